"""How far a long stage is: plain periodic lines in the stage's log and, in a local run, events for a live bar.

The same code runs in a cluster pod and under `pipeline.py run`. In a pod it only logs a plain line every
`D2E_PROGRESS_INTERVAL` seconds (10 by default) and at the end. When the local run names a file in
`D2E_PROGRESS_FILE`, every update is also appended to that file as one JSON line, which the local run's console
(d2e/progress.py) reads to draw its progress bar; each line is a single small append, so processes of one stage
(distilabel's workers) may write to it at once.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Optional

PROGRESS_FILE_ENV = "D2E_PROGRESS_FILE"
PROGRESS_INTERVAL_ENV = "D2E_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 10.0


def progress_interval() -> float:
    """Seconds between two plain progress lines (D2E_PROGRESS_INTERVAL; 0 prints every update)."""
    try:
        return max(0.0, float(os.environ.get(PROGRESS_INTERVAL_ENV, DEFAULT_INTERVAL)))
    except ValueError:
        return DEFAULT_INTERVAL


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def rate_and_eta(event: dict[str, Any]) -> tuple[Optional[float], Optional[float]]:
    """Units per second so far and the seconds left at that rate (None while nothing is done yet)."""
    done, elapsed = event["done"], event.get("elapsed") or 0.0
    if done <= 0 or elapsed <= 0:
        return None, None
    rate = done / elapsed
    return rate, max(0, event["total"] - done) / rate


def progress_details(event: dict[str, Any]) -> str:
    """What follows the count: rate, time left, tokens and failures so far (those the stage reports)."""
    rate, eta = rate_and_eta(event)
    parts = [f"{rate:.2f} {event['unit']}/s" if rate is not None else f"- {event['unit']}/s",
             f"ETA {_duration(eta)}" if eta is not None else "ETA -"]
    if event.get("tokens") is not None:
        parts.append(f"{event['tokens']:,} tokens")
    if event.get("failed") is not None:
        parts.append(f"{event['failed']} failed")
    return ", ".join(parts)


def format_progress(event: dict[str, Any]) -> str:
    """One plain progress line: `generate_queries: 12/60 rows (20%), 0.45 rows/s, ETA 1:47, 5,210 tokens, 1 failed`."""
    total = event["total"]
    percent = f" ({100 * event['done'] / total:.0f}%)" if total else ""
    return f"{event['stage']}: {event['done']}/{total} {event['unit']}{percent}, {progress_details(event)}"


class ProgressReporter:
    """Counts a stage's finished units and reports them (see the module docstring for where)."""

    def __init__(self, stage: str, total: int, unit: str = "rows", logger: Optional[logging.Logger] = None,
                 tokens: bool = False, failures: bool = False):
        self.stage, self.total, self.unit = stage, total, unit
        self.done = 0
        self.tokens: Optional[int] = 0 if tokens else None
        self.failed: Optional[int] = 0 if failures else None
        self.logger = logger or logging.getLogger(stage)
        self.interval = progress_interval()
        self.file = os.environ.get(PROGRESS_FILE_ENV) or None
        self.started = time.monotonic()
        self.last_line = self.started
        self._emit()

    def event(self) -> dict[str, Any]:
        """The current state as the JSON event the local console reads."""
        return {"stage": self.stage, "unit": self.unit, "done": self.done, "total": self.total,
                "tokens": self.tokens, "failed": self.failed, "elapsed": round(time.monotonic() - self.started, 3)}

    def advance(self, units: int = 1, tokens: int = 0, failed: int = 0) -> None:
        """Count `units` more finished, with the tokens they used and how many of them failed."""
        self.done += units
        if self.tokens is not None:
            self.tokens += tokens
        if self.failed is not None:
            self.failed += failed
        self._emit()

    def _emit(self) -> None:
        event = self.event()
        if self.file:
            try:
                with open(self.file, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(event) + "\n")
            except OSError:  # the live bar is a convenience: never fail the stage over it
                self.file = None
        now = time.monotonic()
        finished = self.done >= self.total
        if self.done and (finished or now - self.last_line >= self.interval):
            self.last_line = now
            self.logger.info("%s", format_progress(event))
