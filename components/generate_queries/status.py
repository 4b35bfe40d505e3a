"""The per-row status columns, and the only functions that write them (so every row carries the same fields)."""

from typing import Any, Optional

from components.common import MODEL_NAME, NEGATIVE, POSITIVE
from components.generate_queries.llm import Attempt

STATUS_COLUMNS = (
    "generation_status",  # generated | cached | failed
    "generation_error",
    "review_flag",
    "generation_attempts",
    "generation_requests",  # HTTP requests / local generations made for the row, retries included
    "llm_retries",  # requests repeated after a transport fault (429, 5xx, timeout, dropped connection, bad body)
    "prompt_tokens",
    "completion_tokens",
)
GENERATED_COLUMNS = (POSITIVE, NEGATIVE, MODEL_NAME, *STATUS_COLUMNS)


# Text outputs that may have no value. distilabel writes each batch to its own parquet file and reads them back as one
# dataset: a column that is all None in one batch (typed null) and text in another cannot be read back. Between the
# task and the run they travel as "" and are turned back into None.
OPTIONAL_TEXT = (POSITIVE, NEGATIVE, "generation_error", "review_flag")


def for_transport(row: dict[str, Any]) -> dict[str, Any]:
    """The row with missing optional texts as "" (see OPTIONAL_TEXT)."""
    return {**row, **{key: "" for key in OPTIONAL_TEXT if row.get(key) is None}}


def from_transport(row: dict[str, Any]) -> dict[str, Any]:
    """The row with "" optional texts as None again."""
    return {**row, **{key: None for key in OPTIONAL_TEXT if row.get(key) == ""}}


def new_status(model_label: str, error: Optional[str] = None) -> dict[str, Any]:
    """The output fields of a row before any attempt: failed until a pair is accepted, no pair, zero counts."""
    return {POSITIVE: None, NEGATIVE: None, MODEL_NAME: model_label, "generation_status": "failed",
            "generation_error": error, "review_flag": None, "generation_attempts": 0, "generation_requests": 0,
            "llm_retries": 0, "prompt_tokens": 0, "completion_tokens": 0}


def record_attempt(row: dict[str, Any], number: int, attempt: Attempt) -> None:
    """Count one attempt on the row: its requests (retries included) and tokens."""
    row["generation_attempts"] = number
    row["generation_requests"] += int(attempt.sent) + attempt.retries
    row["llm_retries"] += attempt.retries
    row["prompt_tokens"] += attempt.prompt_tokens
    row["completion_tokens"] += attempt.completion_tokens


def record_failure(row: dict[str, Any], reason: str) -> None:
    """Why the latest attempt gave no usable pair (kept when no later attempt succeeds)."""
    row["generation_error"] = reason


def record_pair(row: dict[str, Any], pair: dict[str, str], status: str) -> None:
    """The accepted pair: `generated` now or `cached` from an earlier run."""
    row.update({POSITIVE: pair[POSITIVE], NEGATIVE: pair[NEGATIVE], "generation_status": status,
                "generation_error": None})


def record_review_flag(row: dict[str, Any], flag: Optional[str]) -> None:
    """A hint for human review on a row that has a pair."""
    row["review_flag"] = flag
