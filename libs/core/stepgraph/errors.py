"""Exceptions raised by stepgraph. Names follow LangGraph's so ported code catches the same ones."""

from __future__ import annotations

__all__ = [
    "CheckpointNotFoundError",
    "EmptyInputError",
    "GraphRecursionError",
    "InvalidUpdateError",
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
    """A value cannot be written: its type is not supported by the serializer."""


class UnknownTypeError(SerializationError):
    """Stored bytes name a type that is not allowed, or cannot be resolved, at read time."""
