"""PostgreSQL stage state (distributed mode): the same behaviour as the SQLite ports."""

from __future__ import annotations

import importlib.util
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import psycopg
import pytest

from paypost.distributed import state
from paypost.refdata.store import HolderCipher
from paypost.stages.dedup import MemoryDedupIndex, check_duplicates
from paypost.stages.ingest import Checkpoint, IngestBatch, QuarantineRecord

_spec = importlib.util.spec_from_file_location(
    "dedup_cases", Path(__file__).parents[1] / "unit" / "test_dedup.py"
)
assert _spec is not None and _spec.loader is not None
dedup_cases: Any = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dedup_cases)

#: every dedup case written against the port (`make` = an index factory), run on PostgreSQL
PORT_CASES = [
    name
    for name in dir(dedup_cases)
    if name.startswith("test_") and "make" in getattr(dedup_cases, name).__code__.co_varnames[:1]
]


@pytest.fixture
def conn(postgres_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(postgres_url) as c:  # one transaction per test, never committed
        yield c
        c.rollback()


@pytest.fixture
def pg_index(conn: psycopg.Connection[Any], pg_schema: str) -> Callable[[], Any]:
    counter = itertools.count()

    def make() -> state.PostgresDedupIndex:
        schema = f"{pg_schema}_{next(counter)}"
        state.ensure_schema(conn, schema)
        return state.PostgresDedupIndex(conn, schema)

    return make


@pytest.mark.parametrize("case", PORT_CASES)
def test_dedup_port_case_on_postgres(case: str, pg_index: Callable[[], Any]) -> None:
    getattr(dedup_cases, case)(pg_index)


def test_postgres_index_gives_the_memory_fake_outputs(pg_index: Callable[[], Any]) -> None:
    """Byte-identical outputs on a sequence with copies, redeliveries and tampering, cut
    into batches, as the SQLite index is tested against the fake."""
    auth = dedup_cases.auth_event
    events = []
    for n, (k, kind) in enumerate(
        [
            *((1, "new"), (2, "new"), (1, "copy"), (2, "redeliver"), (3, "new"), (3, "tamper")),
            *((4, "new"), (4, "copy"), (1, "redeliver"), (5, "new")),
        ]
    ):
        base = auth(stan=f"{k:06d}", at=f"2026-11-21T10:00:{k:02d}Z", event_id=f"ev-{k}")
        if kind == "copy":
            events.append(auth(stan=f"{k:06d}", at=base.time, source_ref=f"c{n}"))
        elif kind == "tamper":
            events.append(auth(stan=f"{k:06d}", at=base.time, minor=n, event_id=base.id))
        else:
            events.append(base)
    outputs = []
    for index in (MemoryDedupIndex(), pg_index()):
        produced = []
        for batch in (events[:3], events[3:7], events[7:]):
            result = check_duplicates(batch, index)
            index.apply(result.effects)
            produced += [msgspec.json.encode(e) for e in result.outputs]
        outputs.append(produced)
    assert outputs[0] == outputs[1]


def test_ingest_store_checkpoint_quarantine_and_vault(
    conn: psycopg.Connection[Any], pg_schema: str
) -> None:
    state.ensure_schema(conn, pg_schema)
    store = state.PostgresIngestStore(conn, pg_schema)
    assert store.load_checkpoint("src") is None
    q = QuarantineRecord(
        source="src",
        tenant="t1",
        position=10,
        line=2,
        kind="malformed",
        reason="bad amount",
        record="amount=x",
    )
    batch = IngestBatch(source="src", tenant="t1", quarantined=[q])
    batch.checkpoint = Checkpoint(source="src", position=120, line=3)
    store.apply(batch)
    store.apply(batch)  # a re-applied batch: the quarantine keeps one row
    assert store.load_checkpoint("src") == batch.checkpoint
    rows = conn.execute(f'SELECT count(*) FROM "{pg_schema}".ingest_quarantine').fetchone()
    assert rows == (1,)


def test_published_refdata_round_trips_with_holder_data_sealed(
    conn: psycopg.Connection[Any], pg_schema: str
) -> None:
    from paypost.demo import demo_refdata

    refdata = demo_refdata(100, bytes(range(32)), seed=2).refdata
    state.ensure_schema(conn, pg_schema)
    cipher = HolderCipher.from_master(bytes(range(32)))
    state.save_refdata(conn, pg_schema, refdata, cipher)
    raw = conn.execute(f'SELECT doc FROM "{pg_schema}".pipeline_config').fetchone()
    assert raw is not None
    some = next(iter(refdata.accounts.values()))
    assert some.holder_name.encode() not in bytes(raw[0])  # sealed at rest
    loaded = state.load_refdata(conn, pg_schema, cipher)
    assert loaded is not None and loaded.version_id == refdata.version_id
    assert loaded.accounts == refdata.accounts


def test_prune_forgets_old_keys_and_late_ones_stay_safe(pg_index: Callable[[], Any]) -> None:
    from paypost.stages.dedup import DedupConfig

    auth = dedup_cases.auth_event
    index = pg_index()
    cfg = DedupConfig(window_seconds=60)
    for ev in (
        [auth(stan="1", at="2026-11-21T10:00:00Z")],
        [auth(stan="2", at="2026-11-21T10:05:00Z")],
    ):
        result = check_duplicates(ev, index, cfg)
        index.apply(result.effects)
    assert state.prune_dedup(index.conn, index.schema, "uk-bank", 60) == 2
    late = check_duplicates([auth(stan="1", at="2026-11-21T10:00:00Z", source_ref="b")], index, cfg)
    assert late.outputs[0].detail["reason"] == "late"  # never accepted twice
