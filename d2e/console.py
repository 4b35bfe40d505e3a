"""Capture everything the local run writes to stdout and stderr, at the file-descriptor level, into a log file.

kfp.local prints each stage subprocess's output and its own log records to this process's stdout, and Python
warnings go to stderr; a subprocess started meanwhile inherits the same descriptors. Pointing descriptors 1 and 2
at a pipe catches all of it: a reader thread appends every byte to the log file and hands each line on (for the
stage lines, the error tail and --verbose). The same thread also reads the stages' progress events from a file, so
one thread sees both, in order. The terminal stays reachable through a copy of the original stderr.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

POLL_SECONDS = 0.2


@contextlib.contextmanager
def print_restored() -> Iterator[None]:
    """Give `print` back as it was after a kfp.local run.

    kfp.local (2.17) indents a task's output by replacing `builtins.print` for the task and restoring what it found;
    the iterations of a ParallelFor (shards) run in threads, so one can "restore" another's indenting print, and every
    later print in the process (the run's summary) would be indented.
    """
    import builtins

    original = builtins.print
    try:
        yield
    finally:
        builtins.print = original


@contextlib.contextmanager
def kfp_local(pipeline_root: Path, cache: bool = False) -> Iterator[None]:
    """Around running a pipeline with kfp.local: each task a subprocess of this environment, its outputs under
    `pipeline_root`, a failed task raising; `print` is given back afterwards (see print_restored).

    `cache`: kfp.local's task cache, for the tasks whose caching option is on; its entries go to
    `pipeline_root/.kfp_cache` (kfp's default) and name the outputs of the run that made them, so deleting the
    pipeline root (the output folder) empties it."""
    from kfp import local

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root), raise_on_error=True,
               enable_caching=cache)
    with print_restored():
        yield


def terminal_stream() -> TextIO:
    """A text stream on a copy of the current stderr: the terminal, whatever later happens to descriptor 2."""
    encoding = getattr(sys.stderr, "encoding", None) or "utf-8"
    return os.fdopen(os.dup(sys.stderr.fileno()), "w", buffering=1, encoding=encoding, errors="replace")


class EventFile:
    """New JSON lines of a file that other processes append to (a partial last line waits for its end)."""

    def __init__(self, path: Path):
        self.path, self.offset, self.partial = path, 0, b""

    def read(self) -> list[dict[str, Any]]:
        """The events appended since the last call; lines that are not JSON objects are skipped."""
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        events = []
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                events.append(event)
        return events


def _guarded(callback: Callable[[Any], None], log: Any) -> Callable[[Any], None]:
    """The callback, with its errors written to the log: the reader must keep draining the pipe whatever happens,
    or the run would block on a full pipe."""
    def call(value: Any) -> None:
        try:
            callback(value)
        except Exception:  # noqa: BLE001 - reported in the log, the run goes on
            import traceback

            log.write(f"d2e console error: {traceback.format_exc()}".encode())

    return call


def _pump(read_fd: int, log: Any, on_line: Callable[[str], None], events: EventFile,
          on_event: Callable[[dict], None], stop: threading.Event) -> None:
    """Copy the pipe to the log and dispatch lines and events until told to stop and the pipe is drained."""
    on_line, on_event = _guarded(on_line, log), _guarded(on_event, log)
    partial = b""
    while True:
        ready, _, _ = select.select([read_fd], [], [], POLL_SECONDS)
        data = os.read(read_fd, 65536) if ready else b""
        # Events first: a stage writes its last event before kfp prints that the stage finished.
        for event in events.read():
            on_event(event)
        if data:
            log.write(data)
            log.flush()
            *lines, partial = (partial + data).split(b"\n")
            for line in lines:
                on_line(line.decode("utf-8", errors="replace").rstrip("\r"))
        elif ready or stop.is_set():  # end of the pipe, or stopped with nothing left to read
            break
    if partial:
        on_line(partial.decode("utf-8", errors="replace"))


@contextlib.contextmanager
def captured_output(log_path: Path, on_line: Callable[[str], None], events_path: Path,
                    on_event: Callable[[dict], None]) -> Iterator[None]:
    """Send descriptors 1 and 2 to `log_path` (overwritten) for the duration; each line and event goes to the
    callbacks, which run on the reader thread."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    read_fd, write_fd = os.pipe()
    for fd in saved:
        os.dup2(write_fd, fd)
    os.close(write_fd)
    # Python-level writers too, even where sys.stdout/stderr were replaced (a notebook, a test's capture); line by
    # line, so --verbose and the log keep pace with kfp's streaming of each stage's output.
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = (open(fd, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
                              for fd in saved)
    stop = threading.Event()
    with open(log_path, "wb") as log:
        reader = threading.Thread(target=_pump, args=(read_fd, log, on_line, EventFile(events_path), on_event, stop),
                                  name="d2e-output", daemon=True)
        reader.start()
        try:
            yield
        finally:
            # Flushed, not closed: a handler created meanwhile may still hold one (it then writes to the terminal).
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            sys.stdout, sys.stderr = streams
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            stop.set()
            reader.join()
            os.close(read_fd)
