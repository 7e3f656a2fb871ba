"""Unsupported values fail loudly at write time, naming their type and where they were."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo
from enum import Enum
from typing import Any

import msgpack
import pytest
from pydantic import BaseModel

from stepgraph.checkpoint.serde import MsgpackSerializer
from stepgraph.checkpoint.serde.codec import DATACLASS, DATETIME, ENUM, FRACTION, TUPLE, UUID
from stepgraph.errors import SerializationError


class Plain:
    """A class with no storable shape (not a dataclass, NamedTuple, model or enum)."""


class MyStr(str):
    pass


class Shade(Enum):
    DARK = "dark"


@dataclass
class Holder:
    content: Any


class Wrapper(BaseModel):
    inner: Any


@pytest.fixture
def serde() -> MsgpackSerializer:
    return MsgpackSerializer(allowed_types=[Holder, Wrapper])


@pytest.mark.parametrize(
    ("value", "path", "type_name"),
    [
        (Plain(), "value", "Plain"),
        ({"items": [1, 2, 3, Plain()]}, "value['items'][3]", "Plain"),
        ((1, {"k": (Plain(),)}), "value[1]['k'][0]", "Plain"),
        ({Plain(): 1}, "key", "Plain"),
        (Holder(content=[Plain()]), "value.content[0]", "Plain"),
        (Wrapper(inner={"x": Plain()}), "value.inner['x']", "Plain"),
        ({"lock": threading.Lock()}, "value['lock']", "lock"),
        ([MyStr("subclass")], "value[0]", "MyStr"),
        ({"fn": len}, "value['fn']", "builtin_function_or_method"),
        ({"gen": iter(range(3))}, "value['gen']", "range_iterator"),
        ({"s": {frozenset({Plain()})}}, "an item of", "Plain"),
    ],
)
def test_unsupported_value_names_its_type_and_path(
    serde: MsgpackSerializer, value: Any, path: str, type_name: str
) -> None:
    with pytest.raises(SerializationError) as caught:
        serde.dumps_typed(value)
    error = caught.value
    assert path in str(error)
    assert type_name in str(error)
    assert type_name in error.type_name  # type: ignore[attr-defined]
    assert path in error.path  # type: ignore[attr-defined]


def test_error_is_a_type_error_that_callers_can_extend(serde: MsgpackSerializer) -> None:
    with pytest.raises(TypeError):
        serde.dumps_typed([Plain()])
    try:
        serde.dumps_typed([Plain()])
    except SerializationError as error:
        extended = SerializationError(f"channel 'messages': {error}")
    assert str(extended).startswith("channel 'messages': cannot serialize value[0]")


def test_custom_tzinfo_is_refused(serde: MsgpackSerializer) -> None:
    class Custom(tzinfo):
        def utcoffset(self, dt: datetime | None) -> timedelta:
            return timedelta(0)

        def dst(self, dt: datetime | None) -> timedelta:
            return timedelta(0)

        def tzname(self, dt: datetime | None) -> str:
            return "custom"

    with pytest.raises(SerializationError, match=r"value\.tzinfo"):
        serde.dumps_typed(datetime(2020, 1, 1, tzinfo=Custom()))


def test_failed_write_leaves_serializer_usable(serde: MsgpackSerializer) -> None:
    with pytest.raises(SerializationError):
        serde.dumps_typed({"a": [Plain()]})
    assert serde.loads_typed(serde.dumps_typed({"a": [1]})) == {"a": [1]}


def test_stored_fields_that_no_longer_exist_fail_loudly() -> None:
    body = msgpack.packb([Holder.__module__, "Holder", {"content": 1, "gone": 2}])
    payload = msgpack.packb(msgpack.ExtType(DATACLASS, body))
    with pytest.raises(SerializationError, match="gone"):
        MsgpackSerializer(allowed_types=[Holder]).loads(payload)


def test_enum_value_that_no_longer_exists_fails_loudly() -> None:
    body = msgpack.packb([Shade.__module__, "Shade", "purple"])
    with pytest.raises(SerializationError, match="purple"):
        MsgpackSerializer(allowed_types=[Shade]).loads(msgpack.packb(msgpack.ExtType(ENUM, body)))


def test_truncated_payload_fails(serde: MsgpackSerializer) -> None:
    tag, payload = serde.dumps_typed({"a": [1, 2, 3]})
    with pytest.raises(ValueError):
        serde.loads_typed((tag, payload[:-2]))


@pytest.mark.parametrize(
    ("code", "body"),
    [
        (FRACTION, msgpack.packb([1, 0])),
        (DATETIME, msgpack.packb([2020, 13, 1, 0, 0, 0, 0, None, 0])),
        (UUID, b"short"),
        (TUPLE, b"\xc1"),
        (DATACLASS, msgpack.packb(["only module"])),
    ],
)
def test_corrupt_extension_bodies_fail_loudly(code: int, body: bytes) -> None:
    with pytest.raises(SerializationError, match="cannot read stored value"):
        MsgpackSerializer().loads(msgpack.packb([msgpack.ExtType(code, body)]))
