"""`paypost review --backend distributed`: errors name the setting to fix (no services)."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

import paypost.cli
from paypost.cli import app
from paypost.config import UserError

paypost.cli._register()
runner = CliRunner()


def test_review_names_the_setting_when_postgres_is_unreachable() -> None:
    env = {"PAYPOST_DB_URL": "postgresql://postgres@127.0.0.1:1/paypost"}
    for args in (
        ["review", "--backend", "distributed", "list"],
        ["review", "--backend", "distributed", "show", "abc"],
    ):
        out = runner.invoke(app, args, env=env)
        assert isinstance(out.exception, UserError), out.output  # the CLI prints it, exit 2
        assert "PAYPOST_DB_URL=postgresql://postgres@127.0.0.1:1/paypost" in str(out.exception)
    out = runner.invoke(app, ["review", "--backend", "cluster", "list"])
    assert "use one of embedded, distributed" in str(out.exception)


def test_embedded_review_without_a_database_points_at_the_distributed_backend(
    tmp_path: Path,
) -> None:
    out = runner.invoke(app, ["review", "list", "--data-dir", str(tmp_path / "none")])
    assert isinstance(out.exception, UserError)
    assert "no paypost database" in str(out.exception)
    assert "paypost review --backend distributed" in str(out.exception)
