"""FR5 on the bus: accepted authorizations routed to the standardize stage come out once."""

from __future__ import annotations

import sys
from pathlib import Path

import msgspec

from paypost.bus.consumer import run_consumer
from paypost.bus.core import ArchiveQuery, Rule, TargetConfig
from paypost.bus.memory import MemoryBus
from paypost.events import StandardizationRejected, detail_of
from paypost.iso.iso20022 import render_xml, validate_xml
from paypost.stages import standardize as stage

sys.path.insert(0, str(Path(__file__).parent.parent / "unit"))
from test_fr5_standardize import accepted_detail, accepted_event


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def test_fr5_bus_routes_accepted_events_through_standardize_exactly_once() -> None:
    clock = Clock()
    bus = MemoryBus(clock=clock)
    bus.put_target(TargetConfig(name="standardize", batch_size=50))
    bus.put_target(TargetConfig(name="enrich", batch_size=500))
    bus.put_target(TargetConfig(name="rejections", batch_size=500))
    bus.put_rule(
        Rule(
            name="accepted",
            pattern={"detail-type": ["AuthorizationAccepted"]},
            target="standardize",
        )
    )
    bus.put_rule(
        Rule(
            name="standardized",
            pattern={"detail-type": ["TransactionStandardized"]},
            target="enrich",
        )
    )
    bus.put_rule(
        Rule(
            name="rejected",
            pattern={"detail-type": ["StandardizationRejected"]},
            target="rejections",
        )
    )
    bad = accepted_detail()
    del bad["request"]["merchant"]
    events = [accepted_event() for _ in range(120)] + [accepted_event(bad)]
    bus.publish(events)

    stats = run_consumer(bus, "standardize", stage.handle, until_idle=True, sleep=lambda s: None)
    assert stats.processed == 121
    standardized = bus.receive("enrich", 500)
    rejected = bus.receive("rejections", 500)
    assert len(standardized) == 120
    assert len(rejected) == 1
    assert detail_of(rejected[0].event, StandardizationRejected).missing == ["request.merchant"]
    validate_xml(render_xml(standardized[0].event.detail["pacs008"]))
    by_cause = {d.event.causation_id: d.event for d in standardized}
    assert set(by_cause) == {e.id for e in events[:120]}

    # Replaying the inputs redoes nothing: the tracking record skips them, no new outputs.
    bus.ack(standardized + rejected)
    clock.now += 1
    bus.replay(ArchiveQuery(start=0, end=clock.now + 1), target="standardize")
    again = run_consumer(bus, "standardize", stage.handle, until_idle=True, sleep=lambda s: None)
    assert again.processed == 0
    assert bus.receive("enrich", 500) == []

    # Re-standardizing the same inputs (tracking lost) yields the same ids and content:
    # the bus's publish dedup drops every copy.
    result = bus.publish(stage.standardize(events))
    assert result.duplicates_dropped == 121
    assert msgspec.json.encode(stage.standardize(events)) == msgspec.json.encode(
        stage.standardize(events)
    )
