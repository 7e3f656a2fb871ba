from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Self

from stepgraph.channels.base import MISSING, BaseChannel
from stepgraph.errors import EmptyChannelError

__all__ = ["Topic"]


class Topic(BaseChannel):
    """Collects the writes of a step into a list (lists written are flattened).

    With ``accumulate=False`` (the default) each step starts a fresh list; with True, values pile
    up across steps.
    """

    __slots__ = ("accumulate", "values")

    def __init__(self, typ: Any = Any, accumulate: bool = False, key: str = "") -> None:
        super().__init__(typ, key)
        self.accumulate = accumulate
        self.values: list[Any] = []

    def from_checkpoint(self, value: Any) -> Self:
        new = self.__class__(self.typ, self.accumulate, self.key)
        if value is not MISSING:
            new.values = list(value)
        return new

    def get(self) -> Any:
        if not self.values:
            raise EmptyChannelError(self.key)
        return self.values

    def checkpoint(self) -> Any:
        return self.values if self.values else MISSING

    def is_available(self) -> bool:
        return bool(self.values)

    def update(self, values: Sequence[Any]) -> bool:
        previous = self.values
        # A new list each time: a checkpoint taken earlier may still be being saved.
        current = list(previous) if self.accumulate else []
        for value in values:
            if isinstance(value, list):
                current.extend(value)
            else:
                current.append(value)
        self.values = current
        return current != previous or (bool(values) and not self.accumulate)
