"""Finding the user classes a schema can hold, so a compiled graph can allow them up front."""

from __future__ import annotations

import dataclasses
import typing
from enum import Enum
from typing import Any, Literal, NewType, TypeVar, get_args, get_origin, get_type_hints

from typing_extensions import is_typeddict

from stepgraph.checkpoint.serde.codec import BUILTIN_TYPES

__all__ = ["is_namedtuple", "is_pydantic_model", "reachable_classes"]


def is_pydantic_model(cls: type) -> bool:
    """A pydantic v2 ``BaseModel`` subclass (checked without importing pydantic)."""
    return hasattr(cls, "__pydantic_fields__") and hasattr(cls, "model_construct")


def is_namedtuple(cls: type) -> bool:
    return issubclass(cls, tuple) and hasattr(cls, "_fields")


def reachable_classes(schema: Any) -> list[type]:
    """Every user class a value of type ``schema`` can contain, ``schema`` itself included.

    Walks TypedDicts, dataclasses, NamedTuples and pydantic models field by field, and unwraps
    ``Annotated``, ``Optional``/unions, ``Literal`` (enum members), generic containers and
    ``NewType``. Annotations that cannot be resolved are skipped.
    """
    found: list[type] = []
    seen: set[Any] = set()
    pending: list[Any] = [schema]
    while pending:
        hint = pending.pop()
        try:
            if hint in seen:
                continue
            seen.add(hint)
        except TypeError:  # unhashable annotation metadata; walking it twice is harmless
            pass
        pending.extend(_inner_hints(hint, found))
    return found


def _inner_hints(hint: Any, found: list[type]) -> list[Any]:
    """The hints nested in ``hint``; appends ``hint`` to ``found`` if it is a user class."""
    origin = get_origin(hint)
    if origin is Literal:
        return [type(arg) for arg in get_args(hint) if isinstance(arg, Enum)]
    if origin is not None:
        # Annotated[X, ...] has X as first argument; metadata (reducers) is not a type.
        args = get_args(hint)
        if origin is typing.Annotated:
            return [args[0]]
        return [origin, *(arg for arg in args if arg is not Ellipsis)]
    if isinstance(hint, TypeVar):
        return [hint.__bound__, *hint.__constraints__]
    if isinstance(hint, NewType):
        return [hint.__supertype__]
    if not isinstance(hint, type) or hint in BUILTIN_TYPES or hint.__module__ in _SKIPPED_MODULES:
        return []
    if is_typeddict(hint):
        return list(_field_hints(hint).values())
    found.append(hint)
    if is_pydantic_model(hint):
        return [field.annotation for field in hint.__pydantic_fields__.values()]  # type: ignore[attr-defined]
    if dataclasses.is_dataclass(hint) or is_namedtuple(hint):
        return list(_field_hints(hint).values())
    return []


# Typing machinery and abstract container types: never stored themselves.
_SKIPPED_MODULES = frozenset({"builtins", "typing", "typing_extensions", "collections.abc", "abc"})


def _field_hints(cls: type) -> dict[str, Any]:
    try:
        return get_type_hints(cls, include_extras=True)
    except Exception:  # unresolvable forward references: use what is already a real type
        annotations = getattr(cls, "__annotations__", {})
        return {name: hint for name, hint in annotations.items() if not isinstance(hint, str)}
