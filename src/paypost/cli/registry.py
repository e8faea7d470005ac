"""Where every command group is attached to the `paypost` app (one place to read)."""

from __future__ import annotations

import inspect

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
    unwrap_help(app)


def unwrap_help(app: typer.Typer) -> None:
    """Join the source's line breaks inside each paragraph of every command's help.

    Docstrings are wrapped at 100 columns in the source, and Typer's rich help keeps those
    breaks, so `--help` printed ragged half-empty lines on any terminal width. A paragraph
    that starts with \\b keeps its line breaks (click's convention). Idempotent."""
    for command in app.registered_commands:
        text = command.help if isinstance(command.help, str) else None
        text = text or (inspect.getdoc(command.callback) if command.callback else None)
        if text:
            command.help = unwrapped(text)
    for group in app.registered_groups:
        if group.typer_instance is not None:
            info = group.typer_instance.info
            if isinstance(info.help, str):
                info.help = unwrapped(info.help)
            unwrap_help(group.typer_instance)


def unwrapped(text: str) -> str:
    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(
        p if p.startswith("\b") else " ".join(line.strip() for line in p.split("\n"))
        for p in paragraphs
    )
