"""The serializer protocol every checkpoint saver writes through."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

__all__ = ["SerializerProtocol"]


@runtime_checkable
class SerializerProtocol(Protocol):
    """Turns values into ``(type_tag, payload)`` pairs and back.

    The type tag is stored next to the payload (a short string such as ``"msgpack"``) so a saver
    can keep rows written by different serializers, or encrypted and plain rows, side by side.
    """

    def dumps_typed(self, obj: Any) -> tuple[str, bytes]: ...

    def loads_typed(self, data: tuple[str, bytes]) -> Any: ...
