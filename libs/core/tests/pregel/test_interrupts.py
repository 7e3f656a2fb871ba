"""interrupt() / Command(resume=...), interrupt_before / interrupt_after, Command as input."""

from __future__ import annotations

import operator
from typing import Annotated, Any, TypedDict

import pytest

from stepgraph.checkpoint.memory import InMemorySaver
from stepgraph.graph import START, StateGraph
from stepgraph.types import Command, Interrupt, interrupt


class State(TypedDict):
    x: int
    log: Annotated[list[str], operator.add]


def node_a(state: State) -> dict[str, Any]:
    return {"log": ["a"]}


def build(ask: Any, **compile_args: Any) -> Any:
    builder = StateGraph(State)
    builder.add_node("a", node_a)
    builder.add_node("ask", ask)
    builder.add_edge(START, "a")
    builder.add_edge("a", "ask")
    return builder.compile(checkpointer=InMemorySaver(), **compile_args)


@pytest.mark.parametrize("durability", ["sync", "async", "exit"])
def test_interrupt_and_resume(durability: str) -> None:
    runs: list[str] = []

    def ask(state: State) -> dict[str, Any]:
        runs.append("ask")
        first = interrupt({"question": "first?"})
        second = interrupt("second?")
        return {"x": first + second, "log": ["ask"]}

    graph = build(ask)
    config = {"configurable": {"thread_id": durability}}
    result = graph.invoke({"x": 0}, config, durability=durability)
    assert result["log"] == ["a"]
    [paused] = result["__interrupt__"]
    assert isinstance(paused, Interrupt)
    assert paused.value == {"question": "first?"}

    snapshot = graph.get_state(config)
    assert snapshot.next == ("ask",)
    assert snapshot.interrupts == (paused,)
    assert snapshot.tasks[0].interrupts == (paused,)

    result = graph.invoke(Command(resume=10), config, durability=durability)
    assert [i.value for i in result["__interrupt__"]] == ["second?"]
    assert graph.invoke(Command(resume=5), config, durability=durability) == {
        "x": 15,
        "log": ["a", "ask"],
    }
    # The node reran from its start on each resume; node a never ran again.
    assert runs == ["ask", "ask", "ask"]
    history = list(graph.get_state_history(config))
    assert [s.metadata["step"] for s in history] == (
        [2, 1, 0, -1] if durability != "exit" else [2, 1]
    )


def test_interrupt_stream_chunks() -> None:
    graph = build(lambda s: {"x": interrupt("why?")})
    chunks = list(
        graph.stream(
            {"x": 0}, {"configurable": {"thread_id": "s"}}, stream_mode=["updates", "values"]
        )
    )
    assert chunks[-2][0] == "updates"
    assert [i.value for i in chunks[-2][1]["__interrupt__"]] == ["why?"]
    assert chunks[-1][0] == "values"
    assert chunks[-1][1]["log"] == ["a"]
    assert "ask" not in [next(iter(c[1])) for c in chunks if c[0] == "updates"]


def test_resume_by_interrupt_id_with_parallel_interrupts() -> None:
    builder = StateGraph(State)
    builder.add_node("p", lambda s: {"log": [f"p={interrupt('p?')}"]})
    builder.add_node("q", lambda s: {"log": [f"q={interrupt('q?')}"]})
    builder.add_edge(START, "p")
    builder.add_edge(START, "q")
    graph = builder.compile(checkpointer=InMemorySaver())
    config = {"configurable": {"thread_id": "par"}}
    pending = graph.invoke({"x": 0}, config)["__interrupt__"]
    assert sorted(i.value for i in pending) == ["p?", "q?"]
    with pytest.raises(RuntimeError, match="multiple pending interrupts"):
        graph.invoke(Command(resume="x"), config)
    answers = {i.id: i.value.upper() for i in pending}
    assert graph.invoke(Command(resume=answers), config)["log"] == ["p=P?", "q=Q?"]


def test_interrupt_before_and_after() -> None:
    runs: list[str] = []

    def ask(state: State) -> dict[str, Any]:
        runs.append("ask")
        return {"log": ["ask"]}

    before = build(ask, interrupt_before=["ask"])
    config = {"configurable": {"thread_id": "b"}}
    assert before.invoke({"x": 0}, config) == {"x": 0, "log": ["a"]}
    assert before.get_state(config).next == ("ask",)
    assert runs == []
    assert list(before.stream(None, config, stream_mode="updates")) == [{"ask": {"log": ["ask"]}}]
    assert runs == ["ask"]

    after = build(ask, interrupt_after=["a"])
    config = {"configurable": {"thread_id": "a"}}
    chunks = list(after.stream({"x": 0}, config, stream_mode="updates"))
    assert chunks == [{"a": {"log": ["a"]}}, {"__interrupt__": ()}]
    assert after.get_state(config).next == ("ask",)
    # Update the paused state, then continue.
    assert after.invoke(Command(update={"x": 4}), config) == {"x": 4, "log": ["a", "ask"]}

    # Breakpoints can be given per call, too.
    per_call = build(ask)
    config = {"configurable": {"thread_id": "c"}}
    assert per_call.invoke({"x": 0}, config, interrupt_before="*")["log"] == []
    assert per_call.get_state(config).next == ("a",)


def test_command_goto_as_input() -> None:
    graph = build(lambda s: {"log": ["ask"]}, interrupt_before=["ask"])
    config = {"configurable": {"thread_id": "g"}}
    graph.invoke({"x": 0}, config)
    # Send the run back to "a" as well as on to "ask".
    result = graph.invoke(Command(goto="a"), config)
    assert result["log"] == ["a", "a", "ask"]
