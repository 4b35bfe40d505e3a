"""The local run's inputs fingerprint (d2e/fingerprint.py): it changes with what load_docs reads and only with that,
and kfp.local's task cache, keyed with it, never serves load_docs' results for an edited dataset at the same path."""

import os

import pandas as pd
from kfp import dsl

from components.common import EMBEDDED_EMBEDDING_MODEL
from components.load_docs import load_docs_component
from d2e.console import kfp_local
from d2e.fingerprint import fingerprint
from d2e.targets import configure_task
from tests.conftest import PROJECT_ROOT, write_chunk_folder

PAGE = "# Page {i}\n\nSome documentation text about installing the product on a cluster. " * 3


def write_pages(folder, count=3):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (folder / f"page{i}.md").write_text(PAGE.format(i=i), encoding="utf-8")
    return folder


def settings(dataset, **models):
    return {"dataset": str(dataset), "embedding_model": EMBEDDED_EMBEDDING_MODEL, "miner_model": "", "llm": "local",
            **models}


def test_a_markdown_folder_s_fingerprint_follows_the_bytes_of_the_pages_load_docs_reads(tmp_path):
    docs = write_pages(tmp_path / "docs")
    first = fingerprint(settings(docs))
    assert len(first) == 32 and fingerprint(settings(docs)) == first
    page = docs / "page1.md"
    os.utime(page, (1, 1))  # another time, the same bytes (a `git checkout`, a copy)
    assert fingerprint(settings(docs)) == first
    # Files load_docs does not read: another suffix, a hidden or tooling folder.
    (docs / "notes.txt").write_text("not documentation")
    for folder in (".git", "node_modules"):
        (docs / folder).mkdir()
        (docs / folder / "x.md").write_text("# Not read\n\ntext")
    assert fingerprint(settings(docs)) == first
    # An edit of the same size, its time put back: still seen.
    stat = page.stat()
    page.write_text(PAGE.format(i=1).replace("cluster", "clustex"), encoding="utf-8")
    os.utime(page, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert page.stat().st_size == stat.st_size and fingerprint(settings(docs)) != first
    page.write_text(PAGE.format(i=1), encoding="utf-8")
    assert fingerprint(settings(docs)) == first
    page.rename(docs / "renamed.md")  # a page's name is its url and decides its split
    assert fingerprint(settings(docs)) != first
    (docs / "renamed.md").rename(page)
    (docs / "page3.md").write_text(PAGE.format(i=3))
    assert fingerprint(settings(docs)) != first


def test_a_parquet_folder_s_fingerprint_covers_its_split_files_only(tmp_path, small_chunks):
    first = fingerprint(settings(small_chunks))
    (small_chunks / "README.md").write_text("# About these chunks\n\ntext")  # split files win: this is not read
    assert fingerprint(settings(small_chunks)) == first
    frame = pd.read_parquet(small_chunks / "test.parquet")
    frame.loc[0, "page_content"] += " edited"
    frame.to_parquet(small_chunks / "test.parquet", index=False)
    assert fingerprint(settings(small_chunks)) != first


def test_stage_code_local_models_and_remote_inputs(tmp_path, monkeypatch):
    import d2e.fingerprint as module

    docs = write_pages(tmp_path / "docs")
    code = tmp_path / "components"
    code.mkdir()
    (code / "stage.py").write_text("X = 1\n")
    monkeypatch.setattr(module, "STAGE_CODE", code)
    first = fingerprint(settings(docs))
    (code / "stage.py").write_text("X = 2\n")  # the stages import this project's code: an edit re-runs them
    assert fingerprint(settings(docs)) != first
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights")
    with_model = fingerprint(settings(docs, embedding_model=str(model)))
    os.utime(model / "model.safetensors", (1, 1))  # weights are compared by name, size and time
    assert fingerprint(settings(docs, embedding_model=str(model))) != with_model
    # Nothing on this machine to fingerprint: the run keeps the task cache off.
    assert fingerprint(settings("zenml/rag_qa_embedding_questions_0_60_0")) is None
    assert fingerprint(settings("gs://bucket/chunks")) is None
    assert fingerprint(settings(docs, embedding_model="Snowflake/snowflake-arctic-embed-l")) is None


@dsl.pipeline(name="load-only")
def load_only(dataset: str, inputs_fingerprint: str):
    task = load_docs_component(dataset=dataset, limit=0, text_column="page_content", docs_base_url="",
                               inputs_fingerprint=inputs_fingerprint)
    configure_task(task, "load_docs", local=True)


def loaded_texts(root) -> list[tuple[str, str]]:
    """(run folder, the chunks' text) of each run that executed load_docs, oldest first."""
    folders = sorted(root.glob("*/load-docs-component/docs"), key=lambda path: path.stat().st_mtime)
    return [(folder.parts[-3], " ".join(pd.read_parquet(folder / "train.parquet")["anchor"])) for folder in folders]


def test_an_edited_dataset_at_the_same_path_is_not_served_stale(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(PROJECT_ROOT))
    docs = write_pages(tmp_path / "docs")
    root = tmp_path / ".kfp"

    def run(inputs_fingerprint):
        with kfp_local(root, cache=True):
            load_only(dataset=str(docs), inputs_fingerprint=inputs_fingerprint)
        return loaded_texts(root)

    assert len(run(fingerprint(settings(docs)))) == 1
    assert len(run(fingerprint(settings(docs)))) == 1  # unchanged: served from the cache, no new run folder
    (docs / "page0.md").write_text(PAGE.format(i=0).replace("installing", "upgrading"), encoding="utf-8")
    runs = run(fingerprint(settings(docs)))
    assert len(runs) == 2 and "upgrading" in runs[-1][1] and "upgrading" not in runs[0][1]
    # Without the fingerprint the key holds the path alone: what the task cache would otherwise have done.
    run("")
    (docs / "page0.md").write_text(PAGE.format(i=0).replace("installing", "removing"), encoding="utf-8")
    stale = run("")
    assert len(stale) == 3 and "removing" not in stale[-1][1]


def test_a_parquet_source_lists_the_files_read_source_reads(tmp_path, small_chunks):
    from components.load_docs import source_files

    assert [path.name for path in source_files(str(small_chunks))] == ["train.parquet", "test.parquet"]
    shards = write_chunk_folder(tmp_path / "shards" / "data", pd.read_parquet(small_chunks / "train.parquet"),
                                pd.read_parquet(small_chunks / "test.parquet"))
    (shards / "train.parquet").rename(shards / "train-00000-of-00001.parquet")
    (shards / "test.parquet").rename(shards / "test-00000-of-00001.parquet")
    assert [path.name for path in source_files(str(tmp_path / "shards"))] == [
        "train-00000-of-00001.parquet", "test-00000-of-00001.parquet"]
    assert source_files(str(small_chunks / "train.parquet")) == [small_chunks / "train.parquet"]
