"""How many requests an API endpoint gets at once: an AIMD limit, lowered on 429 and raised again when they stop.

`llm_concurrency` is the ceiling. A 429 (rate limited) halves the limit (multiplicative decrease); every `limit`
successful requests in a row raise it by one (additive increase), back up to the ceiling. A 429 answering a request
sent before the last decrease does not lower it again: those requests went out at the old limit, and counting them
would collapse the limit to its floor on one burst. One limit serves the whole run (every batch), so the endpoint
sees the same number of requests in flight from the first batch to the last.
"""

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Optional


@dataclass
class AimdLimit:
    """The AIMD limit itself, without any waiting: what the in-flight limit is and how each outcome moves it.

    `on_change(old, new, reason)` runs whenever the limit moves.
    """

    maximum: int
    minimum: int = 1
    factor: float = 0.5  # 1.0: never lowered (a fixed limit)
    on_change: Optional[Callable[[int, int, str], None]] = None
    limit: int = field(init=False)
    lowest: int = field(init=False)
    epoch: int = 0  # raised by each decrease; a request remembers the epoch it was sent in
    decreases: int = 0
    increases: int = 0
    rate_limited: int = 0  # 429 answers seen, counted or not
    _successes: int = 0

    def __post_init__(self) -> None:
        self.maximum = max(1, self.maximum)
        self.minimum = max(1, min(self.minimum, self.maximum))
        self.limit = self.lowest = self.maximum

    def succeeded(self) -> None:
        """A request got an answer: after `limit` of them in a row, one more request may be in flight."""
        self._successes += 1
        if self._successes >= self.limit and self.limit < self.maximum:
            self._successes = 0
            self.increases += 1
            self._set(self.limit + 1, "no 429 for a full window of requests")

    def overloaded(self, sent_in_epoch: int) -> None:
        """A request sent in epoch `sent_in_epoch` got a 429: lower the limit unless it already was since."""
        self.rate_limited += 1
        self._successes = 0
        if sent_in_epoch != self.epoch:
            return
        self.epoch += 1
        lowered = max(self.minimum, int(self.limit * self.factor))
        if lowered < self.limit:
            self.decreases += 1
            self._set(lowered, "the endpoint answered 429")

    def summary(self) -> dict[str, int]:
        """What the run's stats keep: the ceiling, the limit at the end, the lowest it went, how often it moved."""
        return {"maximum": self.maximum, "final": self.limit, "lowest": self.lowest, "decreases": self.decreases,
                "increases": self.increases, "rate_limited": self.rate_limited}

    def _set(self, new: int, reason: str) -> None:
        old, self.limit = self.limit, new
        self.lowest = min(self.lowest, new)
        if self.on_change is not None:
            self.on_change(old, new, reason)


class AdaptiveSlots:
    """At most `limit.limit` requests in flight, the limit moving with each outcome (see AimdLimit).

    `is_overload(error)` says which errors are the endpoint's "too many requests". Create it inside the event loop
    that uses it.
    """

    def __init__(self, limit: AimdLimit, is_overload: Callable[[BaseException], bool]):
        self.limit = limit
        self.is_overload = is_overload
        self.in_flight = 0
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one slot for one request; its outcome (an answer, a 429, another error) adjusts the limit."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.in_flight < self.limit.limit)
            self.in_flight += 1
            epoch = self.limit.epoch
        try:
            yield
        except BaseException as error:
            if self.is_overload(error):
                self.limit.overloaded(epoch)
            raise
        else:
            self.limit.succeeded()
        finally:
            async with self._changed:
                self.in_flight -= 1
                # As many waiters as there are free slots (more after an increase), not every waiter each time.
                self._changed.notify(max(0, self.limit.limit - self.in_flight))
