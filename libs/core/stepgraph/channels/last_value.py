from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Self

from stepgraph.channels.base import MISSING, BaseChannel
from stepgraph.errors import EmptyChannelError, InvalidUpdateError

__all__ = ["LastValue", "LastValueAfterFinish"]


class LastValue(BaseChannel):
    """Holds the last value written; two writes in one step are a conflict."""

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
            return False
        if len(values) != 1:
            raise InvalidUpdateError(
                f"At key '{self.key}': can receive only one value per step. Use an Annotated "
                "key with a reducer (e.g. Annotated[list, operator.add]) to accept several."
            )
        self.value = values[-1]
        return True


class LastValueAfterFinish(LastValue):
    """A last value that becomes readable only once the run has nothing else to do (deferred
    nodes)."""

    __slots__ = ("finished",)

    def __init__(self, typ: Any = Any, key: str = "") -> None:
        super().__init__(typ, key)
        self.finished = False

    def from_checkpoint(self, value: Any) -> Self:
        new = self.__class__(self.typ, self.key)
        if value is not MISSING:
            new.value, new.finished = value
        return new

    def checkpoint(self) -> Any:
        return MISSING if self.value is MISSING else (self.value, self.finished)

    def get(self) -> Any:
        if self.value is MISSING or not self.finished:
            raise EmptyChannelError(self.key)
        return self.value

    def is_available(self) -> bool:
        return self.value is not MISSING and self.finished

    def update(self, values: Sequence[Any]) -> bool:
        if not values:
            return False
        self.finished = False
        self.value = values[-1]
        return True

    def consume(self) -> bool:
        if self.finished:
            self.finished = False
            self.value = MISSING
            return True
        return False

    def finish(self) -> bool:
        if not self.finished and self.value is not MISSING:
            self.finished = True
            return True
        return False
