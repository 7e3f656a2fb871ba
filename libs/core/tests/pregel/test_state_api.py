"""get_state, get_state_history, update_state, time travel and task ids."""

from __future__ import annotations

import itertools
import operator
from typing import Annotated, Any, TypedDict

import pytest

from stepgraph.checkpoint.memory import InMemorySaver
from stepgraph.errors import EmptyInputError, InvalidUpdateError
from stepgraph.graph import START, StateGraph
from stepgraph.pregel._algo import task_id


class State(TypedDict):
    x: int
    log: Annotated[list[str], operator.add]


def build(saver: Any, calls: list[str] | None = None) -> Any:
    def node(name: str):
        def run(state: State) -> dict[str, Any]:
            if calls is not None:
                calls.append(name)
            return {"x": state["x"] + 1, "log": [name]}

        return run

    builder = StateGraph(State)
    builder.add_node("a", node("a"))
    builder.add_node("b", node("b"))
    builder.add_edge(START, "a")
    builder.add_edge("a", "b")
    return builder.compile(checkpointer=saver)


CONFIG = {"configurable": {"thread_id": "1"}}


def test_get_state_and_history_match_langgraph_shape() -> None:
    graph = build(InMemorySaver())
    graph.invoke({"x": 0}, CONFIG, durability="sync")
    snapshot = graph.get_state(CONFIG)
    assert snapshot.values == {"x": 2, "log": ["a", "b"]}
    assert snapshot.next == ()
    assert snapshot.tasks == ()
    assert snapshot.metadata == {"source": "loop", "step": 2, "parents": {}}
    assert snapshot.created_at
    history = list(graph.get_state_history(CONFIG))
    assert [(s.metadata["source"], s.metadata["step"], s.next) for s in history] == [
        ("loop", 2, ()),
        ("loop", 1, ("b",)),
        ("loop", 0, ("a",)),
        ("input", -1, ("__start__",)),
    ]
    # Each checkpoint's parent is the one before it.
    for newer, older in itertools.pairwise(history):
        assert newer.parent_config == older.config
    assert history[-1].parent_config is None
    assert len(list(graph.get_state_history(CONFIG, limit=2))) == 2
    assert len(list(graph.get_state_history(CONFIG, filter={"source": "input"}))) == 1
    assert len(list(graph.get_state_history(CONFIG, before=history[1].config))) == 2


def test_user_metadata_is_merged() -> None:
    graph = build(InMemorySaver())
    config = {"configurable": {"thread_id": "m", "user": "ann"}, "metadata": {"env": "test"}}
    graph.invoke({"x": 0}, config)
    metadata = graph.get_state({"configurable": {"thread_id": "m"}}).metadata
    assert metadata["env"] == "test"
    assert metadata["user"] == "ann"
    assert metadata["source"] == "loop"


def test_empty_thread_state_and_missing_input() -> None:
    graph = build(InMemorySaver())
    snapshot = graph.get_state({"configurable": {"thread_id": "none"}})
    assert snapshot.values == {}
    assert snapshot.next == ()
    with pytest.raises(EmptyInputError):
        graph.invoke(None, {"configurable": {"thread_id": "none"}})
    with pytest.raises(ValueError, match="thread_id"):
        graph.invoke({"x": 0})


def test_new_input_continues_the_thread() -> None:
    graph = build(InMemorySaver())
    graph.invoke({"x": 0}, CONFIG)
    assert graph.invoke({"x": 10}, CONFIG) == {"x": 12, "log": ["a", "b", "a", "b"]}
    steps = [s.metadata["step"] for s in graph.get_state_history(CONFIG)]
    assert steps == [6, 5, 4, 3, 2, 1, 0, -1]


def test_update_state() -> None:
    graph = build(InMemorySaver())
    graph.invoke({"x": 0}, CONFIG)
    # Without as_node the update counts as the node that wrote last (b): nothing follows.
    graph.update_state(CONFIG, {"x": 100})
    snapshot = graph.get_state(CONFIG)
    assert snapshot.values == {"x": 100, "log": ["a", "b"]}
    assert snapshot.next == ()
    assert snapshot.metadata["source"] == "update"
    assert snapshot.metadata["step"] == 3
    # As node a: reducers apply and b runs next.
    graph.update_state(CONFIG, {"x": 5, "log": ["manual"]}, as_node="a")
    snapshot = graph.get_state(CONFIG)
    assert snapshot.values == {"x": 5, "log": ["a", "b", "manual"]}
    assert snapshot.next == ("b",)
    assert graph.invoke(None, CONFIG) == {"x": 6, "log": ["a", "b", "manual", "b"]}
    with pytest.raises(InvalidUpdateError, match="ghost"):
        graph.update_state(CONFIG, {"x": 1}, as_node="ghost")

    fresh = {"configurable": {"thread_id": "fresh"}}
    graph.update_state(fresh, {"x": 3})
    snapshot = graph.get_state(fresh)
    assert snapshot.values == {"x": 3, "log": []}
    assert snapshot.next == ("a",)
    assert snapshot.metadata["step"] == 0


def test_replay_from_an_earlier_checkpoint_forks() -> None:
    calls: list[str] = []
    graph = build(InMemorySaver(), calls)
    graph.invoke({"x": 0}, CONFIG)
    before_b = next(s for s in graph.get_state_history(CONFIG) if s.next == ("b",))
    old_ids = [s.config["configurable"]["checkpoint_id"] for s in graph.get_state_history(CONFIG)]
    calls.clear()
    assert graph.invoke(None, before_b.config) == {"x": 2, "log": ["a", "b"]}
    assert calls == ["b"]  # replays only what followed the checkpoint
    history = list(graph.get_state_history(CONFIG))
    assert [(s.metadata["source"], s.metadata["step"]) for s in history[:2]] == [
        ("loop", 3),
        ("fork", 2),
    ]
    assert history[1].parent_config == before_b.config
    assert history[1].next == ("b",)
    # The old branch is intact.
    assert [s.config["configurable"]["checkpoint_id"] for s in history[2:]] == old_ids


def test_fork_with_new_values_via_update_state() -> None:
    graph = build(InMemorySaver())
    graph.invoke({"x": 0}, CONFIG)
    before_b = next(s for s in graph.get_state_history(CONFIG) if s.next == ("b",))
    forked = graph.update_state(before_b.config, {"x": 50}, as_node="a")
    assert graph.invoke(None, forked) == {"x": 51, "log": ["a", "b"]}


def test_task_ids_are_pure_functions_of_their_inputs() -> None:
    first = task_id("ckpt", "", 3, "node", ("__pregel_pull", "node"))
    assert first == task_id("ckpt", "", 3, "node", ("__pregel_pull", "node"))
    assert first != task_id("ckpt", "", 4, "node", ("__pregel_pull", "node"))
    assert first != task_id("ckpt2", "", 3, "node", ("__pregel_pull", "node"))
    assert first != task_id("ckpt", "ns", 3, "node", ("__pregel_pull", "node"))
    assert first != task_id("ckpt", "", 3, "node", ("__pregel_push", 0))


def test_get_state_reports_task_ids_used_by_the_run() -> None:
    graph = build(InMemorySaver())
    for chunk in graph.stream({"x": 0}, CONFIG, stream_mode="tasks"):
        if chunk["name"] == "b" and "input" in chunk:
            b_task_id = chunk["id"]
    before_b = next(s for s in graph.get_state_history(CONFIG) if s.next == ("b",))
    assert before_b.tasks[0].id == b_task_id
    assert before_b.tasks[0].result == {"x": 2, "log": ["b"]}


async def test_async_state_api() -> None:
    graph = build(InMemorySaver())
    await graph.ainvoke({"x": 0}, CONFIG)
    snapshot = await graph.aget_state(CONFIG)
    assert snapshot.values["x"] == 2
    history = [s async for s in graph.aget_state_history(CONFIG)]
    assert len(history) == 4
    await graph.aupdate_state(CONFIG, {"x": 9}, as_node="a")
    assert await graph.ainvoke(None, CONFIG) == {"x": 10, "log": ["a", "b", "b"]}


def test_model_state_round_trips_through_the_saver() -> None:
    from pydantic import BaseModel

    class Item(BaseModel):
        name: str

    class Shelf(BaseModel):
        items: Annotated[list[Item], operator.add] = []
        count: int = 0

    def add(state: Shelf) -> dict[str, Any]:
        return {"items": [Item(name=f"i{state.count}")], "count": state.count + 1}

    builder = StateGraph(Shelf)
    builder.add_node("add", add)
    builder.add_edge(START, "add")
    # compile() allows the schemas' types in the saver's serializer.
    graph = builder.compile(checkpointer=InMemorySaver())
    config = {"configurable": {"thread_id": "models"}}
    graph.invoke({"count": 1}, config, durability="sync")
    assert graph.get_state(config).values == {"items": [Item(name="i1")], "count": 2}
    assert graph.invoke({"count": 5}, config)["items"] == [Item(name="i1"), Item(name="i5")]
