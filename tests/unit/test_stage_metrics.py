"""Per-stage times as `paypost bench` and `paypost run` report them: quantiles over events."""

from __future__ import annotations

import random

import msgspec
import pytest

from paypost.pipeline import StageMetrics, weighted_percentile
from paypost.security.tokens import contains_pan


def test_a_small_batch_weighs_its_events_not_a_batch() -> None:
    # 99 batches of 1,000 events at 50 µs each, and one deferred batch of 1 event that cost
    # 5,000 µs: 99,001 events, one of them slow. Over batches, p99 would be the slow one.
    m = StageMetrics()
    for _ in range(99):
        m.add(1000, 0.050, 0.040)
    m.add(1, 0.005, 0.002)
    assert m.events == 99_001
    assert m.p(0.99) == pytest.approx(50.0)
    assert m.p(0.99, cpu=True) == pytest.approx(40.0)
    assert m.p(1.0) == pytest.approx(5000.0)  # the slowest event is still there


def test_weighted_percentile_is_the_plain_one_when_weights_are_equal() -> None:
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert [weighted_percentile(values, [3] * 5, q) for q in (0.0, 0.5, 1.0)] == [1.0, 3.0, 5.0]
    assert weighted_percentile([], [], 0.99) == 0.0
    with pytest.raises(ValueError, match="weights"):
        weighted_percentile([1.0], [1, 2], 0.5)


def test_merge_adds_another_process_batches() -> None:
    a, b = StageMetrics(), StageMetrics()
    a.add(10, 0.001, 0.0005)
    b.add(30, 0.009, 0.006)
    merged = StageMetrics()
    merged.merge(a.to_dict())
    merged.merge(b.to_dict())
    assert merged.events == 40
    assert merged.sizes == [10, 30]
    assert merged.p(0.5) == pytest.approx(300.0)  # 30 of the 40 events at 300 µs each
    broken = b.to_dict() | {"sizes": []}
    with pytest.raises(ValueError, match="length"):
        StageMetrics().merge(broken)


def test_a_long_running_worker_keeps_a_bounded_sample() -> None:
    # realtime mode: every authorization a batch, for as long as the worker runs
    m = StageMetrics(max_samples=1000)
    for i in range(50_000):
        m.add(1, (100 if i % 100 == 0 else 10) / 1e6, 5 / 1e6)  # 1% of batches slow
    assert m.events == m.batches == 50_000
    assert len(m.sizes) == len(m.per_event_us) == len(m.cpu_per_event_us) == 1000
    assert m.p(0.5) == pytest.approx(10.0)
    assert m.p(0.999) == pytest.approx(100.0)  # the slow 1% is still in the sample
    assert 0.003 < sum(1 for v in m.per_event_us if v > 50) / 1000 < 0.03


def test_stage_times_as_written_hold_no_card_number_lookalike() -> None:
    # a float's 16-17 digits can form a Luhn-valid run: stage-times.json must not trip a scan
    rng = random.Random(1)
    m = StageMetrics()
    for _ in range(2000):
        m.add(rng.randrange(1, 1000), rng.random() / 10, rng.random() / 20)
    text = msgspec.json.encode(m.to_dict()).decode()
    assert not contains_pan(text)
    # the same times unrounded do trip it: this test is about a real risk
    assert contains_pan(msgspec.json.encode(m.per_event_us).decode())
