"""Postgres stores what SQLite stores: small values inline, lists that only grow as the items
each step appended (``storage.APPENDED_ITEMS``), read back as one primary-key range."""

from __future__ import annotations

import operator
from collections.abc import Iterator
from typing import Annotated, Any, TypedDict

import psycopg
import pytest

from stepgraph.checkpoint.base import empty_checkpoint
from stepgraph.checkpoint.postgres import PostgresSaver, _schema
from stepgraph.checkpoint.postgres._plans import encode
from stepgraph.checkpoint.storage import APPENDED_ITEMS, FULL_VALUE, checkpoint_rows
from stepgraph.graph import END, START, StateGraph


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
    return {"configurable": {"thread_id": thread_id}, "recursion_limit": 1_000}


@pytest.fixture
def saver(postgres_uri: str) -> Iterator[PostgresSaver]:
    with psycopg.connect(postgres_uri, autocommit=True) as conn:
        saver = PostgresSaver(conn)
        saver.setup()
        yield saver


def kinds(saver: PostgresSaver, thread_id: str, channel: str) -> list[int]:
    assert isinstance(saver.conn, psycopg.Connection)
    rows = saver.conn.execute(
        "SELECT kind FROM stepgraph_checkpoint_values WHERE thread_id = %s AND channel = %s",
        (encode(thread_id), encode(channel)),
    ).fetchall()
    return [kind for (kind,) in rows]


def assert_history_exact(saver: PostgresSaver, graph: Any, thread_id: str, total: int) -> None:
    history = list(graph.get_state_history(config(thread_id)))
    assert len(history) == total
    for snapshot in history:
        assert snapshot.values["items"] == list(range(snapshot.values.get("n", 0)))
    for snapshot in history[::23]:
        found = saver.get_tuple(snapshot.config)
        assert found is not None
        values = found.checkpoint["channel_values"]
        assert values.get("items", []) == list(range(values.get("n", 0)))


def test_appended_items_and_inline_scalars(saver: PostgresSaver) -> None:
    graph = counter(saver, 300)
    assert graph.invoke({"n": 0, "items": []}, config("t"), durability="sync")["items"] == list(
        range(300)
    )
    stored = kinds(saver, "t", "items")
    # Whole lists at lengths 0..7 and where the length enters a class of a quarter of a power
    # of two (8, 10, 12, 14, 16, 20, ..., 224, 256: 21 of those); every other step stores
    # only its new item.
    assert stored.count(FULL_VALUE) == 8 + 21
    assert stored.count(APPENDED_ITEMS) == 301 - 29
    assert kinds(saver, "t", "n") == []  # a counter travels in the checkpoint row
    assert_history_exact(saver, graph, "t", 302)


def test_prune_copy_and_delete_keep_chains_readable(saver: PostgresSaver) -> None:
    graph = counter(saver, 300)  # lengths 257..300 are appended items over the 256 snapshot
    graph.invoke({"n": 0, "items": []}, config("p"), durability="sync")
    saver.prune(["p"], keep_last=20)
    stored = kinds(saver, "p", "items")
    assert stored.count(FULL_VALUE) == 1  # the snapshot the kept checkpoints' chains end in
    assert stored.count(APPENDED_ITEMS) == 300 - 256
    assert_history_exact(saver, graph, "p", 20)

    saver.copy_thread("p", "q")
    assert_history_exact(saver, graph, "q", 20)
    saver.delete_thread("p")
    graph = counter(saver, 310)
    assert graph.invoke({"items": []}, config("q"), durability="sync")["items"] == list(range(310))
    assert_history_exact(saver, graph, "q", 32)


def test_rows_of_schema_version_1_stay_readable(postgres_uri: str) -> None:
    """A database set up by the first release is migrated, and its rows read back."""
    with psycopg.connect(postgres_uri, autocommit=True) as conn:
        conn.execute(_schema.CREATE_MIGRATIONS_TABLE)
        for sql in _schema.MIGRATIONS[0]:
            conn.execute(sql)
        conn.execute("INSERT INTO stepgraph_migrations (version) VALUES (1)")
        checkpoint = empty_checkpoint()
        checkpoint["channel_values"] = {"items": [1, 2], "n": 2}
        checkpoint["channel_versions"] = {"items": "00000001.0", "n": "00000001.1"}
        saver = PostgresSaver(conn)
        rows = checkpoint_rows(
            saver.serde,
            {"configurable": {"thread_id": "old"}},
            checkpoint,
            {},
            {"items": "00000001.0", "n": "00000001.1"},
        )
        row = rows.checkpoint
        conn.execute(
            "INSERT INTO stepgraph_checkpoints VALUES"
            " (%s, %s, %s, NULL, %s, NULL, %s, %s, %s, %s, '{}')",
            (encode(row.thread_id), b"", encode(row.checkpoint_id), row.ts, row.checkpoint_type,
             row.checkpoint, row.metadata_type, row.metadata),
        )  # fmt: skip
        for value in rows.values:
            conn.execute(
                "INSERT INTO stepgraph_checkpoint_values VALUES (%s, %s, %s, %s, %s, %s, 0)",
                (encode(value.thread_id), b"", encode(value.channel), encode(value.version),
                 value.type, value.value),
            )  # fmt: skip

        saver.setup()
        versions = conn.execute("SELECT max(version) FROM stepgraph_migrations").fetchone()
        assert versions == (_schema.SCHEMA_VERSION,)
        found = saver.get_tuple({"configurable": {"thread_id": "old"}})
        assert found is not None
        assert found.checkpoint["channel_values"] == {"items": [1, 2], "n": 2}
