"""`paypost postings …`: the bank's posting input (docs/posting-file.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from paypost.cli.common import JsonOption, console, emit_json, fail

app = typer.Typer(
    help="The posting file: the bank's posting input (docs/posting-file.md).",
    no_args_is_help=True,
)


@app.callback()
def _group() -> None:
    """The posting file: the bank's posting input (docs/posting-file.md)."""


@app.command("verify")
def verify(
    file: Annotated[
        Path, typer.Argument(help="A posting file written by paypost.", show_default=False)
    ],
    as_json: JsonOption = False,
) -> None:
    """Check a posting file as the bank would before posting it: framing, record counts,
    trailer hashes, per-currency control totals, one record per entry, no card number.
    Exit 0 when it is sound, 2 when not."""
    from paypost.stages.posting_file import verify_file

    if not file.is_file():
        fail(f"posting file {str(file)!r} does not exist: pass the path of a posting file.")
    check = verify_file(file)
    if as_json:
        emit_json({**{f: getattr(check, f) for f in check.__struct_fields__}, "ok": check.ok})
    else:
        table = Table(title=f"{file}: {check.batches} batches, {check.records} records")
        table.add_column("currency")
        table.add_column("debit legs total (minor)", justify="right")
        table.add_column("credit legs total (minor)", justify="right")
        for cur, t in sorted(check.totals.items()):
            table.add_row(cur, str(t["debit"]), str(t["credit"]))
        console.print(table)
        for p in check.problems:
            console.print(f"  problem: {p}", highlight=False, markup=False, soft_wrap=True)
        console.print("sound" if check.ok else f"{len(check.problems)} problem(s)")
    raise typer.Exit(0 if check.ok else 2)
