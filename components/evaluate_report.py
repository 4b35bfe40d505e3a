"""The evaluate stage's report: the before/after table with the gain's 95% interval (terminal, Markdown, HTML) and
the plot."""

import base64
import html
from pathlib import Path
from typing import Any

from components.evaluate_stats import GATE_METRIC, METRICS

GAIN_HEADER = f"{GATE_METRIC} gain [95% CI]"


def gain_cell(evaluation: dict[str, Any], dim: str) -> str:
    """The finetuned - base gain of the gate metric at a dimension with its bootstrap interval, e.g.
    "+0.0123 [-0.0040, +0.0290]"."""
    interval = evaluation["intervals"][dim]
    return f"{interval['gain']:+.4f} [{interval['low']:+.4f}, {interval['high']:+.4f}]"


def table_markdown(evaluation: dict[str, Any]) -> str:
    """The before/after table in Markdown: one row per dimension, base and finetuned per metric, the gain's CI."""
    lines = ["| dim | " + " | ".join(f"{metric} base | {metric} finetuned" for metric in METRICS)
             + f" | {GAIN_HEADER} |", "|---:|" + "---:|" * (2 * len(METRICS) + 1)]
    base, tuned = evaluation["models"]["base"]["metrics"], evaluation["models"]["finetuned"]["metrics"]
    for dim in map(str, evaluation["dims"]):
        cells = [f"{base[dim][metric]:.4f} | {tuned[dim][metric]:.4f}" for metric in METRICS]
        lines.append(f"| {dim} | " + " | ".join(cells) + f" | {gain_cell(evaluation, dim)} |")
    return "\n".join(lines)


def format_table(evaluation: dict[str, Any]) -> str:
    """The before/after table for a terminal; the finetuned row carries the gain and its 95% interval."""
    base, tuned = evaluation["models"]["base"]["metrics"], evaluation["models"]["finetuned"]["metrics"]
    header = f"{'dim':>5} {'model':<10}" + "".join(f"{metric:>11}" for metric in METRICS) + f"  {GAIN_HEADER}"
    rows = [header]
    for dim in map(str, evaluation["dims"]):
        for name, values in (("base", base[dim]), ("finetuned", tuned[dim])):
            gain = f"  {gain_cell(evaluation, dim)}" if name == "finetuned" else ""
            rows.append(f"{dim:>5} {name:<10}" + "".join(f"{values[metric]:>11.4f}" for metric in METRICS) + gain)
    return "\n".join(rows)


def plot(evaluation: dict[str, Any], path: Path) -> None:
    """Base vs finetuned per dimension for NDCG@10 (with the finetuned model's 95% interval), MRR@10, Recall@10."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base, tuned = evaluation["models"]["base"]["metrics"], evaluation["models"]["finetuned"]["metrics"]
    dims = [str(dim) for dim in evaluation["dims"]]
    figure, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for axis, metric in zip(axes, ("ndcg@10", "mrr@10", "recall@10")):
        axis.plot(range(len(dims)), [base[d][metric] for d in dims], "o-", label="base")
        axis.plot(range(len(dims)), [tuned[d][metric] for d in dims], "s-", label="finetuned")
        if metric == GATE_METRIC:
            # The interval is on the gain; drawn around the base score it shows where the finetuned score may lie.
            intervals = evaluation["intervals"]
            axis.fill_between(range(len(dims)), [base[d][metric] + intervals[d]["low"] for d in dims],
                              [base[d][metric] + intervals[d]["high"] for d in dims], alpha=0.2,
                              label="95% CI of the gain")
        axis.set_xticks(range(len(dims)), dims)
        axis.set_xlabel("embedding dimension")
        axis.set_title(metric)
        axis.set_ylim(0, 1)
        axis.grid(alpha=0.3)
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def summary_line(evaluation: dict[str, Any]) -> str:
    """What was measured, on how many queries, and how the interval was computed."""
    counts, bootstrap = evaluation["counts"], evaluation["bootstrap"]
    return (f"{counts['queries']} queries (test rows that passed every filter, of {counts['test_rows']}) against a "
            f"corpus of {counts['corpus']} test chunks. Base model: {evaluation['models']['base']['name']}. "
            f"Intervals: paired bootstrap over queries, {bootstrap['resamples']} resamples, seed {bootstrap['seed']}.")


def write_report(evaluation: dict[str, Any], output_dir: Path) -> None:
    """evaluation.md, evaluation.html (self-contained, for the KFP UI) and evaluation.png."""
    plot(evaluation, output_dir / "evaluation.png")
    summary, decision = summary_line(evaluation), evaluation["gate"]["reason"]
    exported = evaluation.get("exported") or {}
    where = ", ".join(f"{key}: {value}" for key, value in exported.items())
    markdown = (f"# Retrieval evaluation: base vs finetuned\n\n{summary}\n\n**{decision}**"
                + (f" Exported to {where}." if where else "") + "\n\n" + table_markdown(evaluation)
                + "\n\n![base vs finetuned per dimension](evaluation.png)\n")
    (output_dir / "evaluation.md").write_text(markdown)
    image = base64.b64encode((output_dir / "evaluation.png").read_bytes()).decode()
    page = (f"<html><head><meta charset='utf-8'><title>Evaluation</title><style>body{{font-family:sans-serif}}"
            f"td,th{{padding:2px 6px;text-align:right}}</style></head><body><h2>Retrieval evaluation: base vs "
            f"finetuned</h2><p>{html.escape(summary)}</p><p><b>{html.escape(decision)}</b>"
            + (f" Exported to {html.escape(where)}." if where else "")
            + f"</p>{_markdown_table_to_html(table_markdown(evaluation))}"
            f"<img src='data:image/png;base64,{image}' alt='base vs finetuned'></body></html>")
    (output_dir / "evaluation.html").write_text(page)


def _markdown_table_to_html(table: str) -> str:
    rows = [line.strip("|").split("|") for line in table.splitlines() if not line.startswith("|---")]
    head = "".join(f"<th>{html.escape(cell.strip())}</th>" for cell in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell.strip())}</td>" for cell in row) + "</tr>"
                   for row in rows[1:])
    return f"<table border='1' cellspacing='0'><tr>{head}</tr>{body}</table>"
