"""Every supported value comes back with the same type and value."""

from __future__ import annotations

import dataclasses
import math
import string
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from enum import Enum, Flag, IntEnum, StrEnum
from fractions import Fraction
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Generic, NamedTuple, TypeVar
from uuid import UUID
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict, Field, RootModel

from stepgraph.checkpoint.serde import EncryptedSerializer, MsgpackSerializer
from stepgraph.types import Command, Interrupt, Send

T = TypeVar("T")


class Color(Enum):
    RED = "red"
    GREEN = (0, 255, 0)


class Priority(IntEnum):
    LOW = 1
    HIGH = 2


class Mode(StrEnum):
    FAST = "fast"
    SAFE = "safe"


class Perm(Flag):
    R = 4
    W = 2
    X = 1


class Outer:
    class Inner(Enum):
        A = 1
        B = 2


@dataclass
class Point:
    x: Any
    y: Any = 0


@dataclass(frozen=True)
class FrozenTag:
    name: str
    weight: int = 1


@dataclass(slots=True)
class Counted:
    items: list[Any]
    count: int = field(init=False, default=0)


class Pair(NamedTuple):
    left: Any
    right: Any = None


class Item(BaseModel):
    name: str
    tags: list[str] = []
    when: datetime | None = None


class Loose(BaseModel):
    model_config = ConfigDict(extra="allow")
    kind: str = "loose"


class Page(BaseModel, Generic[T]):
    items: list[T]
    total: int = 0


USER_TYPES: tuple[type, ...] = (
    Color,
    Priority,
    Mode,
    Perm,
    Outer.Inner,
    Point,
    FrozenTag,
    Counted,
    Pair,
    Item,
    Loose,
    Page[Item],
    Page[int],
)


@pytest.fixture(scope="module")
def serde() -> MsgpackSerializer:
    return MsgpackSerializer(allowed_types=USER_TYPES)


def assert_same(original: Any, restored: Any) -> None:
    """Equal value and identical types all the way down (nan equals nan, -0.0 is not 0.0)."""
    assert type(restored) is type(original), (original, restored)
    if isinstance(original, float):
        assert _same_float(original, restored), (original, restored)
    elif isinstance(original, complex):
        assert _same_float(original.real, restored.real)
        assert _same_float(original.imag, restored.imag)
    elif isinstance(original, Decimal):
        assert str(original) == str(restored)
    elif isinstance(original, dict):
        assert len(original) == len(restored)
        for (key, value), (key2, value2) in zip(original.items(), restored.items(), strict=True):
            assert_same(key, key2)
            assert_same(value, value2)
    elif isinstance(original, (list, tuple, deque)):
        assert len(original) == len(restored)
        for item, item2 in zip(original, restored, strict=True):
            assert_same(item, item2)
        if isinstance(original, deque):
            assert original.maxlen == restored.maxlen
    elif isinstance(original, (set, frozenset)):
        by_value = {item: item for item in restored}
        assert len(by_value) == len(original)
        for item in original:
            assert_same(item, by_value[item])
    elif dataclasses.is_dataclass(original):
        for f in dataclasses.fields(original):
            assert_same(getattr(original, f.name), getattr(restored, f.name))
    elif isinstance(original, BaseModel):
        assert_same(dict(original), dict(restored))
        assert original.model_fields_set == restored.model_fields_set
    elif isinstance(original, timezone):
        assert original == restored
        assert original.tzname(None) == restored.tzname(None)
    elif isinstance(original, (datetime, time)):
        assert original == restored
        assert original.fold == restored.fold
        assert_same(original.tzinfo, restored.tzinfo)
    else:
        assert original == restored, (original, restored)


def _same_float(a: float, b: float) -> bool:
    if math.isnan(a):
        return math.isnan(b)
    return a == b and math.copysign(1, a) == math.copysign(1, b)


def roundtrip(serde: Any, value: Any) -> Any:
    tag, payload = serde.dumps_typed(value)
    assert isinstance(tag, str)
    assert isinstance(payload, bytes)
    return serde.loads_typed((tag, payload))


# -- example-based -----------------------------------------------------------------------------

EXAMPLES: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    2**64,
    -(2**63) - 1,
    2**1000,
    -(2**1000),
    1.5,
    -0.0,
    math.inf,
    -math.inf,
    math.nan,
    "",
    "plain",
    "nul\x00inside",
    "lone \ud800 surrogate",
    b"",
    b"\x00\xff",
    bytearray(b"mutable"),
    [],
    [1, [2, [3]]],
    (),
    (1, (2, "x")),
    {"a": 1},
    {1: "int key", (1, 2): "tuple key", None: "none key", b"k": "bytes key"},
    {"\udcff": "surrogate key"},
    set(),
    {1, "a", (2, 3)},
    frozenset({frozenset({1})}),
    deque([1, 2, 3]),
    deque([1, 2], maxlen=2),
    datetime(2024, 2, 29, 23, 59, 59, 999999),
    datetime(2024, 1, 1, tzinfo=UTC),
    datetime(2024, 1, 1, tzinfo=timezone(timedelta(hours=5, minutes=30))),
    datetime(2024, 1, 1, tzinfo=timezone(timedelta(hours=-3), "BRT")),
    datetime(2024, 11, 3, 1, 30, fold=1, tzinfo=ZoneInfo("America/New_York")),
    date(1, 1, 1),
    date(9999, 12, 31),
    time(12, 30, 15, 5),
    time(1, tzinfo=UTC),
    timedelta(days=-3, seconds=5, microseconds=7),
    UTC,
    timezone(timedelta(microseconds=-1)),
    ZoneInfo("Europe/Paris"),
    UUID("12345678-1234-5678-1234-567812345678"),
    Decimal("1.10"),
    Decimal("-0"),
    Decimal("NaN"),
    Decimal("-Infinity"),
    Decimal("1E+1000"),
    Fraction(-7, 3),
    Fraction(2**100, 3),
    complex(1, -2),
    complex(math.nan, -0.0),
    PurePosixPath("/etc/hosts"),
    PureWindowsPath("C:\\Users\\me"),
    Path("relative/file.txt"),
    Path("/tmp/undecodable-\udcff"),
    Color.RED,
    Color.GREEN,
    Priority.HIGH,
    Mode.SAFE,
    Perm.R | Perm.W,
    Outer.Inner.B,
    Point(1, [Point(2, 3)]),
    FrozenTag("t"),
    Pair(Color.RED, {"k": Pair(1)}),
    Item(name="n", tags=["a"], when=datetime(2020, 1, 1)),
    Item(name="only name"),
    Loose.model_validate({"extra_field": [1, 2]}),
    Page[Item](items=[Item(name="x")], total=1),
    Page[int](items=[1, 2]),
    Send("node", {"arg": (1, 2)}),
    Interrupt(value={"question": "ok?"}, id="abc"),
    Command(update={"x": 1}, goto=[Send("a", 1)], resume=None),
    {"nested": [{"deep": (Point(x=Color.RED), {Priority.LOW: frozenset({Mode.FAST})})}]},
]


@pytest.mark.parametrize("value", EXAMPLES, ids=lambda value: type(value).__name__)
def test_example_roundtrips(serde: MsgpackSerializer, value: Any) -> None:
    assert_same(value, roundtrip(serde, value))


def test_dataclass_init_false_field_roundtrips(serde: MsgpackSerializer) -> None:
    counted = Counted([1, 2])
    counted.count = 2
    restored = roundtrip(serde, counted)
    assert_same(counted, restored)
    assert restored.count == 2


def test_pydantic_unset_fields_stay_unset(serde: MsgpackSerializer) -> None:
    restored = roundtrip(serde, Item(name="x"))
    assert restored.model_dump(exclude_unset=True) == {"name": "x"}


def test_pydantic_extra_fields_roundtrip(serde: MsgpackSerializer) -> None:
    restored = roundtrip(serde, Loose.model_validate({"extra_field": [1, 2]}))
    assert restored.model_extra == {"extra_field": [1, 2]}


def test_generic_pydantic_model_keeps_its_parametrized_class(serde: MsgpackSerializer) -> None:
    assert type(roundtrip(serde, Page[int](items=[1]))) is Page[int]


def test_none_and_bytes_use_raw_tags(serde: MsgpackSerializer) -> None:
    assert serde.dumps_typed(None) == ("null", b"")
    assert serde.dumps_typed(b"raw") == ("bytes", b"raw")
    assert serde.dumps_typed(bytearray(b"raw")) == ("bytearray", b"raw")
    assert serde.dumps_typed({"a": 1})[0] == "msgpack"


def test_dumps_and_loads_without_tag(serde: MsgpackSerializer) -> None:
    checkpoint = {"v": 1, "id": "x", "channel_versions": {"a": "00000001.ab"}, "set": {1}}
    assert_same(checkpoint, serde.loads(serde.dumps(checkpoint)))


def test_primitives_stay_plain_msgpack(serde: MsgpackSerializer) -> None:
    import msgpack

    value = {"a": [1, 2.5, "s", b"b", None, True]}
    assert serde.dumps(value) == msgpack.packb(value, use_bin_type=True)


def test_nested_bytearray_comes_back_as_bytes(serde: MsgpackSerializer) -> None:
    # The documented limit: msgpack's C packer writes nested bytearrays as plain bin.
    assert serde.loads(serde.dumps([bytearray(b"x")])) == [b"x"]


def test_enum_ext_is_compact(serde: MsgpackSerializer) -> None:
    # One ext header plus [module, qualname, value]: no field names, no pickle opcodes.
    _, payload = serde.dumps_typed(Priority.HIGH)
    assert len(payload) < len(Priority.__module__) + len("Priority") + 12


# -- property-based ----------------------------------------------------------------------------

surrogate_text = st.text(st.one_of(st.characters(), st.characters(categories=["Cs"])), max_size=20)
fixed_offsets = st.builds(
    timezone,
    st.timedeltas(min_value=timedelta(hours=-23, minutes=-59), max_value=timedelta(hours=23)),
)
named_offsets = st.builds(
    timezone,
    st.timedeltas(min_value=timedelta(hours=-12), max_value=timedelta(hours=12)),
    st.text(string.ascii_letters, min_size=1, max_size=5),
)
tzinfos = st.none() | st.just(UTC) | fixed_offsets | named_offsets | st.timezones()

hashable_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**200), max_value=2**200),
    st.floats(allow_nan=False),
    surrogate_text,
    st.binary(max_size=20),
    st.datetimes(timezones=tzinfos).flatmap(
        lambda moment: st.sampled_from([moment, moment.replace(fold=1)])
    ),
    st.dates(),
    st.times(timezones=tzinfos),
    st.timedeltas(),
    st.uuids(),
    st.decimals(allow_nan=False),
    st.fractions(),
    st.complex_numbers(allow_nan=False),
    st.sampled_from([*Color, *Priority, *Mode, *Perm, *Outer.Inner, Perm.R | Perm.X]),
    st.builds(PurePosixPath, surrogate_text),
    st.builds(PureWindowsPath, st.text(max_size=10)),
    st.builds(Path, st.text(max_size=10)),
    st.builds(FrozenTag, st.text(max_size=5), st.integers()),
)
leaves = st.one_of(
    hashable_leaves,
    st.floats(),
    st.decimals(),
    st.complex_numbers(),
    st.timezones(),
    fixed_offsets,
)
hashable = st.recursive(
    hashable_leaves,
    lambda children: st.one_of(
        st.tuples(children, children),
        st.frozensets(children, max_size=3),
        st.builds(Pair, children, children),
    ),
    max_leaves=6,
)


def containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(hashable, children, max_size=4),
        st.dictionaries(st.text(max_size=5), children, max_size=4),
        st.sets(hashable, max_size=4),
        st.frozensets(hashable, max_size=4),
        st.builds(deque, st.lists(children, max_size=4), st.none() | st.integers(0, 5)),
        st.builds(Point, children, children),
        st.builds(Pair, children, children),
        st.builds(Item, name=surrogate_text, tags=st.lists(st.text(max_size=3), max_size=2)),
        st.builds(lambda items: Page[Item](items=items), st.lists(st.builds(Item, name=st.text()))),
        st.builds(Send, st.text(max_size=5), children),
        st.builds(Interrupt, children, st.text(max_size=5)),
    )


values = st.recursive(leaves, containers, max_leaves=25)


@given(value=values)
@settings(max_examples=400, deadline=None)
def test_any_value_roundtrips(serde: MsgpackSerializer, value: Any) -> None:
    assert_same(value, roundtrip(serde, value))


@given(value=values)
@settings(max_examples=50, deadline=None)
def test_any_value_roundtrips_encrypted(serde: MsgpackSerializer, value: Any) -> None:
    encrypted = EncryptedSerializer(serde, key=b"k" * 16)
    assert_same(value, roundtrip(encrypted, value))


class Scores(RootModel[list[int]]):
    pass


class Aliased(BaseModel):
    value: int = Field(alias="Value")


def test_root_and_aliased_models_roundtrip() -> None:
    serde = MsgpackSerializer(allowed_types=[Scores, Aliased])
    for model in (Scores([1, 2]), Aliased(Value=3)):
        assert_same(model, roundtrip(serde, model))


def test_surrogates_nested_in_extensions_roundtrip(serde: MsgpackSerializer) -> None:
    value = (Point("\udc80", {"\ud83d": Pair("\udfff")}),)
    assert_same(value, roundtrip(serde, value))


def test_concurrent_writes_from_threads(serde: MsgpackSerializer) -> None:
    values = [
        {"n": n, "at": (Point(n, Color.RED), datetime(2020, 1, 1 + n % 28))} for n in range(200)
    ]
    with ThreadPoolExecutor(max_workers=8) as pool:
        stored = list(pool.map(serde.dumps_typed, values))
    assert [serde.loads_typed(item) for item in stored] == values
