"""publish, the Hugging Face Hub target: the dataset as DatasetDict(train, test) and its dataset card.

The token comes from the environment only (HF_TOKEN; the Kubernetes secret `hf-token` in the cluster).
"""

import json
import os
from pathlib import Path
from typing import Any

from components.common import (
    ANCHOR,
    ANCHOR_VECTOR,
    FILTER_STATUS,
    HARD_NEGATIVE_IDS,
    HARD_NEGATIVES,
    HF_TOKEN_ENV,
    KEPT,
    MARGIN_REMOVED,
    NEGATIVE,
    POSITIVE,
    QUERY_STYLE,
    QUERY_VARIANT,
    ROUNDTRIP_RANK,
    SIMILARITIES,
    StageError,
    get_logger,
    read_json,
)

log = get_logger("publish")

# What the card says about each column the data has (columns not listed here are diagnostics).
COLUMN_DOCS = {
    ANCHOR: "the documentation chunk",
    POSITIVE: "a query the chunk answers, written by the LLM",
    NEGATIVE: "a query the chunk does not answer, written by the LLM",
    QUERY_STYLE: "the kind of query: question, keywords (a search phrase) or statement",
    QUERY_VARIANT: "which of the chunk's queries of that style the row is (0, 1, ...)",
    ANCHOR_VECTOR: "the chunk's embedding",
    ROUNDTRIP_RANK: "rank of the row's own chunk for its positive among all chunks of its split (1 = first; "
                    "null for failed rows)",
    FILTER_STATUS: f"`{KEPT}`, or why the row is not used for training (`dropped: generation failed`, "
                   "`dropped: roundtrip rank N`, `dropped: near-duplicate`)",
    HARD_NEGATIVES: "chunks of the same split mined as hard negatives for the positive",
    HARD_NEGATIVE_IDS: "their chunk_ids",
    MARGIN_REMOVED: "how many mining candidates scored too close to the positive and were left out",
}


def _similarity_table(embed_stats: dict) -> list[str]:
    lines = ["| split | rows | " + " | ".join(f"mean {name}" for name in SIMILARITIES) + " |",
             "| --- | --- | " + " | ".join("---" for _ in SIMILARITIES) + " |"]
    for split, stats in sorted(embed_stats.get("splits", {}).items()):
        means = []
        for name in SIMILARITIES:
            mean = (stats.get(name) or {}).get("mean")
            means.append("n/a" if mean is None else f"{mean:.4f}")
        lines.append(f"| {split} | {stats.get('rows', '?')} | " + " | ".join(means) + " |")
    return lines


def _filter_lines(filters: dict) -> list[str]:
    """The report's filter counts per split (stats.json `filters`) as a table; nothing for older reports."""
    if not filters:
        return []
    header = "| split | rows | generated | failed | dropped: round-trip | dropped: near-duplicate | kept for training |"
    lines = ["## Filters", "", header, "| --- | --- | --- | --- | --- | --- | --- |"]
    for split, counts in sorted(filters.items()):
        cells = [counts.get(key) for key in ("rows", "generated", "failed", "dropped_roundtrip",
                                             "dropped_near_duplicate", "kept")]
        lines.append(f"| {split} | " + " | ".join("n/a" if cell is None else str(cell) for cell in cells) + " |")
    return [*lines, ""]


def _column_lines(frames: dict[str, Any]) -> list[str]:
    columns = {column for frame in frames.values() for column in frame.columns}
    return ["## Columns", "", *(f"- `{name}`: {text}" for name, text in COLUMN_DOCS.items() if name in columns), ""]


def dataset_card(repo_id: str, frames: dict[str, Any], stats: dict, metrics: dict, run_id: str) -> str:
    """The README.md of the Hub dataset: what it is and exactly how it was made."""
    load, generation = stats.get("load_docs", {}), stats.get("generate_queries", {})
    embed = stats.get("embed_score", {})
    settings = generation.get("settings", {})
    context = settings.get("context", "")
    failure_rate = generation.get("failure_rate", metrics.get("generation_failure_rate"))
    counts = " | ".join(f"{split}: {len(frame)}" for split, frame in frames.items())
    llm_settings = {k: v for k, v in settings.items() if k not in ("context", "cache")}
    lines = [
        "---",
        "task_categories:",
        "- sentence-similarity",
        "tags:",
        "- embeddings",
        "- synthetic",
        "- docs-to-embeddings",
        "---",
        "",
        f"# {repo_id}",
        "",
        "Synthetic (anchor, positive, negative) triplets for fine-tuning embedding models: each anchor is a "
        "documentation chunk, `positive` a query it answers and `negative` a query it does not, written by an LLM "
        "and scored with an embedding model. Made by the docs-to-embeddings Kubeflow pipeline.",
        "",
        "## Provenance",
        "",
        f"- **Source dataset:** {load.get('source', 'unknown')} ({load.get('source_kind', 'unknown')})",
        f"- **LLM:** {generation.get('llm', 'unknown')} (provider: {generation.get('provider', 'unknown')})",
        f"- **LLM settings:** `{json.dumps(llm_settings, sort_keys=True)}`",
        f"- **Context prompt:** {context}",
        f"- **Embedding model:** {embed.get('embedding_model', 'unknown')} (dimension {embed.get('dimension', '?')})",
        f"- **Pipeline run:** {run_id or 'unknown'}",
        "",
        "## Counts",
        "",
        f"- **Rows:** {counts}",
        f"- **Generation:** {generation.get('generated', 0)} generated, {generation.get('cached', 0)} from cache, "
        f"{generation.get('failed', 0)} failed",
        f"- **Failure rate:** {failure_rate}",
        "",
        "Rows whose generation failed are kept with empty `positive`/`negative` and NaN similarities "
        "(`generation_status` says which); drop them before training. Rows the filters dropped are kept too: "
        f"train only on rows whose `{FILTER_STATUS}` is `{KEPT}` (where the column exists).",
        "",
        *_filter_lines(stats.get("filters") or {}),
        *_column_lines(frames),
        "## Similarity statistics",
        "",
        *_similarity_table(embed),
        "",
    ]
    return "\n".join(lines)


def read_report_stats(report_dir: "str | os.PathLike") -> tuple[dict, dict]:
    """The report's stats.json and metrics.json (empty dicts when the report folder lacks them)."""
    report_dir = Path(report_dir)
    for name in ("stats.json", "metrics.json"):
        if not (report_dir / name).exists():
            raise StageError(f"The report files lack {name} (expected in {report_dir}); was the report stage run?")
    return read_json(report_dir / "stats.json"), read_json(report_dir / "metrics.json")


def publish_to_hub(
    frames: dict[str, Any], report_dir: "str | os.PathLike", repo_id: str, token: str = "", private: bool = True,
    run_id: str = "",
) -> dict[str, Any]:
    """Push DatasetDict(train, test) to `repo_id`, then its dataset card (README.md).

    The token: `token` when given (tests), else HF_TOKEN, passed from the environment straight into each call, so
    that no variable of the run holds it for a traceback to show.
    """
    from datasets import Dataset, DatasetDict
    from huggingface_hub import HfApi

    if not (token or os.environ.get(HF_TOKEN_ENV)):
        raise StageError(f"Pushing to the Hub repo {repo_id} needs a token in the {HF_TOKEN_ENV} environment "
                         "variable (a Kubernetes secret in the cluster).")
    stats, metrics = read_report_stats(report_dir)
    # Vectors as plain float lists so the Hub's parquet has a list<float> column, not numpy objects.
    dataset = DatasetDict({
        split: Dataset.from_pandas(frame.assign(**{ANCHOR_VECTOR: frame[ANCHOR_VECTOR].map(
            lambda v: None if v is None else [float(x) for x in v])}), preserve_index=False)
        for split, frame in frames.items()
    })
    dataset.push_to_hub(repo_id, private=private, token=token or os.environ.get(HF_TOKEN_ENV))
    card = dataset_card(repo_id, frames, stats, metrics, run_id)
    HfApi(token=token or os.environ.get(HF_TOKEN_ENV)).upload_file(
        path_or_fileobj=card.encode(), path_in_repo="README.md", repo_id=repo_id, repo_type="dataset",
        commit_message="Dataset card: provenance of this export")
    log.info("Hub: pushed %s to %s (%s)", {s: len(f) for s, f in frames.items()}, repo_id,
             "private" if private else "public")
    return {"repo_id": repo_id, "private": private, "rows": {split: len(frame) for split, frame in frames.items()}}
