"""Human in the loop: interrupt(), Command(resume=...), breakpoints, Command and Send from nodes.

Every scenario runs on InMemorySaver; those about surviving a restart also run on a SQLite file,
with the saver and the graph built again (as a new process would) before resuming.
"""

from __future__ import annotations

import operator
import uuid
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypedDict

import pytest

from stepgraph.checkpoint.memory import InMemorySaver
from stepgraph.graph import END, START, StateGraph
from stepgraph.types import Command, Interrupt, Send, interrupt


class State(TypedDict, total=False):
    x: int
    log: Annotated[list[str], operator.add]


def thread() -> dict[str, Any]:
    return {"configurable": {"thread_id": str(uuid.uuid4())}}


Reopen = Callable[[], Any]


def two_questions(runs: list[str]) -> StateGraph:
    def before(state: State) -> dict[str, Any]:
        runs.append("before")
        return {"log": ["before"]}

    def ask(state: State) -> dict[str, Any]:
        runs.append("ask")
        name = interrupt("name?")
        age = interrupt({"question": "age?", "name": name})
        return {"log": [f"{name}:{age}"]}

    builder = StateGraph(State)
    builder.add_node("before", before)
    builder.add_node("ask", ask)
    builder.add_edge(START, "before")
    builder.add_edge("before", "ask")
    return builder


def test_interrupts_survive_a_restart_and_are_answered_in_order(reopen_store: Reopen) -> None:
    runs: list[str] = []
    config = thread()
    graph = two_questions(runs).compile(checkpointer=reopen_store())
    result = graph.invoke({"log": []}, config)
    [first] = result["__interrupt__"]
    assert isinstance(first, Interrupt) and first.value == "name?"
    assert result["log"] == ["before"]

    # A new process: new saver, graph compiled again.
    graph = two_questions(runs).compile(checkpointer=reopen_store())
    snapshot = graph.get_state(config)
    assert snapshot.next == ("ask",)
    assert snapshot.tasks[0].interrupts == (first,)
    # Running again without an answer asks the same question, with the same id.
    assert graph.invoke(None, config)["__interrupt__"] == [first]

    second = graph.invoke(Command(resume="Ada"), config)["__interrupt__"]
    assert [i.value for i in second] == [{"question": "age?", "name": "Ada"}]
    assert second[0].id != first.id
    graph = two_questions(runs).compile(checkpointer=reopen_store())
    assert graph.invoke(Command(resume=36), config) == {"log": ["before", "Ada:36"]}
    assert runs == ["before", "ask", "ask", "ask", "ask"]
    assert graph.get_state(config).next == ()


class Answered(TypedDict, total=False):
    x: int
    y: int
    answer: str


def test_updates_sent_while_paused_all_reach_the_resumed_run(reopen_store: Reopen) -> None:
    """Each Command(update=...) sent to a paused thread is saved as the updates so far (one
    list that grows, against the same checkpoint): every one of them must survive a restart."""

    def graph() -> Any:
        builder = StateGraph(Answered)
        builder.add_node("ask", lambda state: {"answer": interrupt("ok?")})
        builder.add_edge(START, "ask")
        return builder.compile(checkpointer=reopen_store())

    config = thread()
    graph().invoke({"x": 0}, config)
    graph().invoke(Command(update={"x": 1}), config)
    graph().invoke(Command(update={"y": 2}), config)
    assert graph().get_state(config).values == {"x": 1, "y": 2}
    assert graph().invoke(Command(resume="yes"), config) == {"x": 1, "y": 2, "answer": "yes"}


def parallel_askers() -> StateGraph:
    builder = StateGraph(State)
    for name in ("p", "q"):
        builder.add_node(name, lambda s, name=name: {"log": [f"{name}={interrupt(name)}"]})
        builder.add_edge(START, name)
    return builder


def test_parallel_interrupts_resume_with_a_map(reopen_store: Reopen) -> None:
    config = thread()
    graph = parallel_askers().compile(checkpointer=reopen_store())
    pending = graph.invoke({"log": []}, config)["__interrupt__"]
    assert sorted(i.value for i in pending) == ["p", "q"]
    assert len({i.id for i in pending}) == 2
    snapshot = graph.get_state(config)
    assert set(snapshot.next) == {"p", "q"}
    graph = parallel_askers().compile(checkpointer=reopen_store())
    with pytest.raises(RuntimeError, match="multiple pending interrupts"):
        graph.invoke(Command(resume="same for all"), config)
    # Answer one of them: the other one is still pending, with the same id.
    by_value = {i.value: i for i in pending}
    left = graph.invoke(Command(resume={by_value["p"].id: 1}), config)["__interrupt__"]
    assert left == [by_value["q"]]
    assert graph.invoke(Command(resume={by_value["q"].id: 2}), config)["log"] == ["p=1", "q=2"]


def breakpoint_graph(runs: list[str], **compile_args: Any) -> Any:
    builder = StateGraph(State)
    for name in ("a", "b", "c"):

        def node(state: State, name: str = name) -> dict[str, Any]:
            runs.append(name)
            return {"log": [name]}

        builder.add_node(name, node)
    builder.add_edge(START, "a")
    builder.add_edge("a", "b")
    builder.add_edge("b", "c")
    return builder


def test_static_breakpoints_at_compile_time_survive_a_restart(reopen_store: Reopen) -> None:
    runs: list[str] = []
    config = thread()
    graph = breakpoint_graph(runs).compile(
        checkpointer=reopen_store(), interrupt_before=["b"], interrupt_after=["b"]
    )
    assert graph.invoke({"log": []}, config) == {"log": ["a"]}
    assert runs == ["a"]
    graph = breakpoint_graph(runs).compile(
        checkpointer=reopen_store(), interrupt_before=["b"], interrupt_after=["b"]
    )
    assert graph.get_state(config).next == ("b",)
    assert graph.invoke(None, config) == {"log": ["a", "b"]}
    assert graph.get_state(config).next == ("c",)
    assert graph.invoke(None, config) == {"log": ["a", "b", "c"]}
    assert runs == ["a", "b", "c"]


def test_static_breakpoints_per_call_and_star() -> None:
    runs: list[str] = []
    graph = breakpoint_graph(runs).compile(checkpointer=InMemorySaver())
    config = thread()
    assert graph.invoke({"log": []}, config, interrupt_after="*") == {"log": ["a"]}
    assert graph.invoke(None, config, interrupt_after="*") == {"log": ["a", "b"]}
    assert graph.get_state(config).next == ("c",)
    # A resumed run does not stop again before the node it is paused at (LangGraph's rule).
    assert graph.invoke(None, config, interrupt_before=["c"]) == {"log": ["a", "b", "c"]}
    other = thread()
    assert graph.invoke({"log": []}, other, interrupt_before=["c"]) == {"log": ["a", "b"]}
    assert graph.get_state(other).next == ("c",)


def test_command_from_nodes_goto_a_node_a_list_and_sends() -> None:
    def route(state: State) -> Command[Literal["single", "fan_a", "fan_b", "mapper"]]:
        x = state["x"]
        if x == 0:
            return Command(update={"log": ["route"]}, goto="single")
        if x == 1:
            return Command(update={"log": ["route"]}, goto=["fan_a", "fan_b"])
        return Command(goto=[Send("mapper", {"item": i}) for i in range(x)])

    def mapper(item: dict[str, int]) -> dict[str, Any]:
        return {"log": [f"item{item['item']}"]}

    builder = StateGraph(State)
    builder.add_node("route", route)
    builder.add_node("single", lambda s: {"log": ["single"]})
    builder.add_node("fan_a", lambda s: {"log": ["fan_a"]})
    builder.add_node("fan_b", lambda s: {"log": ["fan_b"]})
    builder.add_node("mapper", mapper)
    builder.add_edge(START, "route")
    graph = builder.compile()
    assert graph.invoke({"x": 0, "log": []})["log"] == ["route", "single"]
    assert graph.invoke({"x": 1, "log": []})["log"] == ["route", "fan_a", "fan_b"]
    assert graph.invoke({"x": 3, "log": []})["log"] == ["item0", "item1", "item2"]


class MapState(TypedDict, total=False):
    items: list[int]
    results: Annotated[list[int], operator.add]


def map_reduce(runs: list[int], fail_on: set[int]) -> StateGraph:
    def fan_out(state: MapState) -> list[Send]:
        return [Send("work", {"item": i}) for i in state["items"]]

    def work(arg: dict[str, int]) -> dict[str, Any]:
        runs.append(arg["item"])
        if arg["item"] in fail_on:
            raise ConnectionError(f"item {arg['item']} failed")
        return {"results": [arg["item"] * 10]}

    builder = StateGraph(MapState)
    builder.add_node("start", lambda s: {"results": []})
    builder.add_node("work", work)
    builder.add_node("total", lambda s: {"results": [sum(s["results"])]})
    builder.add_edge(START, "start")
    builder.add_conditional_edges("start", fan_out, ["work"])
    builder.add_edge("work", "total")
    builder.add_edge("total", END)
    return builder


def test_pending_sends_survive_a_failure_and_a_restart(reopen_store: Reopen) -> None:
    runs: list[int] = []
    config = thread()
    graph = map_reduce(runs, fail_on={2}).compile(checkpointer=reopen_store())
    with pytest.raises(ConnectionError):
        graph.invoke({"items": [1, 2, 3]}, config, durability="sync")
    assert sorted(runs) == [1, 2, 3]
    # The Sends are in the checkpoint: a new process sees the three pending "work" tasks.
    graph = map_reduce(runs, fail_on=set()).compile(checkpointer=reopen_store())
    snapshot = graph.get_state(config)
    assert snapshot.next == ("work",)  # only the failed one is still to run
    assert [t.name for t in snapshot.tasks] == ["work", "work", "work"]
    runs.clear()
    assert graph.invoke(None, config)["results"] == [10, 20, 30, 60]
    assert runs == [2]


def test_breakpoint_then_update_then_continue() -> None:
    runs: list[str] = []
    graph = breakpoint_graph(runs).compile(checkpointer=InMemorySaver(), interrupt_before=["c"])
    config = thread()
    graph.invoke({"log": []}, config)
    graph.update_state(config, {"log": ["edited"]})
    assert graph.invoke(None, config) == {"log": ["a", "b", "edited", "c"]}


async def test_async_interrupt_resume() -> None:
    runs: list[str] = []
    graph = two_questions(runs).compile(checkpointer=InMemorySaver())
    config = thread()
    first = (await graph.ainvoke({"log": []}, config))["__interrupt__"]
    assert first[0].value == "name?"
    await graph.ainvoke(Command(resume="Bo"), config)
    assert await graph.ainvoke(Command(resume=7), config) == {"log": ["before", "Bo:7"]}
    assert runs.count("before") == 1
