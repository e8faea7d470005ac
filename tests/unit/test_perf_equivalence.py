"""Performance shortcuts taken for the budget (issue 7) give the very same answers as the
straightforward code they replace."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from paypost.security.tokens import contains_pan
from paypost.stages.posting_file import _lines_with_pan

PANS = ["4111111111111111", "4111 1111 1111 1111", "5500-0000-0000-0004", "3782 822463 10005"]


@settings(max_examples=400, deadline=None)
@given(
    st.text(alphabet="0123456789 -,\nab", max_size=160),
    st.sampled_from(["", *PANS]),
    st.integers(min_value=0, max_value=160),
)
def test_line_prefilter_finds_exactly_what_contains_pan_finds(text: str, pan: str, at: int) -> None:
    k = min(at, len(text))
    text = text[:k] + pan + text[k:]
    assert _lines_with_pan(text) == contains_pan(text)


def test_line_prefilter_on_posting_lines() -> None:
    clean = "D,1,8dc26c59-81ac-5813-9c80-040518949679,de-bank,2026-11-21,DE-BANK-1:D:2710:USD"
    assert not _lines_with_pan(clean + "\n" + clean)
    assert _lines_with_pan(clean + "\n" + clean.replace("de-bank", "4111 1111 1111 1111"))
