"""Options and helpers shared by every CLI command (thin entrypoints: parse, call, render)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import msgspec
import typer
from rich.console import Console

from paypost.config import DATA_DIR_ENV, DEFAULT_DATA_DIR, UserError

console = Console()
err_console = Console(stderr=True)

DataDirOption = Annotated[
    Path,
    typer.Option(
        "--data-dir",
        envvar=DATA_DIR_ENV,
        help="Directory of embedded state (SQLite files, archive, outputs).",
        show_default=True,
    ),
]
DEFAULT_DATA_DIR_VALUE = DEFAULT_DATA_DIR

JsonOption = Annotated[
    bool, typer.Option("--json", help="Print machine-readable JSON instead of text.")
]


def emit_json(obj: Any) -> None:
    """Print one JSON document on stdout (msgspec handles structs, dates and bytes)."""
    sys.stdout.write(msgspec.json.encode(obj).decode() + "\n")


def fail(message: str, code: int = 2) -> NoReturn:
    """Print a user-facing error (no traceback) and exit."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def load_json_arg(value: str, what: str) -> Any:
    """Parse VALUE as inline JSON, or as the path of a JSON file; WHAT names it in errors."""
    text = value
    stripped = value.lstrip()
    if not stripped.startswith(("{", "[")):
        path = Path(value)
        if not path.exists():
            raise UserError(
                f"{what}: {value!r} is neither inline JSON nor an existing file. "
                'Pass a JSON object, e.g. \'{"source": ["x"]}\', or a path to a .json file.'
            )
        text = path.read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{what}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})."
        ) from exc
