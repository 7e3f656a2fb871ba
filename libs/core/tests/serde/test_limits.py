"""Limits that keep stored bytes from crashing the reader or burning unbounded CPU and memory.

Deep values are read in a subprocess: a stack overflow there is a failed test, not a dead pytest.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections import deque
from datetime import date, timedelta
from decimal import Decimal
from fractions import Fraction
from typing import Any

import msgpack
import pytest
from msgpack import ExtType

from stepgraph.checkpoint.serde import MsgpackSerializer
from stepgraph.checkpoint.serde.codec import (
    BIGINT,
    COMPLEX,
    DATACLASS,
    DATE,
    DATETIME,
    DECIMAL,
    DEQUE,
    FRACTION,
    FROZENSET,
    MAX_BIGINT_BYTES,
    SET,
    TIME,
    TIMEDELTA,
    TIMEZONE,
    TUPLE,
)
from stepgraph.checkpoint.serde.serializer import MAX_DEPTH
from stepgraph.errors import SerializationError

# The child imports stepgraph from where this process does.
CHILD_PATH = os.pathsep.join(path for path in sys.path if path)

PRELUDE = """
import sys, threading
import msgpack
from dataclasses import dataclass
from msgpack import ExtType
from stepgraph.checkpoint.serde import MsgpackSerializer
from stepgraph.checkpoint.serde.serializer import MAX_DEPTH
from stepgraph.errors import SerializationError

@dataclass
class Node:
    value: int
    next: "Node | None" = None

serde = MsgpackSerializer(allowed_types=[Node])
pk = lambda obj: msgpack.packb(obj, use_bin_type=True)

def crafted(depth, codes):
    # depth nested extensions built byte by byte, each a well-formed body
    packed = pk(1)
    for level in range(depth):
        code = codes[level % len(codes)]
        if code == 33:  # a Node dataclass: [module, qualname, {"value": level, "next": inner}]
            fields = bytes([0x82]) + pk("value") + pk(level) + pk("next") + packed
            body = bytes([0x93]) + pk("__main__") + pk("Node") + fields
        else:  # a tuple or frozenset of one item
            body = bytes([0x91]) + packed
        packed = pk(ExtType(code, body))
    return packed

def bare(depth):
    # the reviewer's probe: each tuple body is the next extension itself
    packed = pk([])
    for _ in range(depth):
        packed = pk(ExtType(1, packed))
    return packed

def tuples(depth):
    value = ()
    for _ in range(depth - 1):
        value = (value,)
    return value

def nodes(depth):
    value = None
    for level in range(depth):
        value = Node(level, value)
    return value

def read(payload):
    try:
        serde.loads(payload)
    except SerializationError as error:
        return "refused: " + str(error)[:200]
    return "read"
"""


def run(script: str, stack_bytes: int | None = None) -> str:
    """Runs ``script`` in a fresh interpreter (in a thread with that stack size, if given)."""
    body = textwrap.dedent(script)
    if stack_bytes is not None:
        body = (
            f"threading.stack_size({stack_bytes})\n"
            "def main():\n" + textwrap.indent(body, "    ") + "\n"
            "failed = []\n"
            "def guarded():\n"
            "    try:\n        main()\n"
            "    except BaseException as error:\n        failed.append(error)\n"
            "thread = threading.Thread(target=guarded)\nthread.start()\nthread.join()\n"
            "if failed:\n    raise failed[0]\n"
        )
    result = subprocess.run(
        [sys.executable, "-c", PRELUDE + body],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": CHILD_PATH},
    )
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-2000:]}"
    return result.stdout


# -- nesting depth ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["tuples", "nodes"])
def test_values_at_the_depth_cap_round_trip(kind: str) -> None:
    out = run(f"""
        value = {kind}(MAX_DEPTH)
        assert serde.loads(serde.dumps(value)) == value
        print("ok")
    """)
    assert out == "ok\n"


@pytest.mark.parametrize("kind", ["tuples", "nodes"])
def test_values_beyond_the_depth_cap_are_refused_when_written(kind: str) -> None:
    out = run(f"""
        try:
            serde.dumps({kind}(MAX_DEPTH + 1))
        except SerializationError as error:
            print(error.path.count(".next") + error.path.count("[0]"))
            print(str(error).split(": ", 1)[1])
    """)
    depth, reason = out.splitlines()
    assert int(depth) == MAX_DEPTH  # the path names the value that is one level too deep
    assert f"nested more than {MAX_DEPTH} levels deep" in reason


def test_reading_at_the_cap_fits_in_a_small_thread_stack() -> None:
    # Before the fix each level kept a ~40 KB unpack context on the C stack (8 MB: ~200 levels).
    out = run(
        """
        print(read(serde.dumps(tuples(MAX_DEPTH))), read(serde.dumps(nodes(MAX_DEPTH))))
        """,
        stack_bytes=1 << 20,
    )
    assert out == "read read\n"


@pytest.mark.parametrize("depth_offset", [0, 1, 1_000, 20_000])
@pytest.mark.parametrize(
    "codes", [[TUPLE], [DATACLASS], [TUPLE, FROZENSET]], ids=["tuple", "class", "mix"]
)
def test_crafted_deep_bytes_fail_cleanly(depth_offset: int, codes: list[int]) -> None:
    out = run(f"print(read(crafted(MAX_DEPTH + {depth_offset}, {codes!r})))")
    if depth_offset == 0:
        assert out == "read\n"
    else:
        assert out.startswith("refused: ") and "nested more than" in out


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 20_000])
def test_crafted_deep_bytes_fail_cleanly_in_a_small_thread_stack(depth: int) -> None:
    out = run(
        f"print(read(crafted({depth}, [1, 33])))\nprint(read(bare({depth})))",
        stack_bytes=1 << 20,
    )
    assert out.count("nested more than") == 2, out


def test_deep_lists_inside_deep_values_are_refused_when_written() -> None:
    # 500 levels of lists inside each of 150 tuples used to overflow the C stack while writing.
    out = run("""
        value = 1
        for _ in range(150):
            for _ in range(500):
                value = [value]
            value = (value,)
        try:
            serde.dumps(value)
        except SerializationError as error:
            print("refused:", str(error)[-120:])
    """)
    assert out.startswith("refused:") and "lists and dicts nest more than" in out


def test_the_deepest_writable_value_fits_in_a_2_mib_thread_stack() -> None:
    # The most C stack a write can take: lists at msgpack's own cap in the first levels, then
    # as many lists as allowed inside every deeper level, up to the depth cap.
    out = run(
        """
        from stepgraph.checkpoint.serde.serializer import _CHECKED_DEPTH, _DEEP_NATIVE_MAX
        value = 1
        for level in reversed(range(MAX_DEPTH)):
            for _ in range(_DEEP_NATIVE_MAX if level >= _CHECKED_DEPTH else 500):
                value = [value]
            value = (value,)
        payload = serde.dumps(value)
        assert serde.dumps(serde.loads(payload)) == payload  # == on the values would recurse
        print("ok")
        """,
        stack_bytes=2 << 20,
    )
    assert out == "ok\n"


def test_moderate_lists_inside_deep_values_round_trip() -> None:
    out = run("""
        value = 1
        for _ in range(MAX_DEPTH // 2):
            value = ([[[value]]],)
        assert serde.loads(serde.dumps(value)) == value
        print("ok")
    """)
    assert out == "ok\n"


# -- extension bodies are exactly what the encoder writes -----------------------------------


def pk(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


CRAFTED_BODIES = {
    "fraction from strings": ExtType(FRACTION, pk(["1e-30000000", None])),
    "fraction from floats": ExtType(FRACTION, pk([0.5, 1.0])),
    "fraction with zero denominator": ExtType(FRACTION, pk([1, 0])),
    "fraction with a bool": ExtType(FRACTION, pk([True, 2])),
    "fraction with three terms": ExtType(FRACTION, pk([1, 2, 3])),
    "complex from strings": ExtType(COMPLEX, pk(["1e999999", "2"])),
    "complex from ints": ExtType(COMPLEX, pk([1, 2])),
    "timedelta from floats": ExtType(TIMEDELTA, pk([1.5, 0, 0])),
    "timedelta from strings": ExtType(TIMEDELTA, pk(["1", 0, 0])),
    "date from a string": ExtType(DATE, pk("738000")),
    "deque with a str maxlen": ExtType(DEQUE, pk([[1], "3"])),
    "deque items not a list": ExtType(DEQUE, pk(["abc", None])),
    "datetime with a str field": ExtType(DATETIME, pk([2024, "1", 1, 0, 0, 0, 0, None, 0])),
    "datetime with a non-tz tzinfo": ExtType(DATETIME, pk([2024, 1, 1, 0, 0, 0, 0, [], 0])),
    "time with a float": ExtType(TIME, pk([1.0, 0, 0, 0, None, 0])),
    "timezone with a float offset": ExtType(TIMEZONE, pk([3600.0, None])),
    "tuple body a str": ExtType(TUPLE, pk("abc")),
    "tuple body a map": ExtType(TUPLE, pk({"a": 1})),
    "set body an int": ExtType(SET, pk(3)),
    "huge int": ExtType(BIGINT, b"\x01" * (MAX_BIGINT_BYTES + 1)),
    "long Decimal": ExtType(DECIMAL, b"1" * 2000),
    "Decimal with a huge exponent": ExtType(DECIMAL, b"1e-30000000"),
    "Decimal that is not ASCII": ExtType(DECIMAL, "\u0661".encode()),
    "truncated nested body": ExtType(TUPLE, pk([1, 2])[:-1]),
    "extra data in a nested body": ExtType(TUPLE, pk([1, 2]) + b"\x01"),
    "class name not a str": ExtType(33, pk([1, 2, {}])),
}


@pytest.mark.parametrize("ext", CRAFTED_BODIES.values(), ids=CRAFTED_BODIES.keys())
def test_crafted_extension_bodies_are_refused(ext: ExtType) -> None:
    with pytest.raises(SerializationError, match="cannot read stored value"):
        MsgpackSerializer().loads(pk({"value": ext}))


def test_largest_int_round_trips_and_larger_is_refused_when_written() -> None:
    serde = MsgpackSerializer()
    largest = (1 << (MAX_BIGINT_BYTES * 8 - 1)) - 1
    for value in (largest, -largest - 1):
        assert serde.loads(serde.dumps([value])) == [value]
    with pytest.raises(SerializationError, match=r"value\[0\].*larger than the 1024 bytes"):
        serde.dumps([largest + 1])


@pytest.mark.parametrize("value", [Decimal("1e-1000000"), Decimal("1" * 1100)])
def test_oversized_decimals_are_refused_when_written(value: Decimal) -> None:
    with pytest.raises(SerializationError, match="Decimal"):
        MsgpackSerializer().dumps({"d": value})


@pytest.mark.parametrize(
    "value",
    [
        Decimal("1e999999"),
        Decimal("-0.000001"),
        Decimal("NaN"),
        Decimal("-Infinity"),
        Fraction(-3, 7),
        complex(float("inf"), -0.0),
        timedelta(days=-3, microseconds=5),
        date.min,
        deque([1, 2], maxlen=0),
    ],
)
def test_values_at_the_edges_still_round_trip(value: Any) -> None:
    serde = MsgpackSerializer()
    back = serde.loads(serde.dumps(value))
    assert type(back) is type(value)
    assert str(back) == str(value)
