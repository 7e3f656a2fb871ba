"""Sync ``stream`` hands out chunks while a step runs, and a failed step's chunks before its error.

Each live test has a node block until the consumer has seen a chunk the step made earlier (a
``threading.Event`` handshake; a guard deadline keeps a regression from hanging): the node only
sees the event set if the chunk was handed out while it still ran.
"""

from __future__ import annotations

import asyncio
import operator
import threading
import uuid
from typing import Annotated, Any, TypedDict

import pytest

from stepgraph.checkpoint.memory import InMemorySaver
from stepgraph.config import get_stream_writer
from stepgraph.func import entrypoint, task
from stepgraph.graph import END, START, StateGraph

GUARD_SECONDS = 10.0


class State(TypedDict):
    log: Annotated[list[Any], operator.add]


def thread() -> dict[str, Any]:
    return {"configurable": {"thread_id": str(uuid.uuid4())}}


def chain(*nodes: tuple[str, Any], checkpointer: Any = None) -> Any:
    builder = StateGraph(State)
    previous = START
    for name, node in nodes:
        builder.add_node(name, node)
        builder.add_edge(previous, name)
        previous = name
    builder.add_edge(previous, END)
    return builder.compile(checkpointer=checkpointer)


def siblings(*nodes: tuple[str, Any]) -> Any:
    builder = StateGraph(State)
    for name, node in nodes:
        builder.add_node(name, node)
        builder.add_edge(START, name)
        builder.add_edge(name, END)
    return builder.compile()


# -- live chunks -----------------------------------------------------------------------------


def test_custom_chunk_reaches_the_consumer_while_its_node_runs() -> None:
    seen = threading.Event()

    def node(state: State) -> dict[str, Any]:
        get_stream_writer()("w")
        return {"log": [seen.wait(GUARD_SECONDS)]}

    chunks = []
    for chunk in chain(("n", node)).stream({"log": []}, stream_mode=["custom", "updates"]):
        chunks.append(chunk)
        seen.set()
    assert chunks == [("custom", "w"), ("updates", {"n": {"log": [True]}})]


def test_finished_sibling_update_streams_before_the_step_ends() -> None:
    seen = threading.Event()

    def waits(state: State) -> dict[str, Any]:
        return {"log": [seen.wait(GUARD_SECONDS)]}

    graph = siblings(("waits", waits), ("quick", lambda state: {"log": ["quick"]}))
    chunks = []
    for chunk in graph.stream({"log": []}, stream_mode="updates"):
        chunks.append(chunk)
        if chunk == {"quick": {"log": ["quick"]}}:
            seen.set()
    assert chunks == [{"quick": {"log": ["quick"]}}, {"waits": {"log": [True]}}]


def test_finished_sibling_update_streams_before_the_step_ends_async() -> None:
    async def run() -> list[Any]:
        seen = asyncio.Event()

        async def waits(state: State) -> dict[str, Any]:
            try:
                await asyncio.wait_for(seen.wait(), GUARD_SECONDS)
            except TimeoutError:
                return {"log": [False]}
            return {"log": [True]}

        async def quick(state: State) -> dict[str, Any]:
            return {"log": ["quick"]}

        graph = siblings(("waits", waits), ("quick", quick))
        chunks = []
        async for chunk in graph.astream({"log": []}, stream_mode="updates"):
            chunks.append(chunk)
            if chunk == {"quick": {"log": ["quick"]}}:
                seen.set()
        return chunks

    assert asyncio.run(run()) == [{"quick": {"log": ["quick"]}}, {"waits": {"log": [True]}}]


def test_entrypoint_streams_its_task_calls_and_custom_chunks_while_it_runs() -> None:
    seen_update = threading.Event()

    @task
    def add_one(x: int) -> int:
        return x + 1

    @entrypoint()
    def workflow(x: int) -> list[Any]:
        get_stream_writer()("started")
        y = add_one(x).result()
        return [y, seen_update.wait(GUARD_SECONDS)]

    chunks = []
    for chunk in workflow.stream(1, stream_mode=["custom", "updates"]):
        chunks.append(chunk)
        if chunk == ("updates", {"add_one": 2}):
            seen_update.set()
    assert chunks == [
        ("custom", "started"),
        ("updates", {"add_one": 2}),
        ("updates", {"workflow": [2, True]}),
    ]


def test_subgraph_chunks_reach_the_root_stream_while_the_parent_node_runs() -> None:
    seen = threading.Event()

    def inner_second(state: State) -> dict[str, Any]:
        return {"log": [seen.wait(GUARD_SECONDS)]}

    inner = chain(("first", lambda state: {"log": ["first"]}), ("second", inner_second))
    outer = chain(("sub", inner))
    chunks = []
    for namespace, chunk in outer.stream({"log": []}, stream_mode="updates", subgraphs=True):
        chunks.append((len(namespace), chunk))
        if chunk == {"first": {"log": ["first"]}}:
            seen.set()
    assert chunks == [
        (1, {"first": {"log": ["first"]}}),
        (1, {"second": {"log": [True]}}),
        (0, {"sub": {"log": ["first", True]}}),
    ]


def test_chunks_of_a_subgraph_invoked_in_a_node_reach_the_root_while_it_runs() -> None:
    seen = threading.Event()

    def inner_node(state: State) -> dict[str, Any]:
        get_stream_writer()("inner")
        return {"log": [seen.wait(GUARD_SECONDS)]}

    inner = chain(("inner", inner_node))
    outer = chain(("outer", lambda state: inner.invoke({"log": []})))
    chunks = []
    for namespace, mode, chunk in outer.stream(
        {"log": []}, stream_mode=["custom", "updates"], subgraphs=True
    ):
        chunks.append((len(namespace), mode, chunk))
        seen.set()
    assert chunks == [
        (1, "custom", "inner"),
        (1, "updates", {"inner": {"log": [True]}}),
        (0, "updates", {"outer": {"log": [True]}}),
    ]


def test_stream_inside_a_node_is_live_too() -> None:
    seen = threading.Event()

    def inner_node(state: State) -> dict[str, Any]:
        get_stream_writer()("inner")
        return {"log": [seen.wait(GUARD_SECONDS)]}

    inner = chain(("inner", inner_node))

    def outer_node(state: State) -> dict[str, Any]:
        got = []
        for chunk in inner.stream({"log": []}, stream_mode=["custom", "updates"]):
            got.append(chunk)
            seen.set()
        return {"log": got}

    assert chain(("outer", outer_node)).invoke({"log": []}) == {
        "log": [("custom", "inner"), ("updates", {"inner": {"log": [True]}})]
    }


def test_only_modes_that_stream_mid_step_leave_the_consumers_thread() -> None:
    """One-task steps run on the consumer's thread for modes whose chunks all come at the
    step's end (no hand-off to pay), on another one when a node may stream from inside."""
    ran_on: list[int] = []

    def node(state: State) -> dict[str, Any]:
        ran_on.append(threading.get_ident())
        return {"log": ["n"]}

    graph = chain(("n", node))
    me = threading.get_ident()
    graph.invoke({"log": []})
    list(graph.stream({"log": []}, stream_mode=["values", "updates", "checkpoints"]))
    assert ran_on == [me, me]
    list(graph.stream({"log": []}, stream_mode="custom"))
    assert ran_on[-1] != me


# -- the consumer stops early ------------------------------------------------------------------


def test_closing_the_stream_mid_step_lets_the_step_finish_and_ends_the_run() -> None:
    release = threading.Event()
    finished = threading.Event()
    later: list[str] = []

    def first(state: State) -> dict[str, Any]:
        get_stream_writer()("first is running")
        release.wait(GUARD_SECONDS)
        finished.set()
        return {"log": ["first"]}

    def second(state: State) -> dict[str, Any]:
        later.append("second")
        return {"log": ["second"]}

    saver = InMemorySaver()
    graph = chain(("first", first), ("second", second), checkpointer=saver)
    config = thread()
    stream = graph.stream({"log": []}, config, stream_mode="custom")
    assert next(stream) == "first is running"
    release.set()
    stream.close()  # returns once the running step has ended
    assert finished.is_set()
    assert later == []
    # The run let go of the thread, having saved the finished node's writes: another run
    # continues from there.
    assert graph.invoke(None, config)["log"] == ["first", "second"]
    assert later == ["second"]


# -- a failed run still streams what its last step made ----------------------------------------


def failing_siblings() -> Any:
    release = threading.Event()

    def bad(state: State) -> dict[str, Any]:
        get_stream_writer()("before-fail")
        release.wait(GUARD_SECONDS)  # fails only once the sibling has finished
        raise ValueError("bad")

    def ok(state: State) -> dict[str, Any]:
        release.set()
        return {"log": ["ok"]}

    return siblings(("ok", ok), ("bad", bad))


@pytest.mark.parametrize("modes", [["updates", "custom"], ["updates", "tasks"]])
def test_failed_step_chunks_come_before_the_error(modes: list[str]) -> None:
    chunks = []
    with pytest.raises(ValueError, match="bad"):
        for mode, chunk in failing_siblings().stream({"log": []}, stream_mode=modes):
            chunks.append((mode, chunk["name"] if mode == "tasks" else chunk))
    assert ("updates", {"ok": {"log": ["ok"]}}) in chunks
    if "custom" in modes:
        assert ("custom", "before-fail") in chunks
    else:
        assert chunks.count(("tasks", "bad")) == 2  # its start and its (failed) result


def test_failed_step_chunks_come_before_the_error_async() -> None:
    async def consume() -> list[Any]:
        chunks = []
        with pytest.raises(ValueError, match="bad"):
            async for chunk in failing_siblings().astream({"log": []}, stream_mode="updates"):
                chunks.append(chunk)
        return chunks

    assert asyncio.run(consume()) == [{"ok": {"log": ["ok"]}}]


def failing_workflow() -> Any:
    @task
    def add_one(x: int) -> int:
        return x + 1

    @task
    def explode(x: int) -> int:
        raise ValueError("explode failed")

    @entrypoint()
    def fails(x: int) -> int:
        return explode(add_one(x).result()).result()

    return fails


EXPECTED_FAILED_RUN = [
    ("tasks", "fails"),
    ("tasks", "add_one"),
    ("updates", {"add_one": 2}),
    ("tasks", "add_one"),
    ("tasks", "explode"),
    ("tasks", "explode"),
    ("tasks", "fails"),
]


def test_failed_entrypoint_streams_its_calls_before_the_error() -> None:
    chunks = []
    with pytest.raises(ValueError, match="explode failed"):
        for mode, chunk in failing_workflow().stream(1, stream_mode=["updates", "tasks"]):
            chunks.append((mode, chunk["name"] if mode == "tasks" else chunk))
    assert chunks == EXPECTED_FAILED_RUN


def test_failed_entrypoint_streams_its_calls_before_the_error_async() -> None:
    async def consume() -> list[Any]:
        chunks = []
        with pytest.raises(ValueError, match="explode failed"):
            async for mode, chunk in failing_workflow().astream(
                1, stream_mode=["updates", "tasks"]
            ):
                chunks.append((mode, chunk["name"] if mode == "tasks" else chunk))
        return chunks

    assert asyncio.run(consume()) == EXPECTED_FAILED_RUN


# -- saving is the same, live or not -----------------------------------------------------------


@pytest.mark.parametrize("durability", ["sync", "async", "exit"])
def test_live_stream_saves_what_invoke_saves(durability: str) -> None:
    def node(name: str) -> Any:
        def run(state: State) -> dict[str, Any]:
            get_stream_writer()(name)
            return {"log": [name]}

        return run

    def history(graph: Any, config: Any) -> list[Any]:
        return [
            (snapshot.values, snapshot.next, snapshot.metadata.get("step"))
            for snapshot in graph.get_state_history(config)
        ]

    nodes = [("a", node("a")), ("b", node("b")), ("c", node("c"))]
    invoked, streamed = thread(), thread()
    graph = chain(*nodes, checkpointer=InMemorySaver())
    graph.invoke({"log": []}, invoked, durability=durability)
    chunks = list(graph.stream({"log": []}, streamed, stream_mode="custom", durability=durability))
    assert chunks == ["a", "b", "c"]
    assert history(graph, streamed) == history(graph, invoked)


def test_a_sync_node_under_astream_leaves_the_event_loop_free() -> None:
    """A blocking sync node runs on a thread: the consumer gets the chunk it wrote (and the
    loop's other coroutines run) while it still blocks."""

    async def run() -> list[Any]:
        seen = threading.Event()
        ticks: list[int] = []

        def blocks(state: State) -> dict[str, Any]:
            get_stream_writer()("asked")
            return {"log": [seen.wait(GUARD_SECONDS)]}

        async def ticker() -> None:
            while not seen.is_set():
                ticks.append(1)
                await asyncio.sleep(0.001)

        beside = asyncio.ensure_future(ticker())
        chunks = []
        async for mode, chunk in chain(("blocks", blocks)).astream(
            {"log": []}, stream_mode=["custom", "updates"]
        ):
            chunks.append((mode, chunk))
            if chunk == "asked":
                seen.set()
        await beside
        assert ticks
        return chunks

    assert asyncio.run(run()) == [("custom", "asked"), ("updates", {"blocks": {"log": [True]}})]


@pytest.mark.parametrize("api", ["sync", "async"])
def test_task_start_events_come_before_the_tasks_end(api: str) -> None:
    """A live step's ``tasks`` start events are handed out as the step starts, not with the
    first chunk a task makes."""
    started = threading.Event()

    def waits(state: State) -> dict[str, Any]:
        return {"log": [started.wait(GUARD_SECONDS)]}

    graph = siblings(("a", waits), ("b", waits))
    events: list[tuple[str, bool]] = []

    answers: list[Any] = []

    def see(event: dict[str, Any]) -> None:
        events.append((event["name"], "result" in event))
        if "result" in event:
            answers.append(event["result"]["log"])
        if sum(not result for _, result in events) == 2:
            started.set()

    if api == "sync":
        for event in graph.stream({"log": []}, stream_mode="tasks"):
            see(event)
    else:

        async def run() -> None:
            async for event in graph.astream({"log": []}, stream_mode="tasks"):
                see(event)

        asyncio.run(run())
    assert sorted(events) == [("a", False), ("a", True), ("b", False), ("b", True)]
    assert events[:2] == [("a", False), ("b", False)]
    assert answers == [[True], [True]]  # both saw their start told while they ran
