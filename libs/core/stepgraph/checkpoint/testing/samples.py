"""Values of every type a checkpoint must carry, and a strict comparison for them.

The user classes live here (a module both writer and reader import), so stored values can
name them; ``allow_sample_types`` allows them on a saver's serializer.
"""

from __future__ import annotations

import enum
import math
import uuid
from collections import deque
from dataclasses import dataclass, field, fields, is_dataclass
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from fractions import Fraction
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

__all__ = [
    "SAMPLE_TYPES",
    "SAMPLE_VALUES",
    "Color",
    "Level",
    "Point",
    "Priority",
    "Reading",
    "Record",
    "allow_sample_types",
    "assert_same",
]


class Color(enum.Enum):
    RED = "red"
    GREEN = (0, 255, 0)


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Priority(enum.StrEnum):
    URGENT = "urgent"


class Point(NamedTuple):
    x: int
    y: float = 0.0


@dataclass
class Record:
    name: str
    tags: list[str] = field(default_factory=list)
    point: Point | None = None
    color: Color = Color.RED


SAMPLE_TYPES: list[type] = [Color, Level, Priority, Point, Record]

try:
    import pydantic
except ImportError:  # pragma: no cover - the kit runs without pydantic, minus one sample
    pydantic = None  # type: ignore[assignment]

if pydantic is not None:

    class Reading(pydantic.BaseModel):
        sensor: str
        value: float
        at: datetime
        labels: dict[str, str] = {}

    SAMPLE_TYPES.append(Reading)


def allow_sample_types(serde: Any) -> None:
    """Allow the sample classes on a serializer that keeps a per-instance allowlist."""
    allow = getattr(serde, "allow", None)
    if callable(allow):
        allow(*SAMPLE_TYPES)


_PARIS = ZoneInfo("Europe/Paris")
_PLUS_2 = timezone(timedelta(hours=2), "CEST-ish")

SAMPLE_VALUES: dict[str, Any] = {
    "none": None,
    "true": True,
    "false": False,
    "zero": 0,
    "int64_max": 2**63 - 1,
    "uint64_max": 2**64 - 1,
    "big_int": 2**200 + 1,
    "big_negative_int": -(2**130),
    "float": 1.25,
    "negative_zero": -0.0,
    "nan": math.nan,
    "inf": math.inf,
    "negative_inf": -math.inf,
    "str": "plain",
    "unicode": "héllo wörld ✓ 🙂 中文",
    "lone_surrogate": "a\ud800b\udfff",
    "nul_str": "a\x00b\x00",
    "empty_str": "",
    "bytes": b"\x00\x01\xff" * 3,
    "empty_bytes": b"",
    "bytearray": bytearray(b"mutable\x00"),
    "list": [1, "two", None, [3.0]],
    "tuple": (1, (2, "three"), ()),
    "dict": {"a": 1, "nested": {"b": [1, 2]}},
    "dict_non_str_keys": {1: "int", (2, "x"): "tuple", 2.5: "float", None: "none"},
    "set": {1, "two", (3, 4)},
    "frozenset": frozenset({1, 2}),
    "empty_set": set(),
    "deque": deque([1, 2, 3]),
    "deque_maxlen": deque([1, 2], maxlen=3),
    "datetime_naive": datetime(2024, 2, 29, 23, 59, 59, 999_999),
    "datetime_utc": datetime(2024, 1, 1, 12, 0, tzinfo=UTC),
    "datetime_offset": datetime(2024, 1, 1, 12, 0, tzinfo=_PLUS_2),
    "datetime_zoneinfo": datetime(2024, 10, 27, 2, 30, tzinfo=_PARIS, fold=1),
    "date": date(1, 1, 1),
    "time": time(23, 59, 1, 5),
    "time_tz": time(8, 30, tzinfo=UTC),
    "timedelta": timedelta(days=-3, seconds=5, microseconds=7),
    "timezone": _PLUS_2,
    "timezone_utc": UTC,
    "zoneinfo": _PARIS,
    "uuid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
    "decimal": Decimal("1.10"),
    "decimal_big": Decimal("-123456789012345678901234567890.000000001"),
    "fraction": Fraction(1, 3),
    "complex": complex(1.5, -2),
    "enum": Color.GREEN,
    "int_enum": Level.HIGH,
    "str_enum": Priority.URGENT,
    "pure_posix_path": PurePosixPath("/tmp/a b/ü"),
    "pure_windows_path": PureWindowsPath(r"C:\Users\x"),
    "path": Path("relative/dir"),
    "named_tuple": Point(1, 2.5),
    "dataclass": Record("r", ["t1", "t2"], Point(3), Color.RED),
    "nested": {
        "records": [Record("a"), Record("b", point=Point(-1, math.inf))],
        "when": {date(2020, 1, 1): (Level.LOW, frozenset({Priority.URGENT}))},
    },
}
if pydantic is not None:
    SAMPLE_VALUES["pydantic"] = Reading(
        sensor="s1", value=0.5, at=datetime(2024, 5, 1, tzinfo=UTC), labels={"k": "v"}
    )


def assert_same(actual: Any, expected: Any, where: str = "value") -> None:
    """Assert ``actual`` equals ``expected`` with the same types throughout, NaN-aware.

    Plain ``==`` is not enough: ``1 == True``, ``(1,) != [1]`` but ``{1} == frozenset({1})``,
    ``-0.0 == 0.0``, and NaN is not equal to itself.
    """
    assert type(actual) is type(expected), (
        f"{where}: got {type(actual).__name__} {actual!r}, expected "
        f"{type(expected).__name__} {expected!r}"
    )
    if isinstance(expected, float):
        if math.isnan(expected):
            assert math.isnan(actual), f"{where}: got {actual!r}, expected nan"
        else:
            assert actual == expected, f"{where}: got {actual!r}, expected {expected!r}"
            assert math.copysign(1, actual) == math.copysign(1, expected), f"{where}: sign"
    elif isinstance(expected, (list, tuple, deque)):
        if isinstance(expected, deque):
            assert actual.maxlen == expected.maxlen, f"{where}: maxlen {actual.maxlen!r}"
        assert len(actual) == len(expected), f"{where}: got {actual!r}, expected {expected!r}"
        for index, (got, want) in enumerate(zip(actual, expected, strict=True)):
            assert_same(got, want, f"{where}[{index}]")
    elif isinstance(expected, dict):
        assert list(actual) == list(expected), f"{where}: keys {list(actual)!r}"
        for key, want in expected.items():
            assert_same(actual[key], want, f"{where}[{key!r}]")
    elif is_dataclass(expected):
        for spec in fields(expected):
            assert_same(getattr(actual, spec.name), getattr(expected, spec.name), where)
    elif isinstance(expected, (datetime, time)):
        assert actual == expected, f"{where}: got {actual!r}, expected {expected!r}"
        assert actual.tzinfo == expected.tzinfo, f"{where}: tzinfo {actual.tzinfo!r}"
        assert actual.fold == expected.fold, f"{where}: fold {actual.fold!r}"
    elif pydantic is not None and isinstance(expected, pydantic.BaseModel):
        assert actual == expected, f"{where}: got {actual!r}, expected {expected!r}"
        assert actual.model_fields_set == expected.model_fields_set, f"{where}: fields set"
    else:
        assert actual == expected, f"{where}: got {actual!r}, expected {expected!r}"
