"""Performance shortcuts taken for the budget (issue 7) give the very same answers as the
straightforward code they replace."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from paypost.bench import bench_rulebook, generate_sources
from paypost.demo import demo_refdata
from paypost.pipeline import PipelineSettings
from paypost.runner import POSTING_FILE, Job
from paypost.security.tokens import contains_pan
from paypost.stages.posting_file import (
    PostingFileWriter,
    PostingRecord,
    _lines_with_pan,
    add_to_outbox,
    verify_file,
)

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


def _record(entry_id: str) -> PostingRecord:
    return PostingRecord(
        entry_id=entry_id,
        tenant="uk-bank",
        booked_at="2026-11-21T10:00:00.000Z",
        value_date="2026-11-21",
        account_id="UK-BANK-00000001",
        side="D",
        amount_minor=100,
        currency="GBP",
        legs=(("UK-BANK-00000001", "D", 100, "GBP"), ("settlement-GBP", "C", 100, "GBP")),
    )


def test_kept_posting_writer_reopens_after_another_writer(tmp_path: Path) -> None:
    """The pipeline keeps its posting-file writer between exports (no rescan of the whole
    file each time); when someone else appended to the file, it reopens: nothing is lost or
    written twice."""
    key = bytes(range(32))
    sources = generate_sources(600, key, 2, "batch", tmp_path, in_process=True)
    refdata = demo_refdata(600, key, 2).refdata
    job = Job(tmp_path / "d", refdata, bench_rulebook(refdata), PipelineSettings("batch"), key)
    try:
        job.run(sources)
        path = job.data_dir / POSTING_FILE
        before = verify_file(path).records
        assert before > 0
        PostingFileWriter(path).write_batch("manual-1", [_record("manual-entry-1")])
        with job.bus.unit_of_work() as uow:
            add_to_outbox(uow.conn, [_record("outbox-entry-2")])
        assert job.pipeline.export_postings() == 1
        assert job.pipeline.export_postings() == 0
        check = verify_file(path)
        assert check.problems == []
        assert check.records == before + 2
        assert job.pipeline._posting_writer().has_batch("manual-1")
    finally:
        job.close()
