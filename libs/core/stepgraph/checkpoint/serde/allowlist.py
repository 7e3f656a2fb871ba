"""Which classes stored bytes may name.

A stored user value names its class as ``(module, qualname)``. Reading resolves that name only
through an allowlist, a dict keyed by the name: a name that is not in it is refused before any
import happens. Three sources feed it:

* the library's own types (``stepgraph.types``), resolved on first use;
* classes registered in code, process-wide with ``register_type`` or per serializer with
  ``MsgpackSerializer.allow``;
* classes reachable from a compiled graph's schemas (``MsgpackSerializer.allow_schema``).
"""

from __future__ import annotations

import importlib
from typing import TypeVar

from stepgraph.errors import UnknownTypeError

__all__ = [
    "REGISTERED_TYPES",
    "TypeAllowlist",
    "TypeKey",
    "register_type",
    "type_key",
    "type_name",
    "unknown_type_error",
]

TypeKey = tuple[str, str]
"""``(module, qualname)`` of a class."""

LIBRARY_MODULE = "stepgraph.types"

T = TypeVar("T", bound=type)


def type_key(cls: type) -> TypeKey:
    return (cls.__module__, cls.__qualname__)


def type_name(key: TypeKey) -> str:
    return f"{key[0]}.{key[1]}"


def _is_library_module(module: str) -> bool:
    return module == LIBRARY_MODULE or module.startswith(LIBRARY_MODULE + ".")


class TypeAllowlist:
    """Allowed classes by name, falling back to a parent list (the process-wide one)."""

    def __init__(self, parent: TypeAllowlist | None = None) -> None:
        self._by_key: dict[TypeKey, type] = {}
        self._parent = parent

    def add(self, *classes: type) -> None:
        for cls in classes:
            if not isinstance(cls, type):
                raise TypeError(f"only classes can be allowed, got {cls!r}")
            # The latest definition wins, e.g. when a module is reloaded.
            self._by_key[type_key(cls)] = cls

    def allows(self, cls: type) -> bool:
        return self._lookup(type_key(cls)) is cls or _is_library_module(cls.__module__)

    def resolve(self, key: TypeKey) -> type:
        """The allowed class named ``key``; raises ``UnknownTypeError`` for any other name."""
        cls = self._lookup(key)
        if cls is not None:
            return cls
        if _is_library_module(key[0]):
            return _import_library_type(key)
        raise unknown_type_error(
            type_name(key),
            f"stored data names type {type_name(key)!r}, which is not allowed. Allow it with "
            "@register_type, serializer.allow(...), or by using it in the graph's state schema",
        )

    def _lookup(self, key: TypeKey) -> type | None:
        cls = self._by_key.get(key)
        if cls is None and self._parent is not None:
            return self._parent._lookup(key)
        return cls


def _import_library_type(key: TypeKey) -> type:
    module_name, qualname = key
    try:
        found: object = importlib.import_module(module_name)
        for part in qualname.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError):
        raise unknown_type_error(
            type_name(key), f"stored type {type_name(key)!r} does not exist"
        ) from None
    if not isinstance(found, type) or type_key(found) != key:
        raise unknown_type_error(type_name(key), f"stored name {type_name(key)!r} is not a class")
    return found


def unknown_type_error(name: str, message: str) -> UnknownTypeError:
    """``UnknownTypeError`` carrying the refused name as ``type_name``."""
    return UnknownTypeError(message, type_name=name)


REGISTERED_TYPES = TypeAllowlist()
"""Process-wide allowlist, shared by every serializer."""


def register_type(cls: T) -> T:
    """Allow ``cls`` to be stored and read back by every serializer in this process.

    Use it (also as a class decorator) for types a graph stores that its state, input and output
    schemas do not mention, e.g. values nested under ``Any`` or returned by ``@task`` functions.
    """
    REGISTERED_TYPES.add(cls)
    return cls
