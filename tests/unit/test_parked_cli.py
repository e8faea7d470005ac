"""FR3: parked authorizations are queryable with `paypost parked list|show`."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from test_dedup import auth_event
from typer.testing import CliRunner

from paypost.cli import app
from paypost.cli.registry import register
from paypost.stages.dedup import SqliteDedupIndex, check_duplicates

register(app)
runner = CliRunner()


def _park(data_dir: Path) -> tuple[str, str]:
    conn = sqlite3.connect(data_dir / "paypost.db")
    index = SqliteDedupIndex(conn)
    first = auth_event()
    dup = auth_event(source_ref="again")
    other = auth_event(tenant="euro-bank", currency="EUR")
    other_dup = auth_event(tenant="euro-bank", currency="EUR", source_ref="again")
    with conn:
        result = check_duplicates([first, dup, other, other_dup], index)
        index.apply(result.effects)
    conn.close()
    return first.id, dup.id


def test_fr3_parked_list_json_filters_by_tenant(data_dir: Path) -> None:
    original, dup = _park(data_dir)
    out = runner.invoke(app, ["parked", "list", "--data-dir", str(data_dir), "--json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.stdout)
    assert doc["totals"] == {"duplicate": 2}
    assert len(doc["parked"]) == 2
    out = runner.invoke(
        app, ["parked", "list", "--data-dir", str(data_dir), "--tenant", "uk-bank", "--json"]
    )
    [row] = json.loads(out.stdout)["parked"]
    assert row["input_event_id"] == dup and row["original_event_id"] == original
    assert row["pan_masked"] == "400000******1234"


def test_fr3_parked_show_by_input_id_and_text_list(data_dir: Path) -> None:
    _, dup = _park(data_dir)
    out = runner.invoke(app, ["parked", "show", dup, "--data-dir", str(data_dir), "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["reason"] == "duplicate"
    out = runner.invoke(app, ["parked", "list", "--data-dir", str(data_dir)])
    assert out.exit_code == 0 and "duplicate" in out.stdout


def test_parked_cli_errors_name_the_problem(data_dir: Path) -> None:
    out = runner.invoke(app, ["parked", "list", "--data-dir", str(data_dir / "missing")])
    assert out.exit_code != 0
    assert "no paypost database" in str(out.exception)
    _park(data_dir)
    out = runner.invoke(app, ["parked", "show", "nope", "--data-dir", str(data_dir)])
    assert "no parked authorization" in str(out.exception)


def test_distributed_backend_names_the_setting_when_postgres_is_unreachable() -> None:
    from paypost.config import UserError

    env = {"PAYPOST_DB_URL": "postgresql://postgres@127.0.0.1:1/paypost"}
    for args in (
        ["parked", "--backend", "distributed", "list"],
        ["quarantine", "--backend", "distributed", "show", "1"],
    ):
        out = runner.invoke(app, args, env=env)
        assert isinstance(out.exception, UserError), out.output  # the CLI prints it, exit 2
        assert "PAYPOST_DB_URL=postgresql://postgres@127.0.0.1:1/paypost" in str(out.exception)
    out = runner.invoke(app, ["parked", "--backend", "cluster", "list"])
    assert "use one of embedded, distributed" in str(out.exception)
