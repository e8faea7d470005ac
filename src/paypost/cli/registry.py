"""Where every command group is attached to the `paypost` app (one place to read)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    # Each group module exposes `app` (a Typer) or `register(app)`.
    pass
