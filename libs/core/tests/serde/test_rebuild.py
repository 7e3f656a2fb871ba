"""User classes come back exactly as written, without running their constructors again."""

from __future__ import annotations

import functools
from dataclasses import InitVar, dataclass, field
from typing import Any

import msgpack
import pydantic
import pytest
from msgpack import ExtType

from stepgraph.checkpoint.serde import MsgpackSerializer
from stepgraph.checkpoint.serde.codec import DATACLASS, PYDANTIC
from stepgraph.errors import SerializationError

CALLS: list[str] = []


@dataclass
class WithInitVar:
    x: int
    scale: InitVar[int]

    def __post_init__(self, scale: int) -> None:
        self.x = self.x * scale


@dataclass
class Normalizes:
    tags: list[str]

    def __post_init__(self) -> None:
        CALLS.append("post_init")
        self.tags = [*sorted(set(self.tags)), "seen"]


@dataclass(frozen=True, slots=True)
class FrozenSlots:
    a: int
    b: tuple[int, ...] = ()
    c: list[int] = field(default_factory=list, init=False)


@dataclass
class Grown:
    """Stands for a class that gained fields since a value was stored."""

    a: int
    b: int = 7
    c: list[int] = field(default_factory=lambda: [1])
    d: int = field(init=False, default=3)


@dataclass
class Caches:
    a: int

    def __post_init__(self) -> None:
        self._cache = {"a": self.a}  # not a field: it would be lost


@dataclass
class Cached:
    a: int

    @functools.cached_property
    def double(self) -> int:
        return self.a * 2


class Model(pydantic.BaseModel):
    a: int
    _secret: str = pydantic.PrivateAttr(default="default")
    _count: int = pydantic.PrivateAttr(default=0)


class Plain(pydantic.BaseModel):
    a: int


@pytest.fixture
def serde() -> MsgpackSerializer:
    return MsgpackSerializer(
        allowed_types=[WithInitVar, Normalizes, FrozenSlots, Grown, Caches, Cached, Model, Plain]
    )


def test_dataclass_with_an_init_var_round_trips(serde: MsgpackSerializer) -> None:
    back = serde.loads(serde.dumps(WithInitVar(2, 10)))
    assert type(back) is WithInitVar and back.x == 20


def test_post_init_does_not_run_again(serde: MsgpackSerializer) -> None:
    value = Normalizes(["b", "a"])
    CALLS.clear()
    back = serde.loads(serde.dumps(value))
    assert back == value
    assert back.tags == ["a", "b", "seen"]
    assert CALLS == []


def test_frozen_slots_dataclass_round_trips(serde: MsgpackSerializer) -> None:
    value = FrozenSlots(1, (2, 3))
    object.__setattr__(value, "c", [4])
    back = serde.loads(serde.dumps(value))
    assert back == value and back.c == [4] and type(back.b) is tuple


def test_missing_fields_get_their_defaults(serde: MsgpackSerializer) -> None:
    stored = msgpack.packb(
        ExtType(DATACLASS, msgpack.packb([__name__, "Grown", {"a": 1}])), use_bin_type=True
    )
    back = serde.loads(stored)
    assert (back.a, back.b, back.c, back.d) == (1, 7, [1], 3)


def test_a_missing_field_without_default_is_refused(serde: MsgpackSerializer) -> None:
    stored = msgpack.packb(
        ExtType(DATACLASS, msgpack.packb([__name__, "Grown", {"b": 1}])), use_bin_type=True
    )
    with pytest.raises(SerializationError, match="no value for field 'a'"):
        serde.loads(stored)


def test_attributes_that_are_not_fields_are_refused_when_written(serde: MsgpackSerializer) -> None:
    with pytest.raises(SerializationError, match=r"value\['x'\].*not fields \(_cache\)"):
        serde.dumps({"x": Caches(1)})


def test_cached_properties_are_not_stored_and_computed_again(serde: MsgpackSerializer) -> None:
    value = Cached(2)
    assert value.double == 4  # now cached in the instance dict
    back = serde.loads(serde.dumps(value))
    assert back == value and "double" not in vars(back) and back.double == 4


def test_pydantic_private_attributes_round_trip(serde: MsgpackSerializer) -> None:
    value = Model(a=1)
    value._secret = "set"
    back = serde.loads(serde.dumps(value))
    assert back == value
    assert (back._secret, back._count) == ("set", 0)
    assert Model(a=1)._secret == "default"


def test_pydantic_private_values_must_be_storable(serde: MsgpackSerializer) -> None:
    value = Model(a=1)
    value._secret = object()  # type: ignore[assignment]
    with pytest.raises(SerializationError, match=r"value\._secret: type 'builtins\.object'"):
        serde.dumps(value)


def test_models_without_private_attributes_keep_the_short_payload(
    serde: MsgpackSerializer,
) -> None:
    payload = msgpack.unpackb(serde.dumps(Plain(a=1)), ext_hook=lambda code, body: body)
    assert msgpack.unpackb(payload) == [__name__, "Plain", [{"a": 1}, None]]


@pytest.mark.parametrize(
    "payload",
    [
        [{"a": 1}, None, {"_unknown": 1}],
        [{"a": 1}, None, ["not", "a", "dict"]],
        [{"a": 1}],
        [[1], None],
        [{"a": 1}, "a"],
        {"a": 1},
    ],
)
def test_malformed_model_payloads_are_refused(serde: MsgpackSerializer, payload: Any) -> None:
    stored = msgpack.packb(
        ExtType(PYDANTIC, msgpack.packb([__name__, "Model", payload])), use_bin_type=True
    )
    with pytest.raises(SerializationError):
        serde.loads(stored)
