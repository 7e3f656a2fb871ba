"""Lists that only grow are stored as the items each step appended (``storage.APPENDED_ITEMS``).

Real SQLite files, driven through graphs, as the executor saves them.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, TypedDict

import pytest

from stepgraph.checkpoint.sqlite import SqliteSaver
from stepgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
from stepgraph.checkpoint.storage import APPENDED_ITEMS, FULL_VALUE
from stepgraph.graph import END, START, StateGraph

STEPS = 1_000


class State(TypedDict):
    n: int
    items: Annotated[list[int], operator.add]


def counter(saver: Any, stop: int) -> Any:
    """One node looping ``stop`` times, appending one item per step."""

    def add(state: State) -> dict[str, Any]:
        return {"n": state["n"] + 1, "items": [state["n"]]}

    builder = StateGraph(State)
    builder.add_node("add", add)
    builder.add_edge(START, "add")
    builder.add_conditional_edges("add", lambda s: "add" if s["n"] < stop else END, ["add", END])
    return builder.compile(checkpointer=saver)


def config(thread_id: str) -> dict[str, Any]:
    return {"configurable": {"thread_id": thread_id}, "recursion_limit": STEPS + 10}


@pytest.fixture
def saver(tmp_path: Path) -> Iterator[SqliteSaver]:
    with SqliteSaver.from_conn_string(tmp_path / "appends.sqlite") as saver:
        yield saver


def stored_items(saver: SqliteSaver, thread_id: str) -> tuple[int, int, int]:
    """(items stored in the rows of channel "items", full rows, appended-items rows)."""
    rows = saver.conn.execute(
        "SELECT type, value, kind FROM checkpoint_values WHERE thread_id = ? AND channel = 'items'",
        (thread_id,),
    ).fetchall()
    items = sum(len(saver.serde.loads_typed((type_, value))) for type_, value, _ in rows)
    kinds = [kind for *_, kind in rows]
    return items, kinds.count(FULL_VALUE), kinds.count(APPENDED_ITEMS)


def assert_history_exact(saver: SqliteSaver, graph: Any, thread_id: str, total: int) -> None:
    """Every checkpoint reads back exactly the list it had: items == range(n)."""
    history = list(graph.get_state_history(config(thread_id)))
    assert len(history) == total
    for snapshot in history:
        values = snapshot.values
        assert values["items"] == list(range(values.get("n", 0))), snapshot.config
    for snapshot in history[::97]:  # get_tuple reads single checkpoints the same way
        found = saver.get_tuple(snapshot.config)
        assert found is not None
        values = found.checkpoint["channel_values"]
        assert values.get("items", []) == list(range(values.get("n", 0)))


def test_a_thousand_appends_store_linear_items_and_every_checkpoint_reads_back(
    saver: SqliteSaver,
) -> None:
    graph = counter(saver, STEPS)
    result = graph.invoke({"n": 0, "items": []}, config("t"), durability="sync")
    assert result["items"] == list(range(STEPS))

    items, full, appended = stored_items(saver, "t")
    # Whole lists at lengths 0..7, then where the length enters a class of a quarter of a
    # power of two (8, 10, 12, 14, 16, 20, ..., 896): 36 of them; every other step stores its
    # one new item. Storing every list whole would be ~STEPS**2 / 2 = 500,000 items.
    assert full == 36
    assert appended == STEPS + 1 - full
    assert items < 7 * STEPS
    assert_history_exact(saver, graph, "t", STEPS + 2)


def test_exit_mode_appends_to_the_version_the_run_started_from(saver: SqliteSaver) -> None:
    graph = counter(saver, 40)
    graph.invoke({"n": 0, "items": []}, config("e"), durability="sync")
    graph = counter(saver, 45)
    graph.invoke({"items": []}, config("e"), durability="exit")  # five more steps, saved once
    latest = saver.get_tuple(config("e"))
    assert latest is not None
    assert latest.checkpoint["channel_values"]["items"] == list(range(45))
    row = saver.conn.execute(
        "SELECT kind, type, value FROM checkpoint_values WHERE thread_id = 'e' AND channel = 'items'"
        " AND version = ?",
        (latest.checkpoint["channel_versions"]["items"],),
    ).fetchone()
    assert row[0] == APPENDED_ITEMS
    assert saver.serde.loads_typed((row[1], row[2])) == [40, 41, 42, 43, 44]


def test_prune_in_the_middle_of_a_chain_keeps_the_rest_readable(saver: SqliteSaver) -> None:
    graph = counter(saver, 300)  # lengths 257..300 are appended items over the 256 snapshot
    graph.invoke({"n": 0, "items": []}, config("p"), durability="sync")
    saver.prune(["p"], keep_last=20)
    _, full, appended = stored_items(saver, "p")
    assert full == 1  # the 256 snapshot the kept checkpoints' chains end in
    assert appended == 300 - 256
    assert_history_exact(saver, graph, "p", 20)
    # The thread goes on from what was kept.
    graph = counter(saver, 310)
    assert graph.invoke({"items": []}, config("p"), durability="sync")["items"] == list(range(310))
    assert_history_exact(saver, graph, "p", 32)


def test_delete_for_runs_keeps_the_chains_of_other_runs(saver: SqliteSaver) -> None:
    graph = counter(saver, 20)
    graph.invoke({"n": 0, "items": []}, {**config("r"), "run_id": "first"}, durability="sync")
    graph = counter(saver, 30)
    graph.invoke({"items": []}, {**config("r"), "run_id": "second"}, durability="sync")
    saver.delete_for_runs(["first"])
    history = list(graph.get_state_history(config("r")))
    assert [s.values["n"] for s in history] == [*range(30, 20, -1), 20, 20]
    assert_history_exact(saver, graph, "r", 12)


def test_copy_thread_copies_chains(saver: SqliteSaver) -> None:
    graph = counter(saver, 50)
    graph.invoke({"n": 0, "items": []}, config("source"), durability="sync")
    saver.copy_thread("source", "copy")
    saver.delete_thread("source")
    assert stored_items(saver, "copy")[2] > 0
    assert_history_exact(saver, graph, "copy", 52)


def test_a_list_replaced_by_a_non_appending_reducer_is_stored_whole(saver: SqliteSaver) -> None:
    """Only operator.add on lists is tracked: another reducer always stores the whole list."""

    class Replaced(TypedDict):
        items: Annotated[list[int], lambda old, new: [*old, *new][-3:]]

    builder = StateGraph(Replaced)
    builder.add_node("a", lambda s: {"items": [1, 2]})
    builder.add_node("b", lambda s: {"items": [3, 4]})
    builder.add_edge(START, "a")
    builder.add_edge("a", "b")
    builder.add_edge("b", END)
    graph = builder.compile(checkpointer=saver)
    assert graph.invoke({"items": []}, config("x"), durability="sync")["items"] == [2, 3, 4]
    assert stored_items(saver, "x")[2] == 0


async def test_async_saver_stores_and_reads_appended_items(tmp_path: Path) -> None:
    async with AsyncSqliteSaver.from_conn_string(tmp_path / "async.sqlite") as saver:
        graph = counter(saver, 100)
        result = await graph.ainvoke({"n": 0, "items": []}, config("a"), durability="async")
        assert result["items"] == list(range(100))
        history = [s async for s in graph.aget_state_history(config("a"))]
        assert len(history) == 102
        for snapshot in history:
            values = snapshot.values
            assert values["items"] == list(range(values.get("n", 0)))
        rows = await saver.conn.execute_fetchall(
            "SELECT count(*) FROM checkpoint_values WHERE kind = ?", (APPENDED_ITEMS,)
        )
        assert next(iter(rows))[0] > 0


def test_forks_and_updates_append_to_the_version_they_start_from(saver: SqliteSaver) -> None:
    graph = counter(saver, 30)
    graph.invoke({"n": 0, "items": []}, config("f"), durability="sync")
    history = list(graph.get_state_history(config("f")))
    at_20 = next(s for s in history if s.values.get("n") == 20 and s.next == ("add",))
    # Replay from step 20 on a new branch: its appends build on the old branch's chain.
    graph = counter(saver, 25)
    replayed = graph.invoke(None, {**config("f"), **at_20.config}, durability="sync")
    assert replayed["items"] == list(range(25))
    # update_state appends as a node would.
    graph.update_state(config("f"), {"items": [100, 101]}, as_node="add")
    latest = graph.get_state(config("f"))
    assert latest.values["items"] == [*range(25), 100, 101]
    assert_history_exact_prefix(graph, "f")
    assert stored_items(saver, "f")[2] > 0


def assert_history_exact_prefix(graph: Any, thread_id: str) -> None:
    """Every checkpoint's list is range(n), possibly followed by items added by update_state."""
    for snapshot in graph.get_state_history(config(thread_id)):
        items, n = snapshot.values["items"], snapshot.values.get("n", 0)
        assert items[:n] == list(range(n)) and items[n:] in ([], [100, 101]), snapshot.config
