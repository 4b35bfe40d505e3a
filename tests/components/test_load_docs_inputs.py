"""Bad inputs to load_docs: each is a clear error or a counted, reported drop, found before any paid work."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from components.common import StageError
from components.load_docs import MAX_FILE_BYTES, load_docs, markdown_folder_to_splits, normalise_split
from components.load_docs.checks import looks_like_path
from tests.conftest import PROJECT_ROOT, write_chunk_folder

PAGE = "# A page\n\n" + "Some documentation text about the product. " * 10


def write_pages(folder, count=3):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (folder / f"page{i}.md").write_text(PAGE.replace("A page", f"Page {i}"), encoding="utf-8")
    return folder


# Source resolution


@pytest.mark.parametrize("value", ["./typo", "../typo-folder-xyz", "/no/such/folder", "~/no-such-folder-xyz",
                                   "~no-such-user-xyz/docs",
                                   "docs.parquet", "notes.md", "existing/typo", "a/b/c", "typo"])
def test_a_missing_path_is_no_such_folder_not_a_hub_id(value, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "pages").mkdir()
    with pytest.raises(StageError, match=f"no such folder or file: {value}"):
        load_docs(value, tmp_path / "out")


def test_no_such_folder_lists_the_nearest_existing_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_pages(tmp_path / "docs" / "guides")
    with pytest.raises(StageError, match=r"docs exists and holds \['guides'\]"):
        load_docs("docs/guide", tmp_path / "out")


def test_path_like_values(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs").mkdir()
    assert looks_like_path("docs/typo") and looks_like_path("./x") and looks_like_path("x.parquet")
    assert not looks_like_path("owner/name") and not looks_like_path("gs://bucket/docs")


def test_an_owner_name_that_is_not_here_still_goes_to_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(StageError, match="Could not load 'someone/docs' from the Hugging Face Hub"):
        load_docs("someone/docs", tmp_path / "out")


# Splits


def test_a_parquet_file_without_a_split_column_is_refused(tmp_path):
    pd.DataFrame({"page_content": ["one chunk", "two chunk"]}).to_parquet(tmp_path / "chunks.parquet")
    with pytest.raises(StageError, match="has no 'split' column, so it has no test rows.*'test' rows"):
        load_docs(str(tmp_path / "chunks.parquet"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_parquet_file_with_a_split_column_is_split_by_it(tmp_path):
    frame = pd.DataFrame({"page_content": ["one chunk", "two chunk", "three chunk"],
                          "split": ["train", "train", "test"]})
    frame.to_parquet(tmp_path / "chunks.parquet")
    stats = load_docs(str(tmp_path / "chunks.parquet"), tmp_path / "out")
    assert (stats["splits"]["train"]["rows"], stats["splits"]["test"]["rows"]) == (2, 1)


def test_unknown_split_values_are_listed_with_their_counts(tmp_path):
    frame = pd.DataFrame({"page_content": list("abcdef"),
                          "split": ["train", "test", "validation", "validation", "dev", None]})
    frame.to_parquet(tmp_path / "chunks.parquet")
    with pytest.raises(StageError) as error:
        load_docs(str(tmp_path / "chunks.parquet"), tmp_path / "out")
    message = str(error.value)
    assert "values other than 'train' and 'test'" in message
    assert "'validation': 2 rows" in message and "'dev': 1 row," in message and "missing: 1 row)" in message


def test_a_folder_with_train_only_is_refused_before_generation(tmp_path):
    frame = pd.DataFrame({"page_content": ["one chunk", "two chunk"]})
    (tmp_path / "src").mkdir()
    frame.to_parquet(tmp_path / "src" / "train.parquet")
    with pytest.raises(StageError, match="has no test rows. Evaluate needs test chunks"):
        load_docs(str(tmp_path / "src"), tmp_path / "out")


def test_test_rows_that_all_repeat_train_are_refused_with_the_counts(tmp_path):
    train = pd.DataFrame({"page_content": ["one chunk", "two chunk"]})
    write_chunk_folder(tmp_path / "src", train, pd.DataFrame({"page_content": ["one chunk", " "]}))
    with pytest.raises(StageError, match="of 2 read, 1 were empty, 0 duplicates and 1 also in train"):
        load_docs(str(tmp_path / "src"), tmp_path / "out")


def test_a_dataset_dict_without_a_test_split_names_its_splits(tmp_path):
    import datasets

    rows = datasets.Dataset.from_dict({"page_content": ["one chunk", "two chunk"]})
    datasets.DatasetDict({"train": rows, "validation": rows}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(StageError, match=r"splits \['train', 'validation'\], but 'test' is needed"):
        load_docs(str(tmp_path / "saved"), tmp_path / "out")


def test_a_markdown_page_of_one_chunk_has_no_test_split(tmp_path):
    write_pages(tmp_path / "docs", count=1)
    with pytest.raises(StageError, match="has no test rows.*two pages"):
        load_docs(str(tmp_path / "docs"), tmp_path / "out")


# Text values


@pytest.mark.parametrize("values, kinds", [
    ([1, 2, 3], "int: 3"),
    ([["a list"], ["another"], ["third"]], "ndarray: 3"),  # parquet lists come back as arrays
    ([1.5, None, 2.5], "float: 2"),
])
def test_a_text_column_of_other_types_names_the_column_and_count(values, kinds, tmp_path):
    write_chunk_folder(tmp_path / "src", pd.DataFrame({"body": values}), pd.DataFrame({"body": values}))
    with pytest.raises(StageError) as error:
        load_docs(str(tmp_path / "src"), tmp_path / "out", text_column="body")
    message = str(error.value)
    assert "text column 'body'" in message and f"({kinds};" in message and "--text-column" in message
    assert "empty" not in message


def test_a_few_non_text_values_among_text_are_still_an_error():
    # Parquet columns have one type; an in-memory frame (or a future source) can mix them.
    frame = pd.DataFrame({"page_content": ["a chunk", 42, None, "another chunk"]})
    with pytest.raises(StageError, match=r"holds 1 of 4 values that are not text \(int: 1; the first, row 1: 42\)"):
        normalise_split(frame, "train", "page_content", 8000)


def test_huge_texts_are_dropped_and_counted(tmp_path):
    huge = "word " * (MAX_FILE_BYTES // 5 + 1)
    train = pd.DataFrame({"page_content": ["one chunk", huge, "two chunk"]})
    write_chunk_folder(tmp_path / "src", train, pd.DataFrame({"page_content": ["test chunk"]}))
    stats = load_docs(str(tmp_path / "src"), tmp_path / "out")
    assert stats["splits"]["train"]["dropped_huge"] == 1 and stats["splits"]["train"]["rows"] == 2


# Markdown files


def test_links_out_of_the_folder_are_skipped_and_counted(tmp_path):
    docs = write_pages(tmp_path / "docs")
    (tmp_path / "secret.md").write_text("# Secret\n\n" + "private notes outside the docs folder " * 10)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "other.md").write_text("# Other\n\n" + "text from another folder " * 10)
    (docs / "leak.md").symlink_to(tmp_path / "secret.md")
    (docs / "more").symlink_to(tmp_path / "elsewhere")
    (docs / "alias.md").symlink_to(docs / "page0.md")  # inside the folder: read
    stats = load_docs(str(docs), tmp_path / "out")
    anchors = pd.concat([pd.read_parquet(tmp_path / "out" / f"{split}.parquet") for split in ("train", "test")])
    assert not anchors["anchor"].str.contains("private notes|another folder").any()
    assert stats["skipped_files"] == {"link_outside_folder": 2}
    assert sorted(stats["skipped_examples"]["link_outside_folder"]) == ["leak.md", "more"]
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["skipped_files"] == stats["skipped_files"]


def test_files_that_are_not_utf8_too_large_or_unreadable_are_skipped_and_counted(tmp_path):
    docs = write_pages(tmp_path / "docs")
    (docs / "latin1.md").write_bytes(("# Café\n\n" + "Beschreibung für Übersicht " * 20).encode("latin-1"))
    (docs / "bom.md").write_bytes(("# Bom page\n\n" + "text with a byte order mark " * 10).encode("utf-8-sig"))
    with open(docs / "big.md", "w", encoding="utf-8") as big:
        big.write("# Big\n\n" + "x" * (MAX_FILE_BYTES + 1))
    (docs / "dangling.md").symlink_to(docs / "gone.md")
    splits, skipped = markdown_folder_to_splits(docs)
    anchors = pd.concat(splits.values())["page_content"]
    assert not anchors.str.contains("\ufffd").any() and anchors.str.startswith("# Bom page").any()
    assert skipped == {"not_utf8": ["latin1.md"], "too_large": ["big.md"], "unreadable": ["dangling.md"]}


def test_a_folder_of_only_skipped_files_says_why(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "latin1.md").write_bytes("# Caf\xe9\n\nmore text".encode("latin-1"))
    with pytest.raises(StageError, match=r"no text after cleaning. Skipped: 1 not_utf8 \(latin1.md\)"):
        load_docs(str(docs), tmp_path / "out")


# Markdown cleaning is linear in the input: inputs that took minutes or never finished with the old regexes.
# A subprocess with a generous limit proves "finishes", not a speed.
ADVERSARIAL = {
    "unclosed comments": "'<!--' * 300_000",
    "unclosed shortcodes": "'{{<' * 300_000 + '{{%' * 300_000",
    "unclosed front matter": "'---' + '\\n' * 300_000",
    "one 100 MB line": "'x' * 100_000_000",
}


@pytest.mark.parametrize("name", ADVERSARIAL)
def test_markdown_cleaning_finishes_on_adversarial_input(name):
    code = (f"from components.load_docs import chunk_markdown\ntext = {ADVERSARIAL[name]}\n"
            "chunks = chunk_markdown(text)\nprint(len(chunks), sum(map(len, chunks)))")
    result = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True,
                            timeout=60, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    assert result.returncode == 0, result.stderr[-2000:]
    pieces, characters = map(int, result.stdout.split())
    assert pieces >= 1 and characters > 0
