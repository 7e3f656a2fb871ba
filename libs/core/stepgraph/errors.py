"""Exceptions raised by stepgraph. Names follow LangGraph's so ported code catches the same ones."""

from __future__ import annotations

from typing import Any

__all__ = [
    "CheckpointNotFoundError",
    "EmptyChannelError",
    "EmptyInputError",
    "GraphInterrupt",
    "GraphRecursionError",
    "InvalidUpdateError",
    "ParentCommand",
    "SerializationError",
    "UnknownTypeError",
]


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


class GraphInterrupt(Exception):
    """Raised inside a run to pause it; carries the ``Interrupt`` values."""

    def __init__(self, interrupts: tuple = ()) -> None:
        super().__init__(interrupts)
        self.interrupts = interrupts


class ParentCommand(Exception):
    """Raised by a subgraph node that returned ``Command(graph=Command.PARENT)``: the node of the
    parent graph that runs the subgraph catches it and applies ``command`` as its own output."""

    def __init__(self, command: Any) -> None:
        super().__init__(command)
        self.command = command
