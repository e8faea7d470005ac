"""The event envelope, derived ids and the schema registry (`paypost schemas`)."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest
from typer.testing import CliRunner

from paypost.cli import _register, app
from paypost.events import (
    CATALOG,
    AuthorizationApproved,
    AuthorizationRequest,
    AuthorizationResponse,
    Event,
    Merchant,
    derive_event_id,
    detail_of,
    new_event,
)
from paypost.money import Money


def _approved() -> Event:
    request = AuthorizationRequest(
        stan="000123",
        transmission_time="2026-11-21T10:00:00Z",
        acquirer_id="12345678",
        card_token="tok_ABCDEF",
        pan_masked="411111******1111",
        amount=Money(1050, "EUR"),
        merchant=Merchant(id="M1", name="Corner Shop", mcc="5411", country="IE"),
    )
    detail = AuthorizationApproved(
        request=request,
        response=AuthorizationResponse(response_code="00", approval_code="A1B2C3"),
        source_ref="auth.log:1",
    )
    return new_event(
        detail, source="paypost.ingest", tenant="bank-eu", time=request.transmission_time
    )


def test_envelope_uses_eventbridge_field_names() -> None:
    event = _approved().to_dict()
    for key in (
        "id",
        "source",
        "detail-type",
        "time",
        "tenant",
        "correlation-id",
        "causation-id",
        "traceparent",
        "schema",
        "detail",
    ):
        assert key in event
    assert event["detail-type"] == "AuthorizationApproved"
    assert event["schema"] == {"name": "AuthorizationApproved", "version": 1}
    assert event["detail"]["request"]["amount"] == {"minor": 1050, "currency": "EUR"}


def test_envelope_round_trips_through_json() -> None:
    event = _approved()
    decoded = msgspec.json.decode(msgspec.json.encode(event), type=Event)
    assert decoded == event
    assert detail_of(decoded, AuthorizationApproved).request.amount == Money(1050, "EUR")


def test_derived_ids_are_deterministic_and_distinct() -> None:
    a = derive_event_id("in-1", "dedup", 0)
    assert a == derive_event_id("in-1", "dedup", 0)
    assert (
        len(
            {
                a,
                derive_event_id("in-1", "dedup", 1),
                derive_event_id("in-2", "dedup", 0),
                derive_event_id("in-1", "enrich", 0),
            }
        )
        == 4
    )


def test_derived_ids_are_rfc4122_uuid5() -> None:
    import uuid

    from paypost.events import EVENT_ID_NAMESPACE

    for input_id in ("in-1", "ümlaut-ü", ""):
        expected = uuid.uuid5(EVENT_ID_NAMESPACE, f"{input_id}/rules/3")
        assert derive_event_id(input_id, "rules", 3) == str(expected)
    for n in range(2000):  # every version/variant digit case, on the ids stages really see
        input_id = str(uuid.uuid4()) if n % 2 else f"ingest:src@{n}"
        expected = uuid.uuid5(EVENT_ID_NAMESPACE, f"{input_id}/enrich/{n % 3}")
        assert derive_event_id(input_id, "enrich", n % 3) == str(expected)


def test_detail_validation_rejects_a_float_amount() -> None:
    event = _approved().to_dict()
    event["detail"]["request"]["amount"]["minor"] = 10.5
    with pytest.raises(msgspec.ValidationError):
        detail_of(Event.from_dict(event), AuthorizationApproved)


def test_schemas_command_writes_a_schema_per_event_type(tmp_path: Path) -> None:
    _register()
    result = CliRunner().invoke(app, ["schemas", "--data-dir", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    listing = json.loads(result.stdout)
    names = {row["name"] for row in listing["schemas"]}
    assert names == set(CATALOG) | {"Event"}
    envelope = json.loads((tmp_path / "schemas" / "Event.v1.schema.json").read_text())
    required = envelope["$defs"]["Event"]["required"]
    assert "detail-type" in required and "correlation-id" in required
