"""The load_docs stage: documentation chunks from the Hub, parquet, a saved DatasetDict or Markdown files.

Output: `train.parquet` and `test.parquet` with the chunk text as `anchor`, the metadata columns kept,
a stable `chunk_id`, and `stats.json` with what was dropped or split and why.
"""


import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kfp.dsl import Dataset, Output

from components.common import (
    ANCHOR,
    METADATA_COLUMNS,
    SPLITS,
    StageError,
    chunk_id,
    get_logger,
    stage_component,
    write_json,
    write_splits,
)
from components.load_docs.checks import (
    check_dataset_splits,
    check_source_exists,
    check_test_rows,
    check_text_values,
    expand,
    split_by_column,
)
from components.load_docs.markdown import (  # noqa: F401 - re-exported: the stage's public API
    MARKDOWN_CHUNK_CHARS,
    MARKDOWN_SUFFIXES,
    MAX_FILE_BYTES,
    chunk_markdown,
    clean_markdown,
    describe_skipped,
    markdown_files,
    markdown_folder_to_splits,
    split_sections,
    split_text,
)
from components.settings import setting
from components.storage import open_file, open_store, read_parquet

log = get_logger("load_docs")

DEFAULT_TEXT_COLUMN = "page_content"
# Chunks longer than this (from parquet or the Hub) are split, not dropped: an LLM prompt and an
# embedding window both have limits, and silently truncating would lose text.
DEFAULT_MAX_CHUNK_CHARS = 8000
# A longer text is no documentation chunk (a log, an export, embedded data): dropped and counted, like a Markdown
# file over MAX_FILE_BYTES, instead of becoming thousands of billed pieces.
MAX_TEXT_CHARS = MAX_FILE_BYTES



@dataclass(frozen=True)
class LoadDocsSettings:
    """Which chunks to load: the stage's pipeline parameters, `run` flags and component arguments."""

    dataset: str = setting("zenml/rag_qa_embedding_questions_0_60_0", "Hub id, parquet file/folder (local or gs://), "
                           "saved DatasetDict or Markdown folder ('': this project's docs)", local="")
    limit: int = setting(0, "at most N chunks per split (0: all)", minimum=0, maximum=10**8)
    text_column: str = setting(DEFAULT_TEXT_COLUMN, "column holding the chunk text")
    docs_base_url: str = setting("", "URL prefix for pages built from Markdown")
    # Part of the task's cache key, which holds `dataset` only as a name: see d2e/fingerprint.py.
    inputs_fingerprint: str = setting("", "content fingerprint of a local run's inputs (dataset files, stage code, "
                                      "local models, packages), set by `pipeline.py run` so its task cache never "
                                      "serves results of other inputs; empty on a cluster", cli=False)


# ---------------------------------------------------------------------------------------------
# Sources


def _is_remote(source: str) -> bool:
    return "://" in source


# A split's files below a folder or prefix: `{split}.parquet`, or `{split}-*.parquet` shards (also under `data/`).
_SPLIT_FILE = r"(data/)?{split}-[^/]*\.parquet|{split}\.parquet"


def _split_files(store) -> dict[str, list[str]]:
    """Each split's parquet files in a store, by name."""
    return {split: sorted(name for name in store.list(split) + store.list(f"data/{split}-")
                          if re.fullmatch(_SPLIT_FILE.format(split=re.escape(split)), name)) for split in SPLITS}


def _read_parquet_source(source: str) -> dict[str, "pandas.DataFrame"] | None:  # noqa: F821
    """Read a parquet file, or each split's parquet files below a folder or gs:// prefix (None: there are none)."""
    import pandas as pd

    if source.endswith(".parquet"):
        store, name = open_file(source)
        if not store.exists(name):
            raise StageError(f"Parquet file {source} does not exist.")
        return split_by_column(read_parquet(store, [name]), source)
    store = open_store(source)
    found = _split_files(store)
    if not any(found.values()):
        return None
    if not found["train"]:
        raise StageError(f"{source} has test data but no train.parquet; both splits are needed.")
    return {split: read_parquet(store, names) if names else pd.DataFrame() for split, names in found.items()}


def _from_dataset_dict(dataset_dict: Any) -> dict[str, "pandas.DataFrame"]:  # noqa: F821
    check_dataset_splits(list(dataset_dict))
    return {split: dataset_dict[split].to_pandas() for split in SPLITS}


def read_source(source: str, test_fraction: float = 0.2,
                docs_base_url: str = "") -> tuple[str, dict[str, Any], dict[str, list[str]]]:
    """Return (kind of source, {split: DataFrame}, {reason: files skipped}) for any supported source."""
    if "://" in source:  # object storage: a parquet prefix
        frames = _read_parquet_source(source)
        if frames is None:
            raise StageError(f"No train.parquet/test.parquet found under {source}.")
        return "parquet", frames, {}
    check_source_exists(source)
    path = expand(source)
    if path.exists():
        if path.is_file() and path.suffix == ".parquet":
            return "parquet", _read_parquet_source(str(path.resolve())), {}
        if path.is_file() and path.suffix.lower() in MARKDOWN_SUFFIXES:
            return "markdown", *markdown_folder_to_splits(path, test_fraction, docs_base_url)
        if path.is_dir():
            if (path / "dataset_dict.json").exists():
                import datasets

                return "saved-dataset", _from_dataset_dict(datasets.load_from_disk(str(path))), {}
            frames = _read_parquet_source(str(path.resolve()))
            if frames is not None:
                return "parquet", frames, {}
            if markdown_files(path):
                return "markdown", *markdown_folder_to_splits(path, test_fraction, docs_base_url)
            listing = sorted(child.name for child in path.iterdir())[:20]
            raise StageError(
                f"{source} is a folder, but holds no train.parquet/test.parquet, no saved DatasetDict "
                f"(dataset_dict.json) and no Markdown files. It contains: {listing}"
            )
        raise StageError(f"{source} is not a parquet file, a Markdown file or a folder.")
    import datasets

    try:
        return "hub", _from_dataset_dict(datasets.load_dataset(source)), {}
    except (ConnectionError, OSError, ValueError) as error:
        raise StageError(
            f"Could not load {source!r} from the Hugging Face Hub ({type(error).__name__}: {error}). "
            "Check the id and the network, or pass a local parquet folder or Markdown folder instead."
        ) from error


def source_files(source: str) -> list[Path] | None:
    """The local files `read_source` reads for `source`, in a stable order; None for a remote source (a gs:// prefix
    or a Hub id) or a path that does not exist. What `pipeline.py run` fingerprints, so it follows read_source's
    choices exactly: one parquet or Markdown file, a saved DatasetDict (every file of its folder), a folder's split
    parquet files, else its Markdown files."""
    path = expand(source) if "://" not in source else None
    if path is None or not path.exists():
        return None
    if path.is_file():
        return [path]
    if (path / "dataset_dict.json").exists():
        return sorted(child for child in path.rglob("*") if child.is_file())
    splits = _split_files(open_store(str(path.resolve())))
    if any(splits.values()):
        return [path.resolve() / name for names in splits.values() for name in names]
    return markdown_files(path)


# ---------------------------------------------------------------------------------------------
# Cleaning


def normalise_split(
    frame: Any, split: str, text_column: str, max_chunk_chars: int
) -> tuple[Any, dict[str, int]]:
    """Rename the text column to `anchor`, drop empty rows, split oversized chunks, drop duplicates."""
    import pandas as pd

    stats = {"rows_read": int(len(frame)), "dropped_empty": 0, "dropped_huge": 0, "dropped_duplicates": 0,
             "split_oversized": 0}
    if len(frame.columns) == 0:
        return pd.DataFrame(columns=[ANCHOR, *METADATA_COLUMNS, "chunk_id"]), stats
    if text_column not in frame.columns:
        if ANCHOR in frame.columns and text_column == DEFAULT_TEXT_COLUMN:
            text_column = ANCHOR  # a dataset this pipeline produced
        else:
            raise StageError(
                f"The {split} split has no text column {text_column!r}. "
                f"Columns found: {sorted(map(str, frame.columns))}. "
                "Pass --text-column with the name of the column that holds the chunk text."
            )
    frame = frame.rename(columns={text_column: ANCHOR}).copy()
    for column in METADATA_COLUMNS:
        if column not in frame.columns:
            frame[column] = 0 if column == "token_count" else ""
    check_text_values(frame[ANCHOR], text_column, split)
    frame[ANCHOR] = frame[ANCHOR].map(lambda value: value if isinstance(value, str) else "")  # missing: empty
    empty = frame[ANCHOR].str.strip() == ""
    stats["dropped_empty"] = int(empty.sum())
    huge = frame[ANCHOR].str.len() > MAX_TEXT_CHARS
    stats["dropped_huge"] = int(huge.sum())
    frame = frame[~empty & ~huge]

    oversized = frame[ANCHOR].str.len() > max_chunk_chars
    stats["split_oversized"] = int(oversized.sum())
    if oversized.any():
        pieces = frame[oversized].copy()
        pieces[ANCHOR] = pieces[ANCHOR].map(lambda text: split_text(text, max_chunk_chars))
        pieces = pieces.explode(ANCHOR)
        pieces["token_count"] = pieces[ANCHOR].map(lambda text: len(text.split()))
        frame = pd.concat([frame[~oversized], pieces], ignore_index=True)

    before = len(frame)
    frame = frame.drop_duplicates(subset=[ANCHOR], keep="first")
    stats["dropped_duplicates"] = int(before - len(frame))
    frame = frame.reset_index(drop=True)
    frame["chunk_id"] = frame[ANCHOR].map(chunk_id)
    frame["token_count"] = pd.to_numeric(frame["token_count"], errors="coerce").fillna(0).astype("int64")
    for column in ("filename", "parent_section", "url"):
        frame[column] = frame[column].fillna("").astype(str)
    return frame, stats


def load_docs(
    source: str,
    output_dir: str | os.PathLike,
    limit: int | None = None,
    text_column: str = DEFAULT_TEXT_COLUMN,
    max_chunk_chars: int = DEFAULT_MAX_CHUNK_CHARS,
    test_fraction: float = 0.2,
    docs_base_url: str = "",
) -> dict[str, Any]:
    """Load, clean and write the chunk dataset; return the statistics written to stats.json."""
    if limit is not None and limit < 0:
        raise StageError(f"limit must be >= 0, got {limit}.")
    log.info("loading %s", source)
    kind, frames, skipped = read_source(source, test_fraction, docs_base_url)
    stats: dict[str, Any] = {"source": source, "source_kind": kind, "splits": {},
                             "skipped_files": {reason: len(names) for reason, names in skipped.items()},
                             "skipped_examples": {reason: names[:20] for reason, names in skipped.items()}}
    if skipped:
        log.warning("skipped files: %s", describe_skipped(skipped))
    cleaned = {}
    for split in SPLITS:
        frame = frames.get(split)
        if frame is None:
            import pandas as pd

            frame = pd.DataFrame()
        cleaned[split], stats["splits"][split] = normalise_split(frame, split, text_column, max_chunk_chars)
    # A chunk in both splits would leak test data into training: keep it in train only.
    leaked = cleaned["test"][ANCHOR].isin(set(cleaned["train"][ANCHOR]))
    stats["splits"]["test"]["dropped_in_train"] = int(leaked.sum())
    cleaned["test"] = cleaned["test"][~leaked].reset_index(drop=True)
    for split in SPLITS:
        if limit:
            cleaned[split] = cleaned[split].head(limit).reset_index(drop=True)
        stats["splits"][split]["rows"] = int(len(cleaned[split]))
    if len(cleaned["train"]) == 0:
        raise StageError(f"No usable chunks in the train split of {source} after dropping empty rows.")
    check_test_rows(stats, source)
    write_splits(cleaned, output_dir)
    write_json(Path(output_dir) / "stats.json", stats)
    for split, values in stats["splits"].items():
        log.info("%s: %d rows (read %d, dropped %d empty, %d over %d characters, %d duplicate; split %d oversized)",
                 split, values["rows"], values["rows_read"], values["dropped_empty"], values["dropped_huge"],
                 MAX_TEXT_CHARS, values["dropped_duplicates"] + values.get("dropped_in_train", 0),
                 values["split_oversized"])
    return stats


@stage_component("load_docs")
def load_docs_component(dataset: str, limit: int, text_column: str, docs_base_url: str, inputs_fingerprint: str,
                        docs: Output[Dataset]):
    """Load documentation chunks (Hub id, parquet folder/prefix, saved DatasetDict or Markdown folder).

    `inputs_fingerprint` is not read: it is there to be part of the task's cache key."""
    from components.load_docs import LoadDocsSettings, load_docs
    from components.settings import from_arguments

    settings = from_arguments(LoadDocsSettings, locals())
    stats = load_docs(settings.dataset, docs.path, limit=settings.limit or None, text_column=settings.text_column,
                      docs_base_url=settings.docs_base_url)
    docs.metadata.update({split: values["rows"] for split, values in stats["splits"].items()})
