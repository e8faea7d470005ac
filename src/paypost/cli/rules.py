"""`paypost rules …`: work with routing rules, i.e. EventBridge event patterns (docs/patterns.md).

`paypost rules test` answers "would this rule route this event?" exactly as the bus decides it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from paypost import patterns
from paypost.cli.common import JsonOption, console, emit_json, fail

app = typer.Typer(
    help="Routing rules: EventBridge event patterns (validate, test against events).",
    no_args_is_help=True,
)

EXIT_MATCH = 0
EXIT_NO_MATCH = 1
EXIT_INVALID = 2


@app.callback()
def _group() -> None:
    """Routing rules: EventBridge event patterns (see docs/patterns.md)."""


def _read_text(value: str, what: str) -> str:
    """VALUE as inline JSON text, or the text of the file it names."""
    if value.lstrip().startswith(("{", "[")):
        return value
    path = Path(value)
    if not path.is_file():
        raise FileNotFoundError(
            f"{what}: {value!r} is neither inline JSON nor an existing file. Pass a JSON "
            'object, e.g. \'{"source": ["paypost.ingest"]}\', or the path of a .json file.'
        )
    return path.read_text(encoding="utf-8")


def _load_event(value: str) -> dict[str, Any]:
    try:
        text = _read_text(value, "--event")
        event = json.loads(text)
    except FileNotFoundError as exc:
        fail(str(exc), EXIT_INVALID)
    except json.JSONDecodeError as exc:
        fail(
            f"--event: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}).",
            EXIT_INVALID,
        )
    if not isinstance(event, dict):
        fail("--event: an event must be a JSON object (e.g. an Event.to_dict()).", EXIT_INVALID)
    return event


@app.command("test")
def test(
    pattern: Annotated[
        str,
        typer.Option(
            "--pattern",
            "-p",
            help="The event pattern: inline JSON or a .json file.",
            show_default=False,
        ),
    ],
    event: Annotated[
        str,
        typer.Option(
            "--event",
            "-e",
            help="The event: inline JSON or a .json file (EventBridge-shaped, as on the bus).",
            show_default=False,
        ),
    ],
    as_json: JsonOption = False,
) -> None:
    """Does the event match the pattern? Prints match (exit 0), no match (exit 1) or
    invalid pattern: WHY (exit 2), with AWS EventBridge's semantics and messages.
    """
    try:
        compiled = patterns.compile(_read_text(pattern, "--pattern"))
    except (FileNotFoundError, patterns.InvalidPattern) as exc:
        if isinstance(exc, patterns.InvalidPattern):
            why, where = exc.reason, exc.path
        else:
            why, where = str(exc), None
        if as_json:
            emit_json({"result": "invalid pattern", "match": None, "reason": why, "path": where})
        else:
            location = f" (at {where})" if where else ""
            console.print(
                f"invalid pattern: {why}{location}", highlight=False, markup=False, soft_wrap=True
            )
        raise typer.Exit(EXIT_INVALID) from None
    loaded = _load_event(event)
    matched = compiled.matches(loaded)
    result = "match" if matched else "no match"
    if as_json:
        emit_json({"result": result, "match": matched})
    else:
        console.print(result, highlight=False, soft_wrap=True)
    raise typer.Exit(EXIT_MATCH if matched else EXIT_NO_MATCH)


# --- `paypost rules check` (rules engine, issue 5) -------------------------------------------


RefdataOption = Annotated[
    Path | None,
    typer.Option(
        "--refdata",
        help="Reference-data directory (e.g. examples/refdata): per-tenant variables from its "
        "tenant settings, as the pipeline uses them.",
        show_default=False,
    ),
]


def _tenant_variables(refdata: Path | None) -> dict[str, dict[str, Any]] | None:
    if refdata is None:
        return None
    from paypost.refdata.files import load_refdata_dir
    from paypost.stages.rules import variables_from_tenants

    return variables_from_tenants(load_refdata_dir(refdata).tenants.values())


@app.command("check")
def check(
    file: Annotated[
        Path,
        typer.Argument(
            help="The YAML rules file to validate (see docs/rules.md).", show_default=False
        ),
    ],
    refdata: RefdataOption = None,
    as_json: JsonOption = False,
) -> None:
    """Validate a rules file: every problem with its line, rule and key path (exit 0 valid, 2 not).

    Checks YAML syntax, the file's keys, each rule's name (unique), action, reason and flag,
    every ${variable} for the defaults and for each tenant, and compiles every event pattern
    with the bus's EventBridge semantics.
    """
    from paypost.stages import rules as engine

    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        if as_json:
            emit_json({"file": str(file), "valid": False, "problems": [{"message": reason}]})
            raise typer.Exit(EXIT_INVALID) from None
        fail(f"rules file {str(file)!r} cannot be read: {reason}", EXIT_INVALID)
    variables = _tenant_variables(refdata)
    problems = engine.check_rules(text, source=str(file), tenant_variables=variables)
    summary: dict[str, Any] = {"file": str(file), "valid": not problems}
    if not problems:
        book = engine.parse_rules(text, source=str(file), tenant_variables=variables)
        counts: dict[str, int] = {}
        for rule in book.rules:
            counts[rule.action] = counts.get(rule.action, 0) + 1
        summary |= {
            "rules": len(book.rules),
            "actions": counts,
            "tenants": sorted(book.tenants),
            "digest": book.digest,
        }
    if as_json:
        import msgspec

        summary["problems"] = msgspec.to_builtins(problems)
        emit_json(summary)
    elif problems:
        console.print(
            f"{file}: {len(problems)} problem(s)", highlight=False, markup=False, soft_wrap=True
        )
        for p in problems:
            console.print(f"  {file}: {p}", highlight=False, markup=False, soft_wrap=True)
    else:
        tenants = ", ".join(summary["tenants"]) or "none (defaults only)"
        console.print(
            f"{file}: valid — {summary['rules']} rules "
            f"({', '.join(f'{n} {a}' for a, n in sorted(counts.items()))}); tenants: {tenants}",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
    raise typer.Exit(EXIT_INVALID if problems else 0)


@app.command("explain")
def explain(
    file: Annotated[
        Path,
        typer.Argument(help="The YAML rules file (see docs/rules.md).", show_default=False),
    ],
    event: Annotated[
        str,
        typer.Option(
            "--event",
            "-e",
            help="A TransactionEnriched event: inline JSON or a .json file (as on the bus).",
            show_default=False,
        ),
    ],
    refdata: RefdataOption = None,
    as_json: JsonOption = False,
) -> None:
    """Why the rules engine decides what it decides for one event: every rule, matched or
    not, the winning terminal rule, the decision and the flags (the events it would emit)."""
    from paypost.events import Event
    from paypost.stages import rules as engine

    book = engine.load_rules(file, tenant_variables=_tenant_variables(refdata))
    loaded = _load_event(event)
    try:
        parsed = Event.from_dict(loaded)
    except Exception as exc:  # msgspec.ValidationError: the message names the field
        fail(f"--event: not a paypost event envelope ({exc}).", EXIT_INVALID)
    rule_set = book.for_tenant(parsed.tenant)
    view = engine.match_view(parsed)
    decision = rule_set.decide(view)
    rows = engine.explain(rule_set, view)
    outputs = [e.detail_type for e in engine.decision_events(parsed, decision)]
    report: dict[str, Any] = {
        "tenant": parsed.tenant,
        "tenant_variables": "tenant" if parsed.tenant in book.tenants else "defaults",
        "decision": decision.action,
        "rule": decision.rule,
        "reason": decision.reason,
        "flags": [f for f, _ in decision.flags],
        "rules": [{"name": n, "action": a, "matched": m} for n, a, m in rows],
        "emits": outputs,
    }
    if as_json:
        emit_json(report)
        return
    for name, action, matched in rows:
        mark = "match   " if matched else "no match"
        console.print(f"  {mark}  {action:<7} {name}", highlight=False, markup=False)
    who = decision.rule or "no terminal rule matched: default"
    why = f" ({decision.reason})" if decision.reason else ""
    console.print(
        f"decision: {decision.action} by {who}{why}; flags: "
        f"{', '.join(report['flags']) or 'none'}; emits: {', '.join(outputs)}",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )
