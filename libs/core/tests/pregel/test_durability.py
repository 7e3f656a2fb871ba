"""What each durability mode has saved at each point of a run, and resuming after failures."""

from __future__ import annotations

import asyncio
import operator
import threading
import time
from collections.abc import Callable, Sequence
from typing import Annotated, Any, TypedDict

import pytest
from pydantic import BaseModel, ValidationError

from stepgraph.checkpoint.base import TaskWrites
from stepgraph.checkpoint.memory import InMemorySaver
from stepgraph.errors import SerializationError
from stepgraph.graph import START, StateGraph


class State(TypedDict):
    x: int
    log: Annotated[list[str], operator.add]


class CountingSaver(InMemorySaver):
    """InMemorySaver that records each call; ``delay`` slows every save down."""

    background_saves = True  # it stands in for a saver that waits on I/O

    def __init__(self, delay: float = 0.0, fail_on_put: int | None = None) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.delay = delay
        self.fail_on_put = fail_on_put
        self.lock = threading.Lock()
        self._inside = threading.local()

    def _record(self, name: str) -> None:
        with self.lock:
            self.calls.append(name)
            puts = sum(1 for c in self.calls if c in ("put", "put_step", "put_steps"))
        if self.delay:
            time.sleep(self.delay)
        if self.fail_on_put is not None and puts >= self.fail_on_put and name != "put_writes":
            raise OSError("disk full")

    def _outermost(self, name: str, save: Callable[[], Any]) -> Any:
        """Record the call the run made, not the ones InMemorySaver makes to implement it (its
        ``put`` may be a ``put_step`` without writes, or the other way round)."""
        if getattr(self._inside, "saving", False):
            return save()
        self._record(name)
        self._inside.saving = True
        try:
            return save()
        finally:
            self._inside.saving = False

    def put(self, config, checkpoint, metadata, new_versions):  # type: ignore[no-untyped-def]
        return self._outermost(
            "put",
            lambda: super(CountingSaver, self).put(config, checkpoint, metadata, new_versions),
        )

    def put_writes(self, config, writes, task_id, task_path=""):  # type: ignore[no-untyped-def]
        return self._outermost(
            "put_writes",
            lambda: super(CountingSaver, self).put_writes(config, writes, task_id, task_path),
        )

    def put_writes_batch(self, config, writes):  # type: ignore[no-untyped-def]
        return self._outermost(
            "put_writes_batch",
            lambda: super(CountingSaver, self).put_writes_batch(config, writes),
        )

    def put_step(self, config, writes: Sequence[TaskWrites], checkpoint, metadata, new_versions):  # type: ignore[no-untyped-def]
        return self._outermost(
            "put_step",
            lambda: super(CountingSaver, self).put_step(
                config, writes, checkpoint, metadata, new_versions
            ),
        )

    def put_steps(self, config, steps, **release):  # type: ignore[no-untyped-def]
        return self._outermost(
            "put_steps",
            lambda: super(CountingSaver, self).put_steps(config, steps, **release),
        )

    async def aput(self, config, checkpoint, metadata, new_versions):  # type: ignore[no-untyped-def]
        return self.put(config, checkpoint, metadata, new_versions)

    async def aput_steps(self, config, steps, **release):  # type: ignore[no-untyped-def]
        return self.put_steps(config, steps, **release)

    async def aput_writes(self, config, writes, task_id, task_path=""):  # type: ignore[no-untyped-def]
        return self.put_writes(config, writes, task_id, task_path)

    async def aput_writes_batch(self, config, writes):  # type: ignore[no-untyped-def]
        return self.put_writes_batch(config, writes)

    async def aput_step(self, config, writes, checkpoint, metadata, new_versions):  # type: ignore[no-untyped-def]
        return self.put_step(config, writes, checkpoint, metadata, new_versions)

    def stored(self, thread_id: str) -> int:
        return len(list(self.list({"configurable": {"thread_id": thread_id}})))


def config(thread_id: str) -> dict[str, Any]:
    return {"configurable": {"thread_id": thread_id}}


def chain_graph(saver: Any, steps: int, observe: Any = None, fail_at: int | None = None) -> Any:
    """A chain of nodes n0..n{steps-1}; ``observe(i)`` runs inside node i."""
    builder = StateGraph(State)
    for i in range(steps):

        def node(state: State, i: int = i) -> dict[str, Any]:
            if observe is not None:
                observe(i)
            if fail_at == i:
                raise RuntimeError(f"node {i} failed")
            return {"x": state["x"] + 1, "log": [f"n{i}"]}

        builder.add_node(f"n{i}", node)
    builder.add_edge(START, "n0")
    for i in range(steps - 1):
        builder.add_edge(f"n{i}", f"n{i + 1}")
    return builder.compile(checkpointer=saver)


def test_sync_commits_each_step_in_one_put_step_before_the_next() -> None:
    saver = CountingSaver()
    seen: list[int] = []
    graph = chain_graph(saver, 3, observe=lambda i: seen.append(saver.stored("t")))
    assert graph.invoke({"x": 0, "log": []}, config("t"), durability="sync")["x"] == 3
    # Node i runs after the input checkpoint, the __start__ step and i node steps are stored.
    assert seen == [2, 3, 4]
    # The input's checkpoint with the __start__ step: one put_steps. Each one-task step (n0,
    # n1, n2): one put_step. No put_writes.
    assert saver.calls == ["put_steps", "put_step", "put_step", "put_step"]
    assert saver.stored("t") == 5


@pytest.mark.parametrize("mode", ["checkpoints", "debug"])
def test_sync_streams_only_checkpoints_already_saved(mode: str) -> None:
    """A stream that tells of each checkpoint as it is made tells of saved ones only: the
    input's checkpoint is then saved before START's step, not with it."""
    saver = CountingSaver()
    graph = chain_graph(saver, 2)
    found = []
    for chunk in graph.stream(
        {"x": 0, "log": []}, config("s"), stream_mode=mode, durability="sync"
    ):
        if mode == "debug":
            if chunk["type"] != "checkpoint":
                continue
            chunk = chunk["payload"]
        found.append(saver.get_tuple(chunk["config"]) is not None)
    assert found == [True] * 4
    assert saver.calls == ["put", "put_step", "put_step", "put_step"]


def test_sync_saves_the_input_apart_when_start_routes() -> None:
    """A conditional edge from START runs the user's routing function in START's step: the
    input's checkpoint is saved before it, on its own."""
    saver = CountingSaver()
    builder = StateGraph(State)
    builder.add_node("n0", lambda state: {"x": state["x"] + 1})
    builder.add_conditional_edges(START, lambda state: "n0")
    graph = builder.compile(checkpointer=saver)
    assert graph.invoke({"x": 0, "log": []}, config("r"), durability="sync")["x"] == 1
    assert saver.calls == ["put", "put_step", "put_step"]


class Strict(BaseModel):
    x: int
    log: Annotated[list[str], operator.add] = []


def test_sync_saves_the_input_before_a_start_step_that_fails() -> None:
    """An input that fails validation fails START's step: the input's checkpoint is saved,
    then the error against it, and the thread resumes from there."""
    saver = CountingSaver()
    builder = StateGraph(Strict)
    builder.add_node("n0", lambda state: {"log": ["n0"]})
    builder.add_edge(START, "n0")
    graph = builder.compile(checkpointer=saver)
    with pytest.raises(ValidationError):
        graph.invoke({"x": "not a number"}, config("v"), durability="sync")
    assert saver.calls == ["put", "put_writes"]
    state = graph.get_state(config("v"))
    assert state.next == (START,) and state.metadata["source"] == "input"
    assert [task.error is not None for task in state.tasks] == [True]


def test_sync_saves_the_input_with_a_start_step_that_ends_the_run() -> None:
    """A run stopped by a breakpoint right after START's step saves both in one call."""
    saver = CountingSaver()
    builder = StateGraph(State)
    builder.add_node("n0", lambda state: {"log": ["n0"]})
    builder.add_edge(START, "n0")
    graph = builder.compile(checkpointer=saver, interrupt_before=["n0"])
    graph.invoke({"x": 0, "log": []}, config("b"), durability="sync")
    assert saver.calls == ["put_steps"]
    assert graph.get_state(config("b")).next == ("n0",)


def test_sync_parallel_step_saves_each_task_as_it_finishes() -> None:
    saver = CountingSaver()
    builder = StateGraph(State)
    builder.add_node("slow", lambda s: (time.sleep(0.05), {"log": ["slow"]})[1])
    builder.add_node("fast", lambda s: {"log": ["fast"]})
    builder.add_edge(START, "slow")
    builder.add_edge(START, "fast")
    graph = builder.compile(checkpointer=saver)
    graph.invoke({"x": 0}, config("p"), durability="sync")
    # The task that finished first was saved at once; the last one went with the checkpoint.
    assert saver.calls == ["put_steps", "put_writes", "put_step"]


class NotAllowed:
    pass


def group_commit_graph(saver: Any, is_async: bool, bad: str = "") -> Any:
    """A step of five tasks: ``first`` finishes at once, three more while its save is in
    flight (the saver sleeps 0.1 s per call), ``last`` long after. Task ``bad`` writes a value
    the serializer refuses."""
    builder = StateGraph(State)
    delays = {"first": 0.0, "a": 0.02, "b": 0.02, "c": 0.02, "last": 0.4}
    for name, delay in delays.items():
        if is_async:

            async def node(state: State, name: str = name, delay: float = delay) -> Any:
                await asyncio.sleep(delay)
                return {"log": [NotAllowed() if name == bad else name]}

        else:

            def node(state: State, name: str = name, delay: float = delay) -> Any:  # type: ignore[misc]
                time.sleep(delay)
                return {"log": [NotAllowed() if name == bad else name]}

        builder.add_node(name, node)
        builder.add_edge(START, name)
    return builder.compile(checkpointer=saver)


@pytest.mark.parametrize("is_async", [False, True])
def test_sync_tasks_finishing_during_a_save_are_saved_together(is_async: bool) -> None:
    saver = CountingSaver()
    graph = group_commit_graph(saver, is_async)
    if is_async:
        put_writes = saver.aput_writes

        async def slow_put_writes(*args: Any) -> None:
            await asyncio.sleep(0.1)
            await put_writes(*args)

        saver.aput_writes = slow_put_writes  # type: ignore[method-assign]
        result = asyncio.run(graph.ainvoke({"x": 0}, config("g"), durability="sync"))
    else:
        put_writes = saver.put_writes

        def slow_put_writes(*args: Any) -> None:
            time.sleep(0.1)
            put_writes(*args)

        saver.put_writes = slow_put_writes  # type: ignore[method-assign]
        result = graph.invoke({"x": 0}, config("g"), durability="sync")
    assert result["log"] == ["a", "b", "c", "first", "last"]  # applied by node name
    # ``first`` was saved alone; a, b and c finished meanwhile and went in one batch; the
    # last task's writes went with the checkpoint.
    assert saver.calls == ["put_steps", "put_writes", "put_writes_batch", "put_step"]
    state = graph.get_state(config("g"))
    assert state.values["log"] == ["a", "b", "c", "first", "last"]
    parent = saver.get_tuple(state.parent_config)
    assert parent is not None
    assert sorted(v for _, c, v in parent.pending_writes if c == "log") == [
        ["a"],
        ["b"],
        ["c"],
        ["first"],
        ["last"],
    ]


def test_a_failed_group_save_saves_each_task_on_its_own() -> None:
    saver = CountingSaver()
    graph = group_commit_graph(saver, False, bad="b")
    put_writes = saver.put_writes

    def slow_put_writes(*args: Any) -> None:
        time.sleep(0.1)
        put_writes(*args)

    saver.put_writes = slow_put_writes  # type: ignore[method-assign]
    with pytest.raises(SerializationError, match="log"):
        graph.invoke({"x": 0}, config("f"), durability="sync")
    assert saver.calls[:3] == ["put_steps", "put_writes", "put_writes_batch"]
    state = graph.get_state(config("f"))
    assert state.next == ("b",)  # only the task whose writes could not be saved runs again
    saved = saver.get_tuple(config("f"))
    assert saved is not None
    assert sorted(v[0] for _, c, v in saved.pending_writes if c == "log") == [
        "a",
        "c",
        "first",
        "last",
    ]


def test_async_saves_everything_before_returning_and_bounds_the_queue() -> None:
    saver = CountingSaver(delay=0.01)
    lag: list[int] = []
    steps = 8

    def observe(i: int) -> None:
        # Node i runs in step i+1, after i+2 finished steps (the input, __start__, n0..n{i-1})
        # of which at most one is missing from the store: one save is in flight.
        lag.append((i + 2) - saver.stored("a"))

    graph = chain_graph(saver, steps, observe=observe)
    assert graph.invoke({"x": 0}, config("a"))["x"] == steps  # async is the default
    assert saver.stored("a") == steps + 2
    assert max(lag) <= 1
    # In the background the input's checkpoint is saved on its own, not with __start__'s.
    assert saver.calls[:2] == ["put", "put_step"]


def test_async_background_failure_fails_the_call() -> None:
    saver = CountingSaver(fail_on_put=3)
    graph = chain_graph(saver, 5)
    with pytest.raises(OSError, match="disk full"):
        graph.invoke({"x": 0}, config("f"), durability="async")


def test_exit_writes_only_at_the_end() -> None:
    saver = CountingSaver()
    seen: list[int] = []
    graph = chain_graph(saver, 3, observe=lambda i: seen.append(saver.stored("e")))
    assert graph.invoke({"x": 0}, config("e"), durability="exit")["x"] == 3
    assert seen == [0, 0, 0]
    assert saver.calls == ["put"]
    snapshot = graph.get_state(config("e"))
    assert snapshot.values == {"x": 3, "log": ["n0", "n1", "n2"]}
    assert snapshot.next == ()
    assert snapshot.metadata["step"] == 3


def test_exit_on_exception_saves_checkpoint_and_error_then_resumes() -> None:
    saver = CountingSaver()
    runs: list[int] = []
    fail = {"at": 2}

    def observe(i: int) -> None:
        runs.append(i)
        if fail["at"] == i:
            raise RuntimeError("boom")

    graph = chain_graph(saver, 4, observe=observe)
    with pytest.raises(RuntimeError, match="boom"):
        graph.invoke({"x": 0}, config("x"), durability="exit")
    assert saver.calls == ["put", "put_writes"]
    snapshot = graph.get_state(config("x"))
    assert snapshot.next == ("n2",)
    assert snapshot.values["x"] == 2
    assert snapshot.tasks[0].error == "RuntimeError('boom')"
    fail["at"] = -1
    assert graph.invoke(None, config("x"), durability="exit")["x"] == 4
    assert runs == [0, 1, 2, 2, 3]


@pytest.mark.parametrize("mode", ["sync", "async", "exit"])
def test_resume_after_failure_reruns_only_unfinished_tasks(mode: str) -> None:
    saver = CountingSaver()
    calls = {"ok": 0, "flaky": 0, "after": 0}
    fail = {"on": True}

    def ok(state: State) -> dict[str, Any]:
        calls["ok"] += 1
        return {"log": ["ok"]}

    def flaky(state: State) -> dict[str, Any]:
        calls["flaky"] += 1
        time.sleep(0.02)  # finishes after `ok`
        if fail["on"]:
            raise RuntimeError("flaky failed")
        return {"log": ["flaky"]}

    def after(state: State) -> dict[str, Any]:
        calls["after"] += 1
        return {"log": ["after"]}

    builder = StateGraph(State)
    builder.add_node("ok", ok)
    builder.add_node("flaky", flaky)
    builder.add_node("after", after)
    builder.add_edge(START, "ok")
    builder.add_edge(START, "flaky")
    builder.add_edge(["ok", "flaky"], "after")
    graph = builder.compile(checkpointer=saver)
    with pytest.raises(RuntimeError):
        graph.invoke({"x": 0}, config(mode), durability=mode)
    # A failed step makes no new checkpoint: the latest is the one before the step. Like
    # LangGraph, the live state shows the finished task's writes and only the rest as next.
    snapshot = graph.get_state(config(mode))
    assert snapshot.next == ("flaky",)
    assert snapshot.values["log"] == ["ok"]
    errors = {t.name: t.error for t in snapshot.tasks}
    assert errors == {"ok": None, "flaky": "RuntimeError('flaky failed')"}
    # Addressed by id, the checkpoint is shown as a record of its step.
    record = graph.get_state(snapshot.config)
    assert set(record.next) == {"ok", "flaky"}
    assert record.values["log"] == []
    fail["on"] = False
    result = graph.invoke(None, config(mode), durability=mode)
    assert result["log"] == ["flaky", "ok", "after"]  # a step's writes by node name
    assert calls == {"ok": 1, "flaky": 2, "after": 1}


def test_exit_on_keyboard_interrupt_saves_progress() -> None:
    saver = CountingSaver()

    def observe(i: int) -> None:
        if i == 1:
            raise KeyboardInterrupt

    graph = chain_graph(saver, 3, observe=observe)
    with pytest.raises(KeyboardInterrupt):
        graph.invoke({"x": 0}, config("k"), durability="exit")
    snapshot = graph.get_state(config("k"))
    assert snapshot.next == ("n1",)
    assert snapshot.values["x"] == 1


async def test_exit_on_cancellation_saves_progress() -> None:
    saver = CountingSaver()
    started = asyncio.Event()

    async def quick(state: State) -> dict[str, Any]:
        return {"x": state["x"] + 1}

    async def hang(state: State) -> dict[str, Any]:
        started.set()
        await asyncio.sleep(60)
        return {}

    builder = StateGraph(State)
    builder.add_node("quick", quick)
    builder.add_node("hang", hang)
    builder.add_edge(START, "quick")
    builder.add_edge("quick", "hang")
    graph = builder.compile(checkpointer=saver)
    run = asyncio.create_task(graph.ainvoke({"x": 0}, config("c"), durability="exit"))
    await started.wait()
    assert saver.stored("c") == 0
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    snapshot = await graph.aget_state(config("c"))
    assert snapshot.next == ("hang",)
    assert snapshot.values == {"x": 1, "log": []}


@pytest.mark.parametrize("mode", ["sync", "async", "exit"])
async def test_async_api_durability_modes(mode: str) -> None:
    saver = CountingSaver()
    graph = chain_graph(saver, 3)
    result = await graph.ainvoke({"x": 0}, config(mode), durability=mode)
    assert result["x"] == 3
    assert saver.stored(mode) == (5 if mode != "exit" else 1)
    if mode == "sync":
        assert saver.calls == ["put_steps", "put_step", "put_step", "put_step"]


async def test_async_api_bounds_the_queue_and_surfaces_failures() -> None:
    saver = CountingSaver(delay=0.01)
    lag: list[int] = []
    graph = chain_graph(saver, 6, observe=lambda i: lag.append((i + 2) - saver.stored("q")))
    assert (await graph.ainvoke({"x": 0}, config("q")))["x"] == 6
    assert saver.stored("q") == 8
    assert max(lag) <= 1  # as in the sync API's test

    failing = chain_graph(CountingSaver(fail_on_put=2), 4)
    with pytest.raises(OSError, match="disk full"):
        await failing.ainvoke({"x": 0}, config("q2"))


async def test_async_api_saves_each_parallel_task_as_it_finishes() -> None:
    saver = CountingSaver()
    fast_saved = asyncio.Event()

    async def slow(state: State) -> dict[str, Any]:
        # Finishes only once the fast task's writes are in the store.
        await asyncio.wait_for(fast_saved.wait(), timeout=5)
        return {"log": ["slow"]}

    async def fast(state: State) -> dict[str, Any]:
        return {"log": ["fast"]}

    original = saver.put_writes

    def put_writes(*args: Any, **kwargs: Any) -> None:
        original(*args, **kwargs)
        fast_saved.set()

    saver.put_writes = put_writes  # type: ignore[method-assign]
    builder = StateGraph(State)
    builder.add_node("slow", slow)
    builder.add_node("fast", fast)
    builder.add_edge(START, "slow")
    builder.add_edge(START, "fast")
    graph = builder.compile(checkpointer=saver)
    result = await graph.ainvoke({"x": 0}, config("ap"), durability="sync")
    assert result["log"] == ["fast", "slow"]  # applied by node name
    assert saver.calls == ["put_steps", "put_writes", "put_step"]


def test_checkpoint_during_picks_the_mode() -> None:
    saver = CountingSaver()
    graph = chain_graph(saver, 2)
    graph.invoke({"x": 0}, config("cd"), checkpoint_during=False)
    assert saver.calls == ["put"]  # exit


@pytest.mark.parametrize("api", ["sync", "async"])
async def test_async_durability_saves_inline_for_a_cpu_only_saver(api: str) -> None:
    """InMemorySaver has no I/O to overlap: with durability="async" each checkpoint is stored
    before the next node runs, as with "sync", and no save runs on another thread."""
    saver = InMemorySaver()
    threads: set[str] = set()
    stored: list[int] = []
    original = saver.put_step

    def put_step(*args: Any) -> Any:
        threads.add(threading.current_thread().name)
        return original(*args)

    saver.put_step = put_step  # type: ignore[method-assign]
    graph = chain_graph(
        saver, 3, observe=lambda i: stored.append(len(list(saver.list(config("i")))))
    )
    if api == "sync":
        result = graph.invoke({"x": 0, "log": []}, config("i"), durability="async")
    else:
        result = await graph.ainvoke({"x": 0, "log": []}, config("i"), durability="async")
    assert result["x"] == 3
    assert stored == [2, 3, 4]
    assert threads == {threading.current_thread().name}
