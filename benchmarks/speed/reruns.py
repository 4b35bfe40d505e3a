"""Re-runs: a tiny local pipeline run twice (same output folder, same LLM cache); the second run's time over the first.

`pipeline.py run --no-argilla` on a few real Kubeflow chunks, as a subprocess, twice. The run's output is read line
by line as it arrives, so each stage's wall time (from the run's "[n/9] stage started" line to its "done in" line)
is known, and the time spent before the first stage (imports, compiling the pipeline) too. A bare Python process that
imports what a stage imports (torch and sentence-transformers) is timed as well: the floor every task pays locally.
"""

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.speed import Row, benchmark
from benchmarks.speed.data import KUBEFLOW_DOCS, PROJECT_ROOT

# The run's own stage lines (d2e/progress.py): "[2/9] generate_queries started", "... done in 14.2 s: ...".
TASK_START = re.compile(r"^\[\d+/\d+\] (\w+) started")
TASK_END = re.compile(r"^\[\d+/\d+\] (\w+) (?:done in|FAILED after)")
ANSI_COLOUR = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
TARGET = 0.10


def tiny_corpus(folder: Path, train_rows: list[int], test_rows: list[int]) -> Path:
    """A few real chunks in the source schema (train and test split files)."""
    import pandas as pd

    folder.mkdir(parents=True)
    for split, rows in (("train", train_rows), ("test", test_rows)):
        pd.read_parquet(KUBEFLOW_DOCS / f"{split}.parquet").iloc[rows].to_parquet(folder / f"{split}.parquet",
                                                                                  index=False)
    return folder


def timed_run(args: list[str]) -> dict:
    """Run `pipeline.py run ARGS`; total seconds, seconds before the first task, each task's seconds."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "pipeline.py", "run", *args], cwd=PROJECT_ROOT, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    opened, tasks, first_task, tail = {}, {}, None, []
    for line in process.stdout:
        now = time.perf_counter() - started
        line = ANSI_COLOUR.sub("", line)
        tail = (tail + [line])[-40:]
        if match := TASK_START.search(line):
            opened[match.group(1)] = now
            first_task = now if first_task is None else first_task
        elif (match := TASK_END.search(line)) and match.group(1) in opened:
            tasks[match.group(1)] = now - opened.pop(match.group(1))
    if process.wait():
        raise RuntimeError("pipeline.py run failed:\n" + "".join(tail))
    return {"seconds": time.perf_counter() - started, "before_tasks": first_task or 0.0, "tasks": tasks}


def import_floor() -> float:
    """Seconds for a fresh Python to import torch and sentence-transformers (what most stage processes import)."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, sentence_transformers, components.common"], cwd=PROJECT_ROOT,
                   check=True, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    return time.perf_counter() - started


def task_times(run: dict) -> str:
    """`task 12.3 s, ...`, slowest first."""
    return ", ".join(f"{name} {seconds:.0f} s" for name, seconds in sorted(run["tasks"].items(), key=lambda x: -x[1]))


def tiny_run_args(work: Path, quick: bool) -> list[str]:
    """`pipeline.py run` arguments for 3 train and 2 test chunks, outputs and LLM cache under `work`."""
    corpus = tiny_corpus(work / "docs", [3, 10, 20], [0, 5])
    args = ["--dataset", str(corpus), "--output-dir", str(work / "out"), "--llm-cache-uri", str(work / "cache"),
            "--no-argilla", "--max-failure-rate", "1.0"]
    return args + (["--finetune-epochs", "0.5"] if quick else [])


def rerun_row(first: dict, second: dict, floor: float) -> Row:
    """The figure: the second run's time over the first, and where the second run spends it."""
    # A task that took less than the floor imports less (load_docs, report, export, publish): count what it took.
    overhead = second["before_tasks"] + sum(min(seconds, floor) for seconds in second["tasks"].values())
    note = (f"target <= {TARGET:.0%}; second run: {second['before_tasks']:.0f} s before the first task, then "
            f"{task_times(second)}; a bare Python importing torch + sentence-transformers takes {floor:.1f} s, "
            f"so about {overhead:.0f} s of the second run's {second['seconds']:.0f} s is process start and imports; "
            f"first run: "
            f"{task_times(first)}")
    return Row("second identical local run / first", second["seconds"], first["seconds"], "s", note=note)


@benchmark("reruns")
def reruns(quick: bool) -> list[Row]:
    """Two identical runs of a tiny pipeline."""
    with tempfile.TemporaryDirectory(prefix="bench-reruns-") as work:
        args = tiny_run_args(Path(work), quick)
        first, second = timed_run(args), timed_run(args)
    return [rerun_row(first, second, import_floor())]
