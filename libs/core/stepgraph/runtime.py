"""What a running node can reach: its config, the run's context, the custom stream writer.

The executor puts the running task in a context variable; ``get_runtime()``, ``get_config()``
and ``get_stream_writer()`` read it, so nodes need no extra parameters.

The classes have LangGraph's fields and helpers, so a ported node reading, say,
``runtime.execution_info.node_attempt`` works unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, runtime_checkable

if TYPE_CHECKING:
    from stepgraph.pregel._algo import Task

__all__ = [
    "BaseUser",
    "ExecutionInfo",
    "RunControl",
    "Runtime",
    "ServerInfo",
    "get_runtime",
]

ContextT = TypeVar("ContextT")

CURRENT_TASK: ContextVar[Task | None] = ContextVar("stepgraph_current_task", default=None)


@dataclass(frozen=True, slots=True)
class ExecutionInfo:
    """Read-only facts about the node execution that is running."""

    checkpoint_id: str
    """The checkpoint the task's step started from (the graph's own, in a subgraph)."""

    checkpoint_ns: str
    """The task's namespace: ``<node>:<task id>``, after its parents' (``|``-separated)."""

    task_id: str
    """The task's id, stable across reruns of the same step."""

    thread_id: str | None = None
    """``config["configurable"]["thread_id"]``; None when the run has no checkpointer."""

    run_id: str | None = None
    """The ``run_id`` the run's config gave, as a string; None if it gave none."""

    node_attempt: int = 1
    """Which attempt this is, from 1: 2 is the first retry under a ``RetryPolicy``."""

    node_first_attempt_time: float | None = None
    """When the first attempt started (Unix time, seconds)."""

    def patch(self, **overrides: Any) -> ExecutionInfo:
        """A copy with the given fields replaced."""
        return replace(self, **overrides)


@runtime_checkable
class BaseUser(Protocol):
    """An authenticated user, as LangGraph Server describes one (``ServerInfo.user``)."""

    @property
    def is_authenticated(self) -> bool: ...

    @property
    def display_name(self) -> str: ...

    @property
    def identity(self) -> str: ...

    @property
    def permissions(self) -> Sequence[str]: ...

    def __getitem__(self, key: str) -> Any: ...

    def __contains__(self, key: object) -> bool: ...

    def __iter__(self) -> Iterator[str]: ...


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """What LangGraph Server tells a run about its deployment. stepgraph has no server, so
    a node's ``runtime.server_info`` is None (as in LangGraph run without one); the class
    exists for code that builds or type-checks one."""

    assistant_id: str
    graph_id: str
    user: BaseUser | None = None


class RunControl:
    """A run's drain switch: ``request_drain()`` asks the run to stop cooperatively.

    A single attribute write is the whole signal, so any thread may call it without a lock.
    """

    __slots__ = ("_drain_reason",)

    def __init__(self) -> None:
        self._drain_reason: str | None = None

    def request_drain(self, reason: str = "shutdown") -> None:
        self._drain_reason = reason

    @property
    def drain_requested(self) -> bool:
        return self._drain_reason is not None

    @property
    def drain_reason(self) -> str | None:
        return self._drain_reason


def _discard(_: Any) -> None:
    return None


def _no_heartbeat() -> None:
    return None


@dataclass(frozen=True, kw_only=True, slots=True)
class Runtime(Generic[ContextT]):
    """Run-scoped values for a node: ``context`` is what the caller passed as ``context=``.

    Keyword-only and frozen, like LangGraph's; ``override`` and ``merge`` make changed copies.
    """

    context: ContextT = None  # type: ignore[assignment]
    store: Any = None
    """Always None: stepgraph has no store (LangGraph passes None when a run has none)."""
    stream_writer: Callable[[Any], None] = field(default=_discard)
    heartbeat: Callable[[], None] = field(default=_no_heartbeat)
    """A no-op: LangGraph uses it only for ``TimeoutPolicy`` idle timeouts, which stepgraph
    does not have (and LangGraph's is a no-op outside them too)."""
    previous: Any = None
    """In an ``@entrypoint`` (and the ``@task`` calls it makes): what the thread's previous
    run returned or saved. None elsewhere."""
    execution_info: ExecutionInfo | None = None
    server_info: ServerInfo | None = None
    control: RunControl | None = None

    def merge(self, other: Runtime[ContextT]) -> Runtime[ContextT]:
        """``other``'s values where it has them (truthy, or not the default), else ours."""
        return Runtime(
            context=other.context or self.context,
            store=other.store or self.store,
            stream_writer=self.stream_writer
            if other.stream_writer is _discard
            else other.stream_writer,
            heartbeat=self.heartbeat if other.heartbeat is _no_heartbeat else other.heartbeat,
            previous=self.previous if other.previous is None else other.previous,
            execution_info=other.execution_info or self.execution_info,
            server_info=other.server_info or self.server_info,
            control=other.control or self.control,
        )

    def override(self, **overrides: Any) -> Runtime[ContextT]:
        """A copy with the given fields replaced."""
        return replace(self, **overrides)

    def patch_execution_info(self, **overrides: Any) -> Runtime[ContextT]:
        """A copy whose ``execution_info`` has the given fields replaced."""
        if self.execution_info is None:
            raise RuntimeError("Cannot patch execution_info before it has been set")
        return replace(self, execution_info=self.execution_info.patch(**overrides))

    @property
    def drain_requested(self) -> bool:
        return self.control is not None and self.control.drain_requested

    @property
    def drain_reason(self) -> str | None:
        return self.control.drain_reason if self.control is not None else None


# A frozen dataclass's __init__ sets each field through object.__setattr__; the executor
# builds a Runtime for every node that takes one, so ``task_runtime`` fills the slots through
# their descriptors instead (about half the time, same objects).
_R = {name: Runtime.__dict__[name].__set__ for name in Runtime.__dataclass_fields__}
_I = {name: ExecutionInfo.__dict__[name].__set__ for name in ExecutionInfo.__dataclass_fields__}


def task_runtime(
    context: Any,
    stream_writer: Callable[[Any], None],
    previous: Any,
    checkpoint_id: str,
    checkpoint_ns: str,
    task_id: str,
    thread_id: str | None,
    run_id: str | None,
    node_attempt: int,
    node_first_attempt_time: float | None,
) -> Runtime[Any]:
    """``Runtime(context=..., stream_writer=..., previous=..., execution_info=...)`` with
    every other field at its default, built without the dataclass __init__."""
    info = object.__new__(ExecutionInfo)
    _I["checkpoint_id"](info, checkpoint_id)
    _I["checkpoint_ns"](info, checkpoint_ns)
    _I["task_id"](info, task_id)
    _I["thread_id"](info, thread_id)
    _I["run_id"](info, run_id)
    _I["node_attempt"](info, node_attempt)
    _I["node_first_attempt_time"](info, node_first_attempt_time)
    runtime: Runtime[Any] = object.__new__(Runtime)
    _R["context"](runtime, context)
    _R["store"](runtime, None)
    _R["stream_writer"](runtime, stream_writer)
    _R["heartbeat"](runtime, _no_heartbeat)
    _R["previous"](runtime, previous)
    _R["execution_info"](runtime, info)
    _R["server_info"](runtime, None)
    _R["control"](runtime, None)
    return runtime


def current_task() -> Task:
    task = CURRENT_TASK.get()
    if task is None:
        raise RuntimeError("Called outside of a running graph node.")
    return task


def get_runtime(context_schema: type[ContextT] | None = None) -> Runtime[ContextT]:
    """The runtime of the node that is running (``context_schema`` only helps type checkers)."""
    return current_task().runtime
