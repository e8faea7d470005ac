"""The rules engine: first terminal rule wins, flags accumulate, default rules = the reference,
per-tenant thresholds, deterministic output ids; and `paypost rules check` errors."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from paypost.events import (
    TransactionEnriched,
    TransactionFlagged,
    derive_event_id,
    detail_of,
    new_event,
)
from paypost.money import Money
from paypost.stages import rules
from paypost.stages.rules import RulesFileError, apply_rules, check_rules, parse_rules

ROOT = Path(__file__).resolve().parents[2]


def txn(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "transaction_id": "txn-1",
        "tenant": "bank-uk",
        "account_id": "acc-1",
        "amount": {"minor": 1250, "currency": "GBP"},
        "billing_amount": {"minor": 1250, "currency": "GBP"},
        "mcc": "5411",
        "issuing_country": "GB",
        "currency_conversion": False,
        "fx": None,
    }
    base.update(over)
    return base


def enriched(tenant: str = "bank-uk", **over: Any) -> Any:
    return new_event(
        TransactionEnriched(transaction=txn(tenant=tenant, **over), refdata_version="v1"),
        source="paypost.enrich",
        tenant=tenant,
        time="2026-11-21T10:00:00.000Z",
    )


def outcome(events: list[Any]) -> tuple[str, list[str]]:
    return events[0].detail_type, [e.detail_type for e in events[1:]]


@dataclass(frozen=True)
class Tenant:
    """What the reference data's TenantSettings offer to the rules (variables_from_tenants)."""

    id: str
    country: str
    home_currency: str
    high_value_threshold: Money
    listed_mccs: tuple[str, ...]


TENANTS = [
    Tenant("bank-uk", "GB", "GBP", Money(500000, "GBP"), ("7995", "6051", "4829", "6540")),
    Tenant("bank-eu", "IE", "EUR", Money(600000, "EUR"), ("7995",)),
    Tenant("bank-jp", "JP", "JPY", Money(800000, "JPY"), ()),
]
DEFAULT = parse_rules(
    rules.default_rules_text(), tenant_variables=rules.variables_from_tenants(TENANTS)
)


# -- the default rules reproduce the reference ------------------------------------------------


def test_domestic_purchase_is_approved_without_flags() -> None:
    out = apply_rules([enriched()], DEFAULT)
    assert outcome(out) == ("TransactionApproved", [])
    assert out[0].detail["transaction"]["transaction_id"] == "txn-1"
    assert out[0].detail["flags"] == []


@pytest.mark.parametrize("missing", [{"issuing_country": None}, {"issuing_country": ""}])
def test_missing_issuing_country_is_rejected_with_a_validation_failed_notification(
    missing: dict[str, Any],
) -> None:
    out = apply_rules([enriched(**missing)], DEFAULT)
    assert outcome(out) == ("TransactionRejected", ["ValidationFailed"])
    assert "issuing country" in out[0].detail["reason"]
    assert out[0].detail["rule"] == "issuing-country-missing"
    flag = detail_of(out[1], TransactionFlagged)
    assert (flag.flag, flag.rule, flag.transaction_id) == (
        "ValidationFailed",
        "issuing-country-missing",
        "txn-1",
    )


def test_absent_issuing_country_is_rejected_too() -> None:
    event = enriched()
    del event.detail["transaction"]["issuing_country"]
    assert outcome(apply_rules([event], DEFAULT)) == ("TransactionRejected", ["ValidationFailed"])


def test_foreign_currency_with_conversion_is_flagged_twice_and_approved() -> None:
    fx = {"rate": "0.85", "base": "EUR", "quote": "GBP", "source": "ECB", "markup": "0"}
    out = apply_rules(
        [
            enriched(
                amount={"minor": 1000, "currency": "EUR"},
                billing_amount={"minor": 850, "currency": "GBP"},
                currency_conversion=True,
                fx=fx,
            )
        ],
        DEFAULT,
    )
    assert outcome(out) == (
        "TransactionApproved",
        ["ForeignTransactionDetected", "CurrencyConversionDetected"],
    )
    assert out[0].detail["flags"] == ["ForeignTransactionDetected", "CurrencyConversionDetected"]


@pytest.mark.parametrize("mcc", ["7995", "6051", "4829", "6540"])
def test_listed_merchant_categories_are_flagged(mcc: str) -> None:
    out = apply_rules([enriched(mcc=mcc)], DEFAULT)
    assert outcome(out) == ("TransactionApproved", ["UnusualMerchantTypeDetected"])


def test_watch_list_is_per_tenant_from_reference_data() -> None:
    def unusual(tenant: str, mcc: str) -> bool:
        flags = outcome(apply_rules([enriched(tenant, mcc=mcc)], DEFAULT))[1]
        return "UnusualMerchantTypeDetected" in flags

    assert unusual("bank-uk", "6051") and unusual("bank-uk", "7995")
    assert not unusual("bank-eu", "6051") and unusual("bank-eu", "7995")
    assert not unusual("bank-jp", "7995")  # an empty watch list flags nothing
    # A tenant the reference data does not describe gets the file's default list.
    assert unusual("other", "5933") and not unusual("other", "5411")


def test_a_tenants_section_in_the_file_overrides_reference_data() -> None:
    text = rules.default_rules_text() + (
        "\ntenants:\n  bank-uk: {variables: {high_value_threshold_minor: 100}}\n"
    )
    book = parse_rules(text, tenant_variables=rules.variables_from_tenants(TENANTS))
    small = {"minor": 101, "currency": "GBP"}
    assert outcome(apply_rules([enriched(amount=small, billing_amount=small)], book))[0] == (
        "TransactionHeld"
    )
    assert outcome(apply_rules([enriched(amount=small, billing_amount=small)], DEFAULT))[0] == (
        "TransactionApproved"
    )


def test_amount_over_the_tenant_threshold_is_held_with_a_high_value_flag() -> None:
    big = {"minor": 500001, "currency": "GBP"}
    out = apply_rules([enriched(amount=big, billing_amount=big)], DEFAULT)
    assert outcome(out) == ("TransactionHeld", ["HighValueTransactionDetected"])
    assert out[0].detail["stage"] == "rules" and out[0].detail["rule"] == "high-value"
    at = {"minor": 500000, "currency": "GBP"}
    assert outcome(apply_rules([enriched(amount=at, billing_amount=at)], DEFAULT))[0] == (
        "TransactionApproved"
    )


def test_threshold_is_per_tenant_in_the_tenant_currency() -> None:
    # EUR 5,500.00: over the UK tenant's GBP 5,000 if it were GBP, under bank-eu's EUR 6,000.
    eur = {"minor": 550000, "currency": "EUR"}
    assert outcome(apply_rules([enriched("bank-eu", amount=eur, billing_amount=eur)], DEFAULT))[
        0
    ] == ("TransactionApproved")
    eur_big = {"minor": 600001, "currency": "EUR"}
    out = apply_rules([enriched("bank-eu", amount=eur_big, billing_amount=eur_big)], DEFAULT)
    assert outcome(out) == ("TransactionHeld", ["HighValueTransactionDetected"])
    # JPY has no minor unit: the threshold is in yen.
    jpy = {"minor": 800001, "currency": "JPY"}
    assert outcome(apply_rules([enriched("bank-jp", amount=jpy, billing_amount=jpy)], DEFAULT))[
        0
    ] == ("TransactionHeld")
    # A tenant the file does not list uses the default variables (GBP 5,000.00).
    gbp = {"minor": 500001, "currency": "GBP"}
    assert outcome(apply_rules([enriched("other", amount=gbp, billing_amount=gbp)], DEFAULT))[
        0
    ] == ("TransactionHeld")


def test_examples_copy_is_the_shipped_default() -> None:
    assert (ROOT / "examples/rules/default.yaml").read_text() == rules.default_rules_text()


# -- semantics: first terminal wins, flags accumulate ----------------------------------------

SEMANTICS = """
version: 1
variables: {limit: 100}
rules:
  - name: flag-early
    pattern: {detail: {transaction: {mcc: ["7995"]}}}
    action: flag
    flag: UnusualMerchantTypeDetected
  - name: hold-first
    pattern: {detail: {transaction: {amount: {minor: [{numeric: [">", "${limit}"]}]}}}}
    action: hold
    reason: first hold
    flag: HighValueTransactionDetected
  - name: reject-second
    pattern: {detail: {transaction: {amount: {minor: [{numeric: [">", 50]}]}}}}
    action: reject
    reason: never reached when hold-first matches
    flag: ValidationFailed
  - name: flag-late
    pattern: {detail: {transaction: {amount: {currency: ["GBP"]}}}}
    action: flag
    flag: ForeignTransactionDetected
  - name: flag-late-again
    pattern: {detail: {transaction: {amount: {currency: ["GBP"]}}}}
    action: flag
    flag: ForeignTransactionDetected
"""


def test_first_matching_terminal_rule_wins_and_flags_accumulate_in_file_order() -> None:
    book = parse_rules(SEMANTICS)
    out = apply_rules([enriched(mcc="7995", amount={"minor": 101, "currency": "GBP"})], book)
    assert outcome(out) == (
        "TransactionHeld",
        [
            "UnusualMerchantTypeDetected",
            "HighValueTransactionDetected",
            "ForeignTransactionDetected",
        ],
    )
    assert out[0].detail["reason"] == "first hold"
    # The flag of a terminal rule that did not win is not raised (reject-second matched too).
    assert "ValidationFailed" not in [e.detail_type for e in out]
    # A flag raised by two rules is emitted once, by the first.
    assert [e.detail["rule"] for e in out[1:]] == ["flag-early", "hold-first", "flag-late"]


def test_second_terminal_rule_decides_when_the_first_does_not_match() -> None:
    out = apply_rules([enriched(amount={"minor": 60, "currency": "GBP"})], parse_rules(SEMANTICS))
    assert outcome(out) == (
        "TransactionRejected",
        ["ValidationFailed", "ForeignTransactionDetected"],
    )


def test_no_terminal_match_approves_with_the_accumulated_flags() -> None:
    out = apply_rules([enriched(amount={"minor": 10, "currency": "GBP"})], parse_rules(SEMANTICS))
    assert outcome(out) == ("TransactionApproved", ["ForeignTransactionDetected"])
    assert out[0].detail["flags"] == ["ForeignTransactionDetected"]


def test_outputs_are_deterministic_and_carry_the_envelope() -> None:
    event = enriched(mcc="7995")
    first = apply_rules([event], DEFAULT)
    again = apply_rules([event], DEFAULT)
    assert [e.to_dict() for e in first] == [e.to_dict() for e in again]
    assert [e.id for e in first] == [derive_event_id(event.id, "rules", i) for i in range(2)]
    for e in first:
        assert e.correlation_id == event.correlation_id
        assert e.causation_id == event.id
        assert e.time == event.time and e.tenant == event.tenant
        assert e.source == "paypost.rules"
    assert first[1].schema.name == "TransactionFlagged"


def test_variables_keep_their_type_and_lists_substitute_whole() -> None:
    book = parse_rules(
        """
variables: {mccs: ["7995", "6051"], who: bank}
rules:
  - name: watch
    pattern: {detail: {transaction: {mcc: "${mccs}", tenant: ["${who}-uk"]}}}
    action: reject
    reason: watched
"""
    )
    assert outcome(apply_rules([enriched(mcc="6051")], book))[0] == "TransactionRejected"
    assert outcome(apply_rules([enriched(mcc="5411")], book))[0] == "TransactionApproved"


# -- rules check: what is wrong and where ------------------------------------------------------


def problems_of(text: str) -> list[str]:
    return [str(p) for p in check_rules(text, "f.yaml")]


def test_check_accepts_the_default_rules() -> None:
    assert check_rules(rules.default_rules_text()) == []


def test_check_reports_yaml_syntax_errors_with_line_and_column() -> None:
    (p,) = check_rules("rules:\n  - name: x\n    pattern: {a: [1\n")
    assert p.message.startswith("YAML syntax error")
    assert p.line is not None and p.line >= 3 and p.column is not None


def test_check_reports_every_problem_with_rule_and_path() -> None:
    text = """rules:
  - name: ok
    pattern: {detail-type: [TransactionEnriched]}
    action: approve
  - name: ok
    pattern: {detail-type: [TransactionEnriched]}
    action: approve
  - name: no-reason
    pattern: {detail-type: [TransactionEnriched]}
    action: hold
  - name: bad-action
    pattern: {detail-type: [TransactionEnriched]}
    action: post
  - name: bad-pattern
    pattern: {detail: {amount: [{numeric: [">", "ten"]}]}}
    action: approve
  - name: bad-flag
    pattern: {detail-type: [TransactionEnriched]}
    action: flag
    flag: SomethingOdd
  - name: undefined-var
    pattern: {detail: {amount: ["${nope}"]}}
    action: approve
"""
    found = check_rules(text, "f.yaml")
    by_rule = {(p.rule_index, p.path): p for p in found}
    dup = by_rule[(1, "rules[1].name")]
    assert "duplicate rule name 'ok'" in dup.message and dup.line == 5
    assert "needs a `reason`" in by_rule[(2, "rules[2]")].message
    bad = by_rule[(3, "rules[3].action")]
    assert "unknown action 'post'" in bad.message and bad.line == 13
    pat = by_rule[(4, "rules[4].pattern.detail.amount[0].numeric[1]")]
    assert "invalid event pattern" in pat.message and "numeric" in pat.message
    assert pat.line == 15 and pat.rule_name == "bad-pattern"
    assert "unknown flag 'SomethingOdd'" in by_rule[(5, "rules[5].flag")].message
    assert "${nope} is not defined" in by_rule[(6, "rules[6].pattern.detail.amount[0]")].message
    assert len(found) == 6


def test_check_names_the_tenant_whose_variables_are_missing() -> None:
    text = """
tenants:
  bank-a: {variables: {limit: 10}}
rules:
  - name: r
    pattern: {detail: {amount: [{numeric: [">", "${limit}"]}]}}
    action: hold
    reason: big
"""
    found = check_rules(text)
    assert [p.tenant for p in found] == [None]  # only the defaults lack `limit`
    assert "top-level `variables:`" in found[0].message


def test_loading_an_invalid_file_raises_a_user_error_listing_problems() -> None:
    with pytest.raises(RulesFileError) as err:
        parse_rules("rules:\n  - name: r\n    action: approve\n", "x.yaml")
    assert "x.yaml" in str(err.value) and "needs a `pattern`" in str(err.value)


def test_rules_check_cli_exit_codes_and_json(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from paypost.cli.rules import app

    runner = CliRunner()
    good = runner.invoke(app, ["check", str(ROOT / "examples/rules/default.yaml")])
    assert good.exit_code == 0, good.output
    assert "valid" in good.output and "6 rules" in good.output
    bad_file = tmp_path / "bad.yaml"
    bad_file.write_text("rules:\n  - name: r\n    pattern: {a: [1]}\n    action: reject\n")
    bad = runner.invoke(app, ["check", str(bad_file)])
    assert bad.exit_code == 2
    assert "line 2, column 5, rule #1 'r', rules[0]: action 'reject' needs a `reason`" in bad.output
    as_json = runner.invoke(app, ["check", str(bad_file), "--json"])
    assert as_json.exit_code == 2
    report = json.loads(as_json.stdout)
    assert report["valid"] is False
    assert report["problems"][0]["rule_name"] == "r" and report["problems"][0]["line"] == 2
    missing = runner.invoke(app, ["check", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 2


def test_fast_paths_have_the_catalog_shape() -> None:
    from paypost.events import Event, TransactionApproved

    event = enriched(mcc="7995")
    assert rules.match_view(event) == event.to_dict()
    approved = apply_rules([event], DEFAULT)[0]
    reference = new_event(
        TransactionApproved(
            transaction=event.detail["transaction"], flags=["UnusualMerchantTypeDetected"]
        ),
        source="paypost.rules",
        tenant=event.tenant,
        id=approved.id,
        correlation_id=event.correlation_id,
        causation_id=event.id,
        time=event.time,
    )
    assert approved.to_dict() == reference.to_dict()
    assert Event.from_dict(approved.to_dict()) == approved


def test_rules_explain_cli_shows_every_rule_and_the_decision(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from paypost.cli.rules import app

    big = {"minor": 300000, "currency": "GBP"}  # over uk-bank's GBP 2,500.00 in examples
    event = new_event(
        TransactionEnriched(
            transaction=txn(tenant="uk-bank", amount=big, billing_amount=big, mcc="7995"),
            refdata_version="v1",
        ),
        source="paypost.enrich",
        tenant="uk-bank",
    )
    path = tmp_path / "event.json"
    path.write_text(json.dumps(event.to_dict()))
    rules_file = str(ROOT / "examples/rules/default.yaml")
    refdata = str(ROOT / "examples/refdata")
    runner = CliRunner()
    out = runner.invoke(
        app, ["explain", rules_file, "--event", str(path), "--refdata", refdata, "--json"]
    )
    assert out.exit_code == 0, out.output
    report = json.loads(out.stdout)
    assert (report["decision"], report["rule"], report["tenant_variables"]) == (
        "hold",
        "high-value",
        "tenant",
    )
    assert report["emits"] == [
        "TransactionHeld",
        "HighValueTransactionDetected",
        "UnusualMerchantTypeDetected",
    ]
    assert [r["matched"] for r in report["rules"]] == [False, False, True, False, False, True]
    text = runner.invoke(app, ["explain", rules_file, "--event", str(path)])
    assert text.exit_code == 0 and "decision: hold by high-value" in text.output
    checked = runner.invoke(app, ["check", rules_file, "--refdata", refdata])
    assert checked.exit_code == 0 and "tenants: de-bank, euro-bank, uk-bank" in checked.output
