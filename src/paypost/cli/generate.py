"""`paypost generate auth-log`: synthetic authorization traffic (ISO 8583 log, JSONL, CSV).

Cards are Luhn-valid numbers on test-like BINs, deterministic for a seed; see
`paypost.iso.generate` for what the traffic contains (declines, ~1 % duplicates, foreign
currency, unanswered requests).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

from paypost.cli.common import JsonOption, console, emit_json
from paypost.config import UserError
from paypost.iso.generate import (
    GeneratedAuthorization,
    card_numbers,
    generate_authorizations,
    render_lines,
)

app = typer.Typer(help="Generate synthetic input data.", no_args_is_help=True)

FORMATS = ("iso8583", "jsonl", "csv")


@app.command("auth-log")
def auth_log(
    count: Annotated[int, typer.Option("--count", min=1, help="Authorizations to log.")] = 1000,
    out: Annotated[Path, typer.Option("--out", help="File to write.")] = Path("auth.log"),
    fmt: Annotated[
        str, typer.Option("--format", help="iso8583 (hex log lines), jsonl or csv.")
    ] = "iso8583",
    seed: Annotated[int, typer.Option("--seed", help="Same seed, same file.")] = 0,
    tenant: Annotated[
        list[str] | None,
        typer.Option("--tenant", help="Tenant id (repeat for several; default bank-a)."),
    ] = None,
    cards: Annotated[int, typer.Option("--cards", min=1, help="Distinct cards per tenant.")] = 1000,
    decline_rate: Annotated[float, typer.Option(help="Share of declined requests.")] = 0.05,
    duplicate_rate: Annotated[float, typer.Option(help="Share logged twice.")] = 0.01,
    foreign_rate: Annotated[float, typer.Option(help="Share in a foreign currency.")] = 0.1,
    unanswered_rate: Annotated[
        float, typer.Option(help="ISO 8583 only: share of requests never answered.")
    ] = 0.001,
    json: JsonOption = False,
) -> None:
    """Write COUNT synthetic authorizations to --out (test card numbers only)."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    for name, rate in (
        ("--decline-rate", decline_rate),
        ("--duplicate-rate", duplicate_rate),
        ("--foreign-rate", foreign_rate),
        ("--unanswered-rate", unanswered_rate),
    ):
        if not 0.0 <= rate <= 1.0:
            raise UserError(f"{name} must be between 0 and 1, got {rate}")
    tenants = tenant or ["bank-a"]
    card_map = {t: card_numbers(cards, seed=seed * 1000 + i) for i, t in enumerate(tenants)}
    auths = generate_authorizations(
        card_map,
        count,
        seed=seed,
        decline_rate=decline_rate,
        duplicate_rate=duplicate_rate,
        foreign_rate=foreign_rate,
        unanswered_rate=unanswered_rate if fmt == "iso8583" else 0.0,
    )
    written = 0

    def counted() -> Iterator[GeneratedAuthorization]:
        nonlocal written
        for a in auths:
            written += 1
            progress.advance(task)
            yield a

    try:
        fh = out.open("w", encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot write {str(out)!r}: {exc.strerror}. Pick another --out.") from exc
    with (
        fh,
        Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
            disable=json,
        ) as progress,
    ):
        task = progress.add_task(f"writing {out}", total=count)
        lines = 0
        for line in render_lines(fmt, counted()):
            fh.write(line)
            fh.write("\n")
            lines += 1
    report = {"out": str(out), "format": fmt, "authorizations": written, "lines": lines,
              "tenants": tenants, "seed": seed}  # fmt: skip
    if json:
        emit_json(report)
    else:
        console.print(
            f"wrote {written} authorizations ({lines} lines, {fmt}) to {out} "
            f"for {', '.join(tenants)}",
            highlight=False,
        )
