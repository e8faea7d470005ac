"""`paypost refdata check|load|show|generate`: reference data for enrichment (FR6).

Formats, versioning and encryption: docs/refdata.md.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from paypost.cli.common import DataDirOption, JsonOption, console, emit_json, err_console
from paypost.config import DEFAULT_DATA_DIR, UserError, ensure_data_dir

app = typer.Typer(
    help="Reference data (tenants, accounts, branches, FX rates, merchants) for enrichment.",
    no_args_is_help=True,
)

DirArgument = Annotated[
    Path, typer.Argument(help="A reference data directory (with refdata.yaml).")
]


def _db_path(data_dir: Path) -> Path:
    from paypost.bus.sqlite import DB_FILENAME

    return data_dir / DB_FILENAME


def _master_key(data_dir: Path) -> bytes:
    from paypost.security.tokens import load_or_create_demo_key

    key, message = load_or_create_demo_key(data_dir)
    if message:
        err_console.print(f"[yellow]note:[/] {message}", highlight=False)
    return key


@app.command("check")
def check_command(directory: DirArgument, as_json: JsonOption = False) -> None:
    """Validate a reference data directory and print its version (writes nothing)."""
    from paypost.refdata.files import load_refdata_dir

    ref = load_refdata_dir(directory)
    if as_json:
        emit_json({"version": ref.version_id, "counts": ref.counts(), "valid": True})
        return
    console.print(f"[green]valid[/] reference data {ref.version_id}: {ref.counts()}")


@app.command("load")
def load_command(
    directory: DirArgument,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    as_json: JsonOption = False,
) -> None:
    """Validate a directory and store it as a new version in the embedded database.

    Holder names and addresses are encrypted (AES-256-GCM) with a key derived from the vault
    key ($PAYPOST_VAULT_KEY, $PAYPOST_VAULT_KEY_FILE, or DATA_DIR/vault.key for the demo).
    """
    from paypost.refdata.files import load_refdata_dir
    from paypost.refdata.store import HolderCipher, load_refdata_into_db

    ref = load_refdata_dir(directory)
    ensure_data_dir(data_dir)
    cipher = HolderCipher.from_master(_master_key(data_dir))
    stored = load_refdata_into_db(_db_path(data_dir), ref, cipher)
    if as_json:
        emit_json({"version": ref.version_id, "stored": stored, "counts": ref.counts()})
        return
    verb = "stored" if stored else "already stored (unchanged)"
    console.print(f"reference data {ref.version_id} {verb}: {ref.counts()}")


@app.command("show")
def show_command(data_dir: DataDirOption = DEFAULT_DATA_DIR, as_json: JsonOption = False) -> None:
    """List the reference data versions stored in the embedded database (latest last)."""
    from paypost.refdata.store import connect, stored_versions

    path = _db_path(data_dir)
    if not path.is_file():
        raise UserError(
            f"no paypost database at {str(path)!r}: load reference data first "
            "(paypost refdata load examples/refdata), or pass --data-dir"
        )
    conn = connect(path)
    try:
        versions = stored_versions(conn)
    finally:
        conn.close()
    if as_json:
        emit_json({"versions": versions})
        return
    if not versions:
        console.print("no reference data stored yet: paypost refdata load DIR")
        return
    table = Table(title="reference data versions (the last one is used)")
    for column in ("version", "loaded at", "counts"):
        table.add_column(column)
    for v in versions:
        counts = ", ".join(f"{n} {what}" for what, n in v["counts"].items())
        table.add_row(v["version_id"], v["loaded_at"], counts)
    console.print(table)


@app.command("generate")
def generate_command(
    out: Annotated[Path, typer.Option("--out", help="Directory to write the files to.")],
    accounts: Annotated[
        int, typer.Option("--accounts", min=1, help="How many accounts (1–2 cards each).")
    ] = 1000,
    seed: Annotated[int, typer.Option("--seed", help="Same seed, same data.")] = 0,
    cards_out: Annotated[
        Path | None,
        typer.Option(
            "--cards-out",
            help="Also write the generated cards' CLEAR test PANs (CSV) for making sample "
            "authorization logs. Test data only; the reference data itself holds tokens.",
        ),
    ] = None,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    as_json: JsonOption = False,
) -> None:
    """Generate realistic reference data (valid IBANs, sort codes, holders, cards, FX rates).

    Card tokens are made with the configured vault key, so the pipeline finds the accounts.
    """
    from paypost.refdata.files import write_refdata_dir
    from paypost.refdata.generate import generate_refdata
    from paypost.security.tokens import Tokenizer, VaultKeys

    tokenizer = Tokenizer(VaultKeys.from_master(_master_key(data_dir)).token_key)
    with Progress(
        TextColumn("generating accounts"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        disable=as_json,
    ) as progress:
        task = progress.add_task("accounts", total=accounts)
        generated = generate_refdata(
            accounts,
            seed=seed,
            tokenizer=tokenizer,
            on_progress=lambda done: progress.update(task, completed=done),
        )
    write_refdata_dir(generated.refdata, out)
    if cards_out is not None:
        with cards_out.open("w", encoding="utf-8", newline="") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(["tenant", "account_id", "currency", "pan"])
            for card in generated.cards:
                writer.writerow([card.tenant, card.account_id, card.currency, card.pan])
    ref = generated.refdata
    if as_json:
        emit_json({"version": ref.version_id, "counts": ref.counts(), "directory": str(out)})
        return
    console.print(f"wrote reference data {ref.version_id} to {out}: {ref.counts()}")
    if cards_out is not None:
        console.print(
            f"[yellow]{cards_out} holds clear TEST card numbers[/]: feed them to ingest only, "
            "and delete the file after use"
        )
