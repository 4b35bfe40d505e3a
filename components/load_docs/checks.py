"""Input checks of the load_docs stage: what a source value means, the splits a source has, the text it holds.

Each check fails with a `StageError` that says what was found and how to fix it, before any paid work: a dataset
without test rows, for one, would otherwise run the whole generation and then stop at evaluate.
"""

import math
from pathlib import Path
from typing import Any

from components.common import SPLITS, StageError
from components.load_docs.markdown import MARKDOWN_SUFFIXES

# Suffixes only a file name has; a Hub id ending in one is far less likely than a typo in a path.
PATH_SUFFIXES = (".parquet", ".json", *MARKDOWN_SUFFIXES)
HOW_TO_ADD_TEST = ("Evaluate needs test chunks: give the parquet a 'split' column with 'train' and 'test' rows (about "
                   "20% test, whole pages on one side), or put train.parquet and test.parquet in one folder and pass "
                   "the folder; a Markdown source needs two pages, or one page of two chunks or more.")


def expand(value: str) -> Path:
    """The path with `~` expanded; unchanged when `~user` names no user (pathlib raises for that)."""
    try:
        return Path(value).expanduser()
    except RuntimeError:
        return Path(value)


def looks_like_path(value: str) -> bool:
    """Whether a dataset or model value is meant as a local path rather than a Hugging Face Hub id.

    A path: it starts with ./ ../ / or ~, ends in a file suffix (.parquet, .md, ...), or its first component
    exists here (`docs/typo` when `docs/` exists). A URI (`gs://...`) is neither.
    """
    if not value or "://" in value:
        return False
    if value in (".", "..") or value.startswith(("./", "../", "/", "~", ".\\", "..\\")):
        return True
    if value.lower().endswith(PATH_SUFFIXES):
        return True
    return Path(Path(value).parts[0]).exists()


def is_hub_id(value: str) -> bool:
    """`owner/name`, valid by the Hub's own rules."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return value.count("/") == 1


def no_such_path(value: str, what: str = "Dataset source") -> StageError:
    """'no such folder or file', naming the nearest folder that does exist and what it holds (typos show)."""
    path = expand(value).absolute()
    parent = next((folder for folder in path.parents if folder.is_dir()), None)
    message = f"{what}: no such folder or file: {value}"
    if parent is not None and parent not in (Path(parent.anchor), Path.cwd()):  # a listing of / or . says little
        listing = sorted(child.name for child in parent.iterdir())
        message += f" ({parent} exists and holds {listing[:20]}{' ...' if len(listing) > 20 else ''})"
    return StageError(message + ".")


def check_source_exists(source: str) -> None:
    """Raise for a local-looking source that does not exist, or a value that is neither a path nor a Hub id."""
    if "://" in source or expand(source).exists():
        return
    if looks_like_path(source):
        raise no_such_path(source)
    if not is_hub_id(source):
        raise StageError(f"Dataset source: no such folder or file: {source} (and not a Hugging Face Hub dataset id, "
                         "which is owner/name).")


def split_by_column(frame: Any, source: str) -> dict[str, Any]:
    """The rows of one parquet file by its `split` column; a clear error without one or with other values."""
    if "split" not in frame:
        raise StageError(f"{source} has no 'split' column, so it has no test rows. {HOW_TO_ADD_TEST}")
    counts = frame["split"].value_counts(dropna=False)
    unknown = {value: int(count) for value, count in counts.items() if value not in SPLITS}
    if unknown:
        listed = ", ".join(f"{'missing' if _is_missing(value) else repr(value)}: {count} row{'s' * (count != 1)}"
                           for value, count in unknown.items())
        raise StageError(f"{source}: the 'split' column has values other than 'train' and 'test' ({listed}). "
                         "Rename them to 'train' or 'test', or drop those rows.")
    return {split: frame[frame["split"] == split].drop(columns="split") for split in SPLITS}


def check_dataset_splits(names: list[str]) -> None:
    """A DatasetDict (saved or from the Hub) needs a train and a test split; others are named, never guessed."""
    missing = [split for split in SPLITS if split not in names]
    if missing:
        raise StageError(
            f"The dataset has splits {sorted(names)}, but {' and '.join(map(repr, missing))} "
            f"{'is' if len(missing) == 1 else 'are'} needed (evaluate scores the test split). Save a copy that has "
            "both, e.g. `d = datasets.load_dataset(ID)['train'].train_test_split(test_size=0.2, seed=0); "
            "d.save_to_disk(DIR)`, then pass DIR.")


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or type(value).__name__ == "NAType"


def check_text_values(values: Any, column: str, split: str) -> None:
    """Raise when the text column holds anything but strings and missing values (missing ones count as empty)."""
    not_text = values.map(lambda value: not isinstance(value, str) and not _is_missing(value))
    if not not_text.any():
        return
    wrong = values[not_text]
    kinds = wrong.map(lambda value: type(value).__name__).value_counts()
    first = wrong.index[0]
    raise StageError(
        f"The {split} split's text column {column!r} holds {len(wrong)} of {len(values)} values that are not text "
        f"({', '.join(f'{kind}: {count}' for kind, count in kinds.items())}; the first, row {first}: "
        f"{wrong.iloc[0]!r:.80}). Convert the column to strings, or name the column that holds the chunk text "
        "with --text-column.")


def check_test_rows(stats: dict[str, Any], source: str) -> None:
    """Raise when no test chunks are left: evaluate would fail after the paid generation."""
    test = stats["splits"]["test"]
    if test["rows"] > 0:
        return
    if test["rows_read"] == 0:
        found = f"{source} has no test rows."
    else:
        found = (f"No test chunk of {source} is left: of {test['rows_read']} read, {test['dropped_empty']} were "
                 f"empty, {test['dropped_duplicates']} duplicates and {test.get('dropped_in_train', 0)} also in "
                 "train.")
    raise StageError(f"{found} {HOW_TO_ADD_TEST}")

