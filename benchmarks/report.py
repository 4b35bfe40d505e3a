"""The benchmark's table (terminal and Markdown) and docs/quality.md."""

import datetime
import os
import platform
from importlib import metadata
from typing import Any, Callable

from benchmarks.figures import meets, share

SMALL_DIM = "64"
VERSIONED = ("torch", "sentence-transformers", "transformers")
FIGURE_LABELS = {
    "echoes": "kept rows that echo a worked example of the prompt (validation.copies_example)",
    "loops": "kept rows that loop (validation.loops)",
    "real_queries": "kept rows that are real queries of their style (question ends in \"?\"; keywords: no \"?\", "
                    "2-8 words, not cut off or a sentence; statement: one sentence; none at the length limit)",
    "kept": "generated rows kept by every filter (kept / rows)",
    "roundtrip_top": "valid rows whose own chunk is in the top 10 for their query (base model)",
    "positive_beats_negative_valid": "valid rows: chunk closer to the positive than to the LLM negative",
    "positive_beats_negative_kept": "kept rows: chunk closer to the positive than to the LLM negative",
}


def with_intervals(results: list[dict[str, Any]], intervals: Callable) -> list[dict[str, Any]]:
    """Each finetuned configuration with `intervals`: dim -> {gain, low, high} of its NDCG@10 minus the base's
    (paired over the same queries); the base is results[0]."""
    base = results[0]
    rows = []
    for result in results:
        row = {key: value for key, value in result.items() if key != "per_query"}
        if "per_query" in result and result is not base:
            row["intervals"] = intervals(base["per_query"], result["per_query"])
        rows.append(row)
    return rows


def dims_of(results: dict[str, Any]) -> list[str]:
    """The full dimension and 64 (when measured)."""
    metrics = results["configs"][0]["metrics"]
    full = str(max(int(dim) for dim in metrics))
    return [full] + ([SMALL_DIM] if SMALL_DIM in metrics and SMALL_DIM != full else [])


def gain_text(row: dict[str, Any], base: dict[str, Any], dim: str) -> str:
    """"+0.0123 (+2.5%) [+0.0040, +0.0210]"; "" for the base."""
    if "intervals" not in row:
        return ""
    interval, base_value = row["intervals"][dim], base["metrics"][dim]["ndcg@10"]
    relative = f" ({100 * interval['gain'] / base_value:+.1f}%)" if base_value else ""
    return f"{interval['gain']:+.4f}{relative} [{interval['low']:+.4f}, {interval['high']:+.4f}]"


def table_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The table's header and cells: per configuration NDCG@10 and its gain at each dim, rows, time."""
    dims, base = dims_of(results), results["configs"][0]
    header = ["configuration", "training rows"]
    for dim in dims:
        header += [f"NDCG@10 @{dim}", f"gain vs base @{dim} [95% CI]"]
    header.append("time")
    cells = []
    for row in results["configs"]:
        if "missing" in row:
            cells.append([row["name"], row["missing"]] + [""] * (2 * len(dims) + 1))
            continue
        line = [row["name"], "" if row.get("training_rows") is None else str(row["training_rows"])]
        for dim in dims:
            line += [f"{row['metrics'][dim]['ndcg@10']:.4f}", gain_text(row, base, dim)]
        cells.append(line + [f"{row['seconds']:.0f} s"])
    return header, cells


def table_text(results: dict[str, Any]) -> str:
    """The table for a terminal."""
    header, cells = table_rows(results)
    widths = [max(len(line[column]) for line in [header, *cells]) for column in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip()
                     for line in [header, *cells])


def table_markdown(results: dict[str, Any]) -> str:
    """The table in Markdown."""
    header, cells = table_rows(results)
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    return "\n".join(lines + ["| " + " | ".join(line) + " |" for line in cells])


def environment() -> dict[str, Any]:
    """The date, the machine and the versions of the libraries that decide the numbers."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    versions = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return {"date": datetime.date.today().isoformat(),
            "machine": {"nproc": nproc, "cpu": cpu or "unknown", "system": platform.platform(),
                        "gpu": gpu_name()}, "versions": versions}


def gpu_name() -> str:
    """The CUDA device the stages used, or "none"."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"


def cell(text: Any, limit: int = 160) -> str:
    """A Markdown table cell: one line, pipes escaped, cut at `limit` characters."""
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def percent(value: float | None) -> str:
    """A share as a percentage, "n/a" for None."""
    return "n/a" if value is None else f"{100 * value:.1f}%"


def figures_markdown(figures: dict[str, Any]) -> str:
    """The generation figures of issue 9 item 0, with the targets met or not."""
    lines = [f"Rows: {figures['rows']} generated, {figures['valid']} valid, {figures['kept']} kept by every filter.",
             "", "| figure | share | count | target met |", "|---|---:|---:|---|"]
    for name, label in FIGURE_LABELS.items():
        value = figures["shares"].get(name)
        count = figures["counts"].get(name, figures["kept"] if name == "kept" else "")
        lines.append(f"| {label} | {percent(value)} | {count} | {meets(name, value)} |")
    lines += ["", "By query style: " + "; ".join(
        f"{style}: {values['rows']} rows, {values['kept']} kept ({percent(share(values['kept'], values['rows']))}), "
        f"{values['real']} of them real" for style, values in figures["by_style"].items()) + "."]
    return "\n".join(lines)


def generation_check_markdown(check: dict[str, Any] | None) -> str:
    """The current code's generation: what it ran on and its figures."""
    if check is None:
        return "Not run this time (`--no-generation-check`): only the fixture's figures below."
    return (f"`make quality` generates with this tree's generate_queries, the embedded LLM "
            f"({', '.join(check['models']) or 'unknown'}) and the local settings, for the {check['chunks']} chunks "
            f"of the corpus's {check['split']} split, {check['queries_per_chunk']} rows per chunk (the query styles "
            "in turn: question, keywords, statement), then runs embed_score and mine_negatives with their defaults "
            f"(round-trip rank among the split's {check['chunks']} chunks). Cached by the code and the corpus: a "
            "change to generation regenerates it.\n\n" + figures_markdown(check["figures"]))


def samples_markdown(samples: list[dict[str, Any]]) -> str:
    """The sample rows as a table."""
    lines = ["| split | style | page | query (positive) | LLM negative | round-trip rank |",
             "|---|---|---|---|---|---:|"]
    for row in samples:
        lines.append(f"| {row['split']} | {row['query_style']} | {cell(row['url'], 80)} | {cell(row['positive'])} | "
                     f"{cell(row['negative'])} | {row['roundtrip_rank']} |")
    return "\n".join(lines)


CONFIG_NOTES = {
    "base": "all-MiniLM-L6-v2 as shipped, not finetuned",
    "in-batch negatives only": "one query per chunk (the question-style row), no round-trip filter, MNRL with the "
                               "batch's other chunks as the only negatives",
    "+ LLM negatives": "as above, plus the generated negative as a hard negative (finetune_negatives=llm)",
    "+ mined negatives": "as above, with mine_negatives' hard negatives instead of the generated one "
                         "(finetune_negatives=mined)",
    "+ round-trip filter": "as above, training only on rows kept by the round-trip filter (roundtrip_k as below)",
    "+ 3 queries per chunk": "as above, with every query style the fixture has (question, keywords, statement)",
}
REGENERATE = """\
.venv/bin/python -m benchmarks.quality generate .cache/quality/generated/test --split test
.venv/bin/python -m benchmarks.quality generate .cache/quality/generated/train --split train
.venv/bin/python -m benchmarks.quality generate .cache/quality/generated/train3 --split train --queries-per-chunk 3
.venv/bin/python -m benchmarks.quality make-fixture .cache/quality/generated/test .cache/quality/generated/train3 \\
    .cache/quality/generated/train
make quality"""


def verdict(results: dict[str, Any]) -> str:
    """Which finetuned configuration scores best at the full dimension, and how it compares with the base."""
    dims, base = dims_of(results), results["configs"][0]
    tuned = [row for row in results["configs"] if "intervals" in row]
    if not tuned:
        return "No finetuned configuration ran."
    full = dims[0]
    best = max(tuned, key=lambda row: row["metrics"][full]["ndcg@10"])
    parts = []
    for dim in dims:
        interval, base_value = best["intervals"][dim], base["metrics"][dim]["ndcg@10"]
        relative = 100 * interval["gain"] / base_value if base_value else float("nan")
        parts.append(f"at {dim} dimensions {relative:+.1f}% relative (interval [{interval['low']:+.4f}, "
                     f"{interval['high']:+.4f}], lower bound {'above' if interval['low'] > 0 else 'not above'} 0)")
    return f"Best at the full dimension: **{best['name']}**: NDCG@10 " + "; ".join(parts) + "."


def settings_markdown(results: dict[str, Any]) -> str:
    """The finetune, mining and bootstrap settings and the stages' times."""
    train, mining, boot = results["train"], results["mining"], results["bootstrap"]
    stage_times = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in results["stage_seconds"].items())
    local = results.get("train_local_defaults", train)
    changed = [f"{name} {local[name]:g}" for name in train if local.get(name) != train[name]]
    epochs = f"{train['epochs']:g} epoch{'' if train['epochs'] == 1 else 's'}"
    return "\n".join([
        f"- finetune: {epochs}, batch size {train['batch_size']}, learning rate "
        f"{train['learning_rate']:g}, warmup ratio {train['warmup_ratio']:g}, seed {train['seed']} (cached MNRL "
        f"mini-batch {train['mini_batch_size']} on a GPU only); MatryoshkaLoss over MultipleNegativesRankingLoss. "
        + (f"A local pipeline run's defaults differ: {', '.join(changed)} (the benchmark trains five configurations; "
           "fewer epochs keep it to minutes on two CPU cores)." if changed else "The local pipeline run's defaults."),
        "- mine_negatives: " + ", ".join(f"{name}={value!r}" for name, value in mining.items()) + " (the stage's "
        "defaults; the configurations without the round-trip filter set roundtrip_k 0).",
        f"- bootstrap: {boot['resamples']} resamples of the queries, seed {boot['seed']}, "
        f"{100 * boot['confidence']:g}% percentile interval of the {boot['metric']} difference.",
        f"- stage times (of the run that computed each; later runs reuse them from the cache): {stage_times}. "
        f"This run took {results['seconds']:.0f} s.",
    ])


def markdown(results: dict[str, Any]) -> str:
    """docs/quality.md."""
    evaluation, machine, versions = results["evaluation"], results["machine"], results["versions"]
    fixture = results["fixture"]
    notes = "\n".join(f"- **{name}**: {note}" for name, note in CONFIG_NOTES.items())
    check = results.get("generation_check")
    current_samples = "" if check is None else (f"20 kept rows of the current code's generation drawn at random "
                                                f"(seed 0):\n\n{samples_markdown(check['samples'])}\n\n")
    return f"""# Quality benchmark

Written by `make quality` (`python -m benchmarks.quality run`) on {results['date']}; do not edit by hand, run it
again. It measures what each part of the training data does to the embedded embedding model (all-MiniLM-L6-v2) on
the Kubeflow documentation: each configuration finetunes the model on the fixture's train split and evaluates it on
the test split.

## Result

{table_markdown(results)}

{verdict(results)}

NDCG@10 at the full dimension and at 64 (Matryoshka truncation); the gain is the configuration's NDCG@10 minus the
base model's on the same queries, with its paired-bootstrap 95% interval. Training rows: the train split's rows that
reached finetuning. Time: finetuning plus evaluation.

## What is compared

{notes}

Every configuration is evaluated on **the same {evaluation['queries']} queries**: the test split's question-style
rows kept by the default filters (valid, round-trip rank within roundtrip_k, not a near-duplicate), each searched
against all {evaluation['corpus']} test chunks, its own chunk the one relevant answer (evaluation set
`{evaluation['id']}`). So the numbers are comparable across rows; the training data is what differs. Nothing of the
test split reaches training (the mining and the filters work per split).

## Settings

{settings_markdown(results)}

## Machine and versions

- {machine['nproc']} CPUs ({machine['cpu']}), GPU: {machine['gpu']}; {machine['system']}
- """ + ", ".join(f"{name} {version}" for name, version in versions.items()) + f"""

## Generation figures (issue 9, item 0)

### The current code

{generation_check_markdown(check)}

### The fixture

The fixture's queries (generated by {", ".join(fixture["models"]) or "unknown"}, with the code of the commit that
`benchmarks/data/README.md` names, which may be older than this tree's: the figures above are the current code's),
after mine_negatives with its default settings (both splits). These rows are what the configurations train on.

{figures_markdown(results['figures'])}

## What the rows look like

{current_samples}20 kept rows of the fixture drawn at random (seed 0):

{samples_markdown(results['samples'])}

## The fixture and how to regenerate it

`{fixture['path']}` (sha256 `{fixture['sha256_16']}…`): the rows generate_queries wrote for the Kubeflow corpus in
`../shared/data/kubeflow-docs` with the embedded LLM and the local settings; provenance, counts and the corpus's
CC BY 4.0 attribution are in `benchmarks/data/README.md`, with the commit whose generation code wrote it.
Generating takes hours on two cores (the LLM cache makes a second run fast; the third command's question rows come
from the cache of the second, and make-fixture takes a row from the last folder that has it, so the question rows
are the second command's); the benchmark itself re-runs only embed_score, mine_negatives, finetune and evaluate:

```
{REGENERATE}
```

`make quality ARGS="--epochs 1 --batch-size 32"` changes the finetune settings; stage outputs are cached in
`.cache/quality/` (keyed by their inputs, settings and code; `--fresh` clears it).
"""
