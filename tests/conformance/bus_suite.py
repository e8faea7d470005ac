"""The bus conformance suite: every backend's test module subclasses `BusConformance`.

A backend proves itself by passing these cases (eventsourcing-style): implement
`make_bus(clock, config)`, `reopen(bus)` (a restart: a fresh bus over the same durable state;
an in-memory backend returns a new view of the same state), and the two effect-store hooks
that let the "exactly-once in effect" cases write a consumer's effect inside the unit of work.

Time is a `FakeClock` that tests advance by hand: retries, leases, linger and rate limits
are tested without sleeping and without timing assertions.
"""

from __future__ import annotations

import abc
import random
import threading
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest

from paypost.bus import (
    ArchiveQuery,
    Bus,
    BusConfig,
    Consumer,
    Delivery,
    RetryPolicy,
    Rule,
    TargetConfig,
    UnitOfWork,
)
from paypost.bus.core import BusError, EncodedEvents, content_hash, encode_event, id_key
from paypost.events import Event, TransactionHeld, TransactionRejected, new_event

T0 = 1_790_000_000.0  # 2026-09-21, a fixed start for the fake clock


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now
        self.lock = threading.Lock()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        with self.lock:
            self.now += seconds


def held(n: int, reason: str = "review", tenant: str = "t1", **kw: Any) -> Event:
    return new_event(
        TransactionHeld(reason=reason, stage=f"s{n}"),
        source="paypost.test",
        tenant=tenant,
        id=kw.pop("id", f"held-{n}"),
        time="2026-09-21T00:00:00.000Z",
        **kw,
    )


def rejected(n: int, reason: str = "limit") -> Event:
    return new_event(
        TransactionRejected(reason=reason),
        source="paypost.test",
        tenant="t1",
        id=f"rej-{n}",
        time="2026-09-21T00:00:00.000Z",
    )


NO_JITTER = RetryPolicy(max_attempts=3, base_delay_s=1.0, max_delay_s=10.0, jitter=False)


class BusConformance(abc.ABC):
    """Backend-neutral behaviour of a paypost bus."""

    # -- what a backend provides ---------------------------------------------------------
    @abc.abstractmethod
    def make_bus(self, clock: FakeClock, config: BusConfig | None = None) -> Bus: ...

    @abc.abstractmethod
    def reopen(self, bus: Bus) -> Bus:
        """A restart: a new bus over the same durable state (old one abandoned)."""

    @abc.abstractmethod
    def apply_effect(self, uow: UnitOfWork, event: Event) -> None:
        """Write one effect for EVENT through the unit of work (e.g. an INSERT on uow.conn)."""

    @abc.abstractmethod
    def effect_counts(self, bus: Bus) -> Counter[str]:
        """Committed effects per event id."""

    # -- fixtures ------------------------------------------------------------------------
    @pytest.fixture
    def clock(self) -> FakeClock:
        return FakeClock()

    @pytest.fixture
    def bus(self, clock: FakeClock) -> Bus:
        bus = self.make_bus(clock)
        bus.put_target(TargetConfig(name="holds", batch_size=10, retry=NO_JITTER, lease_s=30))
        bus.put_target(TargetConfig(name="audit", batch_size=10, retry=NO_JITTER, lease_s=30))
        bus.put_rule(
            Rule(name="holds", pattern={"detail-type": ["TransactionHeld"]}, target="holds")
        )
        bus.put_rule(Rule(name="audit", pattern={"source": ["paypost.test"]}, target="audit"))
        return bus

    @staticmethod
    def ids(deliveries: Sequence[Delivery]) -> list[str]:
        return [d.event.id for d in deliveries]

    @staticmethod
    def receive_at_least(bus: Bus, target: str, n: int, tries: int = 50) -> list[Delivery]:
        """Receive until N deliveries came (or TRIES receives): a networked backend's redrive
        reaches its queue a little later on a loaded server; the embedded ones at once."""
        got: list[Delivery] = []
        for _ in range(tries):
            got += bus.receive(target)
            if len(got) >= n:
                break
        return got

    # -- routing -------------------------------------------------------------------------
    def test_routes_by_pattern(self, bus: Bus) -> None:
        bus.put_target(TargetConfig(name="big", batch_size=10))
        bus.put_rule(Rule(name="fraud", pattern={"detail": {"reason": ["fraud"]}}, target="big"))
        result = bus.publish([held(1), held(2, reason="fraud"), rejected(3)])
        assert result.published == 3
        assert self.ids(bus.receive("holds")) == ["held-1", "held-2"]
        assert self.ids(bus.receive("big")) == ["held-2"]
        assert result.routed == {"holds": 2, "audit": 3, "big": 1}

    def test_fan_out_each_target_has_its_own_queue(self, bus: Bus) -> None:
        bus.publish([held(1), held(2)])
        holds = bus.receive("holds")
        audit = bus.receive("audit")
        assert self.ids(holds) == self.ids(audit) == ["held-1", "held-2"]
        assert bus.ack(holds) == 2
        assert bus.pending("holds") == 0
        assert bus.pending("audit") == 2  # acking one target leaves the other untouched

    def test_inline_targets_are_handed_back_archived_but_not_enqueued(self, bus: Bus) -> None:
        with bus.unit_of_work() as uow:
            result = uow.publish([held(1), rejected(2)], dedup=False, inline={"holds"})
        assert [e.id for e in result.inline["holds"]] == ["held-1"]
        assert "audit" not in result.inline  # not inline: queued as usual
        assert result.routed == {"holds": 1, "audit": 2}
        assert bus.pending("holds") == 0
        assert self.ids(bus.receive("audit")) == ["held-1", "rej-2"]
        assert bus.archive_count() == 2

    def test_publish_only_to_named_targets(self, bus: Bus) -> None:
        result = bus.publish([held(1)], dedup=False, only={"holds"})
        assert result.routed == {"holds": 1}
        assert bus.pending("audit") == 0
        assert self.ids(bus.receive("holds")) == ["held-1"]

    def test_next_position_brackets_what_a_unit_of_work_publishes(self, bus: Bus) -> None:
        with bus.unit_of_work() as uow:
            start = uow.next_position()
            uow.publish([held(1), held(2)], dedup=False)
            end = uow.next_position()
        assert end - start == 2
        archived = bus.archive(ArchiveQuery(start=0, end=T0 + 10))
        assert [a.position for a in archived] == [start, start + 1]

    def test_dead_letter_without_a_delivery(self, bus: Bus) -> None:
        with bus.unit_of_work() as uow:
            assert uow.dead_letter("holds", [held(1), held(2)], "sequence incomplete") == 2
        dead = bus.dlq_list(target="holds")
        assert [d.event.id for d in dead] == ["held-1", "held-2"]
        assert dead[0].error == "sequence incomplete" and dead[0].attempts == 1
        assert bus.dlq_redrive(target="holds") == 2
        assert self.ids(self.receive_at_least(bus, "holds", 2)) == ["held-1", "held-2"]

    def test_rule_with_unknown_target_is_refused(self, bus: Bus) -> None:
        with pytest.raises(BusError, match="nowhere"):
            bus.put_rule(Rule(name="x", pattern={"source": ["a"]}, target="nowhere"))

    def test_content_filters_and_unindexed_rules(self, bus: Bus) -> None:
        bus.put_target(TargetConfig(name="f"))
        bus.put_rule(
            Rule(
                name="f",
                pattern={
                    "detail-type": ["TransactionHeld"],
                    "detail": {"reason": [{"prefix": "fra"}]},
                },
                target="f",
            )
        )
        bus.put_rule(Rule(name="g", pattern={"id": [{"suffix": "-3"}]}, target="f"))
        bus.publish([held(1), held(2, reason="fraud"), rejected(3)])
        assert self.ids(bus.receive("f")) == ["held-2", "rej-3"]

    def test_invalid_pattern_is_refused_with_the_rule_name(self, bus: Bus) -> None:
        with pytest.raises(BusError, match="rule 'bad'"):
            bus.put_rule(
                Rule(name="bad", pattern={"detail": {"reason": [{"prefix": 5}]}}, target="holds")
            )
        assert "bad" not in {r.name for r in bus.rules()}

    def test_rules_and_targets_are_listed(self, bus: Bus) -> None:
        assert {t.name for t in bus.targets()} == {"holds", "audit"}
        assert {r.name for r in bus.rules()} == {"holds", "audit"}
        bus.delete_rule("audit")
        bus.publish([held(1)])
        assert bus.pending("audit") == 0

    # -- batching and linger -------------------------------------------------------------
    def test_batches_of_batch_size(self, bus: Bus) -> None:
        bus.put_target(TargetConfig(name="holds", batch_size=2, retry=NO_JITTER))
        bus.publish([held(i) for i in range(5)])
        sizes = []
        while batch := bus.receive("holds"):
            sizes.append(len(batch))
            bus.ack(batch)
        assert sizes == [2, 2, 1]

    def test_linger_holds_a_partial_batch_until_its_oldest_event_waited(
        self, bus: Bus, clock: FakeClock
    ) -> None:
        bus.put_target(TargetConfig(name="holds", batch_size=4, linger_ms=100))
        bus.publish([held(1), held(2)])
        assert bus.receive("holds") == []  # partial batch, lingering
        clock.advance(0.05)
        bus.publish([held(3)])
        assert bus.receive("holds") == []
        clock.advance(0.06)  # oldest has now waited 110 ms
        assert self.ids(bus.receive("holds")) == ["held-1", "held-2", "held-3"]

    def test_full_batch_is_released_without_linger(self, bus: Bus) -> None:
        bus.put_target(TargetConfig(name="holds", batch_size=2, linger_ms=60_000))
        bus.publish([held(1), held(2), held(3)])
        assert self.ids(bus.receive("holds")) == ["held-1", "held-2"]
        assert bus.receive("holds") == []  # the third lingers

    def test_max_in_flight_caps_leased_events(self, bus: Bus) -> None:
        bus.put_target(TargetConfig(name="holds", batch_size=2, max_in_flight=3))
        bus.publish([held(i) for i in range(6)])
        first = bus.receive("holds")
        second = bus.receive("holds")
        assert (len(first), len(second)) == (2, 1)
        assert bus.receive("holds") == []
        bus.ack(first)
        assert len(bus.receive("holds")) == 2

    # -- retries, backoff, DLQ -----------------------------------------------------------
    def test_nack_retries_with_exponential_backoff_then_dead_letters(
        self, bus: Bus, clock: FakeClock
    ) -> None:
        bus.publish([held(1)])
        start = clock()
        (d1,) = bus.receive("holds")
        assert d1.attempt == 1
        assert bus.nack([d1], "ValueError: account closed") == 0
        assert bus.receive("holds") == []  # backing off: 1 s
        clock.advance(0.999)
        assert bus.receive("holds") == []
        clock.advance(0.002)
        (d2,) = bus.receive("holds")
        assert d2.attempt == 2
        bus.nack([d2], "ValueError: account closed")
        clock.advance(1.5)
        assert bus.receive("holds") == []  # second backoff is 2 s
        clock.advance(0.6)
        (d3,) = bus.receive("holds")
        assert d3.attempt == 3
        assert d3.first_attempt_at == start
        assert bus.nack([d3], "ValueError: account closed (last)") == 1
        assert bus.pending("holds") == 0
        (dead,) = bus.dlq_list(target="holds")
        assert dead.event.id == "held-1"
        assert dead.error == "ValueError: account closed (last)"
        assert dead.attempts == 3
        assert dead.first_attempt_at == start
        assert dead.last_attempt_at == d3.last_attempt_at
        assert dead.dead_lettered_at == clock()
        assert bus.dlq_get(dead.id) == dead

    def test_retry_policy_backoff_is_capped_and_jittered(self) -> None:
        p = RetryPolicy(max_attempts=10, base_delay_s=0.5, max_delay_s=3.0, jitter=False)
        assert [p.delay_s(k) for k in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
        j = RetryPolicy(max_attempts=10, base_delay_s=0.5, max_delay_s=3.0, jitter=True)
        assert j.delay_s(3, rand=lambda: 0.25) == 0.5  # full jitter: uniform in [0, cap)
        assert j.delay_s(60, rand=lambda: 0.999) < 3.0

    def test_dlq_redrive_by_target_and_pattern(self, bus: Bus, clock: FakeClock) -> None:
        bus.put_target(TargetConfig(name="holds", retry=RetryPolicy(max_attempts=1)))
        bus.put_target(TargetConfig(name="audit", retry=RetryPolicy(max_attempts=1)))
        bus.publish([held(1), held(2, reason="fraud")])
        bus.nack(bus.receive("holds"), "boom")
        bus.nack(bus.receive("audit"), "boom")
        assert len(bus.dlq_list()) == 4
        assert len(bus.dlq_list(target="holds")) == 2
        assert bus.dlq_redrive(target="holds", pattern={"detail": {"reason": ["fraud"]}}) == 1
        (again,) = bus.receive("holds")
        assert again.event.id == "held-2"
        assert again.attempt == 1  # a redrive starts a fresh attempt count
        assert len(bus.dlq_list()) == 3
        assert bus.dlq_redrive(target="audit") == 2
        assert len(bus.receive("audit")) == 2
        assert [d.event.id for d in bus.dlq_list()] == ["held-1"]

    def test_dead_letter_error_never_holds_a_card_number(self, bus: Bus) -> None:
        bus.put_target(TargetConfig(name="holds", retry=RetryPolicy(max_attempts=1)))
        bus.publish([held(1)])
        bus.nack(
            bus.receive("holds"), "ValueError: bad PAN 4111 1111 1111 1111 in field 2 " + "x" * 5000
        )
        (dead,) = bus.dlq_list()
        assert "4111 1111 1111 1111" not in dead.error and "1111" in dead.error
        assert len(dead.error) <= 2000

    def test_unknown_dead_letter_is_a_clear_error(self, bus: Bus) -> None:
        with pytest.raises(BusError, match="dead letter 999"):
            bus.dlq_get(999)

    # -- leases: nothing lost, nothing acked twice -------------------------------------------
    def test_expired_lease_redelivers_and_stale_ack_is_ignored(
        self, bus: Bus, clock: FakeClock
    ) -> None:
        bus.publish([held(1)])
        (first,) = bus.receive("holds")
        assert bus.receive("holds") == []  # leased: invisible
        clock.advance(31)  # the consumer died; lease_s=30 has passed
        (second,) = bus.receive("holds")
        assert second.event.id == "held-1" and second.attempt == 2
        assert bus.ack([first]) == 0  # the dead consumer's late ack does nothing
        assert bus.ack([second]) == 1
        assert bus.ack([second]) == 0  # nothing is acked twice
        assert bus.pending("holds") == 0

    def test_event_whose_lease_keeps_expiring_is_dead_lettered(
        self, bus: Bus, clock: FakeClock
    ) -> None:
        bus.publish([held(1)])
        for _ in range(3):  # max_attempts=3, each delivery's consumer "crashes"
            assert len(bus.receive("holds")) == 1
            clock.advance(31)
        assert bus.receive("holds") == []
        (dead,) = bus.dlq_list(target="holds")
        assert "lease expired" in dead.error and dead.attempts == 3

    def test_restart_with_events_in_flight(self, bus: Bus, clock: FakeClock) -> None:
        bus.put_target(TargetConfig(name="holds", batch_size=3, lease_s=30, retry=NO_JITTER))
        bus.publish([held(i) for i in range(5)])
        batch = bus.receive("holds")  # held-0..2 in flight
        bus.ack(batch[:1])  # held-0 done before the crash
        restarted = self.reopen(bus)
        assert restarted.pending("holds") == 4  # nothing lost
        got: list[str] = []
        while b := restarted.receive("holds", 10):
            got += self.ids(b)
            restarted.ack(b)
        assert got == ["held-3", "held-4"]  # in-flight ones are still leased
        clock.advance(31)
        while b := restarted.receive("holds", 10):
            got += self.ids(b)
            restarted.ack(b)
        assert sorted(got) == ["held-1", "held-2", "held-3", "held-4"]  # held-0 not again
        assert restarted.pending("holds") == 0

    # -- archive and replay --------------------------------------------------------------
    def _archive_fixture(self, bus: Bus, clock: FakeClock) -> None:
        bus.publish([held(1), rejected(2)])  # at T0
        clock.advance(100)
        bus.publish([held(3, reason="fraud"), rejected(4)])  # at T0+100
        clock.advance(100)
        for target in ("holds", "audit"):
            while b := bus.receive(target):
                bus.ack(b)

    def test_every_published_event_is_archived(self, bus: Bus, clock: FakeClock) -> None:
        self._archive_fixture(bus, clock)
        assert bus.archive_count() == 4
        q = ArchiveQuery(start=T0 + 50, end=T0 + 150)
        assert [a.event.id for a in bus.archive(q)] == ["held-3", "rej-4"]
        q = ArchiveQuery(start=T0, end=T0 + 1000, pattern={"detail-type": ["TransactionRejected"]})
        assert [a.event.id for a in bus.archive(q)] == ["rej-2", "rej-4"]

    def test_replay_time_range_and_pattern_to_one_target(self, bus: Bus, clock: FakeClock) -> None:
        self._archive_fixture(bus, clock)
        q = ArchiveQuery(start=T0 - 1, end=T0 + 150, pattern={"source": ["paypost.test"]})
        result = bus.replay(q, target="holds")
        assert result.matched == 4
        assert result.routed == {"holds": 2}  # only what the target's rules route to it
        assert bus.pending("audit") == 0
        replayed = bus.receive("holds")
        assert self.ids(replayed) == ["held-1", "held-3"]  # same ids as the originals

    def test_replay_to_the_whole_bus(self, bus: Bus, clock: FakeClock) -> None:
        self._archive_fixture(bus, clock)
        q = ArchiveQuery(start=T0 + 50, end=T0 + 150, pattern={"detail": {"reason": ["fraud"]}})
        seen: list[tuple[int, int]] = []
        result = bus.replay(q, progress=lambda done, total: seen.append((done, total)))
        assert result.routed == {"holds": 1, "audit": 1}
        assert seen and seen[-1] == (2, 2)
        assert self.ids(bus.receive("audit")) == ["held-3"]

    def test_reversed_time_range_is_refused(self) -> None:
        with pytest.raises(BusError, match="reversed"):
            ArchiveQuery(start=T0 + 10, end=T0)

    def test_purge_respects_retention_and_keeps_undelivered_events(self, clock: FakeClock) -> None:
        bus = self.make_bus(clock, BusConfig(archive_retention_s=3600, dedup_window_s=600))
        bus.put_target(TargetConfig(name="holds"))
        bus.put_rule(Rule(name="r", pattern={"detail-type": ["TransactionHeld"]}, target="holds"))
        bus.publish([held(1), held(2), rejected(3)])
        b = bus.receive("holds", 1)
        bus.ack(b)  # held-1 consumed; held-2 still queued; rej-3 routed nowhere
        clock.advance(3601)
        bus.publish([held(4)])
        assert bus.purge_archive() == 2  # held-1 and rej-3
        assert bus.archive_count() == 2
        assert self.ids(bus.receive("holds")) == ["held-2", "held-4"]  # nothing lost

    # -- publish dedup -------------------------------------------------------------------
    def test_publish_dedup_drops_repeats_inside_the_window(
        self, bus: Bus, clock: FakeClock
    ) -> None:
        first = bus.publish([held(1), held(1)])
        assert (first.published, first.duplicates_dropped) == (1, 1)
        clock.advance(10)
        again = bus.publish([held(1), held(2)])
        assert (again.published, again.duplicates_dropped, again.id_conflicts) == (1, 1, 0)
        assert self.ids(bus.receive("holds")) == ["held-1", "held-2"]
        assert bus.stats().duplicates_dropped == 2
        assert bus.archive_count() == 2

    def test_same_id_different_content_is_a_conflict_and_still_delivered(self, bus: Bus) -> None:
        bus.publish([held(1, reason="review")])
        result = bus.publish([held(1, reason="tampered")])
        assert (result.published, result.duplicates_dropped, result.id_conflicts) == (1, 0, 1)
        got = bus.receive("holds")
        assert [d.event.detail["reason"] for d in got] == ["review", "tampered"]
        assert got[0].tracking_key != got[1].tracking_key
        assert bus.stats().id_conflicts == 1

    def test_publish_without_dedup_archives_and_delivers_every_copy(self, bus: Bus) -> None:
        assert bus.publish([held(1)], dedup=False).published == 1
        assert bus.publish([held(1)], dedup=False).published == 1
        assert bus.archive_count() == 2
        assert self.ids(bus.receive("holds")) == ["held-1", "held-1"]

    def test_tracking_keys_do_not_depend_on_how_an_event_was_published(self, bus: Bus) -> None:
        # The same event published with and without dedup, then dead-lettered and redriven:
        # every delivery carries the keys publish dedup would compute (tracking records
        # written from one are found from the others).
        event = held(1)
        expected = (id_key(event.id), content_hash(encode_event(event)))
        bus.publish([event], dedup=False)
        bus.publish([event])
        with bus.unit_of_work() as uow:
            uow.dead_letter("holds", [event], "gave up")
        bus.dlq_redrive("holds")
        got = bus.receive("holds")
        assert self.ids(got) == ["held-1"] * 3
        assert {d.tracking_key for d in got} == {expected}

    def test_pre_encoded_events_publish_exactly_like_plain_ones(self, bus: Bus) -> None:
        # An EncodedEvents (bodies encoded by the stage) and a plain list archive the same
        # bodies, dedup the same and deliver the same events with the same tracking keys.
        def publish_all(wrap: Any, base: int) -> list[Event]:
            first = bus.publish(wrap([held(base + 1), held(base + 2), held(base + 1)]))
            assert (first.published, first.duplicates_dropped) == (2, 1)
            again = bus.publish(wrap([held(base + 1, reason="other")]))
            assert again.id_conflicts == 1
            with bus.unit_of_work() as uow:
                part = wrap([held(base + 3), held(base + 4)])[1:]
                inline = uow.publish(part, dedup=False, inline={"holds"})
                assert [e.id for e in inline.inline["holds"]] == [f"held-{base + 4}"]
                uow.publish(wrap([held(base + 5)]), dedup=False)
            return [held(base + 1), held(base + 2), held(base + 1, reason="other"), held(base + 5)]

        expected = publish_all(list, 0) + publish_all(EncodedEvents, 100)
        archived = [a.event for a in bus.archive(ArchiveQuery(start=0, end=T0 + 1))]
        assert [encode_event(e) for e in archived if e.source == "paypost.test"] == [
            encode_event(e)
            for e in (*expected[:3], held(4), expected[3], *expected[4:7], held(104), expected[7])
        ]
        got = bus.receive("holds", 100)
        assert self.ids(got) == [e.id for e in expected]
        assert [d.tracking_key for d in got] == [
            (id_key(e.id), content_hash(encode_event(e))) for e in expected
        ]

    def test_dedup_window_expires(self, clock: FakeClock) -> None:
        bus = self.make_bus(clock, BusConfig(archive_retention_s=None, dedup_window_s=60))
        bus.put_target(TargetConfig(name="holds"))
        bus.put_rule(Rule(name="r", pattern={"detail-type": ["TransactionHeld"]}, target="holds"))
        bus.publish([held(1)])
        clock.advance(61)
        assert bus.publish([held(1)]).published == 1
        assert len(bus.receive("holds")) == 2

    # -- unit of work and tracking: exactly-once in effect --------------------------------
    def test_unit_of_work_is_atomic(self, bus: Bus, clock: FakeClock) -> None:
        bus.publish([held(1)])
        (d,) = bus.receive("holds")
        with pytest.raises(RuntimeError), bus.unit_of_work() as uow:
            self.apply_effect(uow, d.event)
            uow.track("c", [d])
            uow.publish([rejected(9)])
            uow.ack([d])
            raise RuntimeError("crash before commit")
        assert self.effect_counts(bus) == Counter()
        assert bus.archive_count() == 1  # the output was not published
        assert bus.pending("holds") == 1  # nor the input acked
        with bus.unit_of_work() as uow:
            assert uow.processed("c", [d]) == set()

    def test_crash_between_effect_and_ack_does_not_repeat_the_effect(
        self, bus: Bus, clock: FakeClock
    ) -> None:
        bus.publish([held(1), held(2)])
        batch = bus.receive("holds")
        # Effects + tracking commit, then the process dies before acking (the ack is a
        # separate step here on purpose: the split a broker backend has).
        with bus.unit_of_work() as uow:
            for d in batch:
                self.apply_effect(uow, d.event)
            uow.track("poster", batch)
        clock.advance(31)  # lease expires; the batch is redelivered

        def handler(ds: Sequence[Delivery], uow: UnitOfWork) -> None:
            for d in ds:
                self.apply_effect(uow, d.event)

        consumer = Consumer(bus, "holds", handler, name="poster", sleep=clock.advance)
        consumer.run(until_idle=True)
        assert consumer.stats.skipped == 2 and consumer.stats.processed == 0
        assert self.effect_counts(bus) == Counter({"held-1": 1, "held-2": 1})
        assert bus.pending("holds") == 0

    def test_consumer_commits_effects_outputs_and_acks_together(
        self, bus: Bus, clock: FakeClock
    ) -> None:
        bus.publish([held(i) for i in range(4)])

        def handler(ds: Sequence[Delivery], uow: UnitOfWork) -> None:
            for d in ds:
                self.apply_effect(uow, d.event)
            uow.publish([rejected(int(d.event.id.split("-")[1])) for d in ds])

        Consumer(bus, "holds", handler, name="rules", sleep=clock.advance).run(until_idle=True)
        assert self.effect_counts(bus) == Counter({f"held-{i}": 1 for i in range(4)})
        assert bus.pending("holds") == 0
        assert bus.pending("audit") == 8  # 4 inputs + 4 outputs
        # A replay of the inputs is a no-op for this consumer (its tracking record).
        bus.replay(ArchiveQuery(start=T0 - 1, end=T0 + 1), target="holds")
        stats = Consumer(bus, "holds", handler, name="rules", sleep=clock.advance).run(
            until_idle=True
        )
        assert stats.skipped == 4 and stats.processed == 0
        assert self.effect_counts(bus) == Counter({f"held-{i}": 1 for i in range(4)})

    def test_same_event_twice_in_one_batch_has_one_effect(self, bus: Bus, clock: FakeClock) -> None:
        bus.publish([held(1), held(1), held(2)], dedup=False)

        def handler(ds: Sequence[Delivery], uow: UnitOfWork) -> None:
            for d in ds:
                self.apply_effect(uow, d.event)

        stats = Consumer(bus, "holds", handler, sleep=clock.advance).run(until_idle=True)
        assert self.effect_counts(bus) == Counter({"held-1": 1, "held-2": 1})
        assert (stats.processed, stats.skipped) == (2, 1)

    def test_deferred_deliveries_get_a_unit_of_work_of_their_own_after_the_batch(
        self, bus: Bus, clock: FakeClock
    ) -> None:
        """`Consumer.defer`: deliveries it names are left out of the batch's unit of work
        (not handled, tracked or acked there) and handled once, in a second one."""
        bus.publish([held(i) for i in range(6)])
        waiting = {"held-1", "held-4"}
        calls: list[list[str]] = []

        def handler(ds: Sequence[Delivery], uow: UnitOfWork) -> None:
            for d in ds:
                self.apply_effect(uow, d.event)
            calls.append(sorted(self.ids(ds)))

        def defer(uow: UnitOfWork, ds: Sequence[Delivery]) -> list[Delivery]:
            return [d for d in ds if d.event.id in waiting]

        consumer = Consumer(bus, "holds", handler, name="p", defer=defer, sleep=clock.advance)
        stats = consumer.run(until_idle=True)
        assert calls == [["held-0", "held-2", "held-3", "held-5"], ["held-1", "held-4"]]
        assert self.effect_counts(bus) == Counter({f"held-{i}": 1 for i in range(6)})
        assert bus.pending("holds") == 0
        assert (stats.batches, stats.processed, stats.nacked) == (1, 6, 0)
        # both units of work recorded what they processed: a replay changes nothing
        bus.replay(ArchiveQuery(start=T0 - 1, end=T0 + 1), target="holds")
        again = Consumer(bus, "holds", handler, name="p", defer=defer, sleep=clock.advance)
        assert again.run(until_idle=True).skipped == 6
        assert self.effect_counts(bus) == Counter({f"held-{i}": 1 for i in range(6)})

    def test_a_deferred_poison_event_does_not_undo_its_batch(
        self, bus: Bus, clock: FakeClock
    ) -> None:
        bus.publish([held(i) for i in range(4)])

        def handler(ds: Sequence[Delivery], uow: UnitOfWork) -> None:
            for d in ds:
                if d.event.id == "held-3":
                    raise ValueError("cannot post held-3: account unknown")
                self.apply_effect(uow, d.event)

        def defer(uow: UnitOfWork, ds: Sequence[Delivery]) -> list[Delivery]:
            return [d for d in ds if d.event.id in ("held-2", "held-3")]

        stats = Consumer(bus, "holds", handler, defer=defer, sleep=clock.advance).run(
            until_idle=True
        )
        assert self.effect_counts(bus) == Counter({f"held-{i}": 1 for i in range(3)})
        (dead,) = bus.dlq_list(target="holds")
        assert dead.event.id == "held-3" and "account unknown" in dead.error
        assert stats.processed == 3 and stats.dead_lettered == 1

    def test_poison_event_does_not_dead_letter_its_neighbours(
        self, bus: Bus, clock: FakeClock
    ) -> None:
        bus.publish([held(i) for i in range(5)])

        def handler(ds: Sequence[Delivery], uow: UnitOfWork) -> None:
            for d in ds:
                if d.event.id == "held-2":
                    raise ValueError("cannot post held-2: account unknown")
                self.apply_effect(uow, d.event)

        stats = Consumer(bus, "holds", handler, sleep=clock.advance).run(until_idle=True)
        assert self.effect_counts(bus) == Counter({f"held-{i}": 1 for i in (0, 1, 3, 4)})
        (dead,) = bus.dlq_list(target="holds")
        assert dead.event.id == "held-2"
        assert dead.attempts == 3 and "account unknown" in dead.error
        assert stats.dead_lettered == 1 and stats.processed == 4

    def test_rate_limit_is_back_pressure_not_loss(self, bus: Bus, clock: FakeClock) -> None:
        bus.put_target(TargetConfig(name="holds", batch_size=100, rate_limit_per_s=10))
        bus.publish([held(i) for i in range(35)])
        handled: list[tuple[float, int]] = []

        def handler(ds: Sequence[Delivery], uow: UnitOfWork) -> None:
            handled.append((clock(), len(ds)))

        consumer = Consumer(bus, "holds", handler, sleep=clock.advance)
        consumer.run(max_batches=1)
        assert sum(n for _, n in handled) == 10  # one second's worth (the burst)
        assert bus.pending("holds") == 25  # the rest waits in the queue
        consumer.run(until_idle=True)
        assert sum(n for _, n in handled) == 35  # all delivered in the end
        # never more than rate × elapsed + burst
        start = handled[0][0]
        total = 0
        for at, n in handled:
            total += n
            assert total <= 10 * (at - start) + 10 + 1e-9

    def test_concurrency_keeps_batches_in_flight_under_leases(
        self, bus: Bus, clock: FakeClock
    ) -> None:
        bus.put_target(TargetConfig(name="holds", batch_size=2, concurrency=3))
        bus.publish([held(i) for i in range(12)])
        lock = threading.Lock()
        threads: set[str] = set()

        def handler(ds: Sequence[Delivery], uow: UnitOfWork) -> None:
            with lock:
                threads.add(threading.current_thread().name)
            for d in ds:
                self.apply_effect(uow, d.event)

        stats = Consumer(bus, "holds", handler).run(until_idle=True)
        assert stats.processed == 12 and stats.batches == 6
        assert self.effect_counts(bus) == Counter({f"held-{i}": 1 for i in range(12)})
        assert all(t.startswith("consumer-holds") for t in threads)

    # -- deterministic fault simulation (TigerBeetle-style) ----------------------------------
    @pytest.mark.parametrize("seed", range(6))
    def test_simulated_faults_keep_effects_once_and_lose_nothing(
        self, clock: FakeClock, seed: int
    ) -> None:
        """Random interleavings of publishes (with repeats), receives, commits, crashes before
        commit, crashes between commit and ack, slow consumers acting after their lease
        expired, nacks, clock jumps and restarts; then drain. Every published event has
        exactly one effect, and nothing is left queued or dead-lettered."""
        rng = random.Random(seed)
        bus = self.make_bus(clock)
        bus.put_target(
            TargetConfig(
                name="t",
                batch_size=rng.randint(1, 6),
                lease_s=5,
                retry=RetryPolicy(max_attempts=10_000, base_delay_s=0.1, max_delay_s=2),
            )
        )
        bus.put_rule(Rule(name="t", pattern={"detail-type": ["TransactionHeld"]}, target="t"))
        published: set[str] = set()
        zombies: list[list[Delivery]] = []  # batches held by consumers that will act late
        next_id = 0

        def commit(bus: Bus, batch: Sequence[Delivery], ack: bool = True) -> None:
            with bus.unit_of_work() as uow:
                done = uow.processed("sim", batch)
                fresh = {d.tracking_key: d for d in batch if d.tracking_key not in done}
                for d in fresh.values():
                    self.apply_effect(uow, d.event)
                uow.track("sim", list(fresh.values()))
                if ack:
                    uow.ack(batch)

        for _ in range(250):
            op = rng.random()
            if op < 0.25:
                events = []
                for _ in range(rng.randint(1, 4)):
                    if published and rng.random() < 0.3:
                        events.append(held(int(rng.choice(sorted(published)).split("-")[1])))
                    else:
                        events.append(held(next_id))
                        published.add(f"held-{next_id}")
                        next_id += 1
                bus.publish(events)
            elif op < 0.6:
                batch = bus.receive("t")
                if not batch:
                    continue
                fate = rng.random()
                if fate < 0.4:
                    commit(bus, batch)
                elif fate < 0.55:
                    with pytest.raises(RuntimeError), bus.unit_of_work() as uow:
                        for d in batch:
                            self.apply_effect(uow, d.event)
                        raise RuntimeError("crash before commit")
                elif fate < 0.7:
                    commit(bus, batch, ack=False)  # crash between commit and ack
                elif fate < 0.85:
                    zombies.append(batch)
                else:
                    bus.nack(batch, "transient")
            elif op < 0.7 and zombies:
                commit(bus, zombies.pop(rng.randrange(len(zombies))))  # late, maybe re-leased
            elif op < 0.9:
                clock.advance(rng.uniform(0, 8))
            else:
                bus = self.reopen(bus)
                zombies.clear()  # the crashed process's consumers are gone

        while bus.pending("t"):
            clock.advance(10)
            while batch := bus.receive("t"):
                commit(bus, batch)
        assert self.effect_counts(bus) == Counter({event_id: 1 for event_id in published})
        assert bus.dlq_list() == []

    # -- stats ---------------------------------------------------------------------------
    def test_stats(self, bus: Bus, clock: FakeClock) -> None:
        bus.publish([held(1), held(2), held(3), held(3)])
        bus.receive("holds", 1)  # held-1 in flight
        (d,) = bus.receive("holds", 1)
        bus.nack([d], "x")  # held-2 delayed
        stats = {t.name: t for t in bus.stats().targets}
        assert (stats["holds"].queued, stats["holds"].in_flight, stats["holds"].delayed) == (
            1,
            1,
            1,
        )
        assert stats["audit"].queued == 3 and stats["audit"].routed_total == 3
        s = bus.stats()
        assert (s.archived, s.duplicates_dropped) == (3, 1)
