"""The channel protocol: how a state key accumulates the writes of a superstep."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Self

from stepgraph.errors import EmptyChannelError

__all__ = ["MISSING", "BaseChannel"]


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()
"""``checkpoint()`` of an empty channel; never stored."""


class BaseChannel(ABC):
    """A slot of the graph's state.

    The executor calls ``update`` once per superstep with every write the step made to the
    channel (possibly none, so ephemeral channels can clear), and bumps the channel's version when
    it returns True. Values are replaced, never mutated in place, so a checkpoint taken from
    ``checkpoint()`` stays valid while a background save reads it.
    """

    __slots__ = ("key", "typ")

    def __init__(self, typ: Any = Any, key: str = "") -> None:
        self.typ = typ
        self.key = key

    @abstractmethod
    def from_checkpoint(self, value: Any) -> Self:
        """A new channel like this one holding ``value`` (``MISSING`` for empty)."""

    @abstractmethod
    def get(self) -> Any:
        """The current value; raises ``EmptyChannelError`` when there is none."""

    @abstractmethod
    def update(self, values: Sequence[Any]) -> bool:
        """Apply one step's writes; True if the value changed."""

    def checkpoint(self) -> Any:
        try:
            return self.get()
        except EmptyChannelError:
            return MISSING

    def is_available(self) -> bool:
        try:
            self.get()
        except EmptyChannelError:
            return False
        return True

    def copy(self) -> Self:
        return self.from_checkpoint(self.checkpoint())

    @property
    def can_append(self) -> bool:
        """True if ``update`` only ever appends to a list value (a list reducer such as
        ``Annotated[list, operator.add]``), and ``appended`` tells what it appended."""
        return False

    def appended(self) -> list[Any] | None:
        """The items the last ``update`` appended to the list the channel held before it, when
        appending is all that update did; None otherwise.

        Lets a checkpointer store only the items a step added to a long list (see
        ``Checkpoint["channel_appends"]``).
        """
        return None

    def consume(self) -> bool:
        """Called after a node triggered by this channel ran; True if the value changed."""
        return False

    def finish(self) -> bool:
        """Called when the run has nothing left to do; True if the channel became available."""
        return False
