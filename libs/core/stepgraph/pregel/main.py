"""``Pregel``: a compiled graph. Runs supersteps (``invoke``/``stream`` and async twins) and
exposes the thread's state (``get_state``, ``get_state_history``, ``update_state``)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from typing import Any, Self, cast

from stepgraph.channels.base import BaseChannel
from stepgraph.checkpoint.base import CheckpointTuple, RunInfo, RunStatus, TaskWrites
from stepgraph.checkpoint.base.runs import FINISHED
from stepgraph.config import (
    DefaultRecursionLimit,
    RunnableConfig,
    ensure_thread_id,
    merge_configs,
)
from stepgraph.constants import END, INTERRUPT, NULL_TASK_ID, PULL, START, TASKS, branch_channel
from stepgraph.errors import (
    GraphInterrupt,
    InvalidUpdateError,
    LeaseLostError,
    RunIncompleteError,
)
from stepgraph.managed import ManagedValue
from stepgraph.pregel import _lease, _recovery
from stepgraph.pregel._algo import PregelNode, Task, Writes
from stepgraph.pregel._durability import AsyncWriter, Persistence, SyncWriter, _asave, _save
from stepgraph.pregel._executor import LiveSteps, arun_step, run_step, shared_pool
from stepgraph.pregel._loop import OneChannel, RunLoop, StepSave, read_channels, with_interrupts
from stepgraph.pregel._recovery import RecoveryReport
from stepgraph.runtime import CURRENT_TASK
from stepgraph.types import (
    Command,
    Durability,
    GraphOutput,
    Interrupt,
    PregelTask,
    Send,
    StateSnapshot,
    StateUpdate,
    StreamMode,
    StreamVersion,
)

__all__ = ["Pregel"]

DEFAULT_RECURSION_LIMIT = int(os.environ.get("STEPGRAPH_DEFAULT_RECURSION_LIMIT", "10007"))
"""Supersteps a run may take when its config sets no ``recursion_limit``: LangGraph 1.2's
default (10,007; it was 25 before), from ``STEPGRAPH_DEFAULT_RECURSION_LIMIT`` if set."""
_STREAM_MODES = frozenset({"values", "updates", "custom", "debug", "checkpoints", "tasks"})


class Pregel:
    """A compiled graph: nodes, the channels between them, and how to run them.

    Built by ``StateGraph.compile()``; the constructor is the contract with builders.
    """

    stream_mode: StreamMode = "values"
    """What ``stream`` yields when no ``stream_mode`` is given (a compiled ``StateGraph`` and
    an ``@entrypoint``: ``"updates"``, as in LangGraph)."""
    context_schema: Any = None
    """The ``context_schema`` of the builder: a dict passed as ``context=`` is made into it
    when it is a dataclass or a pydantic model."""

    def __init__(
        self,
        *,
        nodes: dict[str, PregelNode],
        channels: dict[str, BaseChannel],
        output_channels: Sequence[str],
        update_writers: dict[str, Callable[[Task, Any], Writes]],
        ephemeral_channels: frozenset[str],
        finish_channels: Sequence[str] = (),
        checkpointer: Any = None,
        interrupt_before: Sequence[str] = (),
        interrupt_after: Sequence[str] = (),
        name: str = "LangGraph",
        debug: bool = False,
        config: RunnableConfig | None = None,
        builder: Any = None,
        state_keys: Sequence[str] | None = None,
        stream_channels: Sequence[str] | None = None,
    ) -> None:
        self.nodes = nodes
        self.state_keys = frozenset(output_channels if state_keys is None else state_keys)
        """Channels a ``Command(update=...)`` input may write."""
        self.channels = channels
        self.managed_keys = tuple(k for k, c in channels.items() if isinstance(c, ManagedValue))
        self.output_mapper: Callable[[Any], Any] | None = None
        """``version="v2"``: makes a whole output the output schema's object (StateGraph)."""
        self.state_mapper: Callable[[Any], Any] | None = None
        """``version="v2"``: makes a checkpoint's values the state schema's object."""
        """State keys whose value the run computes for each task (``stepgraph.managed``)."""
        self.output_channels = _keys(output_channels)
        """What ``invoke`` returns."""
        self.stream_channels = _keys(
            output_channels if stream_channels is None else stream_channels
        )
        """What ``values`` chunks and ``get_state`` show (LangGraph: the whole state)."""
        self.update_writers = update_writers
        self.ephemeral_channels = ephemeral_channels
        self.finish_channels = tuple(finish_channels)
        self.checkpointer = checkpointer
        self.interrupt_before_nodes = tuple(interrupt_before)
        self.interrupt_after_nodes = tuple(interrupt_after)
        self.name = name
        self.debug = debug
        self.config = config or {}
        self.builder = builder
        # Precomputed trigger table: which nodes may run when a channel changes.
        self.node_names = tuple(nodes)
        self.node_index = {name: i for i, name in enumerate(nodes)}
        trigger_to_nodes: dict[str, list[str]] = {}
        for name, node in nodes.items():
            for trigger in node.triggers:
                trigger_to_nodes.setdefault(trigger, []).append(name)
        self.trigger_to_nodes = {k: tuple(v) for k, v in trigger_to_nodes.items()}
        self.subgraphs: dict[str, Pregel] = {}
        """Graphs run by nodes, by node name (for ``get_state(subgraphs=True)``)."""
        self._schemas_allowed: set[int] = set()

    def command_writes(self, command: Command) -> list[tuple[str, Any]]:
        """The writes of a ``Command`` passed as input: its ``update`` and its ``goto``."""
        writes = [(k, v) for k, v in command.update_writes() if k in self.state_keys]
        for target in command.goto_targets():
            if isinstance(target, Send):
                writes.append((TASKS, target))
            elif target == END:
                continue  # routes nowhere, as a conditional edge returning END
            elif target not in self.nodes:
                raise InvalidUpdateError(f"Command(goto=...) names unknown node '{target}'")
            else:
                writes.append((branch_channel(target), None))
        return writes

    def nodes_triggered_by(self, channels: set[str]) -> Sequence[str]:
        """Candidate nodes for the next step, by name (LangGraph's order: its tasks, their
        start events and a snapshot's ``next`` come so)."""
        table = self.trigger_to_nodes
        found: list[str] = []
        for channel in channels:
            names = table.get(channel)
            if names:
                found.extend(names)
        if len(found) == 2:  # a chain: the node that ran and the next one
            first, second = found
            if first == second:
                return [first]
            return found if first < second else [second, first]
        if len(found) > 1:
            return sorted(set(found))
        return found

    # -- runs ------------------------------------------------------------------------------

    def _prepare(
        self,
        config: RunnableConfig | None,
        stream_mode: StreamMode | Sequence[StreamMode] | None,
        context: Any,
        durability: Durability | None,
        debug: bool | None,
        interrupt_before: Any = None,
        interrupt_after: Any = None,
        output_keys: str | Sequence[str] | None = None,
    ) -> tuple[RunLoop, Durability | None, bool]:
        parent = CURRENT_TASK.get()
        if parent is not None and _names_another_thread(config, parent):
            # A node runs a graph on a thread of its own: as in LangGraph, a run of its own
            # (its own checkpointer, lease and root namespace), not a subgraph of the node.
            parent = None
        if parent is not None:
            config = _nested_config(parent, recast=self.checkpointer is True, config=config)
            if context is None:
                context = parent.loop.context
            if durability is None:
                durability = parent.loop.durability
        forwarded: frozenset[str] = frozenset()
        if parent is not None and parent.loop.forward_to is not None:
            # Under a root streaming subgraphs, a graph run in a node makes the root's chunks
            # too: all of an invoke's, and a stream's besides those its caller asked for.
            forwarded = parent.loop.forward_modes
            if not stream_mode:
                stream_mode = tuple(forwarded)  # type: ignore[arg-type]
        context = _coerce_context(self.context_schema, context)
        config = merge_configs(self.config, config) if config or self.config else {}
        if "recursion_limit" not in config:
            config["recursion_limit"] = DefaultRecursionLimit(DEFAULT_RECURSION_LIMIT)
        elif config["recursion_limit"] < 1:
            raise ValueError("recursion_limit must be at least 1")
        requested = _modes(stream_mode)
        modes = requested | forwarded
        printed = debug if debug is not None else self.debug
        if printed:
            modes = modes | {"debug"}
        checkpointer = self._run_saver(parent)
        if checkpointer is not None:
            ensure_thread_id(config)
        mode = durability or "async"
        if mode not in ("sync", "async", "exit"):
            raise ValueError(f"durability must be 'sync', 'async' or 'exit', got {mode!r}")
        loop = RunLoop(self, config, checkpointer=checkpointer, stream_modes=modes, context=context)
        if printed and "debug" not in requested:
            # debug=True prints debug events instead of streaming them (LangGraph's behaviour).
            loop.printed_modes = frozenset({"debug"})
        if output_keys is not None:
            # One key given as a string: its bare value, as LangGraph returns it.
            keys = (
                OneChannel((output_keys,)) if isinstance(output_keys, str) else tuple(output_keys)
            )
            loop.output_keys = loop.values_keys = keys
        loop.interrupt_before = _breakpoints(interrupt_before, self.interrupt_before_nodes)
        loop.interrupt_after = _breakpoints(interrupt_after, self.interrupt_after_nodes)
        if (loop.interrupt_before or loop.interrupt_after) and checkpointer is None:
            raise ValueError("interrupt_before/interrupt_after need a checkpointer")
        addressed = bool((config.get("configurable") or {}).get("checkpoint_id"))
        loop.durability = mode
        if parent is not None:
            self._nest(loop, parent)
        return loop, (mode if checkpointer is not None else None), addressed

    def _run_saver(self, parent: Task | None) -> Any:
        """A subgraph saves with its parent's checkpointer unless compiled with ``False``."""
        own = self.checkpointer
        if own is False:
            return None
        if parent is not None and parent.loop.checkpointer is not None:
            return parent.loop.checkpointer
        if own is True:
            raise ValueError(
                "checkpointer=True keeps a subgraph's state across its parent's runs; a graph "
                "run on its own needs a checkpointer instance"
            )
        return own

    def _nest(self, loop: RunLoop, parent: Task) -> None:
        """Make ``loop`` a subgraph run of ``parent``'s task."""
        outer = parent.loop
        loop.parent_task = parent
        loop.resume_map = parent.resume
        loop.null_resume = outer.null_resume  # one waiting answer for the whole run
        loop.forward_to = outer.forward_to
        loop.forward_modes = outer.forward_modes
        loop.parents = {**outer.parents, outer.namespace: outer.checkpoint_id}
        loop.fence, loop.holding = outer.fence, outer.holding  # the root run's lease covers it
        # Under a per-task namespace a saved checkpoint can only be an earlier attempt of this
        # very task; a shared one (checkpointer=True) is continued only when the parent resumes.
        loop.continues_saved = self.checkpointer is not True or outer.resuming
        saver = loop.checkpointer
        if saver is not None and id(saver) not in self._schemas_allowed:
            allow = getattr(getattr(saver, "serde", None), "allow_schema", None)
            if allow is not None and self.builder is not None:
                for schema in self.builder._schemas():
                    allow(schema)
            self._schemas_allowed.add(id(saver))

    def _run(
        self,
        loop: RunLoop,
        input: Any,
        mode: Durability | None,
        addressed: bool,
        live: LiveSteps | None = None,
    ) -> Iterator[tuple[str, Any]]:
        """Run supersteps until no task is left, yielding ``(mode, chunk)`` as they come.

        Without ``live`` (``invoke``) a step's first (or only) task runs on the calling thread
        and its chunks are yielded when the step ends; the steps ``live`` takes run on its
        thread instead, while the calling one yields their chunks as they are made."""
        saver = loop.checkpointer
        persistence = Persistence(loop, mode)
        write = SyncWriter(saver, background=mode == "async")
        output = loop.output

        def on_done(task: Task, last: bool) -> None:
            loop.emit_task_result(task)
            write(persistence.on_task_done(task, last))

        if mode is not None:
            loop.save_task_writes = lambda writes: write(persistence.on_call_done(writes))
        holding, saved = self._hold(loop, input)
        completed = False
        failure: BaseException | None = None
        paused_step: Sequence[Task] = ()
        try:
            loop.load(saved)
            made = loop.start(input, addressed=addressed, limit=loop.config["recursion_limit"])
            for save in persistence.on_start(made):
                write(save)
            if made:
                loop.emit_step((), set())
            elif loop.resuming:
                loop.emit_resumed()
            while True:
                while output:
                    yield output.popleft()
                loop.check_recursion()
                tasks = loop.plan()
                if not tasks:
                    if loop.finish():
                        continue
                    break
                if loop.should_interrupt(loop.interrupt_before, tasks):
                    loop.stop_for_interrupts(())
                    break
                loop.emit_task_starts(tasks)
                loop.emit_cached(tasks)
                if live is not None and live.takes(tasks):
                    yield from live.run(tasks, on_done, loop.config.get("max_concurrency"))
                else:
                    run_step(tasks, on_done, loop.config.get("max_concurrency"))
                if loop.holding is not None and loop.holding.lost is not None:
                    raise loop.holding.lost  # another run owns the thread now: stop working
                paused = _paused(tasks)
                if paused is not None:
                    loop.stop_for_interrupts(paused)
                    paused_step = tasks
                    break
                updated = loop.apply(tasks)
                write(persistence.on_step_done(tasks, holding))
                loop.emit_step(tasks, updated)
                if loop.should_interrupt(loop.interrupt_after, tasks):
                    loop.stop_for_interrupts(())
                    break
            completed = True
        except BaseException as error:
            failure = error
            if isinstance(error, Exception):
                # What the failed step streamed (a sibling's update, the failing task's
                # earlier chunks and events) still reaches the caller, then the error.
                while output:
                    yield output.popleft()
            raise
        finally:
            if live is not None:
                live.close()
            try:
                for save in persistence.on_exit(holding if completed else None):
                    write(save)
                if completed:
                    write.flush()
                else:
                    with contextlib.suppress(Exception):  # the run's own error is reported
                        write.flush()
            except BaseException as error:
                failure = failure or error
                raise
            finally:
                if holding is not None:
                    self._let_go(holding, loop, failure)
        if paused_step and loop.parent_task is None:
            loop.show_finished_writes(paused_step)
        while output:
            yield output.popleft()
        if loop.paused and loop.parent_task is not None:
            raise GraphInterrupt(loop.interrupts)  # the parent's task pauses on them too

    async def _arun(
        self, loop: RunLoop, input: Any, mode: Durability | None, addressed: bool
    ) -> AsyncIterator[tuple[str, Any]]:
        saver = loop.checkpointer
        persistence = Persistence(loop, mode)
        write = AsyncWriter(saver, background=mode == "async")
        output = loop.output
        # As the sync stream's (``_live_steps``): every step is live with ``custom`` (chunks
        # handed out while it runs: LLM tokens, say), steps of several tasks with the modes a
        # finished task streams in.
        live = "custom" in loop.stream_modes or (
            loop.forward_to is not None and loop.parent_task is None  # subgraphs stream in
        )
        per_task = bool(loop.stream_modes & {"updates", "tasks", "debug"})

        async def on_done(task: Task, last: bool) -> None:
            loop.emit_task_result(task)
            if loop.on_output is not None:
                loop.on_output()
            await write(persistence.on_task_done(task, last))

        # ``@task`` outcomes may come from worker threads: queue them, and have the event loop
        # save them at once (a job per outcome); the step waits for those jobs before it ends.
        calls: deque[StepSave] = deque()
        event_loop = loop.event_loop = asyncio.get_running_loop()
        jobs: list[asyncio.Future[None]] = []

        def save_call(writes: TaskWrites) -> None:
            save = persistence.on_call_done(writes)
            if save is not None:
                calls.append(save)
                with contextlib.suppress(RuntimeError):  # the loop is closed: the run is over
                    event_loop.call_soon_threadsafe(start_saving)

        def start_saving() -> None:
            if calls:
                jobs.append(asyncio.ensure_future(save_calls()))

        async def save_calls() -> None:
            while calls:
                await write(calls.popleft())

        async def finish_calls() -> None:
            """Every queued outcome saved, by this coroutine or a job; the first failure raised."""
            await save_calls()
            while jobs:
                running = list(jobs)
                jobs.clear()
                await asyncio.wait(running)
                failures = [error for job in running if (error := job.exception()) is not None]
                if failures:
                    raise failures[0]

        if mode is not None:
            loop.save_task_writes = save_call
            loop.asave_calls = save_calls
        holding, beat, saved = await self._ahold(loop, input)
        completed = False
        failure: BaseException | None = None
        paused_step: Sequence[Task] = ()
        try:
            loop.load(saved)
            made = loop.start(input, addressed=addressed, limit=loop.config["recursion_limit"])
            for save in persistence.on_start(made):
                await write(save)
            if made:
                loop.emit_step((), set())
            elif loop.resuming:
                loop.emit_resumed()
            while True:
                while output:
                    yield output.popleft()
                loop.check_recursion()
                tasks = loop.plan()
                if not tasks:
                    if loop.finish():
                        continue
                    break
                if loop.should_interrupt(loop.interrupt_before, tasks):
                    loop.stop_for_interrupts(())
                    break
                loop.emit_task_starts(tasks)
                loop.emit_cached(tasks)
                step = arun_step(tasks, on_done, loop.config.get("max_concurrency"))
                if live or (per_task and len(tasks) > 1):
                    async for chunk in _while_running(step, loop):
                        yield chunk
                else:
                    await step
                await finish_calls()
                if loop.holding is not None and loop.holding.lost is not None:
                    raise loop.holding.lost
                paused = _paused(tasks)
                if paused is not None:
                    loop.stop_for_interrupts(paused)
                    paused_step = tasks
                    break
                updated = loop.apply(tasks)
                await write(persistence.on_step_done(tasks, holding))
                loop.emit_step(tasks, updated)
                if loop.should_interrupt(loop.interrupt_after, tasks):
                    loop.stop_for_interrupts(())
                    break
            completed = True
        except BaseException as error:
            failure = error
            if isinstance(error, Exception):  # as ``_run``: the failed step's chunks first
                while output:
                    yield output.popleft()
            raise
        finally:
            try:
                if completed:
                    await finish_calls()
                else:
                    with contextlib.suppress(Exception):  # the run's own error is reported
                        await finish_calls()
                for save in persistence.on_exit(holding if completed else None):
                    await write(save)
                if completed:
                    await write.flush()
                else:
                    with contextlib.suppress(Exception):  # the run's own error is reported
                        await write.flush()
            except BaseException as error:
                failure = failure or error
                raise
            finally:
                if holding is not None and beat is not None:
                    await self._alet_go(holding, beat, loop, failure)
        if paused_step and loop.parent_task is None:
            loop.show_finished_writes(paused_step)
        while output:
            yield output.popleft()
        if loop.paused and loop.parent_task is not None:
            raise GraphInterrupt(loop.interrupts)

    # -- the run's lease (``_lease``) ---------------------------------------------------------

    def _hold(
        self, loop: RunLoop, input: Any
    ) -> tuple[_lease.Holding | None, CheckpointTuple | None]:
        """The run's checkpoint to start from; for a top-level run with a checkpointer, read
        under the thread's lease, taken in the same call."""
        saver = loop.checkpointer
        if saver is None or loop.parent_task is not None:
            return None, saver.get_tuple(loop.config) if saver is not None else None
        request = _request(self, loop, input)
        holding, saved = _lease.acquire(saver, loop.config, _owner(), request)
        loop.fence, loop.holding = holding.epoch, holding
        return holding, saved

    async def _ahold(
        self, loop: RunLoop, input: Any
    ) -> tuple[_lease.Holding | None, asyncio.Task[None] | None, CheckpointTuple | None]:
        saver = loop.checkpointer
        if saver is None or loop.parent_task is not None:
            return None, None, await saver.aget_tuple(loop.config) if saver is not None else None
        request = _request(self, loop, input)
        holding, beat, saved = await _lease.aacquire(saver, loop.config, _owner(), request)
        loop.fence, loop.holding = holding.epoch, holding
        return holding, beat, saved

    def _let_go(
        self, holding: _lease.Holding, loop: RunLoop, failure: BaseException | None
    ) -> None:
        status, error = _lease.outcome(failure, loop.paused)
        try:
            if holding.lost is None and not isinstance(failure, LeaseLostError):
                _retain(holding.saver, holding.lease.thread_id, status)
        finally:
            _lease.release(holding, status, error)

    async def _alet_go(
        self,
        holding: _lease.Holding,
        beat: asyncio.Task[None],
        loop: RunLoop,
        failure: BaseException | None,
    ) -> None:
        status, error = _lease.outcome(failure, loop.paused)
        try:
            if holding.lost is None and not isinstance(failure, LeaseLostError):
                await _aretain(holding.saver, holding.lease.thread_id, status)
        finally:
            await _lease.arelease(holding, beat, status, error)

    # -- recovery (``_recovery``) ------------------------------------------------------------

    def recover(
        self,
        *,
        max_attempts: int = 3,
        limit: int | None = None,
        config: RunnableConfig | None = None,
        durability: Durability | None = None,
        context: Any = None,
    ) -> RecoveryReport:
        """Run on every thread whose run died mid-way (``checkpointer.list_incomplete()``),
        from its last checkpoint; give up on (mark ``abandoned``) those already started
        ``max_attempts`` times. A recovered run repeats its call's durability and breakpoints;
        ``config`` is merged into each run's config; ``durability`` overrides the kept mode;
        ``context`` is the recovered runs' runtime context (the registry does not keep it)."""
        return _recovery.recover(
            self,
            max_attempts=max_attempts,
            limit=limit,
            config=config,
            durability=durability,
            context=context,
        )

    async def arecover(
        self,
        *,
        max_attempts: int = 3,
        limit: int | None = None,
        config: RunnableConfig | None = None,
        durability: Durability | None = None,
        context: Any = None,
    ) -> RecoveryReport:
        return await _recovery.arecover(
            self,
            max_attempts=max_attempts,
            limit=limit,
            config=config,
            durability=durability,
            context=context,
        )

    def stream(
        self,
        input: Any,
        config: RunnableConfig | None = None,
        *,
        context: Any = None,
        stream_mode: StreamMode | Sequence[StreamMode] | None = None,
        output_keys: str | Sequence[str] | None = None,
        interrupt_before: Any = None,
        interrupt_after: Any = None,
        durability: Durability | None = None,
        subgraphs: bool = False,
        debug: bool | None = None,
        version: StreamVersion = "v1",
        **kwargs: Any,
    ) -> Iterator[Any]:
        """Run the graph, yielding chunks of ``stream_mode`` (``(mode, chunk)`` for a list)."""
        durability = _durability(durability, kwargs)
        stream_mode = stream_mode or self.stream_mode
        loop, mode, addressed = self._prepare(
            config,
            stream_mode,
            context,
            durability,
            debug,
            interrupt_before,
            interrupt_after,
            output_keys,
        )
        shape = _chunk_shape(stream_mode, subgraphs, version, self)
        printed = loop.printed_modes
        live = _live_steps(loop, subgraphs)  # before the output is handed to subgraphs
        if subgraphs and loop.parent_task is None:
            loop.forward_to, loop.forward_modes = loop.output, loop.stream_modes
        own, teed = _teeing(loop, stream_mode)
        for chunk in self._run(loop, input, mode, addressed, live):
            if teed and chunk[0] in loop.forward_modes:
                _pass_on(loop, chunk)
            if chunk[0] in printed:
                _print_event(chunk[1])
            elif chunk[0] in own:
                yield shape(chunk)

    async def astream(
        self,
        input: Any,
        config: RunnableConfig | None = None,
        *,
        context: Any = None,
        stream_mode: StreamMode | Sequence[StreamMode] | None = None,
        output_keys: str | Sequence[str] | None = None,
        interrupt_before: Any = None,
        interrupt_after: Any = None,
        durability: Durability | None = None,
        subgraphs: bool = False,
        debug: bool | None = None,
        version: StreamVersion = "v1",
        **kwargs: Any,
    ) -> AsyncIterator[Any]:
        durability = _durability(durability, kwargs)
        stream_mode = stream_mode or self.stream_mode
        loop, mode, addressed = self._prepare(
            config,
            stream_mode,
            context,
            durability,
            debug,
            interrupt_before,
            interrupt_after,
            output_keys,
        )
        shape = _chunk_shape(stream_mode, subgraphs, version, self)
        printed = loop.printed_modes
        loop.output = _Waking(loop)  # a chunk added mid-step wakes the consumer
        if subgraphs and loop.parent_task is None:
            loop.forward_to, loop.forward_modes = loop.output, loop.stream_modes
        own, teed = _teeing(loop, stream_mode)
        async for chunk in self._arun(loop, input, mode, addressed):
            if teed and chunk[0] in loop.forward_modes:
                _pass_on(loop, chunk)
            if chunk[0] in printed:
                _print_event(chunk[1])
            elif chunk[0] in own:
                yield shape(chunk)

    def invoke(
        self,
        input: Any,
        config: RunnableConfig | None = None,
        *,
        context: Any = None,
        stream_mode: StreamMode = "values",
        output_keys: str | Sequence[str] | None = None,
        interrupt_before: Any = None,
        interrupt_after: Any = None,
        durability: Durability | None = None,
        debug: bool | None = None,
        version: StreamVersion = "v1",
        **kwargs: Any,
    ) -> Any:
        """Run the graph to the end; return the final state (``values``) or the chunks."""
        durability = _durability(durability, kwargs)
        _check_version(version)
        if stream_mode != "values":
            return list(
                self.stream(
                    input,
                    config,
                    context=context,
                    stream_mode=stream_mode,
                    output_keys=output_keys,
                    interrupt_before=interrupt_before,
                    interrupt_after=interrupt_after,
                    durability=durability,
                    debug=debug,
                    version=version,
                )
            )
        # The final value is read once at the end: no per-step output is built.
        loop, mode, addressed = self._prepare(
            config,
            (),
            context,
            durability,
            debug,
            interrupt_before,
            interrupt_after,
            output_keys,
        )
        if loop.forward_to is not None:
            loop.output = _Forwarding(loop)
        for chunk in self._run(loop, input, mode, addressed):
            _pass_on(loop, chunk)
        return _final_output(loop, version)

    async def ainvoke(
        self,
        input: Any,
        config: RunnableConfig | None = None,
        *,
        context: Any = None,
        stream_mode: StreamMode = "values",
        output_keys: str | Sequence[str] | None = None,
        interrupt_before: Any = None,
        interrupt_after: Any = None,
        durability: Durability | None = None,
        debug: bool | None = None,
        version: StreamVersion = "v1",
        **kwargs: Any,
    ) -> Any:
        durability = _durability(durability, kwargs)
        _check_version(version)
        if stream_mode != "values":
            return [
                chunk
                async for chunk in self.astream(
                    input,
                    config,
                    context=context,
                    stream_mode=stream_mode,
                    output_keys=output_keys,
                    interrupt_before=interrupt_before,
                    interrupt_after=interrupt_after,
                    durability=durability,
                    debug=debug,
                    version=version,
                )
            ]
        loop, mode, addressed = self._prepare(
            config,
            (),
            context,
            durability,
            debug,
            interrupt_before,
            interrupt_after,
            output_keys,
        )
        if loop.forward_to is not None:
            loop.output = _Forwarding(loop)
        async for chunk in self._arun(loop, input, mode, addressed):
            _pass_on(loop, chunk)
        return _final_output(loop, version)

    def batch(
        self,
        inputs: Sequence[Any],
        config: RunnableConfig | Sequence[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[Any]:
        """``invoke`` each input (in parallel threads), with one config or one per input."""
        configs = _batch_configs(config, len(inputs))

        def one(pair: tuple[Any, RunnableConfig | None]) -> Any:
            try:
                return self.invoke(pair[0], pair[1], **kwargs)
            except Exception as error:
                if return_exceptions:
                    return error
                raise

        if len(inputs) <= 1:
            return [one(pair) for pair in zip(inputs, configs, strict=True)]
        return list(shared_pool().map(one, zip(inputs, configs, strict=True)))

    async def abatch(
        self,
        inputs: Sequence[Any],
        config: RunnableConfig | Sequence[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[Any]:
        configs = _batch_configs(config, len(inputs))
        runs = [self.ainvoke(i, c, **kwargs) for i, c in zip(inputs, configs, strict=True)]
        return list(await asyncio.gather(*runs, return_exceptions=return_exceptions))

    def batch_as_completed(
        self,
        inputs: Sequence[Any],
        config: RunnableConfig | Sequence[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> Iterator[tuple[int, Any]]:
        """``invoke`` each input in parallel threads, yielding ``(index, output)`` as each
        run finishes (with ``return_exceptions``, a failed run's exception as its output)."""
        configs = _batch_configs(config, len(inputs))
        futures = {
            shared_pool().submit(self.invoke, item, one, **kwargs): index
            for index, (item, one) in enumerate(zip(inputs, configs, strict=True))
        }
        for future in concurrent.futures.as_completed(futures):
            error = future.exception()
            if error is not None and not return_exceptions:
                raise error
            yield futures[future], error if error is not None else future.result()

    async def abatch_as_completed(
        self,
        inputs: Sequence[Any],
        config: RunnableConfig | Sequence[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> AsyncIterator[tuple[int, Any]]:
        """``ainvoke`` each input concurrently, yielding ``(index, output)`` as each finishes."""
        configs = _batch_configs(config, len(inputs))

        async def one(index: int, item: Any, run_config: RunnableConfig | None) -> tuple[int, Any]:
            try:
                return index, await self.ainvoke(item, run_config, **kwargs)
            except Exception as error:
                if not return_exceptions:
                    raise
                return index, error

        runs = [
            asyncio.ensure_future(one(i, item, c))
            for i, (item, c) in enumerate(zip(inputs, configs, strict=True))
        ]
        try:
            for finished in asyncio.as_completed(runs):
                yield await finished
        finally:  # a failure raised, or the consumer stopped: the other runs are cancelled
            for run in runs:
                run.cancel()
            await asyncio.gather(*runs, return_exceptions=True)

    # -- state API -------------------------------------------------------------------------

    def _saver(self) -> Any:
        if self.checkpointer is None:
            raise ValueError("No checkpointer set: compile the graph with checkpointer=...")
        return self.checkpointer

    def _state_loop(self, config: RunnableConfig) -> RunLoop:
        config = merge_configs(self.config, config)
        ensure_thread_id(config)
        return RunLoop(self, config, checkpointer=self._saver(), stream_modes=frozenset())

    def _graph_at(self, namespace: str) -> Pregel:
        """The (sub)graph whose checkpoints live in ``namespace``."""
        graph = self
        for part in namespace.split("|") if namespace else ():
            if part.isdigit():
                continue  # the n-th graph run by one task
            node = part.split(":")[0]
            found = graph.subgraphs.get(node)
            if found is None:
                raise ValueError(f"No subgraph of node '{node}' (namespace '{namespace}')")
            graph = found
        return graph

    def _snapshot(
        self, config: RunnableConfig, saved: CheckpointTuple | None, *, live: bool
    ) -> StateSnapshot:
        if saved is None:
            return StateSnapshot({}, (), config, None, None, None, ())
        namespace = saved.config["configurable"].get("checkpoint_ns", "")
        graph = self._graph_at(namespace)
        loop = RunLoop(
            graph,
            merge_configs(self.config, saved.config),
            checkpointer=self._saver(),
            stream_modes=frozenset(),
        )
        loop.load(saved)
        tasks, next_names = loop.pending_state(live)
        tasks = tuple(
            task._replace(state=graph._subgraph_state_config(saved.config, task))
            if task.name in graph.subgraphs
            else task
            for task in tasks
        )
        return StateSnapshot(
            values=read_channels(loop.channels, graph.stream_channels),
            next=next_names,
            config=saved.config,
            metadata=dict(saved.metadata) if saved.metadata is not None else None,
            created_at=saved.checkpoint["ts"],
            parent_config=saved.parent_config,
            tasks=tasks,
            interrupts=tuple(i for task in tasks for i in task.interrupts),
        )

    def _subgraph_state_config(
        self, config: RunnableConfig, task: PregelTask
    ) -> RunnableConfig | None:
        """Where the subgraph run by ``task`` keeps its checkpoints (None: it keeps none)."""
        own = self.subgraphs[task.name].checkpointer
        if own is False:
            return None
        configurable = config["configurable"]
        namespace = task.name if own is True else f"{task.name}:{task.id}"
        if configurable.get("checkpoint_ns"):
            namespace = f"{configurable['checkpoint_ns']}|{namespace}"
        if own is True:
            namespace = "|".join(part.split(":")[0] for part in namespace.split("|"))
        return {
            "configurable": {"thread_id": configurable["thread_id"], "checkpoint_ns": namespace}
        }

    def get_subgraphs(
        self, *, namespace: str | None = None, recurse: bool = False
    ) -> Iterator[tuple[str, Pregel]]:
        """The graphs this graph's nodes run, as ``(node name, graph)``; ``recurse``: theirs too,
        named ``"outer|inner"``. ``namespace`` (``"outer"`` or ``"outer|inner"``) picks one,
        as LangGraph's does."""
        for name, graph in self.subgraphs.items():
            if namespace is not None and not namespace.startswith(name):
                continue
            if name == namespace:
                yield name, graph
                return
            if namespace is None:
                yield name, graph
            if recurse:
                inner = None if namespace is None else namespace[len(name) + 1 :]
                for found, subgraph in graph.get_subgraphs(namespace=inner, recurse=True):
                    yield f"{name}|{found}", subgraph

    async def aget_subgraphs(
        self, *, namespace: str | None = None, recurse: bool = False
    ) -> AsyncIterator[tuple[str, Pregel]]:
        """``get_subgraphs``, for async code."""
        for found in self.get_subgraphs(namespace=namespace, recurse=recurse):
            yield found

    def get_state(self, config: RunnableConfig, *, subgraphs: bool = False) -> StateSnapshot:
        """The thread's latest state, or the checkpoint ``config`` names; ``subgraphs`` puts the
        state of each task's subgraph in ``task.state`` (else the config naming it)."""
        saver = self._saver()
        snapshot = self._snapshot(
            config, saver.get_tuple(self._lookup_config(config)), live=_is_live(config)
        )
        if not subgraphs:
            return snapshot
        tasks = []
        for task in snapshot.tasks:
            if isinstance(task.state, dict):
                state = self.get_state(cast(RunnableConfig, task.state), subgraphs=True)
                if state.metadata is not None:  # the subgraph saved a checkpoint
                    task = task._replace(state=state)
            tasks.append(task)
        return snapshot._replace(tasks=tuple(tasks))

    async def aget_state(self, config: RunnableConfig, *, subgraphs: bool = False) -> StateSnapshot:
        saver = self._saver()
        saved = await saver.aget_tuple(self._lookup_config(config))
        snapshot = self._snapshot(config, saved, live=_is_live(config))
        if not subgraphs:
            return snapshot
        tasks = []
        for task in snapshot.tasks:
            if isinstance(task.state, dict):
                state = await self.aget_state(cast(RunnableConfig, task.state), subgraphs=True)
                if state.metadata is not None:
                    task = task._replace(state=state)
            tasks.append(task)
        return snapshot._replace(tasks=tuple(tasks))

    def get_state_history(
        self,
        config: RunnableConfig,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> Iterator[StateSnapshot]:
        """The thread's checkpoints, newest first."""
        listed = self._saver().list(
            self._lookup_config(config), filter=filter, before=before, limit=limit
        )
        for saved in listed:
            yield self._snapshot(config, saved, live=False)

    async def aget_state_history(
        self,
        config: RunnableConfig,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[StateSnapshot]:
        listed = self._saver().alist(
            self._lookup_config(config), filter=filter, before=before, limit=limit
        )
        async for saved in listed:
            yield self._snapshot(config, saved, live=False)

    def _lookup_config(self, config: RunnableConfig) -> RunnableConfig:
        config = merge_configs(self.config, config)
        ensure_thread_id(config)
        configurable = config["configurable"]
        if "checkpoint_ns" not in configurable:
            config["configurable"] = {**configurable, "checkpoint_ns": ""}
        return config

    def _update(
        self,
        config: RunnableConfig,
        saved: CheckpointTuple | None,
        supersteps: Sequence[Sequence[StateUpdate]],
        fence: int | None,
    ) -> tuple[RunLoop, list[StepSave]]:
        """The saves of ``supersteps`` of updates applied to ``saved``: one ``source="update"``
        checkpoint per superstep, each update written as if its node had returned it."""
        lookup = self._lookup_config(config)
        # A subgraph's config (from a snapshot's task state) updates that subgraph's state,
        # as its own nodes would.
        graph = self._graph_at(lookup["configurable"]["checkpoint_ns"])
        loop = RunLoop(graph, lookup, checkpointer=self._saver(), stream_modes=frozenset())
        loop.fence = fence
        loop.load(saved)
        if saved is None:
            loop.step = 0  # LangGraph numbers an update of an empty thread step 0
        saves = []
        for updates in supersteps:
            if not updates:
                raise InvalidUpdateError("A superstep of bulk_update_state has no update")
            if updates[0].values is None and updates[0].as_node == END:
                if len(updates) > 1:
                    raise InvalidUpdateError("Cannot apply multiple updates when clearing state")
                tasks = _cleared_tasks(loop) if loop.checkpoint_is_saved else []
            else:
                tasks = [
                    graph._update_task(loop, values, as_node, len(updates))
                    for values, as_node, *_ in updates
                ]
            loop.apply(tasks, source="update")
            saves.append(loop.save_checkpoint([]))
        return loop, saves

    def _update_task(self, loop: RunLoop, values: Any, as_node: str | None, count: int) -> Task:
        """A task of ``update_state``: ``values`` written as node ``as_node`` returns them."""
        if as_node is None:
            if count > 1:
                raise InvalidUpdateError("as_node is required when a superstep has several updates")
            as_node = _last_writer(loop) if loop.checkpoint_is_saved else START
        if as_node == END:
            raise InvalidUpdateError(
                "Cannot update the state as END, except update_state(config, None, as_node=END), "
                "which clears the pending tasks"
            )
        writers = self.update_writers.get(as_node)
        if writers is None:
            raise InvalidUpdateError(f"Node {as_node} does not exist")
        node = self.nodes[as_node]
        task = Task(loop, node, values, (PULL, as_node), node.triggers)
        task.writes = writers(task, values)
        return task

    def update_state(
        self,
        config: RunnableConfig,
        values: Any,
        as_node: str | None = None,
        task_id: str | None = None,
    ) -> RunnableConfig:
        """Write ``values`` as if node ``as_node`` had returned them: a ``source="update"``
        checkpoint whose next nodes are those that follow ``as_node``. ``values=None`` with
        ``as_node=END`` clears the pending tasks instead (the paused run will not go on).
        ``task_id`` is accepted as in LangGraph (see ``StateUpdate``)."""
        return self.bulk_update_state(config, [[StateUpdate(values, as_node, task_id)]])

    def bulk_update_state(
        self, config: RunnableConfig, supersteps: Sequence[Sequence[StateUpdate]]
    ) -> RunnableConfig:
        """Several ``update_state`` steps under one lease: each superstep's updates (each as
        if its ``as_node`` had returned its ``values``, as parallel nodes of one step) make
        one checkpoint."""
        saver = self._saver()
        lookup = _update_config(self._lookup_config(config))
        before = saver.get_run(lookup["configurable"]["thread_id"])
        _check_updatable(before, _lease.expire_if_died_here(saver, before))
        # Read apart from the lease: a failed read must leave the run record as it was.
        holding, _ = _lease.acquire(saver, lookup, _owner(), None, read=False)
        try:
            _check_took_from_live_or_finished(holding, before)
            saved = saver.get_tuple(lookup)
            loop, saves = self._update(config, saved, supersteps, holding.epoch)
            _last_save_lets_go(saves, before, holding)
            for save in saves:
                _save(saver, save)
        finally:
            _lease.release(holding, *_status_kept(before, holding))
        return loop.checkpoint_config()

    async def aupdate_state(
        self,
        config: RunnableConfig,
        values: Any,
        as_node: str | None = None,
        task_id: str | None = None,
    ) -> RunnableConfig:
        return await self.abulk_update_state(config, [[StateUpdate(values, as_node, task_id)]])

    async def abulk_update_state(
        self, config: RunnableConfig, supersteps: Sequence[Sequence[StateUpdate]]
    ) -> RunnableConfig:
        saver = self._saver()
        lookup = _update_config(self._lookup_config(config))
        before = await saver.aget_run(lookup["configurable"]["thread_id"])
        _check_updatable(before, await _lease.aexpire_if_died_here(saver, before))
        kept = _status_kept(before, None)
        holding, beat, _ = await _lease.aacquire(
            saver, lookup, _owner(), None, on_cancel=kept, read=False
        )
        try:
            _check_took_from_live_or_finished(holding, before)
            saved = await saver.aget_tuple(lookup)
            loop, saves = self._update(config, saved, supersteps, holding.epoch)
            _last_save_lets_go(saves, before, holding)
            for save in saves:
                await _asave(saver, save)
        finally:
            await _lease.arelease(holding, beat, *_status_kept(before, holding))
        return loop.checkpoint_config()

    def with_config(self, config: RunnableConfig | None = None, **kwargs: Any) -> Self:
        """A copy of this graph (of its class) whose runs start from ``config`` merged with
        the run's config."""
        copy = object.__new__(type(self))
        copy.__dict__.update(self.__dict__)
        copy.config = merge_configs(self.config, config, kwargs)  # type: ignore[arg-type]
        return copy


def _request(graph: Pregel, loop: RunLoop, input: Any) -> dict[str, Any] | None:
    """What the run registry keeps of a run's call, for recovery to repeat it: the input and
    the call's own durability, breakpoints (a recovered run must still stop for a human) and
    recursion limit (``RemainingSteps`` reads it).
    None when there is nothing beyond the defaults to keep."""
    request: dict[str, Any] = {}
    if input is not None:
        request["input"] = input
    if loop.durability != "async":
        request["durability"] = loop.durability
    if loop.interrupt_before != graph.interrupt_before_nodes:
        request["interrupt_before"] = list(loop.interrupt_before)
    if loop.interrupt_after != graph.interrupt_after_nodes:
        request["interrupt_after"] = list(loop.interrupt_after)
    limit = loop.config.get("recursion_limit", DEFAULT_RECURSION_LIMIT)
    if limit != DEFAULT_RECURSION_LIMIT:
        request["recursion_limit"] = limit
    return request or None


def _owner() -> str:
    """A new name for a run's lease, every time. Not the caller's ``run_id``: two invocations
    given the same one would otherwise count as one holder and share a fencing token. It says
    where the run's process lives, so a run that died on this machine is taken over at once
    (``_lease.owner_name``)."""
    return _lease.owner_name()


def _cleared_tasks(loop: RunLoop) -> list[Task]:
    """The checkpoint's pending tasks, as if they had run: tasks that finished keep their
    saved writes, the others write nothing (``update_state(config, None, as_node=END)``).
    Writes of a resuming ``Command`` saved on the checkpoint are applied first."""
    null_writes = [(c, v) for t, c, v in loop.pending_writes if t == NULL_TASK_ID]
    if null_writes:
        loop.apply([loop._pseudo_task(null_writes)], new_checkpoint=False)
    tasks = loop.plan()
    for task in tasks:
        if not task.done:
            task.writes = []
    return tasks


def _update_config(lookup: RunnableConfig) -> RunnableConfig:
    """An update never waits for a run: a thread a run holds is busy (``ThreadBusyError``)."""
    return {**lookup, "configurable": {**lookup["configurable"], "multitask_strategy": "reject"}}


def _check_updatable(before: RunInfo | None, died_here: bool) -> None:
    """Refuse to update a thread whose last run died (its lease ran out while ``running``, or
    its process died on this machine: ``died_here``, its lease now made to run out so that
    recovery finds it): taking it would overwrite what recovery needs (its request, head)."""
    if before is None or before.status != "running":
        return
    alive = before.expires_at is not None and before.expires_at > time.time()
    if alive and not died_here:
        return  # taking the lease says so (ThreadBusyError)
    raise RunIncompleteError(before.thread_id, before.run_id)


def _check_took_from_live_or_finished(holding: _lease.Holding, before: RunInfo | None) -> None:
    """The lease was taken from a run that died after ``before`` was read (more than one
    attempt counted): give the thread back to recovery and refuse the update."""
    if holding.lease.attempts > 1:
        raise RunIncompleteError(holding.lease.thread_id, before.run_id if before else None)


def _status_kept(
    before: RunInfo | None, holding: _lease.Holding | None
) -> tuple[RunStatus, str | None]:
    """The run record an ``update_state`` leaves: the status it found. A lease that turned out
    to be taken from a dead run is handed back unfinished, for recovery."""
    if holding is not None and holding.lease.attempts > 1:
        return "running", None
    if before is not None and before.status in FINISHED:
        return before.status, before.error
    return "done", None


def _last_save_lets_go(
    saves: Sequence[StepSave], before: RunInfo | None, holding: _lease.Holding
) -> None:
    """An ``update_state``'s last save also lets go of the lease, in its transaction
    (``put_step_and_release``), when the status it leaves needs no error text (the save lets
    go of it with none): the common case, an update of a paused or finished run."""
    status, error = _status_kept(before, holding)
    if saves and error is None and status in FINISHED:
        saves[-1].release = (holding, status)


def _retain(saver: Any, thread_id: str, status: str) -> None:
    """Apply the saver's retention to a thread whose run just finished (lease still held)."""
    retention = saver.retention
    if retention is None:
        return
    if status == "done" and retention.delete_on_completion:
        saver.delete_thread(thread_id)
    elif retention.keep_last is not None and status != "cancelled":
        saver.prune([thread_id], keep_last=retention.keep_last)


async def _aretain(saver: Any, thread_id: str, status: str) -> None:
    retention = saver.retention
    if retention is None:
        return
    if status == "done" and retention.delete_on_completion:
        await saver.adelete_thread(thread_id)
    elif retention.keep_last is not None and status != "cancelled":
        await saver.aprune([thread_id], keep_last=retention.keep_last)


async def _while_running(
    step: Coroutine[Any, Any, None], loop: RunLoop
) -> AsyncIterator[tuple[str, Any]]:
    """Run a step, handing out the chunks its nodes write as they come."""
    signal = asyncio.Event()
    event_loop = asyncio.get_running_loop()
    # Nodes may write from worker threads, so wake the stream thread-safely.
    loop.on_output = lambda: event_loop.call_soon_threadsafe(signal.set)
    running = asyncio.ensure_future(step)
    try:
        while loop.output:  # made before the step started: its tasks' start events
            yield loop.output.popleft()
        while not running.done():
            waiter = asyncio.ensure_future(signal.wait())
            await asyncio.wait({running, waiter}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            signal.clear()
            while loop.output:
                yield loop.output.popleft()
        running.result()
    finally:
        loop.on_output = None
        if not running.done():
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running


def _live_steps(loop: RunLoop, subgraphs: bool) -> LiveSteps | None:
    """How a sync ``stream`` runs its steps. As in LangGraph, every step is live (its chunks
    handed out while it runs) when a node may stream from inside (``custom``) or subgraphs
    stream into it; with ``updates``/``tasks``/``debug``, the steps of several tasks are
    (a finished task's chunks come before its siblings end). Other steps, and every step for
    the other modes, whose chunks all come at the step's end, run on the consumer's thread:
    no hand-off to pay."""
    modes = loop.stream_modes
    if "custom" in modes or (subgraphs and loop.parent_task is None):
        live = LiveSteps(1)
    elif modes & {"updates", "tasks", "debug"}:
        live = LiveSteps(2)
    else:
        return None
    loop.output = live.output
    return live


class _Waking(deque[Any]):
    """An ``astream``'s output: adding a chunk while a step runs live (from a node, a task that
    finished, a subgraph's run) wakes the consumer (``RunLoop.on_output``)."""

    def __init__(self, loop: RunLoop) -> None:
        super().__init__()
        self._loop = loop

    def append(self, chunk: Any) -> None:
        super().append(chunk)
        wake = self._loop.on_output
        if wake is not None:
            wake()


class _Forwarding(deque[Any]):
    """The output of a subgraph run with ``invoke`` under a root streaming subgraphs: each
    chunk goes to the root's stream the moment it is made (a live root hands it out while the
    subgraph's step still runs, as LangGraph does), tagged with the subgraph's namespace."""

    def __init__(self, loop: RunLoop) -> None:
        super().__init__()
        assert loop.forward_to is not None
        self._to = loop.forward_to
        self._namespace = tuple(loop.namespace.split("|"))

    def append(self, chunk: Any) -> None:
        self._to.append((*chunk, self._namespace))


def _keys(channels: Sequence[str]) -> tuple[str, ...]:
    return channels if isinstance(channels, OneChannel) else tuple(channels)


def _teeing(loop: RunLoop, stream_mode: Any) -> tuple[frozenset[str], bool]:
    """The modes a ``stream`` call yields to its caller, and whether its run is a graph run in a
    node under a root streaming subgraphs, whose chunks of the root's modes go there too."""
    own = _modes(stream_mode) | loop.printed_modes
    return own, loop.parent_task is not None and loop.forward_to is not None


def _pass_on(loop: RunLoop, chunk: tuple[str, Any]) -> None:
    """A chunk an ``invoke`` made: a subgraph's goes to the root stream, else a debug print."""
    if loop.forward_to is not None:
        loop.forward_to.append((*chunk, tuple(loop.namespace.split("|"))))
    else:
        _print_event(chunk[1])  # only debug events reach here


def _names_another_thread(config: RunnableConfig | None, parent: Task) -> bool:
    thread = ((config or {}).get("configurable") or {}).get("thread_id")
    return thread is not None and thread != parent.config["configurable"].get("thread_id")


def _nested_config(parent: Task, *, recast: bool, config: RunnableConfig | None) -> RunnableConfig:
    """The run's config for a graph run inside ``parent``'s task: the parent's thread, and the
    namespace ``<parent ns>|<node>:<task id>`` (``<node>`` alone with ``checkpointer=True``, so
    its state outlives the task)."""
    namespace = parent.config["configurable"]["checkpoint_ns"]
    if parent.subgraph_calls:  # a later graph run by the same task (LangGraph's naming)
        namespace = f"{namespace}|{parent.subgraph_calls}"
    parent.subgraph_calls += 1
    if recast:
        namespace = "|".join(part.split(":")[0] for part in namespace.split("|"))
    merged = merge_configs(parent.loop.config, config)
    if config and (tags := config.get("tags")):
        # A node passes its own config on, tags included: as LangGraph, tags the parent's run
        # already has are not added twice.
        inherited = parent.loop.config.get("tags") or []
        merged["tags"] = [*inherited, *(tag for tag in tags if tag not in inherited)]
    configurable = {
        k: v for k, v in (merged.get("configurable") or {}).items() if k != "checkpoint_id"
    }
    merged["configurable"] = {**configurable, "checkpoint_ns": namespace}
    return merged


def _print_event(event: dict[str, Any]) -> None:
    """One line per debug event, for ``debug=True``."""
    payload = event.get("payload", {})
    name = payload.get("name") or ", ".join(payload.get("next", ())) or "-"
    detail = payload.get("result", payload.get("values", ""))
    print(f"[{event.get('step')}:{event.get('type')}] {name} {detail}")


def _durability(durability: Durability | None, kwargs: dict[str, Any]) -> Durability | None:
    """LangGraph's deprecated ``checkpoint_during`` still chooses the mode when given."""
    during = kwargs.pop("checkpoint_during", None)
    if durability is None and during is not None:
        return "async" if during else "exit"
    return durability


def _coerce_context(schema: Any, context: Any) -> Any:
    """A dict given as ``context=`` made into the graph's ``context_schema``, as LangGraph
    does when the schema is a dataclass or a pydantic model (a TypedDict stays a dict)."""
    if not isinstance(context, dict) or not isinstance(schema, type):
        return context
    if dataclasses.is_dataclass(schema):
        return schema(**context)
    validate = getattr(schema, "model_validate", None)  # pydantic v2
    return validate(context) if callable(validate) else context


def _is_live(config: RunnableConfig) -> bool:
    """``get_state`` of the thread's latest checkpoint shows progress made since."""
    return not (config.get("configurable") or {}).get("checkpoint_id")


def _final_output(loop: RunLoop, version: StreamVersion = "v1") -> Any:
    if loop.output_changed or loop.resuming or loop.interrupts:
        values = read_channels(loop.channels, loop.output_keys or loop.graph.output_channels)
    else:
        values = None  # nothing was ever output: LangGraph's invoke has no values chunk to give
    if version == "v2":
        return GraphOutput(_as_output(loop.graph, values), tuple(loop.interrupts))
    if loop.interrupts:
        return with_interrupts(values, list(loop.interrupts))
    return values


def _check_version(version: str) -> None:
    if version not in ("v1", "v2"):
        raise ValueError(f"Unknown version {version!r}: use 'v1' or 'v2'")


def _as_output(graph: Pregel, values: Any) -> Any:
    """``version="v2"``: a whole output as the output schema's object (dataclass,
    pydantic), as LangGraph gives it."""
    mapper = graph.output_mapper
    return mapper(values) if mapper is not None and isinstance(values, dict) else values


def _v2_part(graph: Pregel, item: tuple[Any, ...]) -> dict[str, Any]:
    """A chunk as a ``version="v2"`` stream part (``types.StreamPart``)."""
    mode, payload = item[0], item[1]
    namespace = item[2] if len(item) > 2 else ()
    if mode == "values":
        interrupts: tuple[Interrupt, ...] = ()
        if isinstance(payload, dict) and INTERRUPT in payload:
            payload = dict(payload)
            interrupts = tuple(payload.pop(INTERRUPT))
        if not namespace:  # a subgraph's state is not the root's output schema
            payload = _as_output(graph, payload)
        return {"type": mode, "ns": namespace, "data": payload, "interrupts": interrupts}
    if mode in ("checkpoints", "debug") and not namespace and graph.state_mapper is not None:
        payload = _with_state_objects(payload, graph.state_mapper)
    return {"type": mode, "ns": namespace, "data": payload}


def _with_state_objects(payload: Any, mapper: Callable[[Any], Any]) -> Any:
    """A checkpoint (or debug checkpoint) event whose ``values`` are the state schema's object,
    but for the input's checkpoint (``next`` is ``__start__``: the state is not whole yet)."""
    if not isinstance(payload, dict):
        return payload
    if payload.get("type") == "checkpoint" and isinstance(payload.get("payload"), dict):
        return {**payload, "payload": _with_state_objects(payload["payload"], mapper)}
    values = payload.get("values")
    if isinstance(values, dict) and START not in payload.get("next", ()):
        return {**payload, "values": mapper(values)}
    return payload


def _breakpoints(requested: Any, compiled: tuple[str, ...]) -> tuple[str, ...]:
    if not requested:  # None or empty: the compiled ones, as in LangGraph
        return compiled
    return ("*",) if requested == "*" else tuple(requested)


def _last_writer(loop: RunLoop) -> str:
    """The node that wrote last, for ``update_state`` without ``as_node``."""
    graph = loop.graph
    latest: dict[str, Any] = {}
    for name, seen in loop.versions_seen.items():
        if name in graph.update_writers and seen:
            latest[name] = max(seen.values())
    if not latest:
        return START
    newest = max(latest.values())
    writers = [name for name, version in latest.items() if version == newest]
    if len(writers) > 1:
        raise InvalidUpdateError("Ambiguous update, specify as_node")
    return writers[0]


def _paused(tasks: Sequence[Task]) -> tuple[Interrupt, ...] | None:
    """The interrupts the step's nodes paused on (None if none paused; a subgraph's breakpoint
    pauses on none); raises the first failure, which wins."""
    interrupts: tuple[Interrupt, ...] | None = None
    for task in tasks:
        if task.error is not None:
            raise task.error
        if task.paused:
            interrupts = (interrupts or ()) + task.interrupts
    return interrupts


def _modes(stream_mode: Any) -> frozenset[str]:
    modes = frozenset([stream_mode] if isinstance(stream_mode, str) else stream_mode)
    unknown = modes - _STREAM_MODES
    if unknown:
        # "messages" streams LangChain chat-model tokens; stepgraph has no LangChain layer.
        raise ValueError(
            f"Unsupported stream_mode {sorted(unknown)}; use one of {sorted(_STREAM_MODES)}"
        )
    return modes


def _chunk_shape(
    stream_mode: Any, subgraphs: bool, version: str = "v1", graph: Pregel | None = None
) -> Callable[[tuple[Any, ...]], Any]:
    """Chunks as the caller sees them; with ``subgraphs``, a subgraph's chunk carries its
    namespace as a third item. ``version="v2"``: every chunk is a typed part."""
    _check_version(version)
    if version == "v2" and graph is not None:
        return functools.partial(_v2_part, graph)
    if isinstance(stream_mode, str):
        if subgraphs:
            return lambda item: (item[2] if len(item) > 2 else (), item[1])
        return lambda item: item[1]
    if subgraphs:
        return lambda item: (item[2] if len(item) > 2 else (), item[0], item[1])
    return lambda item: item


def _batch_configs(
    config: RunnableConfig | Sequence[RunnableConfig] | None, count: int
) -> list[RunnableConfig | None]:
    if config is None or isinstance(config, dict):
        return [config] * count
    configs = list(config)
    if len(configs) != count:
        raise ValueError("batch: pass one config, or one per input")
    return configs  # type: ignore[return-value]
