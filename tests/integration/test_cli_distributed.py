"""`paypost worker`, `paypost serve` and `--backend distributed` from the command line."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

import paypost.cli
from paypost.cli import app
from paypost.config import UserError

paypost.cli._register()
runner = CliRunner()


def test_worker_names_the_setting_when_nats_is_unreachable(data_dir: Path) -> None:
    result = runner.invoke(
        app,
        ["worker", "--stage", "dedup", "--data-dir", str(data_dir)],
        env={"PAYPOST_BUS_URL": "nats://127.0.0.1:1"},
    )
    assert isinstance(result.exception, UserError)  # the CLI prints it, exit 2
    assert "PAYPOST_BUS_URL=nats://127.0.0.1:1" in str(result.exception)


def test_worker_refuses_an_unknown_stage(data_dir: Path) -> None:
    result = runner.invoke(app, ["worker", "--stage", "posting", "--data-dir", str(data_dir)])
    assert isinstance(result.exception, UserError)
    assert "assembler" in str(result.exception)


def test_serve_embedded_points_to_run(data_dir: Path) -> None:
    result = runner.invoke(app, ["serve", "--backend", "embedded", "--data-dir", str(data_dir)])
    assert isinstance(result.exception, UserError)
    assert "paypost run" in str(result.exception)


def test_demo_distributed_posts_every_authorization(
    nats_url: str, postgres_url: str, pg_schema: str, data_dir: Path
) -> None:
    env = {"PAYPOST_BUS_URL": nats_url, "PAYPOST_DB_URL": postgres_url, "PAYPOST_PREFIX": pg_schema}
    try:
        result = runner.invoke(
            app,
            [
                "demo",
                "--backend",
                "distributed",
                "-n",
                "600",
                "--json",
                "--data-dir",
                str(data_dir),
            ],
            env=env,
        )
        assert result.exit_code == 0, result.output
        summary = json.loads(result.stdout.strip().splitlines()[-1])
        assert summary["backend"] == "distributed" and summary["complete"]
        assert summary["every_approved_in_one_terminal_state"]
        assert summary["posted"] == summary["journal_entries"] > 0
        assert summary["trial_balance_zero"]
    finally:
        from paypost.bus.nats import NatsBus

        bus = NatsBus(nats_url, postgres_url, prefix=pg_schema, sweep=False)
        bus.destroy()
        bus.close()
