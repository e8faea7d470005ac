"""The `paypost` command. Each command group lives in its own module and is registered here."""

from __future__ import annotations

import typer

from paypost.config import UserError

app = typer.Typer(
    name="paypost",
    help="paypost: post authorized payments into customer accounts in near real time.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """paypost: post authorized payments into customer accounts in near real time."""


def _register() -> None:
    # Imported here so that `import paypost.cli` stays cheap and cycles stay impossible.
    from paypost.cli import registry

    registry.register(app)


def main() -> None:
    _register()
    try:
        app()
    except UserError as exc:
        from paypost.cli.common import err_console

        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise SystemExit(2) from None
