"""Which user classes a serializer accepts: registered in code, or reachable from a schema."""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Any, Generic, Literal, NamedTuple, NewType, Optional, TypeVar, Union

import pytest
from pydantic import BaseModel
from typing_extensions import TypedDict

from stepgraph.checkpoint.serde import EncryptedSerializer, MsgpackSerializer, register_type
from stepgraph.checkpoint.serde.schema import reachable_classes
from stepgraph.errors import SerializationError, UnknownTypeError

T = TypeVar("T")


class Status(Enum):
    OPEN = "open"
    DONE = "done"


class Level(Enum):
    LOW = 1


class Coordinates(NamedTuple):
    lat: float
    lon: float


@dataclass
class Address:
    street: str
    where: Coordinates | None = None


@dataclass
class Person:
    name: str
    address: Optional[Address] = None  # noqa: UP045 -- the old spelling must work too


class Attachment(BaseModel):
    name: str


class Message(BaseModel):
    text: str
    attachments: list[Attachment] = []


class Envelope(BaseModel, Generic[T]):
    content: T


class Tracked(BaseModel):
    note: str


UserId = NewType("UserId", Tracked)


class Reply(TypedDict):
    author: Person
    level: Literal[Level.LOW]


class State(TypedDict):
    messages: Annotated[list[Message], operator.add]
    people: Mapping[str, Person]
    status: Status | None
    replies: Sequence[Reply]
    envelope: Envelope[Attachment]
    tracked: Union[UserId, int]  # noqa: UP007
    lookup: dict[tuple[int, str], set[frozenset[int]]]
    anything: Any


@dataclass
class Unreachable:
    value: int


def test_schema_walk_finds_every_user_class() -> None:
    found = set(reachable_classes(State))
    assert found >= {
        Message,
        Attachment,
        Person,
        Address,
        Coordinates,
        Status,
        Level,
        Envelope[Attachment],
        Tracked,
    }
    assert Unreachable not in found
    assert State not in found  # a TypedDict is a plain dict at runtime


def test_schema_walk_tolerates_recursive_and_unresolvable_hints() -> None:
    @dataclass
    class Node:
        children: list[Node]  # a local forward reference get_type_hints cannot resolve
        label: Status = Status.OPEN

    assert Node in reachable_classes(list[Node])
    assert Message in reachable_classes(Sequence[Message] | None)


def test_allow_schema_lets_values_roundtrip_through_another_instance() -> None:
    state = {
        "messages": [Message(text="hi", attachments=[Attachment(name="a.txt")])],
        "people": {"ann": Person("Ann", Address("Main St", Coordinates(1.0, 2.0)))},
        "status": Status.DONE,
        "envelope": Envelope[Attachment](content=Attachment(name="b")),
        "level": Level.LOW,
    }
    writer = MsgpackSerializer()
    writer.allow_schema(State)
    stored = writer.dumps_typed(state)

    # A new process compiles the same graph and can read what the old one wrote.
    reader = MsgpackSerializer()
    with pytest.raises(UnknownTypeError):
        reader.loads_typed(stored)
    reader.allow_schema(State)
    assert reader.loads_typed(stored) == state


def test_unallowed_class_fails_at_write_time_with_a_fix() -> None:
    with pytest.raises(SerializationError, match="Unreachable") as caught:
        MsgpackSerializer().dumps_typed({"value": Unreachable(1)})
    message = str(caught.value)
    assert "not allowed" in message
    assert "register_type" in message
    assert caught.value.type_name.endswith("Unreachable")  # type: ignore[attr-defined]
    assert not isinstance(caught.value, UnknownTypeError)


def test_allow_is_per_instance() -> None:
    allowed = MsgpackSerializer()
    allowed.allow(Unreachable)
    stored = allowed.dumps_typed(Unreachable(3))
    assert allowed.loads_typed(stored) == Unreachable(3)
    with pytest.raises(UnknownTypeError):
        MsgpackSerializer().loads_typed(stored)


def test_register_type_allows_everywhere_and_works_as_decorator() -> None:
    @register_type
    @dataclass
    class Registered:
        value: int

    assert Registered(1) == Registered(1)  # the decorator returned the class itself
    stored = MsgpackSerializer().dumps_typed([Registered(1)])
    assert MsgpackSerializer().loads_typed(stored) == [Registered(1)]


def test_library_types_need_no_registration() -> None:
    from stepgraph.types import Command, Send

    value: Command[str] = Command(goto=[Send("node", {"x": 1})])
    assert MsgpackSerializer().loads_typed(MsgpackSerializer().dumps_typed(value)) == value


def test_encrypted_serializer_forwards_allowances() -> None:
    serde = EncryptedSerializer(MsgpackSerializer(), key=b"0" * 32)
    serde.allow(Unreachable)
    serde.allow_schema(State)
    value: dict[str, Any] = {"u": Unreachable(1), "m": Message(text="x")}
    assert serde.loads_typed(serde.dumps_typed(value)) == value


def test_allow_rejects_non_classes() -> None:
    with pytest.raises(TypeError):
        MsgpackSerializer().allow(Status.OPEN)  # type: ignore[arg-type]
