from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from stepgraph.channels.base import MISSING
from stepgraph.channels.last_value import LastValue

__all__ = ["AnyValue"]


class AnyValue(LastValue):
    """Holds the last value written in a step, taking any of several writes as equal; a step
    that writes nothing empties it (as LangGraph's: it is told of every step)."""

    __slots__ = ()

    def update(self, values: Sequence[Any]) -> bool:
        if not values:
            if self.value is MISSING:
                return False
            self.value = MISSING
            return True
        self.value = values[-1]
        return True
