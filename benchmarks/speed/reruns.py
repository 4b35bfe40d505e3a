"""Re-runs: a tiny local pipeline run twice (same output folder, same LLM cache); the second run's time over the first.

`pipeline.py run --no-argilla` on a few real Kubeflow chunks, as a subprocess, twice. The run's output is read line
by line as it arrives, so each stage's wall time (from the run's "[n/10] stage started" line to its "done in" line)
is known, which stages kfp.local's task cache served ("served from the cache" lines), and the time spent before the
first stage (imports, fingerprinting the inputs, building the pipeline) and after the last (moving the results into
place, the summary). A bare Python process that imports what a stage imports (torch and sentence-transformers) is
timed as well: the floor every task that runs pays locally.
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

# The run's own stage lines (d2e/progress.py): "[2/10] generate_queries started", "... done in 14.2 s: ...".
TASK_START = re.compile(r"^\[\d+/\d+\] (\w+) started")
TASK_END = re.compile(r"^\[\d+/\d+\] (\w+) (?:done in|FAILED after)")
TASK_CACHED = re.compile(r"^\[\d+/\d+\] (\w+) served from the cache")
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


def read_lines(process: subprocess.Popen, started: float) -> list[tuple[float, str, str]]:
    """(seconds since `started`, "stdout" or "stderr", line) for every line of both pipes, as they arrived."""
    import queue
    import threading

    arrived: queue.Queue = queue.Queue()

    def pump(stream, name):
        for line in stream:
            arrived.put((time.perf_counter() - started, name, line))
        arrived.put(None)

    readers = [threading.Thread(target=pump, args=(stream, name), daemon=True)
               for stream, name in ((process.stdout, "stdout"), (process.stderr, "stderr"))]
    for reader in readers:
        reader.start()
    lines, open_streams = [], len(readers)
    while open_streams:
        item = arrived.get()
        if item is None:
            open_streams -= 1
        else:
            lines.append(item)
    return lines


def timed_run(args: list[str], env: dict | None = None, check: bool = True) -> dict:
    """Run `pipeline.py run ARGS`; total seconds, seconds before the first task and after the last, each task's
    seconds, the tasks the cache served; and the exit status, stdout and stderr (the end-to-end test reads them)."""
    env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "pipeline.py", "run", *args], cwd=PROJECT_ROOT, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines = read_lines(process, started)
    returncode = process.wait()
    seconds = time.perf_counter() - started
    opened, tasks, cached, first_task, last_task = {}, {}, [], None, 0.0
    for now, _, line in lines:
        line = ANSI_COLOUR.sub("", line)
        if match := TASK_START.search(line) or TASK_CACHED.search(line):
            opened[match.group(1)] = now
            first_task = now if first_task is None else first_task
        if (match := TASK_CACHED.search(line)) and match.group(1) in opened:
            cached.append(match.group(1))
            opened.pop(match.group(1))
            last_task = now
        elif (match := TASK_END.search(line)) and match.group(1) in opened:
            tasks[match.group(1)] = now - opened.pop(match.group(1))
            last_task = now
    if check and returncode:
        raise RuntimeError("pipeline.py run failed:\n" + "".join(line for _, _, line in lines[-40:]))
    return {"seconds": seconds, "before_tasks": first_task or 0.0, "after_tasks": seconds - last_task, "tasks": tasks,
            "cached": cached, "returncode": returncode,
            "stdout": "".join(line for _, name, line in lines if name == "stdout"),
            "stderr": "".join(line for _, name, line in lines if name == "stderr")}


def import_floor() -> float:
    """Seconds for a fresh Python to import torch and sentence-transformers (what most stage processes import)."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, sentence_transformers, components.common"], cwd=PROJECT_ROOT,
                   check=True, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    return time.perf_counter() - started


def task_times(run: dict, decimals: int = 0) -> str:
    """`task 12 s, ...`, slowest first."""
    return ", ".join(f"{name} {seconds:.{decimals}f} s"
                     for name, seconds in sorted(run["tasks"].items(), key=lambda x: -x[1])) or "none"


def tiny_run_args(work: Path, quick: bool) -> list[str]:
    """`pipeline.py run` arguments for 3 train and 2 test chunks, outputs and LLM cache under `work`."""
    corpus = tiny_corpus(work / "docs", [3, 10, 20], [0, 5])
    args = ["--dataset", str(corpus), "--output-dir", str(work / "out"), "--llm-cache-uri", str(work / "cache"),
            "--no-argilla", "--max-failure-rate", "1.0"]
    return args + (["--finetune-epochs", "0.5"] if quick else [])


def rerun_row(first: dict, second: dict, floor: float) -> Row:
    """The figure: the second run's time over the first, and where the second run spends it."""
    ratio = second["seconds"] / first["seconds"]
    note = (f"target <= {TARGET:.0%}: {'met' if ratio <= TARGET else 'missed'}; second run: "
            f"{second['before_tasks']:.1f} s before the first stage, served from the cache: "
            f"{', '.join(second.get('cached', [])) or 'none'}; ran: {task_times(second, 1)}; "
            f"{second.get('after_tasks', 0.0):.1f} s after the last stage; first run: {task_times(first)}; a bare "
            f"Python importing torch + sentence-transformers takes {floor:.1f} s (what each stage that runs pays)")
    return Row("second identical local run / first", second["seconds"], first["seconds"], "s", note=note)


@benchmark("reruns")
def reruns(quick: bool) -> list[Row]:
    """Two identical runs of a tiny pipeline."""
    with tempfile.TemporaryDirectory(prefix="bench-reruns-") as work:
        args = tiny_run_args(Path(work), quick)
        first, second = timed_run(args), timed_run(args)
    return [rerun_row(first, second, import_floor())]
