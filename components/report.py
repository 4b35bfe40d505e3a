"""The report stage: what each stage did, in an HTML page for the KFP UI, a Markdown file and a Metrics artifact.

The filter counts, query styles and mining summary are read from the rows themselves (the columns of
mine_negatives), so a dataset made before that stage existed still gets a report: all its valid rows count as kept.
"""

import base64
import io
import math
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Output

from components.common import (
    ANCHOR,
    FILTER_STATUS,
    HARD_NEGATIVES,
    MARGIN_REMOVED,
    NEGATIVE,
    POSITIVE,
    QUERY_STYLE,
    SIM_ANCHOR_NEG,
    SIM_ANCHOR_POS,
    SIM_POS_NEG,
    SPLITS,
    get_logger,
    read_json,
    read_splits,
    stage_component,
    training_rows,
    valid_pairs,
    write_json,
)

log = get_logger("report")
SIMILARITIES = (SIM_ANCHOR_POS, SIM_ANCHOR_NEG, SIM_POS_NEG)
EXAMPLES = 3
TEMPLATES = Path(__file__).parent / "report_templates"
# filter_status values of mine_negatives (the round-trip one ends with the rank: "dropped: roundtrip rank 14").
DROPPED_ROUNDTRIP = "dropped: roundtrip rank"
DROPPED_NEAR_DUPLICATE = "dropped: near-duplicate"


# ----------------------------------------------------------------------------------- filters, styles, mining


def filter_counts(frame) -> dict[str, int | None]:
    """How many rows of a split each step kept: generated (valid), failed, dropped by each filter, kept for training.
    The filter counts are None when the rows carry no filter_status (the filters did not run)."""
    valid = valid_pairs(frame)
    kept = len(training_rows(frame))
    counts: dict[str, int | None] = {"rows": len(frame), "generated": len(valid), "failed": len(frame) - len(valid),
                                        "dropped_roundtrip": None, "dropped_near_duplicate": None,
                                        "dropped_other": None, "kept": kept}
    if FILTER_STATUS in frame.columns:
        status = valid[FILTER_STATUS].astype(str)
        counts["dropped_roundtrip"] = int(status.str.startswith(DROPPED_ROUNDTRIP).sum())
        counts["dropped_near_duplicate"] = int((status == DROPPED_NEAR_DUPLICATE).sum())
        counts["dropped_other"] = len(valid) - kept - counts["dropped_roundtrip"] - counts["dropped_near_duplicate"]
    return counts


def style_counts(frame) -> dict[str, dict[str, int]]:
    """Rows, valid rows and kept rows per query style ({} for data without query_style)."""
    if QUERY_STYLE not in frame.columns:
        return {}
    valid, kept = valid_pairs(frame).index, training_rows(frame).index
    return {str(style): {"rows": len(group), "generated": int(group.index.isin(valid).sum()),
                         "kept": int(group.index.isin(kept).sum())}
            for style, group in frame.groupby(QUERY_STYLE, sort=True)}


def _length(value: Any) -> int:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return 0
    return len(value)


def asked_hard_negatives(mining_stats: dict) -> int | None:
    """`num_hard_negatives` from mine_negatives' stats.json (top level or under settings), if it is there."""
    for source in (mining_stats, mining_stats.get("settings") or {}):
        if isinstance(source.get("num_hard_negatives"), int):
            return source["num_hard_negatives"]
    return None


def mining_summary(frame, asked: int | None) -> dict[str, Any] | None:
    """Per split: valid rows mined, mean hard negatives and margin-removed candidates per row, and how many rows got
    fewer hard negatives than asked (`asked` None: the most any row got). None when no mining ran."""
    if HARD_NEGATIVES not in frame.columns:
        return None
    valid = valid_pairs(frame)
    lengths = valid[HARD_NEGATIVES].map(_length)
    asked = asked if asked is not None else int(lengths.max()) if len(lengths) else 0
    margin = valid[MARGIN_REMOVED].astype(float).dropna() if MARGIN_REMOVED in valid.columns else []
    return {"rows": len(valid), "asked": asked, "mean_hard_negatives": _mean(lengths),
            "rows_short": int((lengths < asked).sum()), "mean_margin_removed": _mean(margin)}


def _mean(values) -> float | None:
    return round(float(sum(values) / len(values)), 3) if len(values) else None


def _fraction(part: int, whole: int) -> float:
    return round(part / whole, 4) if whole else 0.0


def filter_metrics(filters: dict, styles: dict, mining: dict) -> dict[str, float]:
    """The numeric part of the filter table, style counts and mining summary, per split."""
    metrics: dict[str, float] = {}
    for split, counts in filters.items():
        metrics[f"{split}_kept_rows"] = counts["kept"]
        metrics[f"{split}_kept_fraction"] = _fraction(counts["kept"], counts["rows"])
        metrics[f"{split}_kept_fraction_of_generated"] = _fraction(counts["kept"], counts["generated"])
        for key in ("dropped_roundtrip", "dropped_near_duplicate"):
            if counts[key] is not None:
                metrics[f"{split}_{key}"] = counts[key]
        for style, numbers in styles.get(split, {}).items():
            metrics[f"{split}_rows_{style}"] = numbers["rows"]
            metrics[f"{split}_kept_{style}"] = numbers["kept"]
        if mining.get(split):
            metrics[f"{split}_rows_short_of_hard_negatives"] = mining[split]["rows_short"]
            if mining[split]["mean_margin_removed"] is not None:
                metrics[f"{split}_mean_margin_removed"] = mining[split]["mean_margin_removed"]
    return metrics


# ----------------------------------------------------------------------------------------------- metrics


def collect_metrics(load_stats: dict, generation_stats: dict, embed_stats: dict, frames: dict) -> dict[str, float]:
    """Flat numeric metrics (the KFP Metrics artifact takes numbers only)."""
    metrics: dict[str, float] = {}
    for split in SPLITS:
        metrics[f"{split}_rows"] = len(frames[split])
        metrics[f"{split}_rows_read"] = load_stats["splits"][split]["rows_read"]
        for column in SIMILARITIES:
            values = frames[split][column].dropna()
            if len(values):
                metrics[f"{split}_mean_{column}"] = round(float(values.mean()), 4)
    for key in ("generated", "cached", "failed", "llm_requests", "llm_retries", "prompt_tokens", "completion_tokens"):
        if key in generation_stats:
            metrics[f"generation_{key}"] = generation_stats[key]
    if generation_stats.get("estimated_cost_usd") is not None:  # None: no known price for the model
        metrics["generation_estimated_cost_usd"] = generation_stats["estimated_cost_usd"]
    metrics["generation_failure_rate"] = round(generation_stats["failure_rate"], 4)
    metrics["embedding_dimension"] = embed_stats["dimension"]
    metrics["chunks_exceeding_model_window"] = sum(s["exceeds_model_window"] for s in embed_stats["splits"].values())
    return metrics


def histogram_png(frames: dict) -> bytes:
    """One small panel per split with the three similarity distributions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(frames), figsize=(4.2 * len(frames), 2.8), dpi=80, squeeze=False)
    for axis, (split, frame) in zip(axes[0], frames.items()):
        for column in SIMILARITIES:
            values = frame[column].dropna()
            if len(values):
                axis.hist(values, bins=20, range=(-1, 1), alpha=0.5, label=column.replace("similarity-", ""))
        axis.set_title(f"{split} ({len(frame)} rows)")
        axis.set_xlabel("cosine similarity")
        axis.legend(fontsize=7)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------- summary


def generation_sentence(metrics: dict) -> str:
    """The generation counts in one sentence: the run summary's line (`pipeline.py run`) and the report's."""
    cost = metrics.get("generation_estimated_cost_usd")
    return (f"Generation: {metrics['generation_generated']} generated, {metrics['generation_cached']} from cache, "
            f"{metrics['generation_failed']} failed; {metrics['generation_llm_requests']} LLM requests "
            f"({metrics.get('generation_llm_retries', 0)} retries); {metrics['generation_prompt_tokens']} prompt + "
            f"{metrics['generation_completion_tokens']} completion tokens; estimated cost "
            + (f"${cost:.4f}." if cost is not None else "unknown (no price for this model: --llm-prices)."))


def summary_lines(metrics: dict) -> list[str]:
    """The run summary as far as the report knows it, for its top section: the rows of each split and the
    generation counts. The retrieval comparison is measured later, by evaluate (its own report)."""
    rows = [f"{split}: {metrics[f'{split}_rows']} rows, {metrics.get(f'{split}_kept_rows', 0)} kept for training"
            for split in SPLITS]
    return [*rows, generation_sentence(metrics),
            "Retrieval, base vs finetuned: in the evaluate stage's output (evaluation.md / evaluation.html)."]


# ----------------------------------------------------------------------------------------------- rendering


def _clip(text: Any, limit: int = 300) -> str:
    text = "" if text is None else str(text)
    return text if len(text) <= limit else text[:limit] + "…"


def _stage_rows(load_stats: dict, generation_stats: dict, embed_stats: dict) -> list[tuple[str, str]]:
    skipped = load_stats.get("skipped_files") or {}
    rows = [("source", f"{load_stats['source']} ({load_stats['source_kind']})" + (
        f"; skipped {sum(skipped.values())} files ({', '.join(f'{k}: {v}' for k, v in sorted(skipped.items()))})"
        if skipped else ""))]
    for split in SPLITS:
        s = load_stats["splits"][split]
        duplicates = s["dropped_duplicates"] + s.get("dropped_in_train", 0)
        rows.append((f"load_docs {split}", f"{s['rows']} rows kept of {s['rows_read']} read; dropped "
                     f"{s['dropped_empty']} empty, {s.get('dropped_huge', 0)} huge, {duplicates} duplicate; split "
                     f"{s['split_oversized']} oversized"))
    g = generation_stats
    rows.append(("generate_queries", f"{g['llm']}: {g['generated']} generated, {g['cached']} from cache, "
                 f"{g['failed']} failed ({100 * g['failure_rate']:.1f}%); {g['llm_requests']} LLM requests "
                 f"({g.get('llm_retries', 0)} retries), {g['prompt_tokens']} prompt + {g['completion_tokens']} "
                 "completion tokens; estimated cost "
                 + (f"${g['estimated_cost_usd']:.4f}" if g.get("estimated_cost_usd") is not None else "unknown")))
    e = embed_stats
    window = sum(s["exceeds_model_window"] for s in e["splits"].values())
    backend = f" ({e['embedding_backend']}, {e['precision']})" if "embedding_backend" in e else ""
    rows.append(("embed_score", f"{e['embedding_model']} on {e['device']}{backend}, dimension {e['dimension']}; "
                 f"{window} chunks exceed the model's {e['max_seq_length']}-token window (their tail is not embedded)"))
    return rows


def _first_line(negatives: Any) -> str:
    return _clip(negatives[0], 150).replace("\n", " ") if _length(negatives) else ""


def _examples(frames: dict) -> list[dict[str, Any]]:
    """The first rows used for training, as the templates show them."""
    examples = []
    for row in training_rows(frames["train"]).head(EXAMPLES).to_dict("records"):
        negatives = row.get(HARD_NEGATIVES)
        examples.append({"anchor": _clip(row[ANCHOR]).replace("\n", " "), "url": row.get("url") or "",
                         "style": row.get(QUERY_STYLE) or "", "positive": str(row[POSITIVE]),
                         "negative": str(row[NEGATIVE]), "similarities": f"{row[SIM_ANCHOR_POS]:.3f} / "
                         f"{row[SIM_ANCHOR_NEG]:.3f}", "hard_negatives": _length(negatives),
                         "first_hard_negative": _first_line(negatives)})
    return examples


@lru_cache(maxsize=2)
def _template(name: str):
    from jinja2 import Environment, StrictUndefined

    environment = Environment(undefined=StrictUndefined, autoescape=name.endswith(".html.jinja2"),
                              trim_blocks=True, lstrip_blocks=True)
    environment.filters["cell"] = lambda value: "n/a" if value is None else str(value).replace("|", "/")
    return environment.from_string((TEMPLATES / name).read_text(encoding="utf-8"))


def render(name: str, context: dict[str, Any]) -> str:
    """Render `report.md.jinja2` or `report.html.jinja2` (autoescaped) with the report's context."""
    return _template(name).render(**context)


def write_report(
    docs_dir: str | os.PathLike, triplets_dir: str | os.PathLike, scored_dir: str | os.PathLike,
    output_dir: str | os.PathLike, mined_dir: str | os.PathLike | None = None,
) -> dict[str, float]:
    """Write report.html, report.md, similarity_histograms.png, metrics.json and stats.json; return the metrics.

    The rows come from `mined_dir` (mine_negatives' output) when given, else from `scored_dir`."""
    load_stats = read_json(Path(docs_dir) / "stats.json")
    generation_stats = read_json(Path(triplets_dir) / "stats.json")
    embed_stats = read_json(Path(scored_dir) / "stats.json")
    has_mining_stats = mined_dir and Path(mined_dir, "stats.json").exists()
    mining_stats = read_json(Path(mined_dir) / "stats.json") if has_mining_stats else {}
    frames = read_splits(mined_dir or scored_dir)
    filters = {split: filter_counts(frame) for split, frame in frames.items()}
    styles = {split: style_counts(frame) for split, frame in frames.items()}
    mining = {split: mining_summary(frame, asked_hard_negatives(mining_stats)) for split, frame in frames.items()}
    metrics = {**collect_metrics(load_stats, generation_stats, embed_stats, frames),
               **filter_metrics(filters, styles, mining)}
    png = histogram_png(frames)
    context = {"summary": summary_lines(metrics),
               "stage_rows": _stage_rows(load_stats, generation_stats, embed_stats), "filters": filters,
               "show_other": any(c["dropped_other"] for c in filters.values()), "styles": styles,
               "mining": {split: summary for split, summary in mining.items() if summary}, "metrics": metrics,
               "examples": _examples(frames), "png_name": "similarity_histograms.png",
               "png_base64": base64.b64encode(png).decode()}
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "similarity_histograms.png").write_bytes(png)
    (output_dir / "report.md").write_text(render("report.md.jinja2", context))
    (output_dir / "report.html").write_text(render("report.html.jinja2", context))
    write_json(output_dir / "metrics.json", metrics)
    write_json(output_dir / "stats.json", {"load_docs": load_stats, "generate_queries": generation_stats,
                                            "embed_score": embed_stats, "mine_negatives": mining_stats,
                                            "filters": filters, "query_styles": styles, "mining": mining})
    log.info("report written: %s", ", ".join(f"{k}={v}" for k, v in metrics.items() if "rows" in k or "fail" in k))
    return metrics


@stage_component("report")
def report_component(
    docs: Input[Dataset],
    triplets: Input[Dataset],
    scored: Input[Dataset],
    report_html: Output[HTML],
    metrics: Output[Metrics],
    report_files: Output[Artifact],
    mined: Input[Dataset] = None,
):
    """Summarise the run for the KFP UI: counts per stage and per filter, similarity histograms, examples."""
    import shutil

    from components.common import write_metrics_file
    from components.report import write_report

    values = write_report(docs.path, triplets.path, scored.path, report_files.path,
                          mined_dir=mined.path if mined is not None else None)
    shutil.copyfile(f"{report_files.path}/report.html", report_html.path)
    for key, value in values.items():
        metrics.log_metric(key, value)
    write_metrics_file(metrics)
