from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Self

from stepgraph.channels.base import MISSING
from stepgraph.channels.last_value import LastValue
from stepgraph.errors import InvalidUpdateError

__all__ = ["UntrackedValue"]


class UntrackedValue(LastValue):
    """Holds the last value written, for the run only: never saved, so a run resumed from a
    checkpoint (or another run of the thread) starts without it.

    ``guard``: two writes in one step are a conflict (else the last one is kept).
    """

    __slots__ = ("guard",)

    def __init__(self, typ: Any = Any, guard: bool = True, key: str = "") -> None:
        super().__init__(typ, key)
        self.guard = guard

    def from_checkpoint(self, value: Any) -> Self:
        return self.__class__(self.typ, self.guard, self.key)  # nothing was saved

    def copy(self) -> Self:
        new = self.__class__(self.typ, self.guard, self.key)
        new.value = self.value
        return new

    def checkpoint(self) -> Any:
        return MISSING

    def update(self, values: Sequence[Any]) -> bool:
        if not values:
            return False
        if len(values) != 1 and self.guard:
            raise InvalidUpdateError(
                f"At key '{self.key}': UntrackedValue(guard=True) can receive only one value per "
                "step; use guard=False to keep the last of several"
            )
        self.value = values[-1]
        return True
