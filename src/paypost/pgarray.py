"""Fast PostgreSQL array parameters for the `unnest(%s::bigint[], …)` statements.

psycopg dumps a Python list element by element in Python (`ListDumper`): ~7% of a
distributed worker's CPU went there. `Int8Array` and `TextArray` are lists that dump as ONE
text array literal built by `str.join` (C speed). They are registered on psycopg's global
adapters when this module is imported.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.adapt import Dumper
from psycopg.pq import Format


class Int8Array(list[int]):
    """A bigint[] parameter (integers only)."""


class TextArray(list[str]):
    """A text[] parameter."""


class _ArrayDumper(Dumper):
    format = Format.TEXT
    element = "int8"  # the element type: the parameter goes as <element>[]

    def __init__(self, cls: type, context: Any = None) -> None:
        super().__init__(cls, context)
        self.oid = psycopg.adapters.types[self.element].array_oid


class _Int8ArrayDumper(_ArrayDumper):
    def dump(self, obj: Any) -> bytes:
        # int() first: a bool would print as "True", a numpy integer as itself
        return ("{" + ",".join(map(str, map(int, obj))) + "}").encode()


class _TextArrayDumper(_ArrayDumper):
    element = "text"

    def dump(self, obj: Any) -> bytes:
        if not obj:
            return b"{}"
        joined = '","'.join(obj)
        if "\\" in joined or '"' in "".join(obj) or "\x00" in joined:
            joined = '","'.join(s.replace("\\", "\\\\").replace('"', '\\"') for s in obj)
        return ('{"' + joined + '"}').encode()


def register(adapters: Any) -> None:
    adapters.register_dumper(Int8Array, _Int8ArrayDumper)
    adapters.register_dumper(TextArray, _TextArrayDumper)


register(psycopg.adapters)
