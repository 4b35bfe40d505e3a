"""The adaptive in-flight limit (components/generate_queries/concurrency.py): AIMD on its own, then the gate."""

import asyncio

import pytest

from components.generate_queries.concurrency import AdaptiveSlots, AimdLimit


class Overloaded(Exception):
    """Stands for the endpoint's 429."""


def test_a_429_halves_the_limit_and_successes_raise_it_one_window_at_a_time():
    changes = []
    limit = AimdLimit(16, on_change=lambda old, new, reason: changes.append((old, new)))
    limit.overloaded(limit.epoch)
    assert limit.limit == 8
    for _ in range(7):
        limit.succeeded()
    assert limit.limit == 8  # a full window (8 answers) before the first step up
    limit.succeeded()
    assert limit.limit == 9
    for _ in range(9):
        limit.succeeded()
    assert limit.limit == 10
    assert changes == [(16, 8), (8, 9), (9, 10)]
    assert limit.summary() == {"maximum": 16, "final": 10, "lowest": 8, "decreases": 1, "increases": 2,
                               "rate_limited": 1}


def test_the_limit_stays_between_its_floor_and_its_ceiling():
    limit = AimdLimit(4, minimum=1)
    for _ in range(5):
        limit.overloaded(limit.epoch)
    assert limit.limit == 1 and limit.decreases == 2  # 4 -> 2 -> 1, then nothing lower
    for _ in range(100):
        limit.succeeded()
    assert limit.limit == 4  # back to the ceiling, never above it


def test_429s_of_requests_sent_before_the_last_decrease_do_not_lower_it_again():
    limit = AimdLimit(32)
    sent = limit.epoch  # a burst of 32 requests went out at the old limit
    for _ in range(32):
        limit.overloaded(sent)
    assert limit.limit == 16 and limit.rate_limited == 32
    limit.overloaded(limit.epoch)  # one sent at the new limit still overloads it
    assert limit.limit == 8


def test_a_factor_of_one_keeps_the_limit_fixed():
    limit = AimdLimit(8, factor=1.0)
    limit.overloaded(limit.epoch)
    assert limit.limit == 8 and limit.rate_limited == 1 and limit.decreases == 0


def test_the_gate_holds_requests_in_flight_to_the_moving_limit():
    async def scenario() -> list[int]:
        slots = AdaptiveSlots(AimdLimit(4), lambda error: isinstance(error, Overloaded))
        peaks: list[int] = []

        async def request(fail: bool) -> None:
            try:
                async with slots.slot():
                    peaks.append(slots.in_flight)
                    await asyncio.sleep(0.01)
                    if fail:
                        raise Overloaded()
            except Overloaded:
                pass

        await asyncio.gather(*(request(fail=False) for _ in range(8)))
        await request(fail=True)  # 4 -> 2
        assert slots.limit.limit == 2
        peaks.clear()
        # At 2, then 3 after two answers (additive increase), then 4 after three more.
        await asyncio.gather(*(request(fail=False) for _ in range(6)))
        assert slots.limit.limit == 4
        return peaks

    peaks = asyncio.run(scenario())
    assert max(peaks[:2]) == 2 and max(peaks) == 3


def test_an_error_that_is_not_a_429_leaves_the_limit_alone():
    async def scenario() -> AimdLimit:
        slots = AdaptiveSlots(AimdLimit(4), lambda error: isinstance(error, Overloaded))
        with pytest.raises(ValueError):
            async with slots.slot():
                raise ValueError("a malformed body")
        assert slots.in_flight == 0
        return slots.limit

    limit = asyncio.run(scenario())
    assert limit.limit == 4 and limit.rate_limited == 0
