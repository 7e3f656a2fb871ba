"""Binary dumpers for the one-dimensional arrays the saver sends, one array per column of rows.

psycopg's general list dumper inspects every list to find its element type, nesting and
nulls before writing it, which made adapting a step's dozen arrays a good part of the
client's time per step. A column's type is known here, so each list is wrapped in its
column's class and written straight into PostgreSQL's binary array format: header (dimensions,
null flag, element type), the length and lower bound of the one dimension, then each element
as a length and its bytes (-1 for NULL).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from psycopg.adapt import Dumper
from psycopg.pq import Format

__all__ = ["ByteaArray", "Int2Array", "Int4Array", "TextArray", "register"]

_HEAD = struct.Struct("!iiIii")  # dimensions, has nulls, element oid, length, lower bound
_EMPTY = struct.Struct("!iiI")
_LENGTH = struct.Struct("!i")
_INT4 = struct.Struct("!ii")  # length 4, value
_INT2 = struct.Struct("!ih")  # length 2, value
_NULL = b"\xff\xff\xff\xff"


class ByteaArray(list[bytes | None]):
    """A ``bytea[]`` parameter."""


class TextArray(list[str | None]):
    """A ``text[]`` parameter."""


class Int4Array(list[int]):
    """An ``integer[]`` parameter (no NULLs)."""


class Int2Array(list[int]):
    """A ``smallint[]`` parameter (no NULLs)."""


def _bytea_elements(obj: Any, parts: list[bytes]) -> int:
    has_nulls = 0
    for item in obj:
        if item is None:
            parts.append(_NULL)
            has_nulls = 1
        else:
            parts.append(_LENGTH.pack(len(item)))
            parts.append(item)
    return has_nulls


def _text_elements(obj: Any, parts: list[bytes]) -> int:
    return _bytea_elements([None if item is None else item.encode() for item in obj], parts)


def _int4_elements(obj: Any, parts: list[bytes]) -> int:
    parts.extend(_INT4.pack(4, item) for item in obj)
    return 0


def _int2_elements(obj: Any, parts: list[bytes]) -> int:
    parts.extend(_INT2.pack(2, item) for item in obj)
    return 0


def _dumper(
    array_oid: int, element_oid: int, elements: Callable[[Any, list[bytes]], int]
) -> type[Dumper]:
    """A binary dumper of one-dimensional arrays; ``elements`` appends the encoded elements
    and says whether any was NULL."""

    class ArrayDumper(Dumper):
        format = Format.BINARY
        oid = array_oid

        def dump(self, obj: Any) -> bytes:
            if not obj:
                return _EMPTY.pack(0, 0, element_oid)
            parts = [b""]
            has_nulls = elements(obj, parts)
            parts[0] = _HEAD.pack(1, has_nulls, element_oid, len(obj), 1)
            return b"".join(parts)

    return ArrayDumper


_DUMPERS: dict[type, type[Dumper]] = {
    ByteaArray: _dumper(1001, 17, _bytea_elements),
    TextArray: _dumper(1009, 25, _text_elements),
    Int4Array: _dumper(1007, 23, _int4_elements),
    Int2Array: _dumper(1005, 21, _int2_elements),
}


def register(adapters: Any) -> None:
    """Use these dumpers in ``adapters`` (a cursor's or connection's ``AdaptersMap``)."""
    for cls, dumper in _DUMPERS.items():
        adapters.register_dumper(cls, dumper)
