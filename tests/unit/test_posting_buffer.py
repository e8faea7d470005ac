"""The posting buffer (FR7): the account interface waits for tokens, it never drops events."""

from __future__ import annotations

import pytest

from paypost.bus.consumer import TokenBucket
from paypost.pipeline import wait_for_tokens


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_a_batch_larger_than_the_burst_waits_for_the_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(100.0, clock)  # 100 events/s, burst of one second's worth
    wait_for_tokens(bucket, 350, clock.sleep)
    # 100 at once, the other 250 at 100/s: 2.5 s of back-pressure, nothing skipped.
    assert clock.now - 1_000.0 == pytest.approx(2.5, abs=0.02)
    assert bucket.take(1) == 0  # every token was spent on the batch


def test_within_the_burst_there_is_no_wait() -> None:
    clock = FakeClock()
    wait_for_tokens(TokenBucket(100.0, clock), 80, clock.sleep)
    assert clock.sleeps == []
