"""FR6: `paypost refdata check|load|show|generate` validate, store (encrypted) and list."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from paypost.cli import app
from paypost.cli.registry import register

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "refdata"
register(app)
runner = CliRunner()


def test_fr6_refdata_load_then_show_versions(data_dir: Path) -> None:
    out = runner.invoke(app, ["refdata", "check", str(EXAMPLES), "--json"])
    assert out.exit_code == 0, out.output
    version = json.loads(out.stdout)["version"]
    out = runner.invoke(
        app, ["refdata", "load", str(EXAMPLES), "--data-dir", str(data_dir), "--json"]
    )
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout) | {"counts": None} == {
        "version": version,
        "stored": True,
        "counts": None,
    }
    assert (data_dir / "vault.key").exists()  # the demo key, generated and announced
    out = runner.invoke(app, ["refdata", "show", "--data-dir", str(data_dir), "--json"])
    [stored] = json.loads(out.stdout)["versions"]
    assert stored["version_id"] == version and stored["counts"]["accounts"] == 24


def test_fr6_refdata_generate_writes_loadable_files(data_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "gen"
    args = ["refdata", "generate", "--out", str(target), "--accounts", "30", "--seed", "2"]
    out = runner.invoke(app, [*args, "--data-dir", str(data_dir), "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["counts"]["accounts"] == 30
    out = runner.invoke(app, ["refdata", "check", str(target)])
    assert out.exit_code == 0 and "valid" in out.stdout
