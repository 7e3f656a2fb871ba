"""Managed values: state keys the run fills in for each task, never stored or written.

Declare one in a state schema, as in LangGraph::

    class State(TypedDict):
        messages: Annotated[list, operator.add]
        remaining_steps: RemainingSteps

A node then reads ``state["remaining_steps"]``: how many supersteps the run may still take
before ``recursion_limit`` stops it. ``IsLastStep`` is True in the step after which the limit
is reached. Neither appears in the graph's output, its stream or its checkpoints, and a node's
writes to them are ignored.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any, Self

from stepgraph.channels.base import MISSING, BaseChannel
from stepgraph.errors import EmptyChannelError

if TYPE_CHECKING:
    from stepgraph.pregel._loop import RunLoop

__all__ = ["IsLastStep", "ManagedValue", "RemainingSteps"]


class ManagedValue(BaseChannel):
    """A channel whose value the run computes when a task reads it (``value``)."""

    __slots__ = ("loop",)

    def __init__(self, typ: Any = Any, key: str = "") -> None:
        super().__init__(typ, key)
        self.loop: RunLoop | None = None

    def bound(self, loop: RunLoop) -> Self:
        """A copy that reads ``loop``'s progress."""
        copy = self.from_checkpoint(MISSING)
        copy.loop = loop
        return copy

    def from_checkpoint(self, value: Any) -> Self:
        return type(self)(self.typ, self.key)

    def get(self) -> Any:
        if self.loop is None:
            raise EmptyChannelError(self.key)
        return self.value(self.loop.step, self.loop.stop)

    @abstractmethod
    def value(self, step: int, stop: int) -> Any:
        """The value for a task of superstep ``step`` of a run that stops at ``stop``."""

    def update(self, values: Sequence[Any]) -> bool:
        return False  # never written

    def checkpoint(self) -> Any:
        return MISSING  # never stored


class RemainingStepsManager(ManagedValue):
    __slots__ = ()

    def value(self, step: int, stop: int) -> int:
        return stop - step


class IsLastStepManager(ManagedValue):
    __slots__ = ()

    def value(self, step: int, stop: int) -> bool:
        return step == stop - 1


RemainingSteps = Annotated[int, RemainingStepsManager]
IsLastStep = Annotated[bool, IsLastStepManager]
