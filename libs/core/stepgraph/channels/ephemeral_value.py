from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Self

from stepgraph.channels.base import MISSING, BaseChannel
from stepgraph.errors import EmptyChannelError, InvalidUpdateError

__all__ = ["EphemeralValue"]


class EphemeralValue(BaseChannel):
    """Holds a value written in the previous step only; cleared by a step that does not write it.

    Used for triggers ("run node X next") and for the run's input.
    """

    __slots__ = ("guard", "value")

    def __init__(self, typ: Any = Any, guard: bool = True, key: str = "") -> None:
        super().__init__(typ, key)
        self.guard = guard
        self.value: Any = MISSING

    def from_checkpoint(self, value: Any) -> Self:
        new = self.__class__(self.typ, self.guard, self.key)
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
        if len(values) != 1 and self.guard:
            raise InvalidUpdateError(f"At key '{self.key}': can receive only one value per step.")
        self.value = values[-1]
        return True
