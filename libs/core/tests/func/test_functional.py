"""The functional API: @task calls recorded and replayed, @entrypoint runs and state."""

from __future__ import annotations

import asyncio
import operator
import time
import uuid
from typing import Annotated, Any, TypedDict

import pytest

from stepgraph.checkpoint.memory import InMemorySaver
from stepgraph.config import RunnableConfig
from stepgraph.func import TaskFuture, entrypoint, task
from stepgraph.graph import START, StateGraph
from stepgraph.types import Command, RetryPolicy, StreamWriter, interrupt


def thread() -> dict[str, Any]:
    return {"configurable": {"thread_id": str(uuid.uuid4())}}


def test_task_outside_a_run_is_a_clear_error() -> None:
    @task
    def double(x: int) -> int:
        return 2 * x

    with pytest.raises(RuntimeError, match="outside of a run"):
        double(1)


def test_entrypoint_runs_tasks_in_parallel_and_streams_their_results() -> None:
    @task
    def double(x: int) -> int:
        return 2 * x

    @task(name="total")
    def add(values: list[int]) -> int:
        return sum(values)

    @entrypoint()
    def workflow(numbers: list[int]) -> int:
        futures = [double(n) for n in numbers]
        assert all(isinstance(f, TaskFuture) for f in futures)
        return add([f.result() for f in futures]).result()

    assert workflow.invoke([1, 2, 3]) == 12
    chunks = list(workflow.stream([1, 2], stream_mode="updates"))
    assert sorted(chunks[:2], key=str) == [{"double": 2}, {"double": 4}]
    assert chunks[2:] == [{"total": 6}, {"workflow": 6}]
    assert list(workflow.stream([5], stream_mode="values")) == [10]


async def test_async_entrypoint_awaits_async_and_sync_tasks() -> None:
    @task
    async def slow_double(x: int) -> int:
        await asyncio.sleep(0)
        return 2 * x

    @task
    def plus_one(x: int) -> int:
        return x + 1

    @entrypoint(checkpointer=InMemorySaver())
    async def workflow(n: int) -> int:
        doubled = await asyncio.gather(*(slow_double(i) for i in range(n)))
        return await plus_one(sum(doubled))

    config = thread()
    assert await workflow.ainvoke(3, config) == 7
    assert [c async for c in workflow.astream(2, thread(), stream_mode="values")] == [3]
    assert (await workflow.aget_state(config)).values == 7


def test_previous_and_final() -> None:
    @entrypoint(checkpointer=InMemorySaver())
    def counter(step: int, *, previous: Any = None) -> entrypoint.final[int, int]:
        total = (previous or 0) + step
        return entrypoint.final(value=total * 10, save=total)

    config = thread()
    assert counter.invoke(1, config) == 10
    assert counter.invoke(2, config) == 30  # previous == 1
    assert counter.invoke(5, config) == 80  # previous == 3
    assert counter.get_state(config).values == 80
    history = list(counter.get_state_history(config))
    assert [s.metadata["source"] for s in history[:2]] == ["loop", "input"]
    # Another thread starts without a previous value.
    assert counter.invoke(1, thread()) == 10


def test_finished_tasks_are_not_run_again_after_an_error() -> None:
    runs: list[str] = []
    fail = [True]

    @task
    def first(x: int) -> int:
        runs.append("first")
        return x + 1

    @task
    def second(x: int) -> int:
        runs.append("second")
        if fail[0]:
            raise ConnectionError("flaky")
        return x * 10

    @entrypoint(checkpointer=InMemorySaver())
    def workflow(x: int) -> int:
        return second(first(x).result()).result()

    config = thread()
    with pytest.raises(ConnectionError):
        workflow.invoke(1, config)
    snapshot = workflow.get_state(config)
    assert snapshot.next == ("workflow",)
    assert "ConnectionError" in snapshot.tasks[0].error
    fail[0] = False
    assert workflow.invoke(None, config) == 20
    # The failed task runs again (as in LangGraph); the finished one returned its saved result.
    assert runs == ["first", "second", "second"]


def test_interrupt_in_entrypoint_replays_recorded_tasks() -> None:
    runs: list[str] = []

    @task
    def draft(topic: str) -> str:
        runs.append("draft")
        return f"essay about {topic}"

    @task
    def publish(text: str) -> str:
        runs.append("publish")
        return text.upper()

    @entrypoint(checkpointer=InMemorySaver())
    def workflow(topic: str) -> dict[str, Any]:
        text = draft(topic).result()
        approved = interrupt({"review": text})
        second = interrupt("sure?")
        if approved and second:
            return {"published": publish(text).result()}
        return {"published": None}

    config = thread()
    result = workflow.invoke("cats", config)
    [paused] = result["__interrupt__"]
    assert paused.value == {"review": "essay about cats"}
    snapshot = workflow.get_state(config)
    assert snapshot.next == ("workflow",)
    assert snapshot.tasks[0].interrupts == (paused,)
    # Asking again without an answer interrupts with the same id.
    again = workflow.invoke(None, config)["__interrupt__"]
    assert [i.id for i in again] == [paused.id]
    second = workflow.invoke(Command(resume=True), config)["__interrupt__"]
    assert [i.value for i in second] == ["sure?"]
    assert second[0].id != paused.id
    assert workflow.invoke(Command(resume=True), config) == {"published": "ESSAY ABOUT CATS"}
    assert runs == ["draft", "publish"]


def test_interrupt_inside_a_task() -> None:
    runs: list[str] = []

    @task
    def ask(question: str) -> str:
        runs.append(question)
        return str(interrupt(question))

    @task
    def prepare() -> str:
        runs.append("prepare")
        return "ready"

    @entrypoint(checkpointer=InMemorySaver())
    def workflow(_: Any) -> list[str]:
        return [prepare().result(), ask("name?").result(), ask("age?").result()]

    config = thread()
    assert [i.value for i in workflow.invoke(0, config)["__interrupt__"]] == ["name?"]
    assert [i.value for i in workflow.invoke(Command(resume="Ada"), config)["__interrupt__"]] == [
        "age?"
    ]
    assert workflow.invoke(Command(resume=36), config) == ["ready", "Ada", "36"]
    # prepare ran once; each asking task ran once per attempt until answered.
    assert runs == ["prepare", "name?", "name?", "age?", "age?"]


def test_parallel_task_interrupts_resume_by_id() -> None:
    @task
    def ask(name: str) -> str:
        return f"{name}={interrupt(name)}"

    @entrypoint(checkpointer=InMemorySaver())
    def workflow(names: list[str]) -> list[str]:
        futures = [ask(n) for n in names]
        return [future.result() for future in futures]

    config = thread()
    first = workflow.invoke(["a", "b"], config)["__interrupt__"]
    assert [i.value for i in first] == ["a"]
    second = workflow.invoke(Command(resume="1"), config)["__interrupt__"]
    assert [i.value for i in second] == ["b"]
    # Both calls ran in parallel; the first one waited on pauses the run. Ids are distinct.
    assert second[0].id != first[0].id
    assert workflow.invoke(Command(resume={second[0].id: "2"}), config) == ["a=1", "b=2"]


def test_task_retry_policy() -> None:
    attempts: list[int] = []

    @task(retry_policy=RetryPolicy(max_attempts=3, initial_interval=0, jitter=False))
    def flaky() -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise ConnectionError("try again")
        return "ok"

    @entrypoint()
    def workflow(_: Any) -> str:
        return flaky().result()

    assert workflow.invoke(0) == "ok"
    assert len(attempts) == 3


def test_entrypoint_retry_policy_and_injected_arguments() -> None:
    attempts: list[int] = []

    @entrypoint(retry_policy=RetryPolicy(max_attempts=2, initial_interval=0, jitter=False))
    def workflow(
        x: int, *, config: RunnableConfig, runtime: Any, writer: StreamWriter
    ) -> dict[str, Any]:
        attempts.append(1)
        writer({"attempt": len(attempts)})
        if len(attempts) == 1:
            raise ConnectionError("once")
        return {"x": x, "ctx": runtime.context, "node": config["metadata"]["langgraph_node"]}

    chunks = list(workflow.stream(1, context="c", stream_mode=["custom", "values"]))
    assert chunks[-1] == ("values", {"x": 1, "ctx": "c", "node": "workflow"})
    assert ("custom", {"attempt": 2}) in chunks


class State(TypedDict):
    x: int
    log: Annotated[list[str], operator.add]


def test_tasks_in_a_state_graph_node_are_not_repeated_on_resume() -> None:
    runs: list[str] = []

    @task
    def side_effect(x: int) -> int:
        runs.append("side_effect")
        return x * 2

    def node(state: State) -> dict[str, Any]:
        doubled = side_effect(state["x"]).result()
        answer = interrupt(f"doubled to {doubled}, ok?")
        return {"x": doubled, "log": [f"answer={answer}"]}

    builder = StateGraph(State)
    builder.add_node("node", node)
    builder.add_edge(START, "node")
    graph = builder.compile(checkpointer=InMemorySaver())
    config = thread()
    result = graph.invoke({"x": 4, "log": []}, config)
    assert result["__interrupt__"][0].value == "doubled to 8, ok?"
    assert graph.invoke(Command(resume="yes"), config) == {"x": 8, "log": ["answer=yes"]}
    assert runs == ["side_effect"]


@pytest.mark.parametrize("durability", ["sync", "async", "exit"])
def test_durability_modes_keep_task_results(durability: str) -> None:
    runs: list[str] = []

    @task
    def once(x: int) -> int:
        runs.append("once")
        return x + 1

    @entrypoint(checkpointer=InMemorySaver())
    def workflow(x: int) -> int:
        y = once(x).result()
        return y + interrupt("more?")

    config = thread()
    workflow.invoke(1, config, durability=durability)
    assert workflow.invoke(Command(resume=10), config, durability=durability) == 12
    assert runs == ["once"]


def test_interrupted_workflow_survives_a_restart(reopen_store: Any) -> None:
    runs: list[str] = []

    def build() -> Any:
        @task
        def fetch(x: int) -> int:
            runs.append("fetch")
            return x + 1

        @entrypoint(checkpointer=reopen_store())
        def workflow(x: int, *, previous: Any = None) -> entrypoint.final[int, int]:
            fetched = fetch(x).result()
            extra = interrupt({"fetched": fetched})
            return entrypoint.final(value=fetched + extra, save=(previous or 0) + 1)

        return workflow

    config = thread()
    assert build().invoke(1, config)["__interrupt__"][0].value == {"fetched": 2}
    workflow = build()  # a new process
    assert workflow.get_state(config).tasks[0].interrupts[0].value == {"fetched": 2}
    assert workflow.invoke(Command(resume=40), config) == 42
    assert runs == ["fetch"]
    # The saved value (not the returned one) is the next run's previous.
    build().invoke(5, config)
    assert build().invoke(Command(resume=0), config) == 6
    assert next(s.values for s in build().get_state_history(config)) == 6


def test_each_task_result_is_saved_as_soon_as_the_task_finishes() -> None:
    saver = InMemorySaver()
    config = thread()
    seen: list[list[Any]] = []

    @task
    def first() -> str:
        return "one"

    @task
    def second() -> str:
        # The first call's result is already in the store while this one runs.
        saved = saver.get_tuple(config)
        seen.append([v for _, channel, v in saved.pending_writes if channel == "__return__"])
        return "two"

    @entrypoint(checkpointer=saver)
    def workflow(_: Any) -> list[str]:
        return [first().result(), second().result()]

    assert workflow.invoke(0, config, durability="sync") == ["one", "two"]
    assert seen == [["one"]]


async def test_async_task_interrupt_and_resume() -> None:
    runs: list[str] = []

    @task
    async def ask(question: str) -> str:
        runs.append(question)
        return f"{question}{interrupt(question)}"

    @task
    async def prepare() -> str:
        runs.append("prepare")
        return "ready"

    @entrypoint(checkpointer=InMemorySaver())
    async def workflow(_: Any) -> list[str]:
        return [await prepare(), await ask("x=")]

    config = thread()
    chunks = [c async for c in workflow.astream(0, config, stream_mode="updates")]
    assert chunks[0] == {"prepare": "ready"}
    assert [i.value for i in chunks[-1]["__interrupt__"]] == ["x="]
    assert await workflow.ainvoke(Command(resume=1), config) == ["ready", "x=1"]
    assert runs == ["prepare", "x=", "x="]


def test_a_subgraph_called_from_a_task_resumes_inside_it() -> None:
    runs: list[str] = []
    builder = StateGraph(State)

    def inner(state: State) -> dict[str, Any]:
        runs.append("inner")
        return {"log": [f"inner={interrupt('inner?')}"]}

    builder.add_node("first", lambda s: runs.append("first") or {"log": ["first"]})
    builder.add_node("inner", inner)
    builder.add_edge(START, "first")
    builder.add_edge("first", "inner")
    subgraph = builder.compile()

    @task
    def run_subgraph() -> list[str]:
        return subgraph.invoke({"log": []})["log"]

    @entrypoint(checkpointer=InMemorySaver())
    def workflow(_: Any) -> list[str]:
        return run_subgraph().result()

    config = thread()
    assert workflow.invoke(0, config)["__interrupt__"][0].value == "inner?"
    assert workflow.invoke(Command(resume="ok"), config) == ["first", "inner=ok"]
    assert runs == ["first", "inner", "inner"]


def test_a_call_nobody_awaits_ends_within_its_callers_step() -> None:
    """As in LangGraph, the entrypoint's step waits for every ``@task`` call it made, awaited
    or not: the call's result is saved in the step (not after the run returned), and its
    error is its own (the run still succeeds)."""
    finished: list[str] = []
    saver = InMemorySaver()

    @task
    def slow(name: str) -> str:
        time.sleep(0.05)
        finished.append(name)
        if name == "fails":
            raise ValueError("nobody is listening")
        return name

    @entrypoint(checkpointer=saver)
    def workflow(names: list[str]) -> int:
        for name in names:
            slow(name)  # never awaited
        return len(names)

    config = thread()
    assert workflow.invoke(["a", "fails"], config, durability="sync") == 2
    assert sorted(finished) == ["a", "fails"]
    latest = saver.get_tuple(config)
    assert latest is not None and latest.pending_writes == []  # nothing saved after the run
    first = saver.get_tuple(list(workflow.get_state_history(config, limit=2))[-1].config)
    assert first is not None
    saved = sorted((channel, str(value)) for _, channel, value in first.pending_writes)
    assert ("__return__", "a") in saved and any(c == "__error__" for c, _ in saved)


async def test_an_async_call_nobody_awaits_ends_within_its_callers_step() -> None:
    finished: list[str] = []

    @task
    async def slow(name: str) -> str:
        await asyncio.sleep(0.05)
        finished.append(name)
        return name

    @task
    def slow_sync(name: str) -> str:
        time.sleep(0.05)
        finished.append(name)
        return name

    @entrypoint(checkpointer=InMemorySaver())
    async def workflow(names: list[str]) -> int:
        slow(names[0])
        slow_sync(names[1])
        return 2

    assert await workflow.ainvoke(["async", "sync"], thread()) == 2
    assert sorted(finished) == ["async", "sync"]


@pytest.mark.parametrize("failure", [ValueError("caller failed"), KeyboardInterrupt()])
def test_a_failing_caller_drops_the_calls_not_started(failure: BaseException) -> None:
    """A caller that fails (or is interrupted) waits only for the calls already running: the
    ones no worker has started never run. Its ``@task`` context ends with it."""
    started: list[int] = []

    @task
    def slow(number: int) -> int:
        started.append(number)
        time.sleep(0.05)
        return number

    @entrypoint(checkpointer=InMemorySaver())
    def workflow(count: int) -> int:
        for number in range(count):
            slow(number)  # never awaited
        raise failure

    with pytest.raises(type(failure)):
        workflow.invoke(300, thread())
    assert len(started) < 300  # how many the workers had started depends on timing
    with pytest.raises(RuntimeError, match="outside of a run"):
        slow(0)


async def test_a_cancelled_async_caller_cancels_its_calls() -> None:
    """Cancelling an async run cancels the async calls its tasks made, and waits for them to
    unwind: none is left running, or saving, after the run."""
    never = asyncio.Event()
    ended: list[str] = []

    @task
    async def wait_forever() -> None:
        try:
            await never.wait()
        finally:
            ended.append("unwound")

    @entrypoint(checkpointer=InMemorySaver())
    async def workflow(_: int) -> int:
        wait_forever()  # never awaited
        await never.wait()
        return 0

    with pytest.raises(TimeoutError):
        await asyncio.wait_for(workflow.ainvoke(1, thread()), 0.2)
    assert ended == ["unwound"]


def test_a_caller_does_not_hold_every_call_it_made() -> None:
    """The futures a caller keeps (to wait for them at its end) are pruned of finished ones."""
    from stepgraph.runtime import CURRENT_TASK

    @task
    def double(x: int) -> int:
        return 2 * x

    @entrypoint()
    def workflow(count: int) -> int:
        total = sum(double(x).result() for x in range(count))
        caller = CURRENT_TASK.get()
        assert caller is not None and len(caller.spawned or ()) < 256
        return total

    assert workflow.invoke(1000) == 999_000
