"""`paypost schemas`: the schema registry — every event type, its version and JSON Schema."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from paypost.cli.common import DataDirOption, JsonOption, console, emit_json
from paypost.config import DEFAULT_DATA_DIR, ensure_data_dir
from paypost.events import CATALOG, FLAG_DETAIL_TYPES, json_schemas


def schemas(
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", help="Directory for the JSON Schema files (default: DATA_DIR/schemas)."
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """List every event type with its version and write its JSON Schema (from the structs)."""
    target = ensure_data_dir(out if out is not None else data_dir / "schemas")
    written: list[dict[str, object]] = []
    for key, schema in json_schemas().items():
        name, _, version = key.rpartition(".v")
        path = target / f"{key}.schema.json"
        path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        cls = CATALOG.get(name)
        written.append(
            {
                "name": name,
                "version": int(version),
                "description": cls.DESCRIPTION if cls else "The envelope of every event.",
                "file": str(path),
                "detail_types": list(FLAG_DETAIL_TYPES) if name == "TransactionFlagged" else [name],
            }
        )
    if as_json:
        emit_json({"schemas": written, "directory": str(target)})
        return
    table = Table(title=f"paypost event schemas ({len(written)}) → {target}")
    table.add_column("event type")
    table.add_column("version", justify="right")
    table.add_column("description")
    for row in written:
        table.add_row(str(row["name"]), str(row["version"]), str(row["description"]))
    console.print(table)
