from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Self

from stepgraph.channels.base import MISSING, BaseChannel
from stepgraph.errors import EmptyChannelError

__all__ = ["AnyValue"]


class AnyValue(BaseChannel):
    """Holds the last value written in a step, taking any of several writes as equal; a step
    that writes nothing empties it (as LangGraph's: it is told of every step)."""

    __slots__ = ("value",)

    def __init__(self, typ: Any = Any, key: str = "") -> None:
        super().__init__(typ, key)
        self.value: Any = MISSING

    def from_checkpoint(self, value: Any) -> Self:
        new = self.__class__(self.typ, self.key)
        new.value = value
        return new

    def get(self) -> Any:
        if self.value is MISSING:
            raise EmptyChannelError(self.key)
        return self.value

    def checkpoint(self) -> Any:
        return self.value

    def is_available(self) -> bool:
        return self.value is not MISSING

    def update(self, values: Sequence[Any]) -> bool:
        if not values:
            if self.value is MISSING:
                return False
            self.value = MISSING
            return True
        self.value = values[-1]
        return True
