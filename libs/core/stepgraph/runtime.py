"""What a running node can reach: its config, the run's context, the custom stream writer.

The executor puts the running task in a context variable; ``get_runtime()``, ``get_config()``
and ``get_stream_writer()`` read it, so nodes need no extra parameters.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    from stepgraph.pregel._algo import Task

__all__ = ["Runtime", "get_runtime"]

ContextT = TypeVar("ContextT")

CURRENT_TASK: ContextVar[Task | None] = ContextVar("stepgraph_current_task", default=None)


def _discard(_: Any) -> None:
    return None


@dataclass(frozen=True)
class Runtime(Generic[ContextT]):
    """Run-scoped values for a node: ``context`` is what the caller passed as ``context=``."""

    context: ContextT = None  # type: ignore[assignment]
    store: Any = None
    stream_writer: Any = field(default=_discard)
    previous: Any = None


def current_task() -> Task:
    task = CURRENT_TASK.get()
    if task is None:
        raise RuntimeError("Called outside of a running graph node.")
    return task


def get_runtime(context_schema: type[ContextT] | None = None) -> Runtime[ContextT]:
    """The runtime of the node that is running (``context_schema`` only helps type checkers)."""
    return current_task().runtime
