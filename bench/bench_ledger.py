"""Ledger benchmark (not a test): batched posting of 2-leg entries, per store, in entries/s,
next to the raw batched-insert rate of the very same rows measured in the same run.

    .venv/bin/python bench/bench_ledger.py                      # SQLite and PostgreSQL
    .venv/bin/python bench/bench_ledger.py --stores sqlite --entries 500000 --json

"post" is the full store path: idempotency (content hash, unique entry id), validation, account
resolution, overdraft rule, balances, one transaction per batch. "raw" inserts the rows that the
posting wrote (entries, legs, balance upserts), precomputed, with executemany (SQLite) or COPY
(PostgreSQL), one transaction per batch, and nothing else: the storage floor. The gap is what
the ledger logic costs. "replay" re-posts every batch (all duplicates).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from paypost.ledger.model import Account, JournalEntry, Leg
from paypost.ledger.posting import AccountState, Plan, plan_batch
from paypost.money import Money

console = Console(stderr=True)
NS = uuid.UUID("0b6f3f0e-7c55-5c1e-8f7e-6a3d1d1f0a10")


def make_accounts(tenant: str, n: int, overdraft: bool) -> list[Account]:
    accs = [
        Account(
            id=f"cust-{i:07d}",
            tenant=tenant,
            kind="customer",
            currency="EUR",
            product_type="current",
            overdraft_limit=10**12 if overdraft else None,
        )
        for i in range(n)
    ]
    accs.append(Account(id="settle-eur", tenant=tenant, kind="internal", role="settlement",
                        currency="EUR"))  # fmt: skip
    return accs


def make_entries(tenant: str, count: int, accounts: int, seed: int = 7) -> list[JournalEntry]:
    rnd = random.Random(seed)
    out = []
    for i in range(count):
        amount = Money(rnd.randrange(1, 50_000), "EUR")
        out.append(
            JournalEntry(
                id=str(uuid.uuid5(NS, f"{tenant}/{i}")),  # derived ids, like the pipeline's
                tenant=tenant,
                legs=(
                    Leg(account=f"cust-{rnd.randrange(accounts):07d}", side="debit", amount=amount),
                    Leg(account="settle-eur", side="credit", amount=amount),
                ),
                sequence_id=f"seq-{i}",
            )
        )
    return out


def batches(entries: Sequence[JournalEntry], size: int) -> list[Sequence[JournalEntry]]:
    return [entries[i : i + size] for i in range(0, len(entries), size)]


Timing = tuple[float, float]  # (wall seconds, CPU seconds of this process)


def timed(label: str, parts: list[Any], fn: Callable[[Any], object]) -> Timing:
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(label, total=len(parts))
        t0, c0 = time.perf_counter(), time.process_time()
        for part in parts:
            fn(part)
            progress.advance(task)
        return time.perf_counter() - t0, time.process_time() - c0


def precompute_plans(
    entries: Sequence[JournalEntry],
    size: int,
    account_pks: dict[str, int],
    now: int,
    id_key: Callable[[str, str], int] | None = None,
) -> list[Plan]:
    """The rows each batch writes, computed in memory (untimed) for the raw-insert baseline."""
    states = {
        (e.tenant, acc): AccountState(pk, "EUR", "open", None, 0)
        for e in entries[:1]
        for acc, pk in account_pks.items()
    }
    positions = itertools.count(1)
    return [
        plan_batch(
            b,
            existing={},
            accounts=states,
            originals={},
            positions=positions,
            now=now,
            id_key=id_key,
        )
        for b in batches(entries, size)
    ]


# -- SQLite -----------------------------------------------------------------------------------


def bench_sqlite(args: argparse.Namespace) -> dict[str, Any]:
    from paypost.ledger import sqlite as ls

    tenant = "bench"
    accounts = make_accounts(tenant, args.accounts, args.overdraft)
    entries = make_entries(tenant, args.entries, args.accounts)
    parts = batches(entries, args.batch)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        store = ls.SqliteLedger.open(Path(tmp) / "paypost.db")
        store.create_accounts(accounts)
        post_t = timed("sqlite post", parts, store.post_batch)
        tb = store.trial_balance(tenant)
        assert tb.balanced and tb.lines[0].debits > 0
        assert store.balance(tenant, "settle-eur").entries == len(entries)
        replay_t = timed("sqlite replay", parts, store.post_batch)
        assert store.balance(tenant, "settle-eur").entries == len(entries)
        pks = dict(store.conn.execute("SELECT id, pk FROM ledger_accounts").fetchall())
        store.close()

        raw = ls.connect(Path(tmp) / "raw.db")
        raw.execute("BEGIN IMMEDIATE")
        ls.ensure_schema(raw)
        ls.create_accounts_in(raw, accounts)
        raw.execute("COMMIT")
        plans = precompute_plans(entries, args.batch, pks, ls.now_micros(), ls.entry_key)

        def insert(plan: Plan) -> None:
            raw.execute("BEGIN IMMEDIATE")
            ls._insert_entries(raw, plan, None)
            ls._insert_legs_and_balances(raw, plan)
            raw.execute("COMMIT")

        raw_t = timed("sqlite raw", plans, insert)
        raw.close()
    return result("sqlite", args, post_t, raw_t, replay_t)


# -- PostgreSQL -------------------------------------------------------------------------------


def bench_postgres(args: argparse.Namespace) -> dict[str, Any]:
    import psycopg
    from psycopg import sql

    from paypost.ledger.postgres import PostgresLedger

    tenant = "bench"
    prefix = f"bench_{uuid.uuid4().hex[:8]}"
    accounts = make_accounts(tenant, args.accounts, args.overdraft)
    entries = make_entries(tenant, args.entries, args.accounts)
    parts = batches(entries, args.batch)
    store = PostgresLedger(args.pg_url, prefix=prefix)
    raw_store = PostgresLedger(args.pg_url, prefix=prefix + "_raw")
    try:
        store.create_accounts(accounts)
        post_t = timed("postgres post", parts, store.post_batch)
        tb = store.trial_balance(tenant)
        assert tb.balanced and store.balance(tenant, "settle-eur").entries == len(entries)
        replay_t = timed("postgres replay", parts, store.post_batch)
        assert store.balance(tenant, "settle-eur").entries == len(entries)

        raw_store.create_accounts(accounts)
        s = sql.Identifier(raw_store.schema(tenant))
        pks = dict(
            raw_store.conn.execute(
                sql.SQL("SELECT id, pk FROM {}.ledger_accounts").format(s)
            ).fetchall()
        )
        raw_store.conn.commit()
        plans = precompute_plans(entries, args.batch, pks, 0)
        conn = raw_store.conn

        def insert(plan: Plan) -> None:
            raw_store._write_entries(conn, s, plan, 0)
            raw_store._write_legs(conn, s, plan)
            conn.commit()

        raw_t = timed("postgres raw", plans, insert)
    finally:
        store.close()
        raw_store.close()
        with psycopg.connect(args.pg_url, autocommit=True) as c:
            for (nsp,) in c.execute(
                "SELECT nspname FROM pg_namespace WHERE nspname LIKE %s", (prefix + "%",)
            ).fetchall():
                c.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(nsp)))
    return result("postgres", args, post_t, raw_t, replay_t)


def result(
    store: str, args: argparse.Namespace, post: Timing, raw: Timing, replay: Timing
) -> dict[str, Any]:
    n = args.entries
    return {
        "store": store,
        "entries": n,
        "batch": args.batch,
        "accounts": args.accounts,
        "overdraft_rules": args.overdraft,
        "post_entries_per_s": round(n / post[0]),
        "raw_insert_entries_per_s": round(n / raw[0]),
        "replay_entries_per_s": round(n / replay[0]),
        "post_vs_raw": round(raw[0] / post[0], 2),
        # CPU of this process per entry (SQLite: the whole store; PostgreSQL: the client only)
        "post_cpu_us_per_entry": round(post[1] / n * 1e6, 1),
        "raw_cpu_us_per_entry": round(raw[1] / n * 1e6, 1),
    }


def machine() -> dict[str, Any]:
    def run(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "?"

    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in run(["lscpu"]).splitlines()
            if line.startswith("Model name")
        ),
        platform.processor(),
    )
    return {
        "commit": run(["git", "rev-parse", "--short", "HEAD"]),
        "cpus": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "sqlite": __import__("sqlite3").sqlite_version,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--entries", type=int, default=200_000, help="2-leg entries to post")
    p.add_argument("--batch", type=int, default=5_000, help="entries per transaction")
    p.add_argument("--accounts", type=int, default=10_000, help="customer accounts")
    p.add_argument("--overdraft", action="store_true", help="give customers an overdraft rule")
    p.add_argument("--stores", default="sqlite,postgres", help="comma-separated: sqlite,postgres")
    p.add_argument(
        "--pg-url",
        default=os.environ.get("PAYPOST_DB_URL", "postgresql://postgres@127.0.0.1:5432/test"),
    )
    p.add_argument("--tmp", default=None, help="directory for the SQLite files (default: /tmp)")
    p.add_argument("--repeat", type=int, default=1, help="runs per store; the best is kept")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    results = []
    for name in args.stores.split(","):
        fn = {"sqlite": bench_sqlite, "postgres": bench_postgres}[name.strip()]
        runs = [fn(args) for _ in range(max(1, args.repeat))]
        results.append(max(runs, key=lambda r: r["post_entries_per_s"]))
    info = machine()
    if args.json:
        print(json.dumps({"machine": info, "results": results}, indent=2))
        return 0
    table = Table(
        title=f"ledger: {args.entries} 2-leg entries, batches of {args.batch}, "
        f"best of {args.repeat}"
    )
    for col in (
        "store",
        "post entries/s",
        "raw insert entries/s",
        "post/raw",
        "replay entries/s",
        "post CPU µs/entry",
        "raw CPU µs/entry",
    ):
        table.add_column(col, justify="left" if col == "store" else "right")
    for r in results:
        table.add_row(
            r["store"],
            f"{r['post_entries_per_s']:,}",
            f"{r['raw_insert_entries_per_s']:,}",
            f"{r['post_vs_raw']:.2f}",
            f"{r['replay_entries_per_s']:,}",
            f"{r['post_cpu_us_per_entry']}",
            f"{r['raw_cpu_us_per_entry']}",
        )
    Console().print(table)
    Console().print(info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
