"""Process-wide configuration: where embedded state lives, and the environment it reads."""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "PAYPOST_DATA_DIR"
DEFAULT_DATA_DIR = Path("paypost-data")

# Page size of a new SQLite database (the paypost database, a standalone ledger file). 16 KiB
# instead of SQLite's 4 KiB: a batch's WAL frames, checkpoint copies and B-tree descents take
# a quarter of the page operations for the same bytes. Measured with `paypost bench`, one
# shard: CPU per authorization -7% at 50,000 and -4% at 200,000, bytes written -8% and -3%
# (docs/benchmarks.md). An existing database keeps the page size it was created with.
# Realtime mode (one authorization per transaction) is the exception: each commit writes every
# page it touched whole, 430 KB per authorization with 16 KiB pages against 154 KB with 4 KiB
# (same CPU); a deployment that runs realtime mode on a disk that minds its writes sets
# PAYPOST_SQLITE_PAGE_SIZE=4096 before creating its database.
SQLITE_PAGE_SIZE = 16_384
SQLITE_PAGE_SIZE_ENV = "PAYPOST_SQLITE_PAGE_SIZE"


def sqlite_page_size() -> int:
    """The page size for a new SQLite database: $PAYPOST_SQLITE_PAGE_SIZE, else 16 KiB."""
    raw = os.environ.get(SQLITE_PAGE_SIZE_ENV, "").strip()
    if not raw:
        return SQLITE_PAGE_SIZE
    allowed = [512 << i for i in range(8)]  # SQLite's page sizes: 512 ... 65536
    if not raw.isdigit() or int(raw) not in allowed:
        raise UserError(
            f"{SQLITE_PAGE_SIZE_ENV}={raw!r} is not a SQLite page size: use one of "
            f"{', '.join(map(str, allowed))} (bytes), or unset it for {SQLITE_PAGE_SIZE}"
        )
    return int(raw)


# SQLite's page cache per connection, in KiB. The interior pages of the random-key indexes
# (entry ids, dedup keys, per-account legs) must stay cached: with SQLite's default 2 MB a
# large ledger re-reads a page from the OS for most inserts (3x slower). 32 MiB holds them:
# against 64 MiB, 333,000 authorizations in one shard used 1.3% more CPU for 32 MB less RSS
# per process (docs/benchmarks.md), which keeps three shards inside the 500 MB budget.
SQLITE_CACHE_KIB = 32_768


def data_dir(explicit: Path | None = None) -> Path:
    """Embedded state directory: EXPLICIT, else $PAYPOST_DATA_DIR, else ./paypost-data."""
    if explicit is not None:
        return explicit
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env) if env else DEFAULT_DATA_DIR


def ensure_data_dir(path: Path) -> Path:
    """Create the data directory if needed, with a message that names it when that fails."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(
            f"cannot create the data directory {str(path)!r}: {exc.strerror}. "
            f"Pass --data-dir (or set {DATA_DIR_ENV}) to a writable directory."
        ) from exc
    return path


class UserError(Exception):
    """An error a user can meet: the message names the input, what is wrong and what to do.

    The CLI prints it without a traceback and exits with status 2.
    """
