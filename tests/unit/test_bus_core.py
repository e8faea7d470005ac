"""Bus value types and helpers: validation messages, time parsing, token bucket, routing."""

from __future__ import annotations

from typing import Any

import pytest

from paypost.bus import RetryPolicy, Rule, TargetConfig, TokenBucket
from paypost.bus.core import (
    BusError,
    EncodedEvents,
    Router,
    compile_pattern,
    content_hash,
    encode_event,
    encode_events,
    id_key,
    parse_time,
    prepare,
)
from paypost.events import Event, TransactionHeld, new_event


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"concurrency": 0}, "concurrency must be >= 1"),
        ({"rate_limit_per_s": 0}, "rate_limit_per_s must be > 0"),
        ({"linger_ms": -1}, "linger_ms must be >= 0"),
        ({"lease_s": 0}, "lease_s must be > 0"),
        ({"bundle": 0}, "bundle must be between 1 and 1000"),
        ({"bundle": 1001}, "bundle must be between 1 and 1000"),
    ],
)
def test_target_config_errors_name_the_target_and_field(
    kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(BusError, match=message) as info:
        TargetConfig(name="posting", **kwargs)
    assert "'posting'" in str(info.value)


def test_retry_policy_needs_an_attempt() -> None:
    with pytest.raises(BusError, match="max_attempts"):
        RetryPolicy(max_attempts=0)


def test_parse_time() -> None:
    assert parse_time("1970-01-01T00:00:10Z") == 10.0
    assert parse_time("1970-01-01T01:00:10+01:00") == 10.0
    assert parse_time("1970-01-02") == 86400.0
    with pytest.raises(BusError, match="no time zone"):
        parse_time("1970-01-01T00:00:10")


def test_token_bucket_grants_rate_per_second_and_waits() -> None:
    clock = Clock()
    bucket = TokenBucket(5, clock)
    assert bucket.take(100) == 5  # burst: one second's worth
    assert bucket.take(1) == 0
    assert bucket.wait_s() == pytest.approx(0.2)
    clock.now += 0.5
    assert bucket.take(100) == 2
    clock.now += 10
    assert bucket.take(100) == 5  # never more than the burst


def test_keys_are_stable_64_bit_integers() -> None:
    assert id_key("ev-1") == id_key("ev-1") != id_key("ev-2")
    assert -(2**63) <= id_key("ev-1") < 2**63
    assert content_hash(b"{}") != content_hash(b"{ }")


def test_router_indexes_detail_type_pins_and_builds_the_dict_at_most_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = 0
    original = Event.to_dict

    def counting(self: Event) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        return original(self)

    monkeypatch.setattr(Event, "to_dict", counting)
    router = Router(
        [
            Rule(name="a", pattern={"detail-type": ["TransactionHeld"]}, target="a"),
            Rule(name="b", pattern={"detail-type": ["TransactionHeld"]}, target="a"),
            Rule(
                name="c",
                pattern={"detail-type": ["TransactionHeld"], "tenant": ["t1"]},
                target="c",
            ),
            Rule(name="d", pattern={"source": [{"prefix": "paypost."}]}, target="d"),
            Rule(name="e", pattern={"detail-type": ["Other"]}, target="e"),
        ]
    )
    event = new_event(TransactionHeld(reason="r", stage="s"), source="paypost.x", tenant="t1")
    assert router.route(event) == ("a", "c", "d")
    assert calls == 1
    only_pins = Router(
        [
            Rule(name="a", pattern={"detail-type": ["TransactionHeld"]}, target="a"),
            Rule(name="s", pattern={"source": ["paypost.x", "paypost.y"]}, target="s"),
            Rule(name="t", pattern={"source": ["paypost.other"]}, target="t"),
        ]
    )
    calls = 0
    assert only_pins.route(event) == ("a", "s")
    assert only_pins.route(event) == ("a", "s")  # served from the (type, source) cache
    assert calls == 0


def test_router_gives_what_matching_every_rule_in_turn_gives() -> None:
    """The index and the (detail-type, source) cache are shortcuts: the targets (each once)
    are those of testing every rule's full pattern."""
    rules = [
        Rule(name="held", pattern={"detail-type": ["TransactionHeld"]}, target="holds"),
        Rule(name="held2", pattern={"detail-type": ["TransactionHeld", "X"]}, target="holds"),
        Rule(name="x", pattern={"detail-type": ["X"]}, target="x"),
        Rule(name="src", pattern={"source": ["paypost.a"]}, target="from-a"),
        Rule(
            name="t1",
            pattern={"detail-type": ["TransactionHeld"], "tenant": ["t1"]},
            target="t1",
        ),
        Rule(name="prefix", pattern={"source": [{"prefix": "paypost.b"}]}, target="b"),
        Rule(name="any-t2", pattern={"tenant": ["t2"]}, target="t2"),
    ]
    events = [
        new_event(TransactionHeld(reason="r", stage="s"), source=src, tenant=tenant, **extra)
        for src in ("paypost.a", "paypost.b", "paypost.bb", "other")
        for tenant in ("t1", "t2", "t3")
        for extra in ({}, {"detail_type": "X"}, {"detail_type": "Y"})
    ]
    router = Router(rules)
    compiled = [(r.target, compile_pattern(r.pattern)) for r in rules]
    for _ in range(2):  # the second round is served from the cache where it applies
        for event in events:
            expected: list[str] = []
            for target, matcher in compiled:
                if target not in expected and matcher.matches(event.to_dict()):
                    expected.append(target)
            routed = router.route(event)
            assert sorted(routed) == sorted(expected), event
            assert len(set(routed)) == len(routed)


def test_encoded_events_hold_exactly_the_bodies_publish_would_encode() -> None:
    events = [
        new_event(TransactionHeld(reason=f"r{i}", stage="s"), source="paypost.x", tenant="t")
        for i in range(5)
    ]
    encoded = EncodedEvents(events[:2])
    assert encoded.append(events[2]) is events[2]
    encoded.extend(EncodedEvents(events[3:4]))
    encoded.extend(iter(events[4:]))
    assert list(encoded) == events and len(encoded) == 5 and encoded[1] is events[1]
    assert encoded.bodies == [encode_event(e) for e in events] == encode_events(encoded)
    assert list(encoded[1:3]) == events[1:3] and encoded[1:3].bodies == encoded.bodies[1:3]
    assert prepare(encoded) == prepare(events)
