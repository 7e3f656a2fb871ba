"""The functional API: a workflow is a plain function (``@entrypoint``) that calls ``@task``s.

An entrypoint compiles to a one-node ``Pregel``: the whole function runs as one task of one
superstep. Each ``@task`` call inside it (or inside a ``StateGraph`` node) is a child task whose
id is derived from its caller's task id and the call's index, and whose outcome is saved as a
pending write of the running step as soon as it finishes. When the step runs again (resume after
an interrupt, an error or a crash), the function starts from its top, and a call whose index
finds a saved result returns it without running. Calls are matched by their order, so a
workflow must make the same calls in the same order each time it runs (see
``docs/functional-api.md``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import inspect
import threading
import warnings
from collections.abc import Awaitable, Callable, Generator, Sequence
from concurrent.futures import Future, wait
from dataclasses import dataclass
from types import UnionType
from typing import Any, Generic, ParamSpec, TypeVar, Union, cast, get_args, get_origin, overload

from stepgraph.channels.ephemeral_value import EphemeralValue
from stepgraph.channels.last_value import LastValue
from stepgraph.constants import END, PREVIOUS, PUSH, RETURN, START
from stepgraph.errors import GraphInterrupt
from stepgraph.pregel._algo import PregelNode, Task, Writes
from stepgraph.pregel._executor import arun_task, run_task, shared_pool
from stepgraph.pregel._loop import OneChannel
from stepgraph.pregel.main import Pregel
from stepgraph.runtime import CURRENT_TASK
from stepgraph.types import CachePolicy, RetryPolicy, StreamWriter

__all__ = ["TaskFuture", "entrypoint", "task"]

P = ParamSpec("P")
T = TypeVar("T")
R = TypeVar("R")
S = TypeVar("S")


class TaskFuture(Future[T]):
    """What calling a synchronous ``@task`` returns: a ``concurrent.futures.Future`` (so
    ``as_completed``, ``wait`` and done callbacks work on it) whose ``result()`` waits for the
    value.

    The call starts on the shared thread pool at once, so several calls run in parallel. If no
    worker has picked it up by the time ``result()`` or ``exception()`` is called, the caller
    runs it itself: a task waiting for another task can never starve the pool. Under the async
    API, ``await`` it.
    """

    def __init__(self, call: Task | None) -> None:
        super().__init__()
        self._task = call
        # Whoever claims the call first (a pool worker, a waiting caller, or cancel()) decides
        # its fate; the Future's own state cannot say "claimed but not yet running".
        self._claim = threading.Lock()
        self._claimed = call is None

    def _execute(self) -> None:
        with self._claim:
            if self._claimed:
                return
            self._claimed = True
        self.set_running_or_notify_cancel()  # cannot fail: only cancel() claims otherwise
        call = cast(Task, self._task)
        try:
            run_task(call)
            _settle(call)
            value = _outcome(call)
        except BaseException as error:
            self.set_exception(error)
        else:
            self.set_result(value)

    def result(self, timeout: float | None = None) -> T:
        self._execute()
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._execute()
        return super().exception(timeout)

    def _join(self) -> None:
        """Wait for the call to finish (running it here if no worker has started it), without
        raising: its outcome is saved and streamed as its own."""
        self._execute()
        wait([self])

    def cancel(self) -> bool:
        """Drop the call if no one has started it: it never runs (say, its caller failed)."""
        with self._claim:
            if self._claimed:
                return self.cancelled()
            self._claimed = True
        super().cancel()
        self.set_running_or_notify_cancel()  # wait()/as_completed() count it done only now
        return True

    def __await__(self) -> Generator[Any, None, T]:
        return asyncio.wrap_future(self).__await__()


class _TaskFunction(Generic[P, T]):
    """A function decorated with ``@task``: calling it inside a run returns a future."""

    def __init__(
        self,
        func: Callable[P, Any],
        *,
        name: str | None,
        retry_policy: RetryPolicy | Sequence[RetryPolicy] | None,
    ) -> None:
        self.func = func
        self.name: str = name or getattr(func, "__name__", None) or "task"
        self.is_async = inspect.iscoroutinefunction(func)
        self.__name__ = self.name
        self.__doc__ = func.__doc__
        self.__wrapped__ = func
        self.node = PregelNode(
            self.name,
            (),
            _no_read,
            self._run,
            self._arun if self.is_async else None,
            retry_policy=retry_policy,
        )

    def _run(self, call: Task, input: Any) -> Writes:
        args, kwargs = input
        call.update = value = self.func(*args, **kwargs)
        return [(RETURN, value)]

    async def _arun(self, call: Task, input: Any) -> Writes:
        args, kwargs = input
        call.update = value = await self.func(*args, **kwargs)
        return [(RETURN, value)]

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Any:
        caller = CURRENT_TASK.get()
        if caller is None:
            raise RuntimeError(
                f"@task '{self.name}' was called outside of a run: call tasks from inside an "
                "@entrypoint function, a graph node, or another task, so their results are "
                "recorded."
            )
        elsewhere = self.is_async and not _in_event_loop()
        if elsewhere and caller.loop.event_loop is None:
            # Starts with LangGraph's words (sic), so code matching its message still does.
            raise RuntimeError(
                f"In an sync context async tasks cannot be called: @task '{self.name}' is "
                "async; call it from an async entrypoint or node run with ainvoke/astream, "
                "or make it sync."
            )
        if (caller.keeper or caller).cancelled:
            raise asyncio.CancelledError(f"the run was cancelled: @task '{self.name}' not run")
        index = caller.calls
        caller.calls += 1
        loop = caller.loop
        call = Task(loop, self.node, (args, kwargs), (PUSH, caller.id, index), (PUSH,))
        call.resume = caller.resume
        call.keeper = caller.keeper or caller  # its answers are saved with the step's task
        recorded = _recorded(loop.pending_writes, call.id)
        # As in LangGraph, a call replayed from its saved result shows its start event too
        # (but no result event: it does not run).
        loop.emit_task_starts([call])
        if elsewhere:  # sync code of an async run, on a thread: the call runs on the run's loop
            if recorded is not None:
                replayed: concurrent.futures.Future[Any] = concurrent.futures.Future()
                replayed.set_result(recorded[0])
                return replayed
            elsewhere_call = asyncio.run_coroutine_threadsafe(_arun_call(call), loop.event_loop)
            _spawned(caller).append(elsewhere_call)
            return elsewhere_call
        if self.is_async:
            if recorded is not None:
                done = asyncio.get_running_loop().create_future()
                done.set_result(recorded[0])
                return done
            running = asyncio.ensure_future(_arun_call(call))
            _spawned(caller).append(running)
            return running
        if recorded is not None:
            future: TaskFuture[Any] = TaskFuture(None)
            future.set_result(recorded[0])
            return future
        future = TaskFuture(call)
        shared_pool().submit(contextvars.copy_context().run, future._execute)
        _spawned(caller).append(future)
        return future

    def __repr__(self) -> str:
        return f"<task {self.name}>"


def _in_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _spawned(caller: Task) -> list[Any]:
    """The futures of ``caller``'s calls, which it waits for before it ends. Those already
    done are dropped now and then, so a caller making many calls does not hold them all."""
    spawned = caller.spawned
    if spawned is None:
        caller.spawned = spawned = []
    elif len(spawned) % 256 == 255:
        spawned[:] = [call for call in spawned if not call.done()]
    return spawned


def _no_read(channels: Any) -> None:
    return None


def _recorded(pending_writes: Sequence[tuple[str, str, Any]], call_id: str) -> tuple[Any] | None:
    """The result an earlier attempt of this step saved for the call, as a 1-tuple."""
    for task_id, channel, value in pending_writes:
        if task_id == call_id and channel == RETURN:
            return (value,)
    return None


def _settle(call: Task) -> None:
    """A call finished: save its result or error at once, and stream it. An interrupted call
    saves nothing: it runs again, from its start, once answered."""
    if call.paused or (call.keeper or call).cancelled:
        return  # a cancelled run's call saves nothing: its lease is gone
    loop = call.loop
    if loop.save_task_writes is not None:
        loop.save_task_writes(loop.task_writes(call))
    loop.emit_task_result(call)


def _outcome(call: Task) -> Any:
    if call.paused:
        raise GraphInterrupt(call.interrupts)
    if call.error is not None:
        raise call.error
    return call.writes[0][1]


async def _arun_call(call: Task) -> Any:
    await arun_task(call)
    _settle(call)
    if call.loop.asave_calls is not None:
        await call.loop.asave_calls()
    return _outcome(call)


@overload
def task(  # type: ignore[overload-overlap]
    __func: Callable[P, Awaitable[T]],
) -> Callable[P, asyncio.Future[T]]: ...


@overload
def task(
    __func: Callable[P, T],
) -> Callable[P, TaskFuture[T]]: ...


@overload
def task(
    *,
    name: str | None = None,
    retry_policy: RetryPolicy | Sequence[RetryPolicy] | None = None,
    cache_policy: CachePolicy | None = None,
    **kwargs: Any,
) -> Callable[[Callable[P, Any]], Callable[P, Any]]: ...


def task(
    __func: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    retry_policy: RetryPolicy | Sequence[RetryPolicy] | None = None,
    cache_policy: CachePolicy | None = None,
    **kwargs: Any,
) -> Any:
    """Make a function a durable task: inside a run, calling it returns a future, and its
    result is saved so a resumed run gets it back without calling the function again.

    Synchronous functions return a ``TaskFuture`` (``.result()``); ``async`` ones an asyncio
    future (``await`` it). ``retry_policy`` retries failures like a node's.
    """
    retry_policy = retry_policy or kwargs.pop("retry", None)
    if kwargs:
        raise TypeError(f"Unexpected arguments: {sorted(kwargs)}")

    def decorate(func: Callable[..., Any]) -> Any:
        return _TaskFunction(func, name=name, retry_policy=retry_policy)

    return decorate(__func) if __func is not None else decorate


class entrypoint(Generic[T]):
    """Make a function a durable workflow: a runnable graph with ``invoke``/``ainvoke``,
    ``stream``/``astream``, ``get_state`` and ``get_state_history``.

    The function's first parameter takes the input; later ones may ask for ``previous`` (what
    the previous run on the same thread returned, or saved with ``entrypoint.final``),
    ``config``, ``runtime``, ``writer`` and ``store`` (always None: there is no store), and
    any other keeps its default. Generator functions are refused, as in LangGraph.
    """

    @dataclass
    class final(Generic[R, S]):
        """Return ``value`` to the caller but save ``save`` as the next run's ``previous``."""

        value: R
        save: S

    def __init__(
        self,
        checkpointer: Any = None,
        context_schema: Any = None,
        cache_policy: CachePolicy | None = None,
        retry_policy: RetryPolicy | Sequence[RetryPolicy] | None = None,
        **kwargs: Any,
    ) -> None:
        self.checkpointer = checkpointer
        self.context_schema = context_schema or kwargs.pop("config_schema", None)
        self.retry_policy = retry_policy or kwargs.pop("retry", None)
        if kwargs:
            raise TypeError(f"Unexpected arguments: {sorted(kwargs)}")

    def __call__(self, func: Callable[..., Any]) -> Pregel:
        if inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func):
            # As LangGraph: a generator's values would need a stream of their own.
            raise NotImplementedError("Generators are not supported in the Functional API.")
        name = getattr(func, "__name__", "entrypoint")
        call = _entrypoint_caller(func)

        def writes(node_task: Task, output: Any) -> Writes:
            if isinstance(output, entrypoint.final):
                value, saved = output.value, output.save
            else:
                value = saved = output
            node_task.update = value
            return [(END, value), (PREVIOUS, saved)]

        def read(channels: dict[str, Any]) -> Any:
            # The task's input is the run's input alone (what tasks/debug events show);
            # ``previous`` is read when the task runs.
            return channels[START].get()

        def run(node_task: Task, input: Any) -> Writes:
            output = call(node_task, input)
            if inspect.isawaitable(output):
                close = getattr(output, "close", None)
                if close is not None:
                    close()
                raise TypeError(f"Entrypoint '{name}' is async: run it with ainvoke/astream")
            return writes(node_task, output)

        async def arun(node_task: Task, input: Any) -> Writes:
            return writes(node_task, await call(node_task, input))

        node = PregelNode(
            name,
            (START,),
            read,
            run,
            arun if inspect.iscoroutinefunction(func) else None,
            retry_policy=self.retry_policy,
        )
        graph = Pregel(
            nodes={name: node},
            channels={
                START: EphemeralValue(Any, key=START),
                END: LastValue(Any, key=END),
                PREVIOUS: LastValue(Any, key=PREVIOUS),
            },
            output_channels=OneChannel((END,)),
            update_writers={name: writes},
            ephemeral_channels=frozenset({START}),
            checkpointer=self.checkpointer,
            name=name,
        )
        graph.stream_mode = "updates"  # LangGraph's default for an entrypoint's stream()
        graph.context_schema = self.context_schema
        graph.__doc__ = func.__doc__
        return graph


# What an entrypoint parameter of each name is given (LangGraph's injected keywords; there is
# no store, so ``store`` is None, as LangGraph passes when a run has none).
_INJECTED: dict[str, Callable[[Task], Any]] = {
    "config": lambda node_task: node_task.config,
    "writer": lambda node_task: node_task.stream_writer,
    "store": lambda node_task: None,
    "previous": lambda node_task: node_task.previous,
    "runtime": lambda node_task: node_task.runtime,
}


# Injected only when unannotated or annotated as one of these (LangGraph's rule; compared by
# name, so LangGraph's or LangChain's classes count too); ``previous`` and ``runtime`` take any.
_INJECTED_TYPES: dict[str, frozenset[str]] = {
    "config": frozenset({"RunnableConfig", "Optional[RunnableConfig]"}),
    "writer": frozenset({"StreamWriter"}),
    "store": frozenset({"BaseStore", "Optional[BaseStore]"}),
}


def _annotation_name(annotation: Any) -> str:
    if isinstance(annotation, str):  # postponed annotations are compared as written
        return annotation
    if annotation == StreamWriter:  # an alias of a Callable: it has no name of its own
        return "StreamWriter"
    args = get_args(annotation)
    if get_origin(annotation) in (Union, UnionType) and len(args) == 2 and type(None) in args:
        inner = args[0] if args[1] is type(None) else args[1]
        return f"Optional[{_annotation_name(inner)}]"
    return str(getattr(annotation, "__name__", annotation))


def _injects(param: inspect.Parameter) -> bool:
    if param.name not in _INJECTED or param.kind not in (
        param.POSITIONAL_OR_KEYWORD,
        param.KEYWORD_ONLY,
    ):
        return False
    allowed = _INJECTED_TYPES.get(param.name)
    if allowed is None or param.annotation is param.empty:
        return True
    if _annotation_name(param.annotation) in allowed:
        return True
    if param.name == "config":
        warnings.warn(
            f"The 'config' parameter should be typed as 'RunnableConfig' or "
            f"'RunnableConfig | None', not '{param.annotation}'; it is not injected.",
            UserWarning,
            stacklevel=4,
        )
    return False


def _entrypoint_caller(func: Callable[..., Any]) -> Callable[[Task, Any], Any]:
    """``func(input)`` plus the keyword arguments it asks for.

    As in LangGraph, the first parameter takes the input; any later parameter named (and
    typed) like an injected value, keyword-only or not, gets it, and others keep their
    defaults (one without a default fails when the entrypoint runs, with Python's TypeError).
    """
    params = list(inspect.signature(func).parameters.values())
    if not params:
        raise ValueError("Entrypoint function must have at least one parameter")
    wanted = [(p.name, _INJECTED[p.name]) for p in params[1:] if _injects(p)]
    if not wanted:
        return lambda node_task, value: func(value)

    def call(node_task: Task, value: Any) -> Any:
        return func(value, **{name: get(node_task) for name, get in wanted})

    return call
