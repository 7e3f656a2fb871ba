"""StateGraph building, validation and execution without a checkpointer."""

from __future__ import annotations

import asyncio
import itertools
import operator
import threading
import time
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, TypedDict

import pytest
from pydantic import BaseModel

from stepgraph.checkpoint.memory import InMemorySaver
from stepgraph.config import get_config, get_stream_writer
from stepgraph.errors import GraphRecursionError, InvalidUpdateError
from stepgraph.graph import END, START, StateGraph
from stepgraph.runtime import get_runtime
from stepgraph.types import Command, RetryPolicy, Send


class State(TypedDict):
    x: int
    log: Annotated[list[str], operator.add]


def appender(name: str, delay: float = 0.0):
    def node(state: State) -> dict[str, Any]:
        if delay:
            time.sleep(delay)
        return {"log": [name]}

    return node


def chain(*names: str) -> StateGraph:
    builder = StateGraph(State)
    for name in names:
        builder.add_node(name, appender(name))
    builder.add_edge(START, names[0])
    for a, b in itertools.pairwise(names):
        builder.add_edge(a, b)
    return builder


def test_sequential_invoke_and_stream_chunks() -> None:
    def inc(state: State) -> dict[str, Any]:
        return {"x": state["x"] + 1, "log": ["inc"], "not_a_key": 1}

    def noop(state: State) -> None:
        return None

    builder = StateGraph(State)
    builder.add_node("inc", inc)
    builder.add_node("noop", noop)
    builder.add_edge(START, "inc")
    builder.add_edge("inc", "noop")
    builder.add_edge("noop", END)
    graph = builder.compile()

    assert graph.invoke({"x": 1}) == {"x": 2, "log": ["inc"]}
    chunks = list(graph.stream({"x": 1}, stream_mode=["values", "updates"]))
    assert chunks == [
        ("values", {"x": 1, "log": []}),
        ("updates", {"inc": {"x": 2, "log": ["inc"]}}),
        ("values", {"x": 2, "log": ["inc"]}),
        ("updates", {"noop": None}),
    ]
    assert list(graph.stream({"x": 1}, stream_mode="updates")) == [
        {"inc": {"x": 2, "log": ["inc"]}},
        {"noop": None},
    ]


def test_parallel_branches_apply_in_node_order_and_join_waits() -> None:
    builder = StateGraph(State)
    builder.add_node("a", appender("a", delay=0.02))
    builder.add_node("b", appender("b"))
    builder.add_node("b2", appender("b2"))
    builder.add_node("join", appender("join"))
    builder.add_edge(START, "a")
    builder.add_edge(START, "b")
    builder.add_edge("b", "b2")
    builder.add_edge(["a", "b2"], "join")
    graph = builder.compile()
    # a and b run in one step; a is slower but its write still comes first (plan order).
    assert graph.invoke({"x": 0})["log"] == ["a", "b", "b2", "join"]


def test_parallel_tasks_run_concurrently() -> None:
    barrier = threading.Barrier(2, timeout=5)

    def meet(name: str):
        def node(state: State) -> dict[str, Any]:
            barrier.wait()  # deadlocks unless both run at once
            return {"log": [name]}

        return node

    builder = StateGraph(State)
    builder.add_node("a", meet("a"))
    builder.add_node("b", meet("b"))
    builder.add_edge(START, "a")
    builder.add_edge(START, "b")
    assert builder.compile().invoke({"x": 0})["log"] == ["a", "b"]


def test_two_writes_to_last_value_in_one_step_fail() -> None:
    builder = StateGraph(State)
    builder.add_node("a", lambda s: {"x": 1})
    builder.add_node("b", lambda s: {"x": 2})
    builder.add_edge(START, "a")
    builder.add_edge(START, "b")
    with pytest.raises(InvalidUpdateError, match="'x'"):
        builder.compile().invoke({"x": 0})


def test_nodes_read_state_from_start_of_step() -> None:
    seen: dict[str, int] = {}

    def writer(state: State) -> dict[str, Any]:
        return {"x": 100}

    def reader(state: State) -> dict[str, Any]:
        seen["x"] = state["x"]
        return {"log": ["read"]}

    builder = StateGraph(State)
    builder.add_node("writer", writer)
    builder.add_node("reader", reader)
    builder.add_edge(START, "writer")
    builder.add_edge(START, "reader")
    assert builder.compile().invoke({"x": 1})["x"] == 100
    assert seen == {"x": 1}


def test_conditional_edges_path_map_list_and_end() -> None:
    def route(state: State) -> str:
        return "big" if state["x"] > 5 else "small"

    builder = StateGraph(State)
    builder.add_node("start", lambda s: {"x": s["x"] * 2})
    builder.add_node("big_node", appender("big"))
    builder.add_node("small_node", appender("small"))
    builder.add_edge(START, "start")
    builder.add_conditional_edges("start", route, {"big": "big_node", "small": "small_node"})
    graph = builder.compile()
    # The route sees the node's own update (x doubled).
    assert graph.invoke({"x": 3})["log"] == ["big"]
    assert graph.invoke({"x": 1})["log"] == ["small"]

    fan = StateGraph(State)
    fan.add_node("a", appender("a"))
    fan.add_node("b", appender("b"))
    fan.add_conditional_edges(START, lambda s: ["a", "b"] if s["x"] else END, ["a", "b"])
    assert fan.compile().invoke({"x": 1})["log"] == ["a", "b"]
    assert fan.compile().invoke({"x": 0}) == {"x": 0, "log": []}


def test_literal_return_annotation_declares_destinations() -> None:
    def route(state: State) -> Literal["a", "__end__"]:
        return "a" if state["x"] else END

    builder = StateGraph(State)
    builder.add_node("a", appender("a"))
    builder.add_conditional_edges(START, route)
    assert builder.compile().invoke({"x": 1})["log"] == ["a"]


def test_send_map_reduce() -> None:
    class Job(TypedDict):
        item: int

    def work(job: Job) -> dict[str, Any]:
        return {"log": [f"w{job['item']}"]}

    builder = StateGraph(State)
    builder.add_node("work", work)
    builder.add_node("done", appender("done"))
    builder.add_conditional_edges(
        START, lambda s: [Send("work", {"item": i}) for i in range(s["x"])]
    )
    builder.add_edge("work", "done")
    result = builder.compile().invoke({"x": 3})
    assert result["log"] == ["w0", "w1", "w2", "done"]


def test_command_update_and_goto() -> None:
    def decide(state: State) -> Command[Literal["yes", "no"]]:
        return Command(update={"x": 7}, goto="yes" if state["x"] else "no")

    builder = StateGraph(State)
    builder.add_node("decide", decide)
    builder.add_node("yes", appender("yes"))
    builder.add_node("no", appender("no"))
    builder.add_edge(START, "decide")
    graph = builder.compile()
    assert graph.invoke({"x": 1}) == {"x": 7, "log": ["yes"]}
    assert graph.invoke({"x": 0}) == {"x": 7, "log": ["no"]}
    assert list(graph.stream({"x": 1}, stream_mode="updates")) == [
        {"decide": {"x": 7}},
        {"yes": {"log": ["yes"]}},
    ]


def test_dataclass_and_pydantic_state() -> None:
    @dataclass
    class DState:
        x: int
        items: Annotated[list[int], operator.add] = field(default_factory=list)

    def dnode(state: DState) -> dict[str, Any]:
        assert isinstance(state, DState)
        return {"x": state.x + 1, "items": [state.x]}

    builder = StateGraph(DState)
    builder.add_node("n", dnode)
    builder.add_edge(START, "n")
    assert builder.compile().invoke({"x": 1}) == {"x": 2, "items": [1]}

    class PState(BaseModel):
        x: int
        tags: list[str] = []

    def pnode(state: PState) -> dict[str, Any]:
        assert isinstance(state, PState)
        return {"x": state.x * 10}

    pbuilder = StateGraph(PState)
    pbuilder.add_node("n", pnode)
    pbuilder.add_edge(START, "n")
    graph = pbuilder.compile()
    assert graph.invoke({"x": 2}) == {"x": 20}
    with pytest.raises(Exception, match="x"):
        graph.invoke({"x": "not a number"})


def test_input_and_output_schemas() -> None:
    class In(TypedDict):
        question: str

    class Out(TypedDict):
        answer: str

    class Full(In, Out):
        scratch: str

    def think(state: Full) -> dict[str, Any]:
        return {"scratch": state["question"].upper()}

    def answer(state: Full) -> dict[str, Any]:
        return {"answer": state["scratch"] + "!"}

    builder = StateGraph(Full, input_schema=In, output_schema=Out)
    builder.add_sequence([think, answer])
    builder.add_edge(START, "think")
    assert builder.compile().invoke({"question": "hi"}) == {"answer": "HI!"}


def test_entry_and_finish_points() -> None:
    builder = StateGraph(State)
    builder.add_node("a", appender("a"))
    builder.set_entry_point("a")
    builder.set_finish_point("a")
    assert builder.compile().invoke({"x": 0})["log"] == ["a"]


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda b: b.add_edge("ghost", "a"), "unknown node 'ghost'"),
        (lambda b: b.add_edge("a", "ghost"), "unknown node `ghost`"),
        (lambda b: b.add_conditional_edges("a", lambda s: "x", {"x": "ghost"}), "ghost"),
    ],
)
def test_validation_of_edges(build: Any, message: str) -> None:
    builder = StateGraph(State)
    builder.add_node("a", appender("a"))
    builder.add_edge(START, "a")
    build(builder)
    with pytest.raises(ValueError, match=message):
        builder.compile()


def test_validation_of_nodes() -> None:
    builder = StateGraph(State)
    builder.add_node("a", appender("a"))
    with pytest.raises(ValueError, match="already present"):
        builder.add_node("a", appender("a"))
    for reserved in (START, END):
        with pytest.raises(ValueError, match="reserved"):
            builder.add_node(reserved, appender("x"))
    with pytest.raises(ValueError, match="reserved"):
        builder.add_node("a:b", appender("x"))
    with pytest.raises(ValueError, match="entrypoint"):
        builder.compile()
    with pytest.raises(ValueError, match="START cannot be an end node"):
        builder.add_edge("a", START)
    with pytest.raises(ValueError, match="END cannot be a start node"):
        builder.add_edge(END, "a")
    builder.add_edge(START, "a")
    # A node no edge leads to compiles, as in LangGraph: an unannotated Command(goto=...)
    # reaches it, and nothing tells the graph so beforehand.
    builder.add_node("orphan", appender("orphan"))
    assert builder.compile().invoke({"x": 0})["log"] == ["a"]
    builder.add_node("router", lambda s: Command(goto="orphan"))
    builder.add_edge("a", "router")
    assert builder.compile().invoke({"x": 0})["log"] == ["a", "orphan"]


def test_recursion_limit() -> None:
    builder = StateGraph(State)
    builder.add_node("loop", appender("loop"))
    builder.add_edge(START, "loop")
    builder.add_edge("loop", "loop")
    with pytest.raises(GraphRecursionError, match="Recursion limit of 5"):
        builder.compile().invoke({"x": 0}, {"recursion_limit": 5})
    # LangGraph counts the input step too: three nodes need a limit of four.
    graph = chain("a", "b", "c").compile()
    with pytest.raises(GraphRecursionError):
        graph.invoke({"x": 0}, {"recursion_limit": 3})
    assert graph.invoke({"x": 0}, {"recursion_limit": 4})["log"] == ["a", "b", "c"]


def test_config_runtime_context_and_custom_stream() -> None:
    @dataclass
    class Context:
        user: str

    def node(state: State, config: dict[str, Any]) -> dict[str, Any]:
        assert get_config()["metadata"]["langgraph_node"] == "node"
        assert config["configurable"]["key"] == "v"
        assert config["metadata"]["langgraph_step"] == 1
        get_stream_writer()({"progress": 1})
        return {"log": [get_runtime(Context).context.user]}

    def with_runtime(state: State, runtime: Any) -> dict[str, Any]:
        runtime.stream_writer("from runtime")
        return {"log": [runtime.context.user.upper()]}

    builder = StateGraph(State, context_schema=Context)
    builder.add_sequence([node, with_runtime])
    builder.add_edge(START, "node")
    graph = builder.compile()
    config = {"configurable": {"key": "v"}}
    chunks = list(
        graph.stream({"x": 0}, config, context=Context("ann"), stream_mode=["custom", "updates"])
    )
    assert chunks == [
        ("custom", {"progress": 1}),
        ("updates", {"node": {"log": ["ann"]}}),
        ("custom", "from runtime"),
        ("updates", {"with_runtime": {"log": ["ANN"]}}),
    ]
    # Without a listener the writer is a no-op.
    assert graph.invoke({"x": 0}, config, context=Context("bo"))["log"] == ["bo", "BO"]


def test_retry_policy() -> None:
    attempts = {"flaky": 0, "buggy": 0}

    def flaky(state: State) -> dict[str, Any]:
        attempts["flaky"] += 1
        if attempts["flaky"] < 3:
            raise ConnectionError("try again")
        return {"log": ["flaky"]}

    def buggy(state: State) -> dict[str, Any]:
        attempts["buggy"] += 1
        raise ValueError("a bug does not retry")

    fast = RetryPolicy(initial_interval=0.001, jitter=False)
    builder = StateGraph(State)
    builder.add_node("flaky", flaky, retry_policy=fast)
    builder.add_node("buggy", buggy, retry_policy=fast)
    builder.add_edge(START, "flaky")
    builder.add_edge("flaky", "buggy")
    with pytest.raises(ValueError, match="a bug"):
        builder.compile().invoke({"x": 0})
    assert attempts == {"flaky": 3, "buggy": 1}

    exhausted = StateGraph(State)
    exhausted.add_node(
        "always", lambda s: (_ for _ in ()).throw(ConnectionError("down")), retry_policy=fast
    )
    exhausted.add_edge(START, "always")
    with pytest.raises(ConnectionError):
        exhausted.compile().invoke({"x": 0})
    assert RetryPolicy(retry_on=KeyError).should_retry(KeyError("k"))
    assert not RetryPolicy().should_retry(TypeError("t"))


def test_deferred_node_runs_when_nothing_else_is_left() -> None:
    builder = StateGraph(State)
    builder.add_node("a", appender("a"))
    builder.add_node("b", appender("b"))
    builder.add_node("b2", appender("b2"))
    builder.add_node("b3", appender("b3"))
    builder.add_node("last", appender("last"), defer=True)
    builder.add_edge(START, "a")
    builder.add_edge(START, "b")
    builder.add_edge("b", "b2")
    builder.add_edge("b2", "b3")
    builder.add_edge("a", "last")
    builder.add_edge("b3", "last")
    assert builder.compile().invoke({"x": 0})["log"] == ["a", "b", "b2", "b3", "last"]


def test_stream_tasks_and_debug_modes() -> None:
    graph = chain("a").compile()
    events = list(graph.stream({"x": 0}, stream_mode="tasks"))
    assert [(e["name"], "result" in e) for e in events] == [("a", False), ("a", True)]
    assert events[1]["result"] == {"log": ["a"]}
    assert events[0]["id"] == events[1]["id"]
    # Without a checkpointer there are no checkpoints to report (as in LangGraph).
    debug = list(graph.stream({"x": 0}, stream_mode="debug"))
    assert [e["type"] for e in debug] == ["task", "task_result"]
    assert list(graph.stream({"x": 0}, stream_mode="checkpoints")) == []
    saved = chain("a").compile(checkpointer=InMemorySaver())
    debug = list(saved.stream({"x": 0}, {"configurable": {"thread_id": "d"}}, stream_mode="debug"))
    assert [e["type"] for e in debug] == [
        "checkpoint",
        "checkpoint",
        "task",
        "task_result",
        "checkpoint",
    ]
    assert [e["step"] for e in debug] == [-1, 0, 1, 1, 1]
    config = {"configurable": {"thread_id": "c"}}
    checkpoints = list(saved.stream({"x": 0}, config, stream_mode="checkpoints"))
    assert [c["next"] for c in checkpoints] == [["__start__"], ["a"], []]
    assert [c["metadata"]["source"] for c in checkpoints] == ["input", "loop", "loop"]


def test_invoke_with_other_stream_mode_returns_chunks() -> None:
    graph = chain("a", "b").compile()
    assert graph.invoke({"x": 0}, stream_mode="updates") == [
        {"a": {"log": ["a"]}},
        {"b": {"log": ["b"]}},
    ]


def test_batch() -> None:
    graph = chain("a").compile()
    assert graph.batch([{"x": 1}, {"x": 2}]) == [
        {"x": 1, "log": ["a"]},
        {"x": 2, "log": ["a"]},
    ]


async def test_async_nodes_and_apis() -> None:
    async def slow(state: State) -> dict[str, Any]:
        await asyncio.sleep(0.01)
        return {"log": ["slow"]}

    async def route(state: State) -> str:
        return "sync_node"

    builder = StateGraph(State)
    builder.add_node("slow", slow)
    builder.add_node("fast", appender("fast"))
    builder.add_node("sync_node", appender("sync"))
    builder.add_edge(START, "slow")
    builder.add_edge(START, "fast")
    builder.add_conditional_edges("slow", route, ["sync_node"])
    graph = builder.compile()
    assert (await graph.ainvoke({"x": 0}))["log"] == ["fast", "slow", "sync"]  # by node name
    chunks = [c async for c in graph.astream({"x": 0}, stream_mode="updates")]
    assert sorted(next(iter(c)) for c in chunks) == ["fast", "slow", "sync_node"]
    assert await graph.abatch([{"x": 1}, {"x": 2}]) == [
        {"x": 1, "log": ["fast", "slow", "sync"]},
        {"x": 2, "log": ["fast", "slow", "sync"]},
    ]
    with pytest.raises(TypeError, match="async"):
        graph.invoke({"x": 0})


async def test_async_custom_stream_and_context() -> None:
    async def node(state: State) -> dict[str, Any]:
        get_stream_writer()("hello")
        return {"log": [get_runtime().context]}

    builder = StateGraph(State)
    builder.add_node("node", node)
    builder.add_edge(START, "node")
    chunks = [
        c
        async for c in builder.compile().astream(
            {"x": 0}, context="ctx", stream_mode=["custom", "values"]
        )
    ]
    assert chunks == [
        ("values", {"x": 0, "log": []}),
        ("custom", "hello"),
        ("values", {"x": 0, "log": ["ctx"]}),
    ]


async def test_astream_hands_out_custom_chunks_while_the_node_runs() -> None:
    received = asyncio.Event()

    async def talker(state: State) -> dict[str, Any]:
        get_stream_writer()("token")
        # Only finishes once the caller has seen the chunk: proves it was streamed live.
        await asyncio.wait_for(received.wait(), timeout=5)
        return {"log": ["done"]}

    builder = StateGraph(State)
    builder.add_node("talker", talker)
    builder.add_edge(START, "talker")
    chunks = []
    async for chunk in builder.compile().astream({"x": 0}, stream_mode=["custom", "updates"]):
        chunks.append(chunk)
        if chunk == ("custom", "token"):
            received.set()
    assert chunks == [("custom", "token"), ("updates", {"talker": {"log": ["done"]}})]


def test_max_concurrency_limits_parallel_tasks() -> None:
    running = {"now": 0, "peak": 0}
    lock = threading.Lock()

    def worker(state: dict[str, Any]) -> dict[str, Any]:
        with lock:
            running["now"] += 1
            running["peak"] = max(running["peak"], running["now"])
        time.sleep(0.01)
        with lock:
            running["now"] -= 1
        return {"log": ["w"]}

    builder = StateGraph(State)
    builder.add_node("worker", worker)
    builder.add_conditional_edges(START, lambda s: [Send("worker", {}) for _ in range(6)])
    result = builder.compile().invoke({"x": 0}, {"max_concurrency": 2})
    assert result["log"] == ["w"] * 6
    assert running["peak"] <= 2


def test_debug_prints_events_without_changing_the_stream(
    capsys: pytest.CaptureFixture[str],
) -> None:
    builder = chain("a")
    graph = builder.compile(debug=True)
    assert list(graph.stream({"x": 0}, stream_mode="updates")) == [{"a": {"log": ["a"]}}]
    assert graph.invoke({"x": 0}) == {"x": 0, "log": ["a"]}
    printed = capsys.readouterr().out
    assert "[1:task] a" in printed
    assert "[1:task_result] a" in printed


async def test_async_conditional_entry_point() -> None:
    async def route(state: State) -> str:
        return "a" if state["x"] else "b"

    builder = StateGraph(State)
    builder.add_node("a", appender("a"))
    builder.add_node("b", appender("b"))
    builder.set_conditional_entry_point(route, ["a", "b"])
    graph = builder.compile()
    assert (await graph.ainvoke({"x": 1}))["log"] == ["a"]
    assert (await graph.ainvoke({"x": 0}))["log"] == ["b"]
    with pytest.raises(TypeError, match="async"):
        graph.invoke({"x": 1})


async def test_compiled_graph_as_a_node() -> None:
    inner = chain("inner1", "inner2").compile()
    builder = StateGraph(State)
    builder.add_node("before", appender("before"))
    builder.add_node("sub", inner)
    builder.add_edge(START, "before")
    builder.add_edge("before", "sub")
    graph = builder.compile()
    # The subgraph returns the whole state: its reducer output replaces nothing but adds the
    # inner nodes' entries on top of the input it received.
    assert graph.invoke({"x": 0})["log"] == ["before", "before", "inner1", "inner2"]
    assert (await graph.ainvoke({"x": 0}))["log"] == ["before", "before", "inner1", "inner2"]


def test_a_model_states_input_runs_its_reducers_once() -> None:
    """START's check of a pydantic state's input does not run the reducers itself: a reducer
    that changes its value in place sees the input once."""
    import pydantic

    def extend(value: list[str], more: list[str]) -> list[str]:
        value.extend(more)
        return value

    class Model(pydantic.BaseModel):
        items: Annotated[list[str], extend] = []
        n: int = 0

    builder = StateGraph(Model)
    builder.add_node("node", lambda state: {"items": ["node"]})
    builder.add_edge(START, "node")
    graph = builder.compile()
    assert graph.invoke({"items": ["in"]}) == {"items": ["in", "node"]}
    with pytest.raises(pydantic.ValidationError):
        graph.invoke({"items": ["in"], "n": "not a number"})
