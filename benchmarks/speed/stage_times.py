"""Time per 1,000 chunks for each stage of a local run, and the share of it that is fixed pipeline overhead.

`pipeline.py run --no-argilla` (the embedded models, an empty LLM cache) on two sizes of real Kubeflow chunks, each
stage timed from its "started" line to its "done" line (benchmarks/speed/reruns.py reads them). A stage's time is
taken as fixed + per-chunk x chunks: the two sizes give both, so its time for 1,000 chunks is fixed + 1,000 x
per-chunk, and the fixed part (a task's process start, its imports and model load, artifact copies) is the
pipeline's overhead. A bare Python importing torch and sentence-transformers is timed too, as a check: most stages'
fixed part should be about that.
"""

import tempfile
from pathlib import Path

from benchmarks.speed import Row, benchmark
from benchmarks.speed.reruns import import_floor, timed_run, tiny_corpus

PER = 1000
# (train chunks, test chunks) of the small and the large run: the corpus' own 4:1 split, few enough that the large
# run's generation (about 2.5 s a chunk with the embedded LLM on 2 cores) stays near a minute and a half.
SIZES = ((6, 2), (32, 8))
QUICK_SIZES = ((4, 1), (6, 2))


def run_args(work: Path, train: int, test: int) -> list[str]:
    """`pipeline.py run` arguments for the first `train` and `test` chunks, each run with its own outputs and an
    empty LLM cache (nothing served from an earlier run)."""
    corpus = tiny_corpus(work / "docs", list(range(train)), list(range(test)))
    return ["--dataset", str(corpus), "--output-dir", str(work / "out"), "--llm-cache-uri", str(work / "cache"),
            "--no-argilla", "--max-failure-rate", "1.0"]


def fit(small: dict, large: dict, small_chunks: int, large_chunks: int) -> dict[str, dict[str, float]]:
    """Per stage: seconds per chunk, fixed seconds (not below 0), seconds per 1,000 chunks, the fixed share of it."""
    fitted = {}
    for stage in sorted(set(small["tasks"]) & set(large["tasks"])):
        per_chunk = max(0.0, (large["tasks"][stage] - small["tasks"][stage]) / (large_chunks - small_chunks))
        fixed = max(0.0, small["tasks"][stage] - per_chunk * small_chunks)
        per_thousand = fixed + per_chunk * PER
        fitted[stage] = {"per_chunk": per_chunk, "fixed": fixed, "per_thousand": per_thousand,
                         "fixed_share": fixed / per_thousand if per_thousand else 0.0}
    return fitted


def stage_rows(fitted: dict, small: dict, large: dict, sizes: tuple[int, int], floor: float) -> list[Row]:
    """A row per stage (slowest first), then the whole run."""
    rows = []
    for stage, figures in sorted(fitted.items(), key=lambda item: -item[1]["per_thousand"]):
        rows.append(Row(f"local run, {stage}: seconds per {PER:,} chunks", figures["per_thousand"], None, "s",
                        note=f"fixed {figures['fixed']:.1f} s ({figures['fixed_share']:.0%} of it) + "
                             f"{figures['per_chunk']:.3f} s a chunk; measured {small['tasks'][stage]:.1f} s at "
                             f"{sizes[0]} chunks, {large['tasks'][stage]:.1f} s at {sizes[1]}"))
    fixed = sum(figures["fixed"] for figures in fitted.values()) + large["before_tasks"] + large["after_tasks"]
    total = sum(figures["per_thousand"] for figures in fitted.values()) + large["before_tasks"] + large["after_tasks"]
    rows.append(Row(f"local run, all stages: seconds per {PER:,} chunks", total, None, "s",
                    note=f"pipeline overhead (each stage's fixed part, {large['before_tasks']:.1f} s before the first "
                         f"stage, {large['after_tasks']:.1f} s after the last): {fixed:.0f} s, {fixed / total:.1%}; "
                         f"runs of {sizes[0]} and {sizes[1]} chunks took {small['seconds']:.0f} s and "
                         f"{large['seconds']:.0f} s; a bare Python importing torch + sentence-transformers takes "
                         f"{floor:.1f} s"))
    return rows


@benchmark("stage_times")
def stage_times(quick: bool) -> list[Row]:
    """Two local runs of different sizes; each stage's time per 1,000 chunks and its fixed part."""
    sizes = QUICK_SIZES if quick else SIZES
    runs = []
    for train, test in sizes:
        with tempfile.TemporaryDirectory(prefix="bench-stage-times-") as work:
            runs.append(timed_run(run_args(Path(work), train, test)))
    chunks = tuple(train + test for train, test in sizes)
    return stage_rows(fit(runs[0], runs[1], *chunks), runs[0], runs[1], chunks, import_floor())
