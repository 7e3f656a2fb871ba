"""Exceptions raised by stepgraph. Names follow LangGraph's so ported code catches the same ones."""

from __future__ import annotations

from typing import Any

__all__ = [
    "CheckpointNotFoundError",
    "EmptyChannelError",
    "EmptyInputError",
    "GraphBubbleUp",
    "GraphInterrupt",
    "GraphRecursionError",
    "InvalidUpdateError",
    "LeaseLostError",
    "NodeInterrupt",
    "ParentCommand",
    "RunIncompleteError",
    "SerializationError",
    "ThreadBusyError",
    "UnknownTypeError",
    "is_invalid_resume",
]

_INVALID_RESUME = "__stepgraph_invalid_resume__"


class GraphRecursionError(RecursionError):
    """The graph ran more supersteps than ``recursion_limit`` allows."""


class InvalidUpdateError(Exception):
    """A channel received an update it cannot apply (e.g. two writes to a last-value channel)."""


class EmptyInputError(Exception):
    """The graph was invoked with empty input where input is required."""


class CheckpointNotFoundError(LookupError):
    """A config names a checkpoint that the saver does not have."""


class SerializationError(TypeError):
    """A value cannot be written, or stored bytes cannot be read back.

    ``type_name`` is the qualified name of the offending type and ``path`` where in the value
    it sat (e.g. ``value['items'][3]``), when known.
    """

    def __init__(self, message: str, *, type_name: str | None = None, path: str | None = None):
        super().__init__(message)
        self.type_name = type_name
        self.path = path


class UnknownTypeError(SerializationError):
    """Stored bytes name a type that is not allowed, or cannot be resolved, at read time."""


class EmptyChannelError(Exception):
    """A channel was read before it received a value."""


class GraphBubbleUp(Exception):
    """Raised inside a run for the run itself to handle (``GraphInterrupt``, ``ParentCommand``),
    never a node's failure: retry policies and error handlers leave it alone."""


class GraphInterrupt(GraphBubbleUp):
    """Raised inside a run to pause it; carries the ``Interrupt`` values."""

    def __init__(self, interrupts: tuple = ()) -> None:
        super().__init__(interrupts)
        self.interrupts = interrupts


class NodeInterrupt(GraphInterrupt):
    """Raised by a node to pause the run with ``value`` (LangGraph's older form of a dynamic
    breakpoint; ``interrupt()`` is the newer one). Resuming runs the node again from its start:
    change the state with ``update_state`` first, or it raises again."""

    def __init__(self, value: Any, id: str = "") -> None:
        from stepgraph.types import Interrupt

        super().__init__((Interrupt(value=value, id=id),))


class ParentCommand(GraphBubbleUp):
    """Raised by a subgraph node that returned ``Command(graph=Command.PARENT)``: the node of the
    parent graph that runs the subgraph catches it and applies ``command`` as its own output."""

    def __init__(self, command: Any) -> None:
        super().__init__(command)
        self.command = command


class ThreadBusyError(RuntimeError):
    """Another run holds the thread's lease (policy ``"reject"``, or ``"enqueue"`` past its
    timeout). Nothing was written."""

    def __init__(self, thread_id: str, holder: str | None, expires_in: float | None) -> None:
        wait = f"; its lease expires in {expires_in:.1f} s" if expires_in is not None else ""
        super().__init__(
            f"Thread {thread_id!r} is busy: run {holder!r} holds its lease{wait}. Retry later, or "
            'run with config["configurable"]["multitask_strategy"] = "enqueue" to wait for it.'
        )
        self.thread_id = thread_id
        self.holder = holder
        self.expires_in = expires_in


class LeaseLostError(RuntimeError):
    """A run's write was refused because it no longer holds its thread's lease: another run
    took the thread over after the lease expired, or the thread was deleted. The refused write
    was not stored, so the thread's history has no fork."""

    def __init__(self, thread_id: str, reason: str) -> None:
        super().__init__(f"Write to thread {thread_id!r} refused: {reason}")
        self.thread_id = thread_id
        self.reason = reason


class RunIncompleteError(RuntimeError):
    """``update_state`` on a thread whose last run died while running: recover the run first
    (``graph.recover()``), so that what it had saved and what it was asked to do are kept."""

    def __init__(self, thread_id: str, run_id: str | None) -> None:
        super().__init__(
            f"Thread {thread_id!r}: its last run ({run_id!r}) died while running and has not "
            "been recovered. Run graph.recover() first; updating the state now would take the "
            "thread from the dead run and lose what recovery needs."
        )
        self.thread_id = thread_id
        self.run_id = run_id


def mark_invalid_resume(error: BaseException) -> None:
    """Mark ``error`` as raised by an answer that did not match ``interrupt()``'s schema."""
    setattr(error, _INVALID_RESUME, True)


def is_invalid_resume(error: BaseException) -> bool:
    """Whether ``error`` (a pydantic ``ValidationError``) was raised because a resume answer
    did not match the ``response_schema`` of the ``interrupt()`` it answered: the node failed,
    and the question can be answered again."""
    return getattr(error, _INVALID_RESUME, False) is True
