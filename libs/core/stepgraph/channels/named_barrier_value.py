from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Self

from stepgraph.channels.base import MISSING, BaseChannel
from stepgraph.errors import EmptyChannelError, InvalidUpdateError

__all__ = ["NamedBarrierValue", "NamedBarrierValueAfterFinish"]


class NamedBarrierValue(BaseChannel):
    """Available once every name in ``names`` has written to it (a join of several edges)."""

    __slots__ = ("names", "seen")

    def __init__(self, typ: Any, names: set[str] | frozenset[str], key: str = "") -> None:
        super().__init__(typ, key)
        self.names = frozenset(names)
        self.seen: frozenset[str] = frozenset()

    def from_checkpoint(self, value: Any) -> Self:
        new = self.__class__(self.typ, self.names, self.key)
        if value is not MISSING:
            new.seen = frozenset(value)
        return new

    def checkpoint(self) -> Any:
        # Sorted so equal states serialize identically.
        return sorted(self.seen) if self.seen else MISSING

    def get(self) -> Any:
        if self.seen != self.names:
            raise EmptyChannelError(self.key)
        return None

    def is_available(self) -> bool:
        return self.seen == self.names

    def update(self, values: Sequence[Any]) -> bool:
        seen = self.seen
        for value in values:
            if value not in self.names:
                raise InvalidUpdateError(
                    f"At key '{self.key}': value {value!r} is not one of {sorted(self.names)}"
                )
            seen = seen | {value}
        changed = seen != self.seen
        self.seen = seen
        return changed

    def consume(self) -> bool:
        if self.seen == self.names:
            self.seen = frozenset()
            return True
        return False


class NamedBarrierValueAfterFinish(NamedBarrierValue):
    """A join for a deferred node: available once complete and the run has nothing else to do."""

    __slots__ = ("finished",)

    def __init__(self, typ: Any, names: set[str] | frozenset[str], key: str = "") -> None:
        super().__init__(typ, names, key)
        self.finished = False

    def from_checkpoint(self, value: Any) -> Self:
        new = self.__class__(self.typ, self.names, self.key)
        if value is not MISSING:
            seen, new.finished = value
            new.seen = frozenset(seen)
        return new

    def checkpoint(self) -> Any:
        return (sorted(self.seen), self.finished) if self.seen else MISSING

    def get(self) -> Any:
        if not self.is_available():
            raise EmptyChannelError(self.key)
        return None

    def is_available(self) -> bool:
        return self.finished and self.seen == self.names

    def consume(self) -> bool:
        if self.is_available():
            self.seen, self.finished = frozenset(), False
            return True
        return False

    def finish(self) -> bool:
        if not self.finished and self.seen == self.names:
            self.finished = True
            return True
        return False
