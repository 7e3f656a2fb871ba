"""State schemas (TypedDict, dataclass, pydantic model): their keys, channels and readers."""

from __future__ import annotations

import contextlib
import dataclasses
import typing
from collections.abc import Callable
from typing import Annotated, Any, NotRequired, Required, get_args, get_origin, get_type_hints

from stepgraph.channels.base import BaseChannel
from stepgraph.channels.binop import BinaryOperatorAggregate
from stepgraph.channels.last_value import LastValue
from stepgraph.errors import EmptyChannelError, InvalidUpdateError

__all__ = ["channels_for", "is_model", "make_reader", "schema_keys", "update_pairs"]


def _is_pydantic(schema: Any) -> bool:
    return isinstance(schema, type) and hasattr(schema, "model_fields")


def is_model(schema: Any) -> bool:
    """True for schemas whose values are objects (dataclass, pydantic), not dicts."""
    return _is_pydantic(schema) or (isinstance(schema, type) and dataclasses.is_dataclass(schema))


def _hints(schema: Any) -> dict[str, Any]:
    if schema is None or schema is dict or schema is Any:
        return {}
    if _is_pydantic(schema):
        # Pydantic has resolved the annotations already (even for locally defined models);
        # Annotated extras, such as a reducer, are kept in ``metadata``.
        return {
            name: Annotated[(field.annotation, *field.metadata)]
            if field.metadata
            else field.annotation
            for name, field in schema.model_fields.items()
        }
    try:
        hints = get_type_hints(schema, include_extras=True)
    except Exception:
        hints = dict(getattr(schema, "__annotations__", {}))
    if dataclasses.is_dataclass(schema):
        return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(schema)}
    return {k: v for k, v in hints.items() if get_origin(v) is not typing.ClassVar}


def schema_keys(schema: Any) -> tuple[str, ...]:
    return tuple(_hints(schema))


def _unwrap_required(annotation: Any) -> Any:
    while get_origin(annotation) in (Required, NotRequired):
        annotation = get_args(annotation)[0]
    return annotation


def channel_for(key: str, annotation: Any) -> BaseChannel:
    """``Annotated[T, reducer]`` folds writes with the reducer; ``Annotated[T, channel]`` uses
    that channel; anything else keeps the last value."""
    annotation = _unwrap_required(annotation)
    if get_origin(annotation) is Annotated:
        typ, *extras = get_args(annotation)
        for extra in reversed(extras):
            if isinstance(extra, BaseChannel):
                channel = extra.copy()
                channel.key = key
                return channel
            if isinstance(extra, type) and issubclass(extra, BaseChannel):
                return extra(typ, key=key)
            if callable(extra):
                return BinaryOperatorAggregate(_unwrap_required(typ), extra, key=key)
        annotation = typ
    return LastValue(annotation, key=key)


def channels_for(schema: Any) -> dict[str, BaseChannel]:
    return {key: channel_for(key, annotation) for key, annotation in _hints(schema).items()}


def make_reader(schema: Any, keys: tuple[str, ...]) -> Callable[[dict[str, BaseChannel]], Any]:
    """A function building the value a node of this schema receives from the channels."""

    def read_dict(channels: dict[str, BaseChannel]) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for key in keys:
            with contextlib.suppress(EmptyChannelError):
                values[key] = channels[key].get()
        return values

    if not is_model(schema):
        return read_dict

    def read_model(channels: dict[str, BaseChannel]) -> Any:
        return schema(**read_dict(channels))

    return read_model


def update_pairs(value: Any, keys: frozenset[str] | set[str]) -> list[tuple[str, Any]] | None:
    """The state writes of a node's return value: a dict, or an object of a state schema.

    Keys that are not state keys are left out. ``None`` if ``value`` is neither kind.
    """
    if isinstance(value, dict):
        return [(k, v) for k, v in value.items() if k in keys]
    if _is_pydantic(type(value)):
        # LangGraph's rule: every field, except one that is None by default and was left so.
        fields_set = value.model_fields_set
        fields = type(value).model_fields
        return [
            (k, item)
            for k, field in fields.items()
            if k in keys
            and (
                (item := getattr(value, k)) is not None
                or field.default is not None
                or k in fields_set
            )
        ]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [
            (f.name, getattr(value, f.name)) for f in dataclasses.fields(value) if f.name in keys
        ]
    return None


def check_update(node: str, value: Any, keys: frozenset[str]) -> list[tuple[str, Any]]:
    pairs = update_pairs(value, keys)
    if pairs is None:
        raise InvalidUpdateError(f"Expected dict, got {value!r} (returned by node '{node}')")
    return pairs
