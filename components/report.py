"""Stage 4, report: what each stage did, in an HTML page for the KFP UI, a Markdown file and a Metrics artifact."""

import base64
import html
import io
import os
from pathlib import Path
from typing import Any

from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Output

from components.common import (
    ANCHOR,
    NEGATIVE,
    POSITIVE,
    SIM_ANCHOR_NEG,
    SIM_ANCHOR_POS,
    SIM_POS_NEG,
    SPLITS,
    get_logger,
    stage_component,
    read_json,
    read_splits,
    write_json,
)

log = get_logger("report")
SIMILARITIES = (SIM_ANCHOR_POS, SIM_ANCHOR_NEG, SIM_POS_NEG)
EXAMPLES = 3


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


def _clip(text: Any, limit: int = 300) -> str:
    text = "" if text is None else str(text)
    return text if len(text) <= limit else text[:limit] + "…"


def _stage_rows(load_stats: dict, generation_stats: dict, embed_stats: dict) -> list[tuple[str, str]]:
    rows = [("source", f"{load_stats['source']} ({load_stats['source_kind']})")]
    for split in SPLITS:
        s = load_stats["splits"][split]
        rows.append((f"load_docs {split}", f"{s['rows']} rows kept of {s['rows_read']} read; dropped {s['dropped_empty']} "
                     f"empty, {s['dropped_duplicates'] + s.get('dropped_in_train', 0)} duplicate; split {s['split_oversized']} oversized"))
    g = generation_stats
    rows.append(("generate_queries", f"{g['llm']}: {g['generated']} generated, {g['cached']} from cache, {g['failed']} failed "
                 f"({100 * g['failure_rate']:.1f}%); {g['llm_requests']} LLM requests ({g.get('llm_retries', 0)} retries), "
                 f"{g['prompt_tokens']} prompt + {g['completion_tokens']} completion tokens; estimated cost "
                 + (f"${g['estimated_cost_usd']:.4f}" if g.get("estimated_cost_usd") is not None else "unknown")))
    e = embed_stats
    window = sum(s["exceeds_model_window"] for s in e["splits"].values())
    rows.append(("embed_score", f"{e['embedding_model']} on {e['device']}, dimension {e['dimension']}; {window} chunks exceed "
                 f"the model's {e['max_seq_length']}-token window (their tail is not embedded)"))
    return rows


def _examples(frames: dict) -> list[dict[str, Any]]:
    train = frames["train"]
    valid = train[train[POSITIVE].notna() & train[NEGATIVE].notna()]
    return valid.head(EXAMPLES).to_dict("records")


def render_markdown(stage_rows, metrics, examples, png_name: str) -> str:
    lines = ["# Synthetic embedding data: run report", "", "| stage | result |", "| --- | --- |"]
    lines += [f"| {name} | {value.replace('|', '/')} |" for name, value in stage_rows]
    lines += ["", f"![similarity histograms]({png_name})", "", "## Metrics", "", "| metric | value |", "| --- | --- |"]
    lines += [f"| {key} | {value} |" for key, value in metrics.items()]
    lines += ["", "## Example triplets", ""]
    for example in examples:
        lines += [f"- **anchor** ({example.get('url', '')}): {_clip(example[ANCHOR]).replace(chr(10), ' ')}",
                  f"  - positive: {example[POSITIVE]}", f"  - negative: {example[NEGATIVE]}",
                  f"  - similarity anchor-positive {example[SIM_ANCHOR_POS]:.3f}, anchor-negative {example[SIM_ANCHOR_NEG]:.3f}"]
    return "\n".join(lines) + "\n"


def render_html(stage_rows, metrics, examples, png: bytes) -> str:
    esc = html.escape
    table = "".join(f"<tr><th>{esc(name)}</th><td>{esc(value)}</td></tr>" for name, value in stage_rows)
    metric_rows = "".join(f"<tr><th>{esc(key)}</th><td>{value}</td></tr>" for key, value in metrics.items())
    example_rows = "".join(
        f"<tr><td>{esc(_clip(e[ANCHOR]))}</td><td>{esc(str(e[POSITIVE]))}</td><td>{esc(str(e[NEGATIVE]))}</td>"
        f"<td>{e[SIM_ANCHOR_POS]:.3f} / {e[SIM_ANCHOR_NEG]:.3f}</td></tr>" for e in examples)
    image = base64.b64encode(png).decode()
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>Run report</title><style>"
        "body{font-family:sans-serif;margin:1em}table{border-collapse:collapse;margin:.5em 0}"
        "td,th{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top;font-size:13px}</style></head><body>"
        f"<h2>Synthetic embedding data: run report</h2><table>{table}</table>"
        f"<img alt='similarity histograms' src='data:image/png;base64,{image}'>"
        f"<h3>Example triplets</h3><table><tr><th>anchor</th><th>positive</th><th>negative</th>"
        f"<th>sim a-p / a-n</th></tr>{example_rows}</table>"
        f"<h3>Metrics</h3><table>{metric_rows}</table></body></html>"
    )


def write_report(
    docs_dir: str | os.PathLike, triplets_dir: str | os.PathLike, scored_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
) -> dict[str, float]:
    """Write report.html, report.md, similarity_histograms.png and metrics.json; return the metrics."""
    load_stats = read_json(Path(docs_dir) / "stats.json")
    generation_stats = read_json(Path(triplets_dir) / "stats.json")
    embed_stats = read_json(Path(scored_dir) / "stats.json")
    frames = read_splits(scored_dir)
    metrics = collect_metrics(load_stats, generation_stats, embed_stats, frames)
    stage_rows = _stage_rows(load_stats, generation_stats, embed_stats)
    examples = _examples(frames)
    png = histogram_png(frames)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "similarity_histograms.png").write_bytes(png)
    (output_dir / "report.md").write_text(render_markdown(stage_rows, metrics, examples, "similarity_histograms.png"))
    (output_dir / "report.html").write_text(render_html(stage_rows, metrics, examples, png))
    write_json(output_dir / "metrics.json", metrics)
    write_json(output_dir / "stats.json", {"load_docs": load_stats, "generate_queries": generation_stats,
                                            "embed_score": embed_stats})
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
):
    """Summarise the run for the KFP UI: counts per stage, failure rate, similarity histograms, examples."""
    import shutil

    from components.report import write_report

    values = write_report(docs.path, triplets.path, scored.path, report_files.path)
    shutil.copyfile(f"{report_files.path}/report.html", report_html.path)
    for key, value in values.items():
        metrics.log_metric(key, value)
