"""Where every command group is attached to the `paypost` app (one place to read)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    from paypost.cli import schemas

    app.command("schemas")(schemas.schemas)
    from paypost.cli import iso20022

    app.add_typer(iso20022.app, name="iso20022")
    from paypost.cli import rules

    app.add_typer(rules.app, name="rules")
    from paypost.cli import parked

    app.add_typer(parked.app, name="parked")
    from paypost.cli import ledger

    app.add_typer(ledger.app, name="ledger")
    from paypost.cli import bus

    bus.register(app)
    from paypost.cli import refdata

    app.add_typer(refdata.app, name="refdata")
    from paypost.cli import generate, ingest, quarantine

    app.command("ingest")(ingest.ingest)
    app.add_typer(generate.app, name="generate")
    app.add_typer(quarantine.app, name="quarantine")
    from paypost.cli import postings

    app.add_typer(postings.app, name="postings")
