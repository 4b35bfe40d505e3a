"""What `pipeline.py run` shows while the pipeline runs, and the summary it leaves in the output folder.

kfp.local runs every stage as a subprocess and copies its output (distilabel's log, the executor's input dump,
warnings) to this process's stdout. d2e/console.py sends all of that to OUTPUT_DIR/run.log and hands each line
here, together with the stages' progress events (components/progress.py). This module turns them into:

- one line as each stage starts and ends: the stage, rows in and out (counted in the task's output datasets),
  seconds; a stage that kfp.local's task cache served (an earlier run's results, not run again) gets one line
  saying so, with the rows of the outputs it served;
- while generate_queries and embed_score run, one live bar (done/total, rate, ETA, tokens, failures) on an
  interactive terminal, or a plain progress line every D2E_PROGRESS_INTERVAL seconds elsewhere (CI, logs);
- for a stage that fails, its last lines and where the whole log is.
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, TextIO

from components.progress import format_progress, progress_details, progress_interval
from d2e.fanout import HELPER_TASKS

# kfp.local's own lines (kfp 2.17, pinned) that say a task starts and ends, once the colour codes are removed.
TASK_STARTED = re.compile(r"Executing task '([^']+)'")
TASK_FINISHED = re.compile(r"Task '([^']+)' finished with status (\w+)")
# kfp.local's log record for a task served from its cache (kfp/local/orchestrator/task_executor.py).
TASK_CACHED = re.compile(r"Task '?([\w-]+)'? cache hit \(key=(\w+)\)")
CACHE_FOLDER = ".kfp_cache"  # kfp.local's default cache_root, below the pipeline root
COLOUR = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# kfp.local indents a task's streamed output by four spaces.
STREAM_INDENT = "    "
FAILED_TAIL_LINES = 25


def stage_of(task: str) -> str:
    """The stage name of a kfp task name: `generate-queries-component` -> `generate_queries`."""
    return task.removesuffix("-component").replace("-", "_")


def pipeline_upstream(pipeline: Any) -> dict[str, list[str]]:
    """Task name -> the tasks it depends on, from the compiled pipeline's DAG; the tasks inside a ParallelFor (the
    shards' loop) stand in for the loop, with its dependencies added to their own."""
    spec = pipeline.pipeline_spec
    upstream: dict[str, list[str]] = {}
    for name, task in spec.root.dag.tasks.items():
        inner = spec.components[task.component_ref.name].dag.tasks if name.startswith("for-loop") else None
        if inner:
            for inner_name, inner_task in inner.items():
                upstream[inner_name] = list(task.dependent_tasks) + list(inner_task.dependent_tasks)
        else:
            upstream[name] = list(task.dependent_tasks)
    return upstream


def loop_tasks(pipeline: Any) -> set[str]:
    """The tasks inside a ParallelFor (one instance per shard)."""
    spec = pipeline.pipeline_spec
    return {inner for name, task in spec.root.dag.tasks.items() if name.startswith("for-loop")
            for inner in spec.components[task.component_ref.name].dag.tasks}


def cached_task_dirs(cache_root: Path, key_prefix: str) -> list[Path]:
    """The task folders (`<run>/[for-loop-*/]<task>`) of the outputs a cache entry serves: its artifacts' parents."""
    import json

    dirs: list[Path] = []
    for entry in sorted(cache_root.glob(f"{key_prefix}*.json")):
        for value in json.loads(entry.read_text()).values():
            artifacts = value.get("artifacts", []) if isinstance(value, dict) else []
            artifacts = [value] if isinstance(value, dict) and value.get("uri") else artifacts
            dirs += [Path(artifact["uri"]).parent for artifact in artifacts if artifact.get("uri")]
    return sorted(set(dirs))


def dataset_rows(task_dirs: list[Path]) -> Optional[int]:
    """Rows in the parquet files of a task's output artifacts, over all its shards (None: it wrote no dataset)."""
    import pyarrow.parquet as pq

    files = sorted(path for task_dir in task_dirs for path in task_dir.glob("*/*.parquet"))
    return sum(pq.read_metadata(path).num_rows for path in files) if files else None


def source_rows(task_dirs: list[Path]) -> Optional[int]:
    """Rows a first stage read from its source (`rows_read` per split in its stats.json), if it says."""
    import json

    for path in sorted(path for task_dir in task_dirs for path in task_dir.glob("*/stats.json")):
        splits = json.loads(path.read_text()).get("splits") or {}
        counts = [split.get("rows_read") for split in splits.values() if isinstance(split, dict)]
        if counts and all(isinstance(count, int) for count in counts):
            return sum(counts)
    return None


def _rows(count: Optional[int]) -> str:
    return "-" if count is None else f"{count:,}"


@dataclass
class StageRun:
    """A stage that started: its place in the run, when it started, its rows in and its latest output lines."""

    task: str
    number: int
    started: float
    rows_in: Optional[int]
    tail: deque = field(default_factory=lambda: deque(maxlen=FAILED_TAIL_LINES))
    done: int = 0  # instances finished (one per shard inside the fan-out)
    cached: int = 0  # of which served from kfp.local's task cache
    cached_dirs: list = field(default_factory=list)  # the task folders those served


class RunConsole:
    """The terminal view of a local run, fed with captured output lines (`line`) and progress events (`event`)."""

    def __init__(self, terminal: TextIO, pipeline_root: Path, upstream: dict[str, list[str]], log_path: Path,
                 verbose: bool = False, interactive: Optional[bool] = None, sharded: frozenset = frozenset(),
                 shards: int = 1):
        from rich.console import Console

        self.terminal, self.pipeline_root, self.upstream = terminal, pipeline_root, upstream
        # Tasks that run once per shard: such a stage is over when all `shards` instances are.
        self.sharded, self.shards = sharded, shards
        self.log_path, self.verbose, self.interval = log_path, verbose, progress_interval()
        self.rich = Console(file=terminal, highlight=False, soft_wrap=True)
        self.interactive = (self.rich.is_terminal and not self.rich.is_dumb_terminal) if interactive is None \
            else interactive
        self.stages: dict[str, StageRun] = {}
        self.stage_count = len([task for task in upstream if task not in HELPER_TASKS])
        self.running: dict[str, int] = {}  # task -> its instances running now (one per shard)
        self.finished: dict[str, Optional[int]] = {}  # task -> rows out, in the order tasks finished
        self.failed: list[str] = []
        self.current: Optional[StageRun] = None
        self.last_printed: dict[str, float] = {}
        # The live bar runs only while a stage reports progress; between those, lines are printed plainly.
        self.bar, self.bar_tasks = None, {}

    def _start_bar(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("  {task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[unit]}"), TimeElapsedColumn(), TextColumn("{task.fields[detail]}"),
                        console=self.rich, transient=True,
                        # The run's stdout/stderr are already captured (d2e/console.py): rich must not take them over.
                        redirect_stdout=False, redirect_stderr=False, refresh_per_second=2)
        self.bar.start()

    # -- output ----------------------------------------------------------------------------------------------

    def say(self, text: str) -> None:
        """Print a line above the live bar (or plainly)."""
        if self.bar is not None:
            self.bar.console.print(text, markup=False)
        else:
            self.terminal.write(text + "\n")
            self.terminal.flush()

    def _echo(self, line: str) -> None:
        if self.bar is not None:
            from rich.text import Text

            self.bar.console.print(Text.from_ansi(line))
        else:
            self.terminal.write(line + "\n")
            self.terminal.flush()

    # -- input -----------------------------------------------------------------------------------------------

    def line(self, raw: str) -> None:
        """One line of captured output: a kfp task marker, or a stage's own output (kept for an error)."""
        if self.verbose:
            self._echo(raw)
        text = COLOUR.sub("", raw)
        started, finished, cached = TASK_STARTED.search(text), TASK_FINISHED.search(text), TASK_CACHED.search(text)
        if started:
            self._started(started.group(1))
        elif finished:
            self._finished(finished.group(1), finished.group(2))
        elif cached:
            self._cached(cached.group(1), cached.group(2))
        elif self.current is not None and text.strip():
            self.current.tail.append(text.removeprefix(STREAM_INDENT))

    def event(self, event: dict[str, Any]) -> None:
        """A progress event of a running stage (see components/progress.py)."""
        stage = event.get("stage")
        if self.current is None or stage != stage_of(self.current.task):
            return  # a late event of a stage that already ended
        if self.interactive:
            self._update_bar(event)
            return
        now = time.monotonic()
        done = event["done"] and event["done"] >= event["total"]
        if event["done"] and (done or now - self.last_printed.get(stage, 0.0) >= self.interval):
            self.last_printed[stage] = now
            self.say(f"      {format_progress(event)}")

    def _update_bar(self, event: dict[str, Any]) -> None:
        stage = event["stage"]
        if self.bar is None:
            self._start_bar()
        if stage not in self.bar_tasks:
            self.bar_tasks[stage] = self.bar.add_task(stage, total=event["total"], unit=event["unit"], detail="")
        self.bar.update(self.bar_tasks[stage], completed=event["done"], total=event["total"],
                        detail=progress_details(event))

    # -- stages ----------------------------------------------------------------------------------------------

    def _task_dirs(self, task: str) -> list[Path]:
        """The task's output folders in the latest run: one, or one per shard (`for-loop-*-iteration-*/TASK`)."""
        candidates = [path for path in self.pipeline_root.glob(f"*/{task}") if path.is_dir()]
        candidates += [path for path in self.pipeline_root.glob(f"*/for-loop-*/{task}") if path.is_dir()]
        if not candidates:
            return []
        run = max(candidates, key=lambda path: path.stat().st_mtime)
        run_dir = run.parent if run.parent.parent == self.pipeline_root else run.parent.parent
        return [path for path in candidates if run_dir in path.parents]

    def _rows_in(self, task: str) -> Optional[int]:
        upstream = [name for name in self.finished if name in self.upstream.get(task, ())]
        counts = [self.finished[name] for name in upstream if self.finished[name] is not None]
        return counts[-1] if counts else None  # the rows of the latest upstream stage that wrote a dataset

    def _new_stage(self, task: str) -> StageRun:
        helper = task in HELPER_TASKS
        number = len([name for name in self.stages if name not in HELPER_TASKS]) + (0 if helper else 1)
        self.stages[task] = StageRun(task, number, time.monotonic(), self._rows_in(task))
        return self.stages[task]

    def _started(self, task: str) -> None:
        self.running[task] = self.running.get(task, 0) + 1
        if task in self.stages:  # another shard of a stage already under way
            self.current = self.stages[task]
            return
        run = self.current = self._new_stage(task)
        if task not in HELPER_TASKS:
            rows = f" ({_rows(run.rows_in)} rows in)" if run.rows_in is not None else ""
            self.say(f"[{run.number}/{self.stage_count}] {stage_of(task)} started{rows}")

    def _over(self, task: str, run: StageRun) -> bool:
        """Whether every instance of the task has finished (one per shard in the fan-out, else one)."""
        return not self.running.get(task) and run.done >= (self.shards if task in self.sharded else 1)

    def _cached(self, task: str, key_prefix: str) -> None:
        """kfp.local served the task from its cache: it did not run; its outputs are an earlier run's."""
        run = self.stages.get(task) or self._new_stage(task)
        run.done, run.cached = run.done + 1, run.cached + 1
        run.cached_dirs += cached_task_dirs(self.pipeline_root / CACHE_FOLDER, key_prefix)
        if self._over(task, run):
            self._report(task, run, "SUCCESS")

    def _finished(self, task: str, status: str) -> None:
        run = self.stages.get(task) or StageRun(task, len(self.stages) + 1, time.monotonic(), None)
        self.running[task] = max(0, self.running.get(task, 1) - 1)
        run.done += status == "SUCCESS"
        if status == "SUCCESS" and not self._over(task, run):
            return  # other shards of this stage still run: it is done when the last one is
        self._report(task, run, status)

    def _report(self, task: str, run: StageRun, status: str) -> None:
        """The stage's end line: rows in and out, seconds or that the cache served it; or its failure."""
        seconds = time.monotonic() - run.started
        stage = stage_of(task)
        if stage in self.bar_tasks:
            self.bar.remove_task(self.bar_tasks.pop(stage))
            self.close()
        # Outputs the cache served lie in earlier runs' folders; those of instances that ran, in this run's.
        task_dirs = run.cached_dirs + (self._task_dirs(task) if run.cached < max(run.done, 1) else [])
        rows_out = dataset_rows(task_dirs)
        self.finished[task] = rows_out
        rows_in = run.rows_in if run.rows_in is not None or self.upstream.get(task) else source_rows(task_dirs)
        helper = task in HELPER_TASKS
        head = stage if helper else f"[{run.number}/{self.stage_count}] {stage}"
        rows = f"{_rows(rows_in)} rows in, {_rows(rows_out)} rows out"
        if status != "SUCCESS":
            self.failed.append(stage)
            self.say(f"{head} FAILED after {seconds:.1f} s. Its last lines:")
            for text in run.tail:
                self.say(f"  | {text}")
            self.say(f"The whole log: {self.log_path}")
        elif helper:
            pass
        elif run.cached == run.done:
            self.say(f"{head} served from the cache (not run again): {rows}")
        else:
            shards = f" ({run.cached} of {run.done} shards served from the cache)" if run.cached else ""
            self.say(f"{head} done in {seconds:.1f} s{shards}: {rows}")
        if self.current is run or not run.cached:
            self.current = None

    def close(self) -> None:
        """Stop the live bar (it leaves no trace: the stage's end line follows)."""
        if self.bar is not None:
            self.bar.stop()
            self.bar, self.bar_tasks = None, {}


@contextlib.contextmanager
def cache_hits_printed() -> Iterator[None]:
    """kfp.local logs a task served from its cache on the root logger at INFO, outside the handler it sets up for its
    other task lines, so by default nobody sees it: print those records to stdout, where the console reads them."""
    import logging

    class CacheHits(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return TASK_CACHED.search(record.getMessage()) is not None

    root, handler = logging.getLogger(), logging.StreamHandler(sys.stdout)
    handler.addFilter(CacheHits())
    level = root.level
    root.addHandler(handler)
    root.setLevel(min(level, logging.INFO) if level else level)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


@contextlib.contextmanager
def watch_run(output_dir: Path, pipeline_root: Path, pipeline: Any, verbose: bool = False,
              shards: int = 1) -> Iterator[RunConsole]:
    """Around the pipeline call: its output goes to OUTPUT_DIR/run.log (and, with `verbose`, to the terminal);
    the terminal shows the stage lines, the live progress and the errors. `shards`: instances of each task inside
    the pipeline's ParallelFor."""
    import os
    import tempfile

    from components.progress import PROGRESS_FILE_ENV
    from d2e.console import captured_output, terminal_stream

    log_path = output_dir / "run.log"
    terminal = terminal_stream()
    console = RunConsole(terminal, pipeline_root, pipeline_upstream(pipeline), log_path, verbose,
                         sharded=frozenset(loop_tasks(pipeline)), shards=shards)
    console.say(f"Log of every stage: {log_path}" + ("" if verbose else " (--verbose shows it live)"))
    # Under the run's own folder: a killed run leaves it there, not in /tmp.
    pipeline_root.mkdir(parents=True, exist_ok=True)
    handle, events = tempfile.mkstemp(prefix="progress-", suffix=".jsonl", dir=pipeline_root)
    os.close(handle)
    previous = os.environ.get(PROGRESS_FILE_ENV)
    os.environ[PROGRESS_FILE_ENV] = events  # the stage subprocesses inherit it
    try:
        with captured_output(log_path, console.line, Path(events), console.event), cache_hits_printed():
            yield console
    except BaseException:
        if not console.failed:  # a failing stage has already said where the log is
            console.say(f"The whole log: {log_path}")
        raise
    finally:
        console.close()
        terminal.close()
        os.unlink(events)
        if previous is None:
            os.environ.pop(PROGRESS_FILE_ENV, None)
        else:
            os.environ[PROGRESS_FILE_ENV] = previous


class _Tee(io.TextIOBase):
    def __init__(self, *streams: TextIO):
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


@contextlib.contextmanager
def summary_file(path: Path) -> Iterator[None]:
    """Print as usual, and keep what was printed as Markdown in `path` (OUTPUT_DIR/summary.md)."""
    copy = io.StringIO()
    with contextlib.redirect_stdout(_Tee(sys.stdout, copy)):
        yield
    text = copy.getvalue().strip("\n")
    path.write_text(f"# Run summary\n\n```text\n{text}\n```\n", encoding="utf-8")
