"""Public value types: what nodes return, what runs stream, what the state API reports.

Names and fields follow LangGraph's ``langgraph.types``. The classes are plain dataclasses with
simple fields so the checkpoint serializer can store them as built-in safe types.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Literal, NamedTuple, TypedDict, TypeVar

from stepgraph.config import RunnableConfig

__all__ = [
    "All",
    "CachePolicy",
    "CheckpointStreamPart",
    "Checkpointer",
    "Command",
    "CustomStreamPart",
    "DebugStreamPart",
    "Durability",
    "GraphOutput",
    "Interrupt",
    "Overwrite",
    "PregelTask",
    "RetryPolicy",
    "Send",
    "StateSnapshot",
    "StateUpdate",
    "StreamMode",
    "StreamPart",
    "StreamVersion",
    "StreamWriter",
    "TasksStreamPart",
    "UpdatesStreamPart",
    "ValuesStreamPart",
    "default_retry_on",
    "interrupt",
]

N = TypeVar("N")

All = Literal["*"]
"""Pass ``"*"`` as ``interrupt_before``/``interrupt_after`` to interrupt at every node."""

StreamMode = Literal["values", "updates", "custom", "debug", "checkpoints", "tasks"]
"""What ``stream`` yields: full state after each step, each node's update, data sent with
``get_stream_writer()``, checkpoint and task events (``debug`` is both, wrapped)."""

Durability = Literal["sync", "async", "exit"]
"""When a run's progress reaches the checkpointer: before the next step starts (``sync``), in the
background while the next step runs (``async``, the default), or only when the run ends (``exit``)."""

StreamWriter = Callable[[Any], None]

StreamVersion = Literal["v1", "v2"]
"""How ``stream`` shapes its chunks and ``invoke`` its result: ``"v1"`` (the default) as
LangGraph always did; ``"v2"`` as the typed parts below and ``GraphOutput``."""

Checkpointer = Any
"""A ``BaseCheckpointSaver``, or ``None`` (a subgraph then uses its parent's)."""


class ValuesStreamPart(TypedDict):
    """A ``version="v2"`` chunk of ``stream_mode="values"``: the state after a step (the
    output schema's object for a dataclass or pydantic schema), the interrupts apart."""

    type: Literal["values"]
    ns: tuple[str, ...]
    data: Any
    interrupts: tuple[Interrupt, ...]


class UpdatesStreamPart(TypedDict):
    """A ``version="v2"`` chunk of ``stream_mode="updates"``: ``{node: update}``."""

    type: Literal["updates"]
    ns: tuple[str, ...]
    data: dict[str, Any]


class CustomStreamPart(TypedDict):
    """A ``version="v2"`` chunk of ``stream_mode="custom"``: what a node wrote."""

    type: Literal["custom"]
    ns: tuple[str, ...]
    data: Any


class CheckpointStreamPart(TypedDict):
    """A ``version="v2"`` chunk of ``stream_mode="checkpoints"``."""

    type: Literal["checkpoints"]
    ns: tuple[str, ...]
    data: dict[str, Any]


class TasksStreamPart(TypedDict):
    """A ``version="v2"`` chunk of ``stream_mode="tasks"``: a task's start or result."""

    type: Literal["tasks"]
    ns: tuple[str, ...]
    data: dict[str, Any]


class DebugStreamPart(TypedDict):
    """A ``version="v2"`` chunk of ``stream_mode="debug"``."""

    type: Literal["debug"]
    ns: tuple[str, ...]
    data: dict[str, Any]


StreamPart = (
    ValuesStreamPart
    | UpdatesStreamPart
    | CustomStreamPart
    | CheckpointStreamPart
    | TasksStreamPart
    | DebugStreamPart
)
"""A ``version="v2"`` chunk; ``part["type"]`` tells which."""


@dataclass(frozen=True, slots=True)
class GraphOutput(Generic[N]):
    """What ``invoke(..., version="v2")`` returns: the output (the output schema's object for a
    dataclass or pydantic schema) and the interrupts the run paused on, apart."""

    value: N
    interrupts: tuple[Interrupt, ...] = ()

    def __getitem__(self, key: str) -> Any:
        """``result[key]``, as a v1 result reads (deprecated in LangGraph too)."""
        _warn_item_access()
        if key == "__interrupt__":
            return self.interrupts
        if isinstance(self.value, dict):
            return self.value[key]
        try:
            return getattr(self.value, key)
        except AttributeError:
            raise KeyError(key) from None

    def __contains__(self, key: object) -> bool:
        _warn_item_access()
        if key == "__interrupt__":
            return bool(self.interrupts)
        if isinstance(self.value, dict):
            return key in self.value
        return isinstance(key, str) and hasattr(self.value, key)


def _warn_item_access() -> None:
    warnings.warn(
        "Reading a GraphOutput by key is deprecated: use result.value for the output and "
        "result.interrupts for the interrupts.",
        DeprecationWarning,
        stacklevel=3,
    )


@dataclass(frozen=True, slots=True)
class Overwrite:
    """A write that replaces a reduced key's value instead of going through its reducer:
    ``return {"messages": Overwrite(["only this"])}`` for ``Annotated[list, operator.add]``.

    In a step, an ``Overwrite`` wins over the key's other writes; two for one key are an
    ``InvalidUpdateError``. (As LangGraph's: the dict ``{"__overwrite__": value}`` means the
    same.)
    """

    value: Any
    type: Literal["__overwrite__"] = "__overwrite__"
    """Tells the JSON form ``{"value": ..., "type": "__overwrite__"}`` apart (as LangGraph's)."""


def default_retry_on(exc: BaseException) -> bool:
    """Retry transient failures, not programming errors.

    Connection errors and HTTP 5xx responses (from ``httpx`` or ``requests``, when those are the
    cause) retry; the builtin errors that signal a bug or bad input do not; anything else does.
    """
    if isinstance(exc, ConnectionError):
        return True
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    if type(exc).__name__ in ("HTTPStatusError", "HTTPError") and isinstance(status, int):
        return 500 <= status < 600
    return not isinstance(
        exc,
        (
            ValueError,
            TypeError,
            ArithmeticError,
            ImportError,
            LookupError,
            NameError,
            SyntaxError,
            RuntimeError,
            ReferenceError,
            StopIteration,
            StopAsyncIteration,
            OSError,
        ),
    )


class RetryPolicy(NamedTuple):
    """How a node is retried when it raises."""

    initial_interval: float = 0.5
    """Seconds before the first retry."""
    backoff_factor: float = 2.0
    """Multiplier applied to the interval after each retry."""
    max_interval: float = 128.0
    """Upper bound on the interval, in seconds."""
    max_attempts: int = 3
    """Attempts in total, the first one included."""
    jitter: bool = True
    """Add up to one second of random delay to each interval."""
    retry_on: (
        type[BaseException] | Sequence[type[BaseException]] | Callable[[BaseException], bool]
    ) = default_retry_on
    """Exception classes to retry, or a predicate deciding from the exception."""

    def should_retry(self, exc: BaseException) -> bool:
        retry_on = self.retry_on
        if isinstance(retry_on, type):
            return isinstance(exc, retry_on)
        if isinstance(retry_on, Sequence):
            return isinstance(exc, tuple(retry_on))
        return bool(retry_on(exc))

    def interval(self, attempt: int) -> float:
        """Seconds to sleep after failed attempt number ``attempt`` (1-based)."""
        interval = min(
            self.max_interval, self.initial_interval * self.backoff_factor ** (attempt - 1)
        )
        return interval + random.uniform(0, 1) if self.jitter else interval


@dataclass(frozen=True)
class CachePolicy:
    """Accepted for API compatibility; node results are not cached yet."""

    key_func: Callable[..., str | bytes] | None = None
    ttl: int | None = None


@dataclass(eq=True)
class Send:
    """Run ``node`` in the next step with ``arg`` as its input (map-reduce fan-out).

    Return a list of these from a conditional edge to start one task per item.
    """

    node: str
    arg: Any


@dataclass
class Interrupt:
    """A pause requested by a node, surfaced to the caller under ``__interrupt__``."""

    value: Any
    id: str = ""
    response_schema: dict[str, Any] | None = None
    """The JSON Schema the answer must match, when ``interrupt()`` was given one."""


@dataclass
class Command(Generic[N]):
    """Returned by a node to update the state and choose the next nodes in one value.

    Passed as input, ``Command(resume=...)`` answers an interrupt.
    """

    graph: str | None = None
    """``None`` for the current graph, ``Command.PARENT`` for the closest parent graph."""
    update: Any = None
    resume: Any = None
    goto: Send | Sequence[Send | N] | N | tuple[()] = ()

    PARENT: ClassVar[Literal["__parent__"]] = "__parent__"

    def update_writes(self) -> list[tuple[str, Any]]:
        """``update`` as ``(key, value)`` pairs: a dict, or a list of pairs."""
        update = self.update
        if update is None:
            return []
        if isinstance(update, dict):
            return list(update.items())
        if isinstance(update, (list, tuple)) and all(
            isinstance(item, tuple) and len(item) == 2 for item in update
        ):
            return list(update)
        return [("__root__", update)]

    def goto_targets(self) -> list[Send | str]:
        goto = self.goto
        if isinstance(goto, (str, Send)):
            return [goto]
        return list(goto)  # type: ignore[arg-type]


class StateUpdate(NamedTuple):
    """One update of ``bulk_update_state``: ``values`` as if node ``as_node`` returned them."""

    values: Any
    as_node: str | None = None
    task_id: str | None = None
    """Accepted for LangGraph's signature; the update's task id is derived as usual."""


class PregelTask(NamedTuple):
    """A task of the next step, as reported by ``get_state``."""

    id: str
    name: str
    path: tuple[Any, ...]
    error: Any = None
    """The saved error of a task that failed, as ``repr(exception)``."""
    interrupts: tuple[Interrupt, ...] = ()
    state: Any = None
    result: Any = None


class StateSnapshot(NamedTuple):
    """The state of a thread at one checkpoint."""

    values: dict[str, Any] | Any
    """Channel values (the output schema's keys)."""
    next: tuple[str, ...]
    """Nodes that run in the next step."""
    config: RunnableConfig
    """Config naming this checkpoint."""
    metadata: dict[str, Any] | None
    created_at: str | None
    parent_config: RunnableConfig | None
    tasks: tuple[PregelTask, ...]
    """Tasks of the next step, with the error or result saved for those that already ran."""
    interrupts: tuple[Interrupt, ...] = ()


def interrupt(value: Any, *, response_schema: dict[str, Any] | type | None = None) -> Any:
    """Pause the run and surface ``value`` to the caller; return the answer once resumed.

    The caller resumes with ``invoke(Command(resume=answer), config)``; the node then runs again
    from its start, and this call returns ``answer``. Needs a checkpointer.

    ``response_schema``: what the answer must be. A type (a pydantic model, a dataclass,
    ``int``...) is surfaced as its JSON Schema (``Interrupt.response_schema``) and the answer
    is validated and converted with pydantic (an invalid answer raises its
    ``ValidationError`` from here: ``errors.is_invalid_resume`` tells it apart); a dict is
    taken as a JSON Schema and only surfaced.
    """
    from stepgraph.runtime import current_task

    return current_task().interrupt(value, response_schema)
