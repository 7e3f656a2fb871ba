"""Subgraphs: nested checkpoint namespaces, interrupts at any depth, state and streaming."""

from __future__ import annotations

import operator
import uuid
from typing import Annotated, Any, TypedDict

import pytest

from stepgraph.checkpoint.memory import InMemorySaver
from stepgraph.errors import InvalidUpdateError
from stepgraph.graph import END, START, StateGraph
from stepgraph.types import Command, StateSnapshot, interrupt


class State(TypedDict):
    log: Annotated[list[str], operator.add]


def thread() -> dict[str, Any]:
    return {"configurable": {"thread_id": str(uuid.uuid4())}}


def recorder(runs: list[str], name: str) -> Any:
    def node(state: State) -> dict[str, Any]:
        runs.append(name)
        return {"log": [name]}

    return node


def asker(runs: list[str], name: str) -> Any:
    def node(state: State) -> dict[str, Any]:
        runs.append(name)
        return {"log": [f"{name}={interrupt(name + '?')}"]}

    return node


def namespaces(saver: Any, config: dict[str, Any]) -> set[str]:
    return {t.config["configurable"]["checkpoint_ns"] for t in saver.list(config)}


def build_three_levels(runs: list[str], **child_compile: Any) -> Any:
    """parent: p1 -> child -> p2; child: c1 -> (c_sib, grandchild) -> c2; grandchild: g1 -> ask."""
    grand = StateGraph(State)
    grand.add_node("g1", recorder(runs, "g1"))
    grand.add_node("ask", asker(runs, "ask"))
    grand.add_edge(START, "g1")
    grand.add_edge("g1", "ask")
    grandchild = grand.compile()

    child_builder = StateGraph(State)
    child_builder.add_node("c1", recorder(runs, "c1"))
    child_builder.add_node("c_sib", recorder(runs, "c_sib"))
    child_builder.add_node("grandchild", grandchild)
    child_builder.add_node("c2", recorder(runs, "c2"))
    child_builder.add_edge(START, "c1")
    child_builder.add_edge("c1", "c_sib")
    child_builder.add_edge("c1", "grandchild")
    child_builder.add_edge(["c_sib", "grandchild"], "c2")
    child = child_builder.compile(**child_compile)

    parent = StateGraph(State)
    parent.add_node("p1", recorder(runs, "p1"))
    parent.add_node("child", child)
    parent.add_node("p2", recorder(runs, "p2"))
    parent.add_edge(START, "p1")
    parent.add_edge("p1", "child")
    parent.add_edge("child", "p2")
    return parent


@pytest.mark.parametrize("durability", ["sync", "async", "exit"])
def test_interrupt_two_levels_down_resumes_without_rerunning_finished_nodes(
    durability: str,
) -> None:
    runs: list[str] = []
    saver = InMemorySaver()
    graph = build_three_levels(runs).compile(checkpointer=saver)
    config = thread()
    result = graph.invoke({"log": []}, config, durability=durability)
    [paused] = result["__interrupt__"]
    assert paused.value == "ask?"
    assert sorted(runs) == sorted(["p1", "c1", "c_sib", "g1", "ask"])

    snapshot = graph.get_state(config)
    assert snapshot.next == ("child",)
    assert snapshot.interrupts == (paused,)
    [child_task] = snapshot.tasks
    ns = child_task.state["configurable"]["checkpoint_ns"]
    assert ns == f"child:{child_task.id}"
    if durability != "exit":
        found = namespaces(saver, config)
        assert "" in found and ns in found
        assert any(n.startswith(f"{ns}|grandchild:") for n in found)

    runs.clear()
    final = graph.invoke(Command(resume="yes"), config, durability=durability)
    # Only the interrupted node, and what follows it, ran: not c1, c_sib, g1 or p1.
    assert runs == ["ask", "c2", "p2"]
    assert "ask=yes" in final["log"]
    assert final["log"][-2:] == ["c2", "p2"]


def test_get_state_with_subgraphs_and_state_configs() -> None:
    runs: list[str] = []
    graph = build_three_levels(runs).compile(checkpointer=InMemorySaver())
    config = thread()
    graph.invoke({"log": []}, config)
    snapshot = graph.get_state(config, subgraphs=True)
    child_state = snapshot.tasks[0].state
    assert isinstance(child_state, StateSnapshot)
    assert child_state.next == ("grandchild",)  # c_sib finished, the grandchild is paused
    assert child_state.values["log"] == ["p1", "c1", "c_sib"]
    grandchild_task = next(t for t in child_state.tasks if t.name == "grandchild")
    grand_state = grandchild_task.state
    assert isinstance(grand_state, StateSnapshot)
    assert grand_state.next == ("ask",)
    assert grand_state.tasks[0].interrupts[0].value == "ask?"
    # The config a task reports reads the subgraph's state directly.
    plain = graph.get_state(config)
    direct = graph.get_state(plain.tasks[0].state)
    assert direct.values == child_state.values
    assert direct.next == child_state.next


def test_stream_subgraphs_yields_namespaced_chunks() -> None:
    runs: list[str] = []
    graph = build_three_levels(runs).compile(checkpointer=InMemorySaver())
    chunks = list(graph.stream({"log": []}, thread(), stream_mode="updates", subgraphs=True))
    by_ns = {}
    for namespace, chunk in chunks:
        by_ns.setdefault(len(namespace), []).append(chunk)
        assert isinstance(namespace, tuple)
    assert by_ns[0][0] == {"p1": {"log": ["p1"]}}
    assert {"c1": {"log": ["c1"]}} in by_ns[1]
    assert {"g1": {"log": ["g1"]}} in by_ns[2]
    deepest = next(ns for ns, _ in chunks if len(ns) == 2)
    assert deepest[0].startswith("child:") and deepest[1].startswith("grandchild:")
    # Without subgraphs=True only the root's chunks come out.
    plain = list(build_three_levels([]).compile().stream({"log": []}, stream_mode="updates"))
    assert all("g1" not in chunk for chunk in plain)


def test_subgraph_invoked_inside_a_node_function() -> None:
    runs: list[str] = []
    sub = StateGraph(State)
    sub.add_node("s1", recorder(runs, "s1"))
    sub.add_node("ask", asker(runs, "ask"))
    sub.add_edge(START, "s1")
    sub.add_edge("s1", "ask")
    subgraph = sub.compile()

    def call_sub(state: State) -> dict[str, Any]:
        runs.append("call_sub")
        output = subgraph.invoke({"log": ["from parent"]})
        return {"log": output["log"]}

    parent = StateGraph(State)
    parent.add_node("call_sub", call_sub)
    parent.add_edge(START, "call_sub")
    saver = InMemorySaver()
    graph = parent.compile(checkpointer=saver)
    config = thread()
    assert graph.invoke({"log": []}, config)["__interrupt__"][0].value == "ask?"
    assert any(ns.startswith("call_sub:") for ns in namespaces(saver, config))
    snapshot = graph.get_state(config, subgraphs=True)
    assert snapshot.tasks[0].state.next == ("ask",)
    assert graph.invoke(Command(resume=1), config)["log"] == ["from parent", "s1", "ask=1"]
    # The node reran from its start, the subgraph went on from its interrupted node.
    assert runs == ["call_sub", "s1", "ask", "call_sub", "ask"]


def counting_subgraph(runs: list[str], **compile_args: Any) -> Any:
    class Count(TypedDict):
        n: int

    sub = StateGraph(Count)

    def bump(state: Count) -> dict[str, Any]:
        runs.append("bump")
        return {"n": state.get("n", 0) + 1}

    sub.add_node("bump", bump)
    sub.add_edge(START, "bump")
    subgraph = sub.compile(**compile_args)

    class Outer(TypedDict):
        total: int

    def run_sub(state: Outer) -> dict[str, Any]:
        return {"total": subgraph.invoke({})["n"]}

    parent = StateGraph(Outer)
    parent.add_node("run_sub", run_sub)
    parent.add_edge(START, "run_sub")
    return parent


def test_checkpointer_true_keeps_subgraph_state_across_parent_runs() -> None:
    runs: list[str] = []
    saver = InMemorySaver()
    graph = counting_subgraph(runs, checkpointer=True).compile(checkpointer=saver)
    config = thread()
    assert graph.invoke({"total": 0}, config)["total"] == 1
    assert graph.invoke({"total": 0}, config)["total"] == 2
    assert graph.invoke({"total": 0}, config)["total"] == 3
    assert "run_sub" in namespaces(saver, config)


def test_default_subgraph_state_is_per_task() -> None:
    runs: list[str] = []
    graph = counting_subgraph(runs).compile(checkpointer=InMemorySaver())
    config = thread()
    assert graph.invoke({"total": 0}, config)["total"] == 1
    assert graph.invoke({"total": 0}, config)["total"] == 1


def test_checkpointer_false_saves_nothing_for_the_subgraph() -> None:
    runs: list[str] = []
    saver = InMemorySaver()
    graph = counting_subgraph(runs, checkpointer=False).compile(checkpointer=saver)
    config = thread()
    assert graph.invoke({"total": 0}, config)["total"] == 1
    assert namespaces(saver, config) == {""}


def test_checkpointer_true_needs_a_parent() -> None:
    sub = StateGraph(State)
    sub.add_node("a", recorder([], "a"))
    sub.add_edge(START, "a")
    with pytest.raises(ValueError, match="checkpointer=True"):
        sub.compile(checkpointer=True).invoke({"log": []})


def test_command_parent_goto_and_update() -> None:
    runs: list[str] = []
    sub = StateGraph(State)

    def escalate(state: State) -> Command:
        runs.append("escalate")
        return Command(graph=Command.PARENT, goto="handler", update={"log": ["escalated"]})

    sub.add_node("escalate", escalate)
    sub.add_node("never", recorder(runs, "never"))
    sub.add_edge(START, "escalate")
    sub.add_edge("escalate", "never")

    parent = StateGraph(State)
    # Only the subgraph's Command reaches "handler": declare it on the node running the subgraph.
    parent.add_node("sub", sub.compile(), destinations=("handler",))
    parent.add_node("handler", recorder(runs, "handler"))
    parent.add_node("after_sub", recorder(runs, "after_sub"))
    parent.add_edge(START, "sub")
    parent.add_edge("sub", "after_sub")
    parent.add_edge("handler", END)
    graph = parent.compile(checkpointer=InMemorySaver())
    result = graph.invoke({"log": []}, thread())
    # The static edge sub -> after_sub applies too, as with any Command(goto=...).
    assert runs[0] == "escalate" and sorted(runs[1:]) == ["after_sub", "handler"]
    assert result["log"] == ["escalated", "after_sub", "handler"]  # applied by node name


def test_command_parent_at_the_root_is_an_error() -> None:
    builder = StateGraph(State)
    builder.add_node("a", lambda s: Command(graph=Command.PARENT, goto="a"))
    builder.add_edge(START, "a")
    with pytest.raises(InvalidUpdateError, match="no parent"):
        builder.compile().invoke({"log": []})


async def test_async_subgraph_interrupt_and_resume() -> None:
    runs: list[str] = []
    sub = StateGraph(State)

    async def s1(state: State) -> dict[str, Any]:
        runs.append("s1")
        return {"log": ["s1"]}

    async def ask(state: State) -> dict[str, Any]:
        runs.append("ask")
        return {"log": [f"ask={interrupt('?')}"]}

    sub.add_node("s1", s1)
    sub.add_node("ask", ask)
    sub.add_edge(START, "s1")
    sub.add_edge("s1", "ask")
    parent = StateGraph(State)
    parent.add_node("sub", sub.compile())
    parent.add_edge(START, "sub")
    graph = parent.compile(checkpointer=InMemorySaver())
    config = thread()
    assert (await graph.ainvoke({"log": []}, config))["__interrupt__"][0].value == "?"
    snapshot = await graph.aget_state(config, subgraphs=True)
    assert snapshot.tasks[0].state.next == ("ask",)
    chunks = [c async for c in graph.astream(Command(resume=2), config, subgraphs=True)]
    assert chunks[-1] == ((), {"sub": {"log": ["s1", "ask=2"]}})  # "updates" by default
    assert runs == ["s1", "ask", "ask"]


def test_subgraph_interrupt_survives_a_restart(reopen_store: Any) -> None:
    runs: list[str] = []
    config = thread()
    graph = build_three_levels(runs).compile(checkpointer=reopen_store())
    paused = graph.invoke({"log": []}, config)["__interrupt__"]
    # A new process: the store opened again, the graphs built again.
    runs.clear()
    graph = build_three_levels(runs).compile(checkpointer=reopen_store())
    snapshot = graph.get_state(config, subgraphs=True)
    assert snapshot.interrupts == tuple(paused)
    assert snapshot.tasks[0].state.next == ("grandchild",)
    final = graph.invoke(Command(resume="later"), config)
    assert runs == ["ask", "c2", "p2"]
    assert final["log"][-3:] == ["ask=later", "c2", "p2"]


def test_subgraph_error_resumes_inside_the_subgraph(reopen_store: Any) -> None:
    runs: list[str] = []
    fail = [True]
    sub = StateGraph(State)
    sub.add_node("s1", recorder(runs, "s1"))

    def flaky(state: State) -> dict[str, Any]:
        runs.append("flaky")
        if fail[0]:
            raise ConnectionError("down")
        return {"log": ["flaky"]}

    sub.add_node("flaky", flaky)
    sub.add_edge(START, "s1")
    sub.add_edge("s1", "flaky")
    parent = StateGraph(State)
    parent.add_node("sub", sub.compile())
    parent.add_edge(START, "sub")
    config = thread()
    graph = parent.compile(checkpointer=reopen_store())
    with pytest.raises(ConnectionError):
        graph.invoke({"log": []}, config, durability="sync")
    fail[0] = False
    graph = parent.compile(checkpointer=reopen_store())
    assert graph.invoke(None, config)["log"] == ["s1", "flaky"]
    assert runs == ["s1", "flaky", "flaky"]


def test_several_graphs_run_by_one_node_keep_separate_namespaces() -> None:
    runs: list[str] = []

    def single(name: str) -> Any:
        builder = StateGraph(State)
        builder.add_node(name, recorder(runs, name))
        builder.add_edge(START, name)
        return builder.compile()

    first, second = single("x"), single("y")

    def node(state: State) -> dict[str, Any]:
        logs = [entry for g in (first, second, first) for entry in g.invoke({"log": []})["log"]]
        return {"log": [*logs, interrupt("done?")]}

    builder = StateGraph(State)
    builder.add_node("node", node)
    builder.add_edge(START, "node")
    saver = InMemorySaver()
    graph = builder.compile(checkpointer=saver)
    config = thread()
    graph.invoke({"log": []}, config)
    [task_ns] = [ns for ns in namespaces(saver, config) if ns and "|" not in ns]
    assert namespaces(saver, config) == {"", task_ns, f"{task_ns}|1", f"{task_ns}|2"}
    assert graph.invoke(Command(resume="ok"), config)["log"] == ["x", "y", "x", "ok"]
    # On resume each of the three runs returned its saved result without running again.
    assert runs == ["x", "y", "x"]


def test_breakpoint_inside_a_subgraph_pauses_the_parent() -> None:
    runs: list[str] = []
    sub = StateGraph(State)
    sub.add_node("s1", recorder(runs, "s1"))
    sub.add_node("s2", recorder(runs, "s2"))
    sub.add_edge(START, "s1")
    sub.add_edge("s1", "s2")
    parent = StateGraph(State)
    parent.add_node("p1", recorder(runs, "p1"))
    parent.add_node("sub", sub.compile(interrupt_before=["s2"]))
    parent.add_node("p2", recorder(runs, "p2"))
    parent.add_edge(START, "p1")
    parent.add_edge("p1", "sub")
    parent.add_edge("sub", "p2")
    graph = parent.compile(checkpointer=InMemorySaver())
    config = thread()
    assert graph.invoke({"log": []}, config) == {"log": ["p1"]}  # a breakpoint: no __interrupt__
    snapshot = graph.get_state(config, subgraphs=True)
    assert snapshot.next == ("sub",)
    assert snapshot.tasks[0].interrupts == ()
    assert snapshot.tasks[0].state.next == ("s2",)
    assert graph.invoke(None, config)["log"][-2:] == ["s2", "p2"]
    assert runs == ["p1", "s1", "s2", "p2"]


def test_checkpointer_true_subgraph_interrupt_and_resume() -> None:
    runs: list[str] = []
    sub = StateGraph(State)
    sub.add_node("s1", recorder(runs, "s1"))
    sub.add_node("ask", asker(runs, "ask"))
    sub.add_edge(START, "s1")
    sub.add_edge("s1", "ask")
    parent = StateGraph(State)
    parent.add_node("sub", sub.compile(checkpointer=True))
    parent.add_edge(START, "sub")
    graph = parent.compile(checkpointer=InMemorySaver())
    config = thread()
    graph.invoke({"log": []}, config)
    assert graph.get_state(config).tasks[0].state["configurable"]["checkpoint_ns"] == "sub"
    assert graph.invoke(Command(resume="a"), config)["log"] == ["s1", "ask=a"]
    # The next parent run continues the subgraph's own thread state.
    runs.clear()
    graph.invoke({"log": []}, config)
    assert graph.invoke(Command(resume="b"), config)["log"][-2:] == ["s1", "ask=b"]
    assert runs == ["s1", "ask", "ask"]


def test_stream_subgraphs_with_several_modes() -> None:
    graph = build_three_levels([]).compile(checkpointer=InMemorySaver())
    chunks = list(
        graph.stream({"log": []}, thread(), stream_mode=["values", "updates"], subgraphs=True)
    )
    assert all(len(chunk) == 3 for chunk in chunks)
    assert ((), "updates", {"p1": {"log": ["p1"]}}) in chunks
    child_values = [c for ns, mode, c in chunks if len(ns) == 1 and mode == "values"]
    assert child_values[0] == {"log": ["p1"]}  # the child's input
