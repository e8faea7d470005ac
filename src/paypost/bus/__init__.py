"""The event bus: rules → targets, durable queues, retries, DLQ, archive, replay (DESIGN §2).

`paypost.bus.core` holds the interface and value types; `memory` and `sqlite` the backends;
`consumer` the runner that makes a handler exactly-once in effect. See docs/bus.md.
"""

from paypost.bus.consumer import Consumer, ConsumerStats, TokenBucket, run_consumer
from paypost.bus.core import (
    ArchivedEvent,
    ArchiveQuery,
    Bus,
    BusConfig,
    BusError,
    BusStats,
    DeadLetter,
    Delivery,
    PublishResult,
    ReplayResult,
    RetryPolicy,
    Rule,
    TargetConfig,
    TargetStats,
    UnitOfWork,
)
from paypost.bus.memory import MemoryBus

__all__ = [
    "ArchiveQuery",
    "ArchivedEvent",
    "Bus",
    "BusConfig",
    "BusError",
    "BusStats",
    "Consumer",
    "ConsumerStats",
    "DeadLetter",
    "Delivery",
    "MemoryBus",
    "PublishResult",
    "ReplayResult",
    "RetryPolicy",
    "Rule",
    "TargetConfig",
    "TargetStats",
    "TokenBucket",
    "UnitOfWork",
    "run_consumer",
]
