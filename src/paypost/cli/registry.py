"""Where every command group is attached to the `paypost` app (one place to read)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    from paypost.cli import bench as bench_cli
    from paypost.cli import (
        bus,
        distributed,
        generate,
        ingest,
        iso20022,
        ledger,
        parked,
        postings,
        quarantine,
        reconcile,
        refdata,
        review,
        rules,
        run,
        schemas,
    )

    # The main jobs.
    app.command("demo")(run.demo)
    app.command("run")(run.run)
    app.command("bench")(bench_cli.bench)
    app.command("ingest")(ingest.ingest)
    app.command("reconcile")(reconcile.reconcile)
    distributed.register(app)  # worker, serve --backend distributed (docs/deployment.md)
    # Looking into state.
    app.add_typer(ledger.app, name="ledger")
    app.add_typer(parked.app, name="parked")
    app.add_typer(review.app, name="review")
    app.add_typer(quarantine.app, name="quarantine")
    app.add_typer(postings.app, name="postings")
    bus.register(app)  # dlq, replay, bus stats
    # Configuration and reference.
    app.add_typer(rules.app, name="rules")
    app.add_typer(refdata.app, name="refdata")
    app.command("schemas")(schemas.schemas)
    app.add_typer(iso20022.app, name="iso20022")
    app.add_typer(generate.app, name="generate")
