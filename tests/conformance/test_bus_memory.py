"""The bus conformance suite on the in-memory backend."""

from __future__ import annotations

from collections import Counter

from bus_suite import BusConformance, FakeClock

from paypost.bus import Bus, BusConfig, MemoryBus, UnitOfWork
from paypost.events import Event


class TestMemoryBus(BusConformance):
    def make_bus(self, clock: FakeClock, config: BusConfig | None = None) -> Bus:
        bus = MemoryBus(config, clock=clock)
        self.effects: dict[int, Counter[str]] = {}
        return bus

    def reopen(self, bus: Bus) -> Bus:
        return bus  # in-process state survives a "restart" of the consumer only

    def apply_effect(self, uow: UnitOfWork, event: Event) -> None:
        # In memory, effects are applied at commit, atomically with the rest.
        store = self.effects.setdefault(0, Counter())
        uow.on_commit(lambda: store.update([event.id]))

    def effect_counts(self, bus: Bus) -> Counter[str]:
        return self.effects.get(0, Counter())
