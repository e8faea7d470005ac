"""`paypost iso20022 …`: look at the ISO 20022 pacs.008 form of a transaction (FR5)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import msgspec
import typer

from paypost.cli.common import JsonOption, console, emit_json, err_console, load_json_arg
from paypost.config import UserError
from paypost.events import Event, TransactionStandardized
from paypost.iso.iso20022 import XSD_PATH, XsdInvalid, render_xml, validate_xml
from paypost.stages.standardize import INPUT_DETAIL_TYPE, standardize_one

app = typer.Typer(
    help="ISO 20022 pacs.008.001.08: render standardized transactions as XML, check the XSD.",
    no_args_is_help=True,
)

EventArg = Annotated[
    str,
    typer.Argument(
        help="An event as inline JSON or a .json file: a TransactionStandardized event (or "
        "its detail), or an AuthorizationAccepted event, which is standardized first.",
        show_default=False,
    ),
]


def _pacs008_of(value: str) -> dict[str, Any]:
    """The pacs.008 dict of the event VALUE names (standardizing an accepted authorization)."""
    data = load_json_arg(value, "EVENT")
    if not isinstance(data, dict):
        raise UserError("EVENT: expected a JSON object (an event or its detail).")
    if "pacs008" in data:  # a TransactionStandardized detail
        detail = data
    else:
        try:
            event = Event.from_dict(data)
        except msgspec.ValidationError as exc:
            raise UserError(
                f"EVENT: not a paypost event envelope ({exc}). Pass a TransactionStandardized "
                "or AuthorizationAccepted event as printed by the bus or `--json` commands."
            ) from None
        if event.detail_type == INPUT_DETAIL_TYPE:
            event = standardize_one(event)
        if event.detail_type != TransactionStandardized.DETAIL_TYPE:
            reason = event.detail.get("reason") if isinstance(event.detail, dict) else None
            raise UserError(
                f"EVENT {event.id}: is a {event.detail_type} event, which has no pacs.008 "
                f"form{': ' + reason if reason else ''}. Fix the named fields upstream, or "
                "pass a TransactionStandardized / AuthorizationAccepted event."
            )
        detail = event.detail
    doc = detail.get("pacs008")
    if not isinstance(doc, dict) or "CdtTrfTxInf" not in doc or "GrpHdr" not in doc:
        raise UserError("EVENT: its pacs008 is not a pacs.008 document (no GrpHdr/CdtTrfTxInf).")
    return doc


@app.command("render")
def render(
    event: EventArg,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Write the XML to this file instead of stdout."),
    ] = None,
    validate: Annotated[
        bool,
        typer.Option(
            "--validate/--no-validate",
            help="Also validate the XML against the shipped pacs.008.001.08 XSD "
            "(needs the xmlschema package).",
        ),
    ] = False,
) -> None:
    """Print the pacs.008.001.08 XML of a standardized transaction."""
    doc = _pacs008_of(event)
    xml = render_xml(doc)
    if validate:
        try:
            validate_xml(xml)
        except XsdInvalid as exc:
            raise UserError(f"EVENT: the rendered XML does not validate: {exc}") from None
    if out is None:
        typer.echo(xml.decode("utf-8"), nl=False)
    else:
        try:
            out.write_bytes(xml)
        except OSError as exc:
            raise UserError(
                f"--out {str(out)!r}: cannot write ({exc.strerror}); choose a writable path."
            ) from None
        err_console.print(f"wrote {out} ({len(xml)} bytes)", highlight=False)
    if validate:
        err_console.print(f"valid against {XSD_PATH.name}", highlight=False)


@app.command("show")
def show(event: EventArg, json_out: JsonOption = False) -> None:
    """Print the pacs.008 of a transaction as structured data (what travels on the bus)."""
    doc = _pacs008_of(event)
    if json_out:
        emit_json(doc)
    else:
        console.print_json(msgspec.json.encode(doc).decode())


@app.command("xsd")
def xsd() -> None:
    """Print the path of the shipped pacs.008.001.08 XSD (for external validators)."""
    typer.echo(str(XSD_PATH))
