"""The backend choice of the CLI record readers (`paypost parked|quarantine|review`).

Each of those groups takes `--backend embedded|distributed` (and `--config`, `--db-url`,
`--prefix`) before its subcommand, and reads its records read-only either from the embedded
database (DATA_DIR/paypost.db, through the group's own SQLite queries) or from the distributed
pipeline's PostgreSQL state (`paypost.distributed.queries.StateReader`, same method names).
One definition here, registered as each group's callback.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from typing import TYPE_CHECKING, TypeVar

import typer

from paypost.cli.bus import BusChoice
from paypost.cli.distributed import (
    BackendOption,
    ConfigOption,
    DbUrlOption,
    PrefixOption,
    check_backend,
)

if TYPE_CHECKING:
    from paypost.distributed.queries import StateReader

R = TypeVar("R")


def choose_backend(
    ctx: typer.Context,
    backend: BackendOption = "embedded",
    config: ConfigOption = None,
    db_url: DbUrlOption = None,
    prefix: PrefixOption = None,
) -> None:
    """Options of the group (before the subcommand): which backend's records to read."""
    ctx.obj = BusChoice(check_backend(backend), config, None, db_url, prefix)


def add_backend_options(app: typer.Typer) -> None:
    """Give APP's group the backend options (`paypost GROUP --backend distributed CMD`)."""
    app.callback()(choose_backend)


def backend_choice(ctx: typer.Context) -> BusChoice:
    return ctx.obj if isinstance(ctx.obj, BusChoice) else BusChoice()


def backend_flag(ctx: typer.Context) -> str:
    """The option to repeat in a hint for the next command."""
    return " --backend distributed" if backend_choice(ctx).backend == "distributed" else ""


@contextmanager
def open_reader(
    ctx: typer.Context,
    connect: Callable[[], sqlite3.Connection],
    embedded: Callable[[sqlite3.Connection], R],
) -> Iterator[R | StateReader]:
    """The chosen backend's reader, closed on exit: a `StateReader` on PostgreSQL (an
    unreachable database names PAYPOST_DB_URL, an unknown prefix PAYPOST_PREFIX), or
    EMBEDDED over the read-only SQLite connection CONNECT opens."""
    choice = backend_choice(ctx)
    if choice.backend == "distributed":
        from paypost.distributed.queries import open_configured_reader

        with open_configured_reader(
            choice.config, db_url=choice.db_url, prefix=choice.prefix
        ) as reader:
            yield reader
    else:
        with closing(connect()) as conn:
            yield embedded(conn)
