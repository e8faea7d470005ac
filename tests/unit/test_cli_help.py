"""Every command has --help, and its text reads as written: paragraphs, not ragged lines."""

from __future__ import annotations

import inspect
from collections.abc import Iterator

import pytest
import typer
from typer.testing import CliRunner

import paypost.cli
from paypost.cli import app

paypost.cli._register()
runner = CliRunner()


def _commands(group: typer.Typer, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for command in group.registered_commands:
        assert command.callback is not None
        yield (*path, command.name or command.callback.__name__)
    for sub in group.registered_groups:
        assert sub.typer_instance is not None and sub.name
        yield (*path, sub.name)
        yield from _commands(sub.typer_instance, (*path, sub.name))


COMMANDS = sorted(set(_commands(app)))


def _doc(path: tuple[str, ...]) -> str:
    group = app
    for name in path[:-1]:
        group = next(g.typer_instance for g in group.registered_groups if g.name == name)
    for command in group.registered_commands:
        if (command.name or command.callback.__name__) == path[-1]:  # type: ignore[union-attr]
            return inspect.getdoc(command.callback) or ""
    return ""  # a group: its one-line help


def test_every_command_is_covered() -> None:
    names = {" ".join(p) for p in COMMANDS}
    assert {"demo", "run", "bench", "review list", "parked show", "ledger"} <= names


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_help_prints_each_paragraph_whole(path: tuple[str, ...]) -> None:
    result = runner.invoke(
        app, [*path, "--help"], env={"TERMINAL_WIDTH": "2000", "COLUMNS": "2000"}
    )
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    out = " ".join(result.output.split())
    for paragraph in _doc(path).split("\n\n"):
        if paragraph.startswith("\b"):
            continue
        text = " ".join(paragraph.split())
        # On a wide terminal a paragraph is one line: the source's wrapping must not show.
        assert text in out, f"{' '.join(path)}: {text[:60]!r}… not printed as one paragraph"
        assert any(text in " ".join(line.split()) for line in result.output.splitlines()), (
            f"{' '.join(path)} --help breaks the paragraph {text[:60]!r}… across lines"
        )
