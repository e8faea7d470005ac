"""EventBridge pattern conformance: 156 cases recorded against real AWS.

The cases come from the localstack project (Apache License 2.0), recorded against Amazon
EventBridge by localstack's parity tests, and live in
`../shared/conformance/eventbridge/localstack_cases.json` beside the repository (override the
directory with PAYPOST_SHARED_DIR). Each case is a pattern, an event and AWS's verdict: match,
no match, or InvalidEventPatternException with AWS's message, which paypost must reproduce
verbatim (`InvalidPattern.aws_message`).

If the file is absent the tests skip, except under CI=true, where that is a failure.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from paypost import patterns

CASES_RELATIVE = Path("conformance") / "eventbridge" / "localstack_cases.json"


def _shared_dir() -> Path:
    override = os.environ.get("PAYPOST_SHARED_DIR")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[3] / "shared"


def _load_cases() -> list[dict[str, Any]]:
    path = _shared_dir() / CASES_RELATIVE
    if not path.exists():
        return []
    cases: list[dict[str, Any]] = json.loads(path.read_text(encoding="utf-8"))
    return cases


CASES = _load_cases()


def _case_id(case: dict[str, Any]) -> str:
    return str(case["name"]).split(" ")[0]


def test_case_file_present() -> None:
    if CASES:
        assert len(CASES) == 156
        return
    message = f"conformance cases not found at {_shared_dir() / CASES_RELATIVE}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message + " (CI=true: shared/ must be beside the repository)")
    pytest.skip(message + "; set PAYPOST_SHARED_DIR to the shared directory")


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_localstack_case(case: dict[str, Any]) -> None:
    pattern = case["pattern_raw"] if "pattern_raw" in case else case["pattern"]
    event = json.loads(case["event_raw"]) if "event_raw" in case else case["event"]
    expected = case["expected_match"]
    if expected == "exception":
        with pytest.raises(patterns.InvalidPattern) as info:
            patterns.compile(pattern)
        assert info.value.aws_message == case["aws_error"]["message"]
        return
    compiled = patterns.compile(pattern)
    assert compiled.matches(event) is expected
    # Same verdict through the JSON-text entry point.
    text = pattern if isinstance(pattern, str) else json.dumps(pattern)
    assert patterns.matches(text, event) is expected
