"""The fast array parameters reach PostgreSQL exactly as psycopg's own list dumping would."""

from __future__ import annotations

import psycopg

from paypost.pgarray import Int8Array, TextArray

AWKWARD = ["plain", 'a "quoted" id', "back\\slash", "", "NULL", "x y,z{}", "ünïcode €", "tab\tnl\n"]


def test_text_and_bigint_arrays_round_trip(postgres_url: str) -> None:
    ints = [0, -1, 2**63 - 1, -(2**63), 42]
    with psycopg.connect(postgres_url) as conn:
        texts, numbers = conn.execute(
            "SELECT %s::text[], %s::bigint[]", (TextArray(AWKWARD), Int8Array(ints))
        ).fetchone()  # type: ignore[misc]
        assert texts == AWKWARD
        assert numbers == ints
        rows = conn.execute(
            "SELECT * FROM unnest(%s::text[], %s::bigint[])", (TextArray([]), Int8Array([]))
        ).fetchall()
        assert rows == []
        # the same answer as psycopg's own dumping of plain lists
        assert conn.execute(
            "SELECT %s::text[] = %s::text[]", (TextArray(AWKWARD), AWKWARD)
        ).fetchone() == (True,)
