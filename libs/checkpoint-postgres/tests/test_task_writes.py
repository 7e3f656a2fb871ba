"""A task's regular writes share one row (``storage.TASK_WRITES``), as in SQLite; rows of one
write each, as every version before schema 4 stored them, read back alongside."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from pg_test_helpers import migrate_to

from stepgraph.checkpoint.base import ERROR, TaskWrites, empty_checkpoint
from stepgraph.checkpoint.postgres import PostgresSaver, _schema
from stepgraph.checkpoint.postgres._plans import encode
from stepgraph.checkpoint.storage import ONE_WRITE, TASK_WRITES, write_rows
from stepgraph.config import RunnableConfig


@pytest.fixture
def saver(postgres_uri: str) -> Iterator[PostgresSaver]:
    with PostgresSaver.from_conn_string(postgres_uri) as saver:
        saver.setup()
        yield saver


def thread(thread_id: str) -> RunnableConfig:
    return {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}


def kinds(postgres_uri: str, thread_id: str) -> list[tuple[str, int, int]]:
    with psycopg.connect(postgres_uri) as conn:
        found = conn.execute(
            "SELECT convert_from(task_id, 'UTF8'), idx, kind FROM stepgraph_checkpoint_writes"
            " WHERE thread_id = %s ORDER BY task_id, idx",
            (encode(thread_id),),
        ).fetchall()
    return [tuple(row) for row in found]


def test_a_tasks_writes_share_a_row(postgres_uri: str, saver: PostgresSaver) -> None:
    config = saver.put(thread("t"), empty_checkpoint(), {}, {})
    saver.put_writes(config, [("a", 1), ("b", [2]), ("a", None)], "task-1")
    saver.put_writes(config, [("c", b"\x00")], "task-2")
    saver.put_writes_batch(
        config, [TaskWrites("task-3", [(ERROR, "boom"), ("d", 4), ("e", bytearray(b"5"))])]
    )
    # A repeat with fewer writes is a row of its own (keyed by its last index) that reads as
    # nothing new: the fullest list wins.
    saver.put_writes(config, [("a", "again"), ("b", "again")], "task-1")
    assert kinds(postgres_uri, "t") == [
        ("task-1", 1, TASK_WRITES),
        ("task-1", 2, TASK_WRITES),
        ("task-2", 0, ONE_WRITE),
        ("task-3", -1, ONE_WRITE),
        ("task-3", 2, TASK_WRITES),
    ]
    found = saver.get_tuple(config)
    assert found is not None
    assert found.pending_writes == [
        ("task-1", "a", 1),
        ("task-1", "b", [2]),
        ("task-1", "a", None),
        ("task-2", "c", b"\x00"),
        ("task-3", ERROR, "boom"),
        ("task-3", "d", 4),
        ("task-3", "e", bytearray(b"5")),
    ]
    assert type(found.pending_writes[-1][2]) is bytearray  # typed as a row of its own would be
    saver.copy_thread("t", "copy")
    assert kinds(postgres_uri, "copy") == kinds(postgres_uri, "t")
    copied = saver.get_tuple({"configurable": {**config["configurable"], "thread_id": "copy"}})
    assert copied is not None and copied.pending_writes == found.pending_writes


def test_rows_of_schema_version_3_stay_readable(postgres_uri: str) -> None:
    """Write rows stored one write each before ``kind`` existed read back after the migration,
    next to a task's writes saved after it in one row."""
    with psycopg.connect(postgres_uri, autocommit=True) as conn:
        migrate_to(conn, 3)
        saver = PostgresSaver(conn)
        checkpoint = empty_checkpoint()
        conn.execute(
            "INSERT INTO stepgraph_checkpoints (thread_id, checkpoint_ns, checkpoint_id,"
            " parent_checkpoint_id, ts, run_id, checkpoint_type, checkpoint, metadata_type,"
            " metadata, metadata_json) VALUES (%s, '', %s, NULL, %s, NULL, %s, %s, %s, %s, '{}')",
            (encode("old"), encode(checkpoint["id"]), checkpoint["ts"],
             *saver.serde.dumps_typed({"v": 1, "channel_versions": {}, "versions_seen": {}}),
             *saver.serde.dumps_typed({})),
        )  # fmt: skip
        config = {
            "configurable": {**thread("old")["configurable"], "checkpoint_id": checkpoint["id"]}
        }
        old_rows = write_rows(saver.serde, config, [(ERROR, "e")], "task-old")
        old_rows += [
            row._replace(idx=idx, channel=channel, value=saver.serde.dumps_typed(value)[1])
            for idx, (channel, value) in enumerate([("a", 1), ("b", 2)])
            for row in write_rows(saver.serde, config, [(channel, value)], "task-old")
        ]
        for row in old_rows:
            conn.execute(
                "INSERT INTO stepgraph_checkpoint_writes VALUES (%s, '', %s, %s, %s, %s, %s, %s, %s)",
                (encode(row.thread_id), encode(row.checkpoint_id), encode(row.task_id), row.idx,
                 encode(row.channel), row.type, row.value, encode(row.task_path)),
            )  # fmt: skip

        saver.setup()
        found = conn.execute("SELECT max(version) FROM stepgraph_migrations").fetchone()
        assert found == (_schema.SCHEMA_VERSION,)
        saver.put_writes(config, [("c", 3), ("d", 4)], "task-new")
        assert kinds(postgres_uri, "old") == [
            ("task-new", 1, TASK_WRITES),
            ("task-old", -1, ONE_WRITE),
            ("task-old", 0, ONE_WRITE),
            ("task-old", 1, ONE_WRITE),
        ]
        loaded = saver.get_tuple(config)
        assert loaded is not None
        assert loaded.pending_writes == [
            ("task-new", "c", 3),
            ("task-new", "d", 4),
            ("task-old", ERROR, "e"),
            ("task-old", "a", 1),
            ("task-old", "b", 2),
        ]
