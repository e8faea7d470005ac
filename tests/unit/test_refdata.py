"""FR6 reference data: documented files load validated and versioned; holder personal data
is encrypted at rest; the generator makes valid IBANs and keeps PANs out of the data."""

from __future__ import annotations

import csv
import json
import os
import shutil
import sqlite3
from pathlib import Path

import pytest
import yaml
from schwifty import IBAN

from paypost.config import UserError
from paypost.refdata.files import load_refdata_dir, write_refdata_dir
from paypost.refdata.generate import example_refdata, generate_refdata
from paypost.refdata.store import (
    HolderCipher,
    connect,
    load_refdata_from_db,
    load_refdata_into_db,
    save_refdata,
    stored_versions,
)
from paypost.security.tokens import Tokenizer, luhn_valid

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "refdata"
MASTER = bytes(range(32))


@pytest.fixture
def example_dir(tmp_path: Path) -> Path:
    target = tmp_path / "refdata"
    shutil.copytree(EXAMPLES, target)
    return target


def test_fr6_examples_load_with_valid_ibans_and_sort_codes() -> None:
    ref = load_refdata_dir(EXAMPLES)
    assert set(ref.tenants) == {"uk-bank", "euro-bank", "de-bank"}
    assert {t.home_currency for t in ref.tenants.values()} == {"GBP", "EUR"}
    assert len(ref.accounts) >= 20
    for account in ref.accounts.values():
        iban = IBAN(account.iban, validate_bban=True)  # raises if invalid
        assert account.account_number in account.iban
        assert account.sort_code == ref.branches[account.branch_id].sort_code
        if iban.country_code in ("GB", "IE"):
            assert len(account.sort_code) == 6 and iban.branch_code == account.sort_code
        assert account.card_tokens
    assert len({(r.base, r.quote) for r in ref.rates.values()}) >= 8
    # The shipped files are exactly what the documented generator makes.
    assert ref.version_id == example_refdata().refdata.version_id


def test_fr6_version_is_declared_plus_content_hash(example_dir: Path) -> None:
    ref = load_refdata_dir(example_dir)
    declared, _, digest = ref.version_id.partition("+")
    assert declared == "2026.11.21-1" and len(digest) == 12
    # Same data in another format: same version.
    rows = list(csv.DictReader((example_dir / "fx_rates.csv").open(encoding="utf-8")))
    (example_dir / "fx_rates.csv").unlink()
    (example_dir / "fx_rates.json").write_text(json.dumps(rows), encoding="utf-8")
    manifest = yaml.safe_load((example_dir / "refdata.yaml").read_text())
    manifest["fx_rates"] = "fx_rates.json"
    (example_dir / "refdata.yaml").write_text(yaml.safe_dump(manifest))
    assert load_refdata_dir(example_dir).version_id == ref.version_id
    # Changed data: a new version, even with the same declared version.
    rows[0]["rate"] = "1.0856"
    (example_dir / "fx_rates.json").write_text(json.dumps(rows), encoding="utf-8")
    changed = load_refdata_dir(example_dir).version_id
    assert changed.startswith("2026.11.21-1+") and changed != ref.version_id


def test_fr6_bad_rows_are_reported_with_file_line_and_advice(example_dir: Path) -> None:
    accounts = example_dir / "accounts.csv"
    lines = accounts.read_text(encoding="utf-8").splitlines()
    iban = lines[1].split(",")[2]
    broken = iban[:-1] + ("0" if iban[-1] != "0" else "1")
    lines[1] = lines[1].replace(iban, broken)
    lines[2] = lines[2].replace(",EUR,", ",XXX,").replace(",USD,", ",XXX,")
    accounts.write_text("\n".join(lines) + "\n", encoding="utf-8")
    rates = example_dir / "fx_rates.csv"
    rates.write_text(
        rates.read_text(encoding="utf-8") + "EUR,NOK,-11.7,somewhere,2026-11-20T16:00:00\n",
        encoding="utf-8",
    )
    with pytest.raises(UserError) as err:
        load_refdata_dir(example_dir)
    text = str(err.value)
    assert "accounts.csv:2: IBAN" in text and "not valid" in text
    assert "accounts.csv:3" in text and "XXX" in text
    assert "must be positive" in text
    assert "RFC 3339" in text
    assert "docs/refdata.md" in text


def test_fr6_float_amounts_and_pans_are_refused(example_dir: Path) -> None:
    tenants = yaml.safe_load((example_dir / "tenants.yaml").read_text())
    tenants["tenants"][0]["fx_markup"] = 0.0275
    (example_dir / "tenants.yaml").write_text(yaml.safe_dump(tenants))
    accounts = example_dir / "accounts.csv"
    lines = accounts.read_text(encoding="utf-8").splitlines()
    lines[1] = lines[1].rsplit(",", 1)[0] + ",4751295000806363"
    accounts.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(UserError) as err:
        load_refdata_dir(example_dir)
    assert "fx_markup" in str(err.value) and "decimal string" in str(err.value)
    assert "card numbers must never be in reference data" in str(err.value)
    assert "4751295000806363" not in str(err.value)


def test_missing_manifest_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"refdata\.yaml"):
        load_refdata_dir(tmp_path)


def test_fr6_holder_data_encrypted_at_rest_and_restored_in_memory(tmp_path: Path) -> None:
    ref = load_refdata_dir(EXAMPLES)
    db = tmp_path / "paypost.db"
    cipher = HolderCipher.from_master(MASTER)
    assert load_refdata_into_db(db, ref, cipher) is True
    assert load_refdata_into_db(db, ref, cipher) is False  # same version: stored once
    # No holder name or address in clear in any file the database wrote (db, -wal, -shm).
    blobs = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    for account in ref.accounts.values():
        assert account.holder_name.encode() not in blobs
        assert account.holder_address is not None
        assert account.holder_address.encode() not in blobs
        assert account.iban.encode() in blobs  # non-personal data is stored plainly
    conn = connect(db)
    back = load_refdata_from_db(conn, cipher)
    assert back.version_id == ref.version_id
    assert back.accounts == ref.accounts
    assert back.tenants == ref.tenants and back.rates == ref.rates
    some = next(iter(ref.accounts.values()))
    found = back.account_for_card(some.tenant, some.card_tokens[0])
    assert found is not None and found.holder_name == some.holder_name
    assert [v["version_id"] for v in stored_versions(conn)] == [ref.version_id]


def test_fr6_wrong_key_cannot_read_holders(tmp_path: Path) -> None:
    db = tmp_path / "paypost.db"
    load_refdata_into_db(db, load_refdata_dir(EXAMPLES), HolderCipher.from_master(MASTER))
    other = HolderCipher.from_master(os.urandom(32))
    with pytest.raises(UserError, match="cannot be decrypted"):
        load_refdata_from_db(connect(db), other)


def test_save_refdata_does_not_commit(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "paypost.db")
    save_refdata(conn, load_refdata_dir(EXAMPLES), HolderCipher.from_master(MASTER))
    conn.rollback()
    with pytest.raises(UserError, match="holds no reference data"):
        load_refdata_from_db(conn, HolderCipher.from_master(MASTER))


def test_generator_makes_valid_ibans_and_keeps_pans_out(tmp_path: Path) -> None:
    tokenizer = Tokenizer(b"generator-test-key-0123456789abc")
    g = generate_refdata(90, seed=3, tokenizer=tokenizer)
    again = generate_refdata(90, seed=3, tokenizer=tokenizer)
    assert g.refdata.version_id == again.refdata.version_id  # deterministic
    assert len(g.refdata.accounts) == 90
    for account in g.refdata.accounts.values():
        IBAN(account.iban, validate_bban=True)
    assert {c.tenant for c in g.cards} == {"uk-bank", "euro-bank", "de-bank"}
    for card in g.cards:
        assert luhn_valid(card.pan)
        assert g.refdata.account_for_card(card.tenant, card.token) is not None
        assert card.token == tokenizer.tokenize(card.pan, card.tenant).token
    written = write_refdata_dir(g.refdata, tmp_path / "gen")
    assert load_refdata_dir(written).version_id == g.refdata.version_id
    text = "".join(p.read_text(encoding="utf-8") for p in written.iterdir())
    assert not any(card.pan in text for card in g.cards)


def test_generator_for_some_tenants_keeps_exactly_their_records() -> None:
    """A shard holding whole tenants loads only their reference data, record for record the
    same as in the full data set of the same seed."""
    tokenizer = Tokenizer(b"generator-test-key-0123456789abc")
    full = generate_refdata(60, seed=4, tokenizer=tokenizer)
    part = generate_refdata(60, seed=4, tokenizer=tokenizer, only_tenants={"euro-bank"})
    assert set(part.refdata.tenants) == {"euro-bank"}
    assert {b.tenant for b in part.refdata.branches.values()} == {"euro-bank"}
    wanted = {k: a for k, a in full.refdata.accounts.items() if a.tenant == "euro-bank"}
    assert wanted and part.refdata.accounts == wanted
    assert part.cards == [c for c in full.cards if c.tenant == "euro-bank"]
    assert part.refdata.rates == full.refdata.rates
    # a different snapshot (its own content hash), not the full one relabelled
    assert part.refdata.version_id != full.refdata.version_id
    with pytest.raises(ValueError, match="only_tenants: no such tenant nope-bank"):
        generate_refdata(6, seed=4, tokenizer=tokenizer, only_tenants={"nope-bank"})
