"""`paypost worker`, `paypost serve` and `--backend distributed` from the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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
        lines = (data_dir / "postings" / "postings.csv").read_text().splitlines()
        assert sum(1 for line in lines if line.startswith("D,")) == summary["posted"]
    finally:
        from paypost.bus.nats import NatsBus

        bus = NatsBus(nats_url, postgres_url, prefix=pg_schema, sweep=False)
        bus.destroy()
        bus.close()


def test_bus_commands_on_the_distributed_backend(
    nats_url: str, postgres_url: str, pg_schema: str
) -> None:
    from paypost.bus import RetryPolicy, Rule, TargetConfig
    from paypost.bus.nats import NatsBus
    from paypost.events import TransactionHeld, new_event

    env = {"PAYPOST_BUS_URL": nats_url, "PAYPOST_DB_URL": postgres_url, "PAYPOST_PREFIX": pg_schema}
    bus = NatsBus(nats_url, postgres_url, prefix=pg_schema)
    try:
        bus.put_target(TargetConfig(name="holds", retry=RetryPolicy(max_attempts=1)))
        bus.put_rule(Rule(name="h", pattern={"detail-type": ["TransactionHeld"]}, target="holds"))

        def held_events(n: int, source: str, prefix: str) -> list[Any]:
            return [
                new_event(
                    TransactionHeld(reason="review", stage="rules"),
                    source=source,
                    tenant="t1",
                    id=f"{prefix}-{i}",
                    time="2026-11-21T00:00:00.000Z",
                )
                for i in range(n)
            ]

        bus.publish(held_events(3, "paypost.test", "held"))
        bus.nack(bus.receive("holds", 1), "ValueError: account closed")

        stats = runner.invoke(app, ["bus", "--backend", "distributed", "stats", "--json"], env=env)
        assert stats.exit_code == 0, stats.output
        doc = json.loads(stats.stdout)
        holds = {t["name"]: t for t in doc["targets"]}["holds"]
        assert doc["outbox"] == 0  # every committed output event is published
        assert (holds["queued"], holds["dead_lettered"]) == (2, 1)

        dead = runner.invoke(app, ["dlq", "--backend", "distributed", "list", "--json"], env=env)
        (entry,) = json.loads(dead.stdout)
        assert entry["error"] == "ValueError: account closed" and entry["target"] == "holds"

        redrive = runner.invoke(
            app, ["dlq", "--backend", "distributed", "redrive", "--target", "holds"], env=env
        )
        assert "redriven: 1" in redrive.stdout
        assert bus.pending("holds") == 3

        replay = runner.invoke(
            app,
            [
                "replay",
                "--backend",
                "distributed",
                "--from",
                "2000-01-01",
                "--to",
                "2100-01-01",
                "--json",
            ],
            env=env,
        )
        assert json.loads(replay.stdout)["routed"] == {"holds": 3}
        assert bus.pending("holds") == 6

        # a bundling target: its queue counts messages, and stats says so
        bus.put_target(TargetConfig(name="batched", bundle=10))
        bus.put_rule(Rule(name="b", pattern={"source": ["paypost.batch"]}, target="batched"))
        bus.publish(held_events(4, "paypost.batch", "batch"))
        text = runner.invoke(app, ["bus", "--backend", "distributed", "stats"], env=env)
        flat = " ".join(text.stdout.split())  # the console wraps long lines
        assert "batched *" in flat and "bundles up to 10 events" in flat
        doc = json.loads(
            runner.invoke(
                app, ["bus", "--backend", "distributed", "stats", "--json"], env=env
            ).stdout
        )
        batched = {t["name"]: t for t in doc["targets"]}["batched"]
        assert (batched["queued"], batched["routed_total"]) == (1, 4)  # one message, 4 events
        assert doc["bundled_targets"] == {"batched": 10}
    finally:
        bus.destroy()
        bus.close()
