import json

import pandas as pd
import pytest

from components.common import StageError
from components.load_docs import (
    chunk_markdown,
    clean_markdown,
    load_docs,
    markdown_folder_to_splits,
    split_sections,
    split_text,
)
from tests.conftest import write_chunk_folder


def read(folder, split):
    return pd.read_parquet(folder / f"{split}.parquet")


def test_parquet_folder_renames_text_and_keeps_metadata(tmp_path, kubeflow_docs):
    stats = load_docs(str(kubeflow_docs), tmp_path / "out")
    train, test = read(tmp_path / "out", "train"), read(tmp_path / "out", "test")
    source = pd.read_parquet(kubeflow_docs / "train.parquet")
    assert len(train) == len(source) == stats["splits"]["train"]["rows"] == 971
    assert len(test) == 116
    assert "page_content" not in train.columns
    assert train["anchor"].iloc[0] == source["page_content"].iloc[0]
    for column in ("filename", "parent_section", "url", "token_count", "chunk_id"):
        assert column in train.columns
    assert train["url"].iloc[0] == source["url"].iloc[0]
    assert train["chunk_id"].is_unique
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["source_kind"] == "parquet"


def test_limit_applies_per_split(tmp_path, kubeflow_docs):
    stats = load_docs(str(kubeflow_docs), tmp_path / "out", limit=7)
    assert len(read(tmp_path / "out", "train")) == 7
    assert len(read(tmp_path / "out", "test")) == 7
    assert stats["splits"]["train"]["rows_read"] == 971


def test_gs_prefix_with_hub_style_shards_and_a_single_parquet_file(tmp_path, kubeflow_docs, gcs_bucket):
    """Read through components.storage from the real fake-gcs-server: shards under data/, and one file."""
    train = pd.read_parquet(kubeflow_docs / "train.parquet").iloc[:30]
    test = pd.read_parquet(kubeflow_docs / "test.parquet").iloc[:5]
    for name, frame in (("data/train-00000-of-00002.parquet", train.iloc[:20]),
                        ("data/train-00001-of-00002.parquet", train.iloc[20:]), ("data/test-00000.parquet", test),
                        ("data/training-notes/train-x.parquet", test)):  # deeper files are not shards
        frame.to_parquet(tmp_path / "shard.parquet", index=False)
        gcs_bucket.blob(f"docs/{name}").upload_from_filename(str(tmp_path / "shard.parquet"))
    stats = load_docs(f"gs://{gcs_bucket.name}/docs", tmp_path / "out")
    assert stats["source_kind"] == "parquet"
    assert list(read(tmp_path / "out", "train")["anchor"]) == list(train["page_content"])
    assert list(read(tmp_path / "out", "test")["anchor"]) == list(test["page_content"])

    one = pd.concat([train.iloc[20:].assign(split="train"), test.assign(split="test")])
    one.to_parquet(tmp_path / "one.parquet", index=False)
    gcs_bucket.blob("docs/one.parquet").upload_from_filename(str(tmp_path / "one.parquet"))
    load_docs(f"gs://{gcs_bucket.name}/docs/one.parquet", tmp_path / "one")
    assert list(read(tmp_path / "one", "train")["anchor"]) == list(train["page_content"].iloc[20:])
    assert list(read(tmp_path / "one", "test")["anchor"]) == list(test["page_content"])
    with pytest.raises(StageError, match="has no 'split' column, so it has no test rows"):
        load_docs(f"gs://{gcs_bucket.name}/docs/data/train-00001-of-00002.parquet", tmp_path / "shard")
    with pytest.raises(StageError, match="does not exist"):
        load_docs(f"gs://{gcs_bucket.name}/docs/missing.parquet", tmp_path / "none")


def test_missing_text_column_names_it_and_lists_columns(tmp_path):
    frame = pd.DataFrame({"body": ["some text here"], "url": ["u"]})
    write_chunk_folder(tmp_path / "src", frame, frame)
    with pytest.raises(StageError) as error:
        load_docs(str(tmp_path / "src"), tmp_path / "out")
    message = str(error.value)
    assert "'page_content'" in message and "['body', 'url']" in message and "--text-column" in message


def test_custom_text_column(tmp_path):
    frame = pd.DataFrame({"body": ["a first chunk of text", "another chunk"]})
    write_chunk_folder(tmp_path / "src", frame, pd.DataFrame({"body": ["a test chunk"]}))
    load_docs(str(tmp_path / "src"), tmp_path / "out", text_column="body")
    train = read(tmp_path / "out", "train")
    assert list(train["anchor"]) == ["a first chunk of text", "another chunk"]
    assert set(train["parent_section"]) == {""}  # missing metadata is filled, not an error


def test_empty_and_duplicate_rows_are_dropped_and_counted(tmp_path):
    train = pd.DataFrame({"page_content": ["alpha text", "", "   \n", None, "alpha text", "beta text"],
                          "url": list("abcdef")})
    test = pd.DataFrame({"page_content": ["beta text", "gamma text", "gamma text"], "url": list("xyz")})
    write_chunk_folder(tmp_path / "src", train, test)
    stats = load_docs(str(tmp_path / "src"), tmp_path / "out")
    assert list(read(tmp_path / "out", "train")["anchor"]) == ["alpha text", "beta text"]
    assert list(read(tmp_path / "out", "test")["anchor"]) == ["gamma text"]
    assert stats["splits"]["train"] | {} == {"rows_read": 6, "dropped_empty": 3, "dropped_huge": 0,
                                             "dropped_duplicates": 1, "split_oversized": 0, "rows": 2}
    assert stats["splits"]["test"]["dropped_duplicates"] == 1
    assert stats["splits"]["test"]["dropped_in_train"] == 1  # "beta text" would leak train into test


def test_only_empty_rows_is_an_error(tmp_path):
    frame = pd.DataFrame({"page_content": ["", "  "]})
    write_chunk_folder(tmp_path / "src", frame, frame)
    with pytest.raises(StageError, match="No usable chunks"):
        load_docs(str(tmp_path / "src"), tmp_path / "out")


def test_oversized_chunks_are_split_without_losing_text(tmp_path):
    words = [f"word{i}" for i in range(3000)]
    big = "\n\n".join(" ".join(words[i : i + 100]) for i in range(0, 3000, 100))
    frame = pd.DataFrame({"page_content": [big, "small chunk"], "url": ["big", "small"]})
    write_chunk_folder(tmp_path / "src", frame, frame.iloc[1:].replace("small chunk", "test chunk"))
    stats = load_docs(str(tmp_path / "src"), tmp_path / "out", max_chunk_chars=4000)
    train = read(tmp_path / "out", "train")
    pieces = train[train["url"] == "big"]["anchor"]
    assert stats["splits"]["train"]["split_oversized"] == 1
    assert len(pieces) > 1 and pieces.str.len().max() <= 4000
    assert set(" ".join(pieces).split()) == set(words)


def test_saved_dataset_dict(tmp_path):
    import datasets

    dataset = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"page_content": ["one chunk", "two chunk"], "url": ["a", "b"]}),
        "test": datasets.Dataset.from_dict({"page_content": ["three chunk"], "url": ["c"]}),
    })
    dataset.save_to_disk(str(tmp_path / "saved"))
    stats = load_docs(str(tmp_path / "saved"), tmp_path / "out")
    assert stats["source_kind"] == "saved-dataset"
    assert list(read(tmp_path / "out", "test")["anchor"]) == ["three chunk"]


def test_unusable_sources_say_what_was_found(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(StageError, match=r"no train.parquet.*notes.txt"):
        load_docs(str(tmp_path / "empty"), tmp_path / "out")
    with pytest.raises(StageError, match="no such folder or file"):
        load_docs(str(tmp_path / "missing"), tmp_path / "out")


def test_unreachable_hub_dataset_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(StageError, match="Could not load 'nobody/no-such-dataset-xyz' from the Hugging Face Hub"):
        load_docs("nobody/no-such-dataset-xyz", tmp_path / "out")


# Markdown


def test_clean_markdown_strips_front_matter_shortcodes_and_comments():
    text = ('---\ntitle: "Page"\nweight: 3\n---\n# Title\n{{% alert title="Note" %}}Keep me{{% /alert %}}\n'
            '<!-- hidden -->\nBody')
    cleaned = clean_markdown(text)
    assert cleaned == "# Title\nKeep me\n\nBody"


def test_headings_inside_code_fences_do_not_split():
    text = "# A\nintro\n```bash\n# a shell comment\nls\n```\n## B\nmore"
    assert split_sections(text) == ["# A\nintro\n```bash\n# a shell comment\nls\n```", "## B\nmore"]


def test_split_text_respects_limit_and_overlaps():
    paragraphs = [" ".join(f"p{n}w{i}" for i in range(40)) for n in range(20)]
    pieces = split_text("\n\n".join(paragraphs), max_chars=600, overlap=50)
    assert len(pieces) > 3
    assert max(map(len, pieces)) <= 600
    for previous, current in zip(pieces, pieces[1:]):
        first_word = current.split()[0]
        assert first_word in previous.split()[-10:]  # the next piece starts with the previous piece's tail


def test_chunk_markdown_merges_lone_headings():
    text = "# Title\n\n## Section\n" + "Body text. " * 20
    chunks = chunk_markdown(text)
    assert len(chunks) == 1 and chunks[0].startswith("# Title")


def test_markdown_folder_on_the_kubeflow_sources(tmp_path, kubeflow_docs):
    stats = load_docs(str(kubeflow_docs / "markdown"), tmp_path / "out", docs_base_url="https://www.kubeflow.org/docs")
    train, test = read(tmp_path / "out", "train"), read(tmp_path / "out", "test")
    assert stats["source_kind"] == "markdown"
    assert train["anchor"].str.len().max() <= 2000
    assert not train["anchor"].str.contains(r"\{\{[<%]").any()
    assert not set(train["url"]) & set(test["url"])  # split by page
    assert len(test) > 0.1 * (len(train) + len(test))
    row = train[train["url"].str.contains("/pipelines/")].iloc[0]
    assert row["url"].startswith("https://www.kubeflow.org/docs/") and row["parent_section"] == "components"


def test_markdown_folder_skips_tooling_folders_and_single_page_still_has_both_splits(tmp_path):
    docs = tmp_path / "project"
    (docs / ".venv" / "lib").mkdir(parents=True)
    (docs / ".venv" / "lib" / "README.md").write_text("# Not ours\n" + "installed package text " * 20)
    (docs / "README.md").write_text("\n\n".join(f"## Part {i}\n" + f"Content of part {i}. " * 30 for i in range(6)))
    splits, skipped = markdown_folder_to_splits(docs)
    assert skipped == {}
    anchors = pd.concat([splits["train"], splits["test"]])["page_content"]
    assert not anchors.str.contains("Not ours").any()
    assert len(splits["train"]) > 0 and len(splits["test"]) > 0
    assert set(splits["train"]["parent_section"]) == {"root"}
