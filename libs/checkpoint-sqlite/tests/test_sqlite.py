"""SQLite-specific behaviour, beyond the shared contract (see test_contract.py)."""

from __future__ import annotations

import asyncio
import importlib.util
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from stepgraph.checkpoint.base import (
    Checkpoint,
    CheckpointTuple,
    TaskWrites,
    copy_checkpoint,
    empty_checkpoint,
)
from stepgraph.checkpoint.sqlite import SqliteSaver, _plans
from stepgraph.checkpoint.sqlite._schema import SCHEMA_VERSION
from stepgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
from stepgraph.checkpoint.storage import CorruptCheckpointError
from stepgraph.config import RunnableConfig

TESTS = Path(__file__).parent
FIXTURES = TESTS / "fixtures"


@pytest.fixture
def saver(tmp_path: Path) -> Iterator[SqliteSaver]:
    with SqliteSaver.from_conn_string(tmp_path / "checkpoints.sqlite") as saver:
        yield saver


def thread(thread_id: str, checkpoint_ns: str = "") -> RunnableConfig:
    return {"configurable": {"thread_id": thread_id, "checkpoint_ns": checkpoint_ns}}


def step(
    saver: SqliteSaver,
    config: RunnableConfig,
    updates: dict[str, Any],
    metadata: dict[str, Any] | None = None,
    previous: Checkpoint | None = None,
    seen: dict[str, dict[str, Any]] | None = None,
) -> tuple[RunnableConfig, Checkpoint]:
    """Save the checkpoint after ``previous`` with ``updates`` applied (and ``seen``: nodes'
    new ``versions_seen``), saying what changed, as the executor would."""
    checkpoint = empty_checkpoint()
    if previous is not None:
        checkpoint["channel_values"] = dict(previous["channel_values"])
        checkpoint["channel_versions"] = dict(previous["channel_versions"])
        checkpoint["versions_seen"] = dict(previous["versions_seen"])
    new_versions = {}
    for channel, value in updates.items():
        version = saver.get_next_version(checkpoint["channel_versions"].get(channel))
        checkpoint["channel_versions"][channel] = new_versions[channel] = version
        checkpoint["channel_values"][channel] = value
    checkpoint["versions_seen"].update(seen or {})
    checkpoint["versions_seen_changes"] = list(seen or ())
    stored_metadata: Any = metadata or {"source": "loop"}
    saved = saver.put(config, checkpoint, stored_metadata, new_versions)
    del checkpoint["versions_seen_changes"]  # never read back
    return saved, checkpoint


def count(saver: SqliteSaver, table: str) -> int:
    return int(saver.conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


# -- storage layout ---------------------------------------------------------------------------


def _chain(saver: SqliteSaver, thread_id: str, steps: int) -> list[Checkpoint]:
    """A graph-like history: each step bumps a counter and records what a node saw."""
    config, checkpoint = step(saver, thread(thread_id), {"n": 0})
    saved = [checkpoint]
    for number in range(1, steps):
        seen = {f"node{number}": {"n": checkpoint["channel_versions"]["n"]}}
        config, checkpoint = step(saver, config, {"n": number}, previous=checkpoint, seen=seen)
        saved.append(checkpoint)
    return saved


def _chain_starts(saver: SqliteSaver, thread_id: str) -> list[str | None]:
    rows = saver.conn.execute(
        "SELECT chain_start FROM checkpoints WHERE thread_id = ? ORDER BY checkpoint_id",
        (thread_id,),
    )
    return [start for (start,) in rows]


def test_steps_store_changes_to_their_parents_blob(saver: SqliteSaver) -> None:
    saved = _chain(saver, "t", 6)
    assert _chain_starts(saver, "t") == [None] + [saved[0]["id"]] * 5
    listed = list(saver.list(thread("t")))
    assert [found.checkpoint for found in listed] == saved[::-1]
    middle = saver.get_tuple(
        {"configurable": {**thread("t")["configurable"], "checkpoint_id": saved[3]["id"]}}
    )
    assert middle is not None and middle.checkpoint == saved[3]


def test_a_missing_row_of_a_chain_is_named_and_other_threads_read(saver: SqliteSaver) -> None:
    saved = _chain(saver, "broken", 4)
    _chain(saver, "fine", 4)
    saver.conn.execute(
        "DELETE FROM checkpoints WHERE thread_id = 'broken' AND checkpoint_id = ?",
        (saved[2]["id"],),
    )
    # The saver that wrote the chain keeps the head's blob and needs no row to read it back;
    # a reader without it (another process, a restart) finds the gap and names it.
    kept = saver.get_tuple(thread("broken"))
    assert kept is not None and kept.checkpoint == saved[3]
    fresh = SqliteSaver(saver.conn)
    with pytest.raises(CorruptCheckpointError) as raised:
        fresh.get_tuple(thread("broken"))
    message = str(raised.value)
    assert saved[3]["id"] in message and saved[2]["id"] in message and "'broken'" in message
    assert fresh.get_tuple(thread("fine")) is not None


def test_reading_a_head_the_saver_keeps_fetches_no_chain(saver: SqliteSaver) -> None:
    saved = _chain(saver, "t", 6)
    fresh = SqliteSaver(saver.conn)
    for reader, chain_reads in ((saver, 0), (fresh, 1), (fresh, 0)):  # fresh keeps what it read
        statements: list[str] = []
        saver.conn.set_trace_callback(statements.append)
        found = reader.get_tuple(thread("t"))
        saver.conn.set_trace_callback(None)
        assert found is not None and found.checkpoint == saved[-1]
        assert sum("AS k CROSS JOIN checkpoints AS c" in sql for sql in statements) == chain_reads


def test_reading_a_checkpoint_the_saver_knows_is_one_statement(saver: SqliteSaver) -> None:
    def read(reader: SqliteSaver) -> tuple[Any, list[str]]:
        statements: list[str] = []
        saver.conn.set_trace_callback(statements.append)
        found = reader.get_tuple(thread("t"))
        saver.conn.set_trace_callback(None)
        assert found is not None
        config, checkpoint, metadata, _, pending_writes = found
        return (config, checkpoint, metadata, pending_writes), statements

    config, latest = step(saver, thread("t"), {"n": 0, "doc": "d" * 500})
    for number in range(1, 4):  # a chain of rows, and a value too big to travel inline
        seen = {f"node{number}": {"n": latest["channel_versions"]["n"]}}
        updates = {"n": number, "doc": "d" * 500 + str(number)}
        config, latest = step(saver, config, updates, previous=latest, seen=seen)
    saver.put_writes(config, [("n", 7)], "pending")
    # The writer keeps the blob of what it saved: row, value rows and writes in one statement,
    # which needs no transaction around it.
    known, statements = read(saver)
    assert len(statements) == 1
    assert known[1] == latest and known[3] == [("pending", "n", 7)]
    # A saver that knows nothing reads the same in a transaction (the row, its chain, its
    # value rows and writes); then it knows the checkpoint.
    other = SqliteSaver(saver.conn)
    other.setup()
    for expected in (["BEGIN", "SELECT", "SELECT", "WITH", "COMMIT"], ["WITH"]):
        found, statements = read(other)
        assert [sql.split()[0] for sql in statements] == expected, statements
        assert found == known
    # Another saver saves a newer checkpoint: the writer's guess is wrong, its read right.
    step(other, config, {"n": 9}, previous=latest)
    newer, statements = read(saver)
    assert len(statements) > 1 and newer == read(other)[0]
    assert newer[1]["channel_values"]["n"] == 9
    # A checkpoint stored whole leaves a reader no blob, but what it names is enough.
    step(saver, thread("w"), {"doc": "w" * 500})
    reader = SqliteSaver(saver.conn)
    reader.setup()
    counts = []
    for _ in range(2):
        statements = []
        saver.conn.set_trace_callback(statements.append)
        assert reader.get_tuple(thread("w")) is not None
        saver.conn.set_trace_callback(None)
        counts.append(len(statements))
    assert counts == [4, 1]


def test_copy_thread_onto_the_same_ids_is_read_as_copied(saver: SqliteSaver) -> None:
    """copy_thread replaces the target's rows that have the source's ids: blobs the saver
    kept of the target's old rows must not be read in their place."""

    def saved(thread_id: str, id_: str, n: int, parent: RunnableConfig | None) -> RunnableConfig:
        checkpoint = empty_checkpoint()
        checkpoint["id"] = id_
        checkpoint["channel_versions"] = {"n": f"{n:08x}.0"}
        checkpoint["channel_values"] = {"n": n}
        checkpoint["versions_seen"] = {"node": {"n": f"{n:08x}.0"}}
        checkpoint["versions_seen_changes"] = ["node"]  # type: ignore[typeddict-unknown-key]
        return saver.put(parent or thread(thread_id), checkpoint, {}, {"n": f"{n:08x}.0"})

    target = saved("t", "0001", 1, None)
    saved("t", "0002", 2, target)
    saver.get_tuple(thread("t"))  # kept: t's own 0002
    source = saved("s", "0001", 7, None)
    saved("s", "0002", 8, source)
    saver.copy_thread("s", "t")
    found = saver.get_tuple(thread("t"))
    assert found is not None and found.checkpoint["channel_values"] == {"n": 8}


def test_prune_rewrites_the_first_kept_row_whole(saver: SqliteSaver) -> None:
    saved = _chain(saver, "t", 8)
    saver.prune(["t"], keep_last=3)
    # The rows after it keep their chain_start: a lower bound of the range that holds the
    # rows they lead through, which the whole row now ends.
    assert _chain_starts(saver, "t") == [None, saved[0]["id"], saved[0]["id"]]
    assert [found.checkpoint for found in saver.list(thread("t"))] == saved[:4:-1]
    saver.prune(["t"])
    assert _chain_starts(saver, "t") == [None]
    latest = saver.get_tuple(thread("t"))
    assert latest is not None and latest.checkpoint == saved[-1]


def test_unchanged_channels_are_not_written_again(saver: SqliteSaver) -> None:
    config, checkpoint = step(saver, thread("t"), {"big": "x" * 10_000, "counter": [0]})
    for number in range(1, 20):
        config, checkpoint = step(saver, config, {"counter": [number]}, previous=checkpoint)

    assert count(saver, "checkpoint_values") == 2 + 19
    stored = saver.conn.execute(
        "SELECT count(*), sum(length(value)) FROM checkpoint_values WHERE channel = 'big'"
    ).fetchone()
    assert stored[0] == 1 and stored[1] >= 10_000
    latest = saver.get_tuple(thread("t"))
    assert latest is not None
    assert latest.checkpoint["channel_values"] == {"big": "x" * 10_000, "counter": [19]}


def test_small_scalars_travel_in_the_checkpoint_row(saver: SqliteSaver) -> None:
    """None, booleans, numbers and short strings need no value row; longer values do."""
    small = {"trigger": None, "flag": True, "count": 3, "ratio": 0.5, "name": "n" * 64}
    config, checkpoint = step(saver, thread("t"), {**small, "text": "t" * 65, "items": [1]})
    rows = saver.conn.execute("SELECT channel FROM checkpoint_values").fetchall()
    assert sorted(channel for (channel,) in rows) == ["items", "text"]
    config, _ = step(saver, config, {"count": 4}, previous=checkpoint)
    assert count(saver, "checkpoint_values") == 2
    for found in saver.list(thread("t")):
        values = found.checkpoint["channel_values"]
        assert list(values) == [*small, "text", "items"]  # the order they were saved in
        assert values["count"] in (3, 4) and values["text"] == "t" * 65
    # A pruned history keeps what its checkpoints read from rows.
    saver.prune(["t"])
    latest = saver.get_tuple(thread("t"))
    assert latest is not None
    assert latest.checkpoint["channel_values"] == {
        **small,
        "count": 4,
        "text": "t" * 65,
        "items": [1],
    }


# The unique keys of the rowid tables (schema version 4) and the writes' primary key.
CHECKPOINTS_KEY = "INDEX sqlite_autoindex_checkpoints_1"
VALUES_KEY = "INDEX sqlite_autoindex_checkpoint_values_1"
# A full scan of a table (by its name or an alias the statements give it).
TABLE_SCAN = re.compile(
    r"\bSCAN (checkpoints|checkpoint_values|checkpoint_writes|thread_runs|[bcrvw])\b"
)


def _plan(saver: SqliteSaver, sql: str) -> str:
    return " | ".join(row[3] for row in saver.conn.execute(f"EXPLAIN QUERY PLAN {sql}"))


def test_the_unique_keys_keep_one_row_per_key(saver: SqliteSaver) -> None:
    """``checkpoints`` and ``checkpoint_values`` are rowid tables whose former primary keys are
    UNIQUE constraints: a checkpoint saved again replaces its row, a (channel, version) saved
    again keeps its first value, and copying a thread twice adds no rows."""
    config, checkpoint = step(saver, thread("t"), {"doc": "first " * 50})
    for table in ("checkpoints", "checkpoint_values"):
        sql = saver.conn.execute("SELECT sql FROM sqlite_master WHERE name = ?", (table,))
        assert "WITHOUT ROWID" not in sql.fetchone()[0]
        origins = {row[3] for row in saver.conn.execute(f"PRAGMA index_list({table})")}
        assert "u" in origins and "pk" not in origins
    again = Checkpoint(**checkpoint)  # the same id and version, another value and metadata
    again["channel_values"] = {"doc": "second " * 50}
    versions = dict(checkpoint["channel_versions"])
    saver.put(thread("t"), again, {"source": "update", "step": 7}, versions)

    assert (count(saver, "checkpoints"), count(saver, "checkpoint_values")) == (1, 1)
    found = saver.get_tuple(config)
    assert found is not None
    assert found.metadata["source"] == "update"  # the checkpoint row was replaced
    assert found.checkpoint["channel_values"] == {"doc": "first " * 50}  # the value was not
    saver.put_writes(config, [("doc", "w")], "task")
    for _ in range(2):
        saver.copy_thread("t", "u")
    rows = saver.conn.execute(
        "SELECT (SELECT count(*) FROM checkpoints), (SELECT count(*) FROM checkpoint_values),"
        " (SELECT count(*) FROM checkpoint_writes)"
    ).fetchone()
    assert rows == (2, 2, 2)


ROWS = 200


@pytest.mark.parametrize("table", ["checkpoints", "checkpoint_values"])
def test_rows_of_one_and_a_half_kilobytes_share_pages(tmp_path: Path, table: str) -> None:
    """An index b-tree (a WITHOUT ROWID table, schema versions 1-3) keeps at most 1,002 bytes
    of a row on a 4 KiB page and moves the rest to an overflow page of its own: ROWS rows of
    1.5 kB took more than ROWS pages. A rowid table keeps such rows whole on its leaves, two or
    more to a page, so the whole file stays under ROWS pages (about ROWS / 2 + index pages)."""
    with SqliteSaver.from_conn_string(tmp_path / "db.sqlite") as saver:
        config, previous = thread("t"), None
        for number in range(ROWS):
            if table == "checkpoints":  # short strings are stored in the checkpoint row
                updates = {f"f{i:02}": f"{number:04}.{i:02} " + "x" * 52 for i in range(15)}
            else:
                updates = {"doc": f"{number:04} " + "d" * 1500}
            config, previous = step(saver, config, updates, previous=previous)
        size = "length(checkpoint)" if table == "checkpoints" else "length(value)"
        found = saver.conn.execute(f"SELECT count(*), min({size}) FROM {table}").fetchone()
        assert found[0] == ROWS and 1400 <= found[1] <= 1700, found
        assert saver.conn.execute("PRAGMA page_size").fetchone() == (4096,)
        saver.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        pages = saver.conn.execute("PRAGMA page_count").fetchone()[0]
        assert pages < ROWS, pages
        try:  # where SQLite has the dbstat table: not one overflow page
            overflow = saver.conn.execute(
                "SELECT count(*) FROM dbstat WHERE name = ? AND pagetype = 'overflow'", (table,)
            ).fetchone()[0]
        except sqlite3.OperationalError:  # built without SQLITE_ENABLE_DBSTAT_VTAB
            return
        assert overflow == 0


def test_reads_use_the_keys(saver: SqliteSaver) -> None:
    """Latest, by id and list(limit) are index range reads, whatever the thread's length."""
    config, _ = step(saver, thread("t"), {"a": 1})
    statements: list[str] = []
    saver.conn.set_trace_callback(statements.append)
    saver.get_tuple(thread("t"))
    saver.get_tuple(config)
    saver.list(thread("t"), limit=10).__next__()
    saver.conn.set_trace_callback(None)

    selects = [sql for sql in statements if "FROM checkpoints" in sql]
    assert len(selects) == 3
    for sql in selects:
        plan = _plan(saver, sql)
        assert "SCAN checkpoint" not in plan, plan
        assert "TEMP B-TREE" not in plan, plan
        assert f"SEARCH checkpoints USING {CHECKPOINTS_KEY} (thread_id=? AND" in plan, plan


def test_no_statement_of_a_step_or_a_read_scans_a_table(saver: SqliteSaver) -> None:
    """Saving steps (value rows, appended items, writes) and reading them back (values by key
    and appended-items chains by version range) search every table by its key."""
    config: RunnableConfig = thread("t")
    previous: Checkpoint | None = None
    saver.setup()
    statements: list[str] = []
    saver.conn.set_trace_callback(statements.append)
    for number in range(12):
        checkpoint = empty_checkpoint()
        if previous is not None:
            checkpoint["channel_values"] = dict(previous["channel_values"])
            checkpoint["channel_versions"] = dict(previous["channel_versions"])
        base = checkpoint["channel_versions"].get("items")
        items = [*checkpoint["channel_values"].get("items", []), f"item {number}"]
        new_versions = {
            "items": saver.get_next_version(base),
            "doc": saver.get_next_version(checkpoint["channel_versions"].get("doc")),
        }
        checkpoint["channel_values"] |= {"items": items, "doc": "d" * 2000 + str(number)}
        checkpoint["channel_versions"] |= new_versions
        if base is not None:
            checkpoint["channel_appends"] = {"items": (base, items[-1:])}
        writes = [TaskWrites("task", [("items", [number])])] if previous else []
        config = saver.put_step(config, writes, checkpoint, {"source": "loop"}, new_versions)
        previous = checkpoint
    saver.get_tuple(thread("t"))
    saver.get_tuple(config)
    list(saver.list(thread("t"), limit=3))
    list(saver.list({"configurable": {"thread_id": "t"}}, limit=3))
    saver.conn.set_trace_callback(None)

    assert count(saver, "checkpoint_values") > 12  # whole values and appended items
    latest = saver.get_tuple(config)
    assert latest is not None and latest.checkpoint["channel_values"]["items"] == [
        f"item {number}" for number in range(12)
    ]
    queries = [sql for sql in statements if sql.split()[0] in ("SELECT", "WITH", "INSERT")]
    plans = {sql: _plan(saver, sql) for sql in queries}
    for sql, plan in plans.items():
        assert not TABLE_SCAN.search(plan), (sql, plan)
    joined = " | ".join(plans.values())
    value = "thread_id=? AND checkpoint_ns=? AND channel=? AND version"
    # The value reads: exact keys, then each chain as one range of the unique key.
    assert f"SEARCH v USING {VALUES_KEY} ({value}=?)" in joined
    assert f"SEARCH v USING {VALUES_KEY} ({value}>? AND version<?)" in joined
    # An appended-items row looks up its base's chain start by key.
    assert f"SEARCH b USING {VALUES_KEY} ({value}=?)" in joined


def test_listing_a_thread_reads_each_namespace_by_range(saver: SqliteSaver) -> None:
    """list() of a thread without a namespace merges each namespace's newest rows instead of
    sorting the whole thread, so its cost does not grow with the thread's length."""
    configs = {ns: step(saver, thread("t", ns), {"n": 0}) for ns in ("", "child", "other")}
    for number in range(1, 30):
        for ns, (config, checkpoint) in configs.items():
            configs[ns] = step(saver, config, {"n": number}, previous=checkpoint)
    statements: list[str] = []
    saver.conn.set_trace_callback(statements.append)
    listed = list(saver.list({"configurable": {"thread_id": "t"}}, limit=5))
    saver.conn.set_trace_callback(None)

    ids = [found.checkpoint["id"] for found in listed]
    every = [found.checkpoint["id"] for found in saver.list({"configurable": {"thread_id": "t"}})]
    assert len(every) == 90
    assert every == sorted(every, reverse=True)
    assert ids == every[:5]
    selects = [sql for sql in statements if "FROM checkpoints" in sql]
    page = next(sql for sql in selects if "ORDER BY checkpoint_id DESC LIMIT" in sql)
    plan = _plan(saver, page)
    assert "SCAN checkpoints" not in plan, plan
    assert plan.count(f"SEARCH checkpoints USING {CHECKPOINTS_KEY}") == 3, plan


def test_listing_a_thread_of_many_namespaces_sorts_them_together(saver: SqliteSaver) -> None:
    """Beyond _SPLIT_NAMESPACES namespaces, one sorted query lists them: same results."""
    for index in range(20):
        config, checkpoint = step(saver, thread("many", f"ns{index:02}"), {"n": [index]})
        step(saver, config, {"n": [index, index]}, previous=checkpoint)
    listed = list(saver.list({"configurable": {"thread_id": "many"}}))
    assert len(listed) == 40
    ids = [found.checkpoint["id"] for found in listed]
    assert ids == sorted(ids, reverse=True)
    assert {found.config["configurable"]["checkpoint_ns"] for found in listed} == {
        f"ns{index:02}" for index in range(20)
    }
    page = list(saver.list({"configurable": {"thread_id": "many"}}, limit=3))
    assert [found.checkpoint["id"] for found in page] == ids[:3]


def test_put_step_is_one_transaction(saver: SqliteSaver) -> None:
    config, _ = step(saver, thread("t"), {"a": 1})
    statements: list[str] = []
    saver.conn.set_trace_callback(statements.append)
    following = empty_checkpoint()
    following["channel_versions"] = {"a": saver.get_next_version(None)}
    following["channel_values"] = {"a": 2}
    writes = [TaskWrites("t1", [("a", 2)]), TaskWrites("t2", [("a", 3), ("b", 4)])]
    saver.put_step(config, writes, following, {"source": "loop"}, following["channel_versions"])
    saver.conn.set_trace_callback(None)

    assert [sql for sql in statements if sql in ("BEGIN IMMEDIATE", "COMMIT")] == [
        "BEGIN IMMEDIATE",
        "COMMIT",
    ]
    assert not any(sql.startswith("PRAGMA") for sql in statements)  # no per-call pragmas


def test_failed_put_step_leaves_nothing_and_the_saver_usable(saver: SqliteSaver) -> None:
    config, checkpoint = step(saver, thread("t"), {"a": [1]})
    saver.conn.execute(
        "CREATE TRIGGER refuse BEFORE INSERT ON checkpoints"
        " BEGIN SELECT RAISE(ABORT, 'refused by test'); END"
    )
    following = empty_checkpoint()
    following["channel_versions"] = {"a": saver.get_next_version(None)}
    following["channel_values"] = {"a": [2]}
    with pytest.raises(sqlite3.IntegrityError, match="refused by test"):
        saver.put_step(
            config,
            [TaskWrites("task", [("a", 2)])],
            following,
            {"source": "loop"},
            following["channel_versions"],
        )
    assert not saver.conn.in_transaction
    assert count(saver, "checkpoint_writes") == 0
    assert count(saver, "checkpoint_values") == 1

    saver.conn.execute("DROP TRIGGER refuse")
    step(saver, config, {"a": 3}, previous=checkpoint)
    assert count(saver, "checkpoints") == 2


def test_list_pages_through_long_histories_and_ties(saver: SqliteSaver) -> None:
    config, checkpoint = step(saver, thread("long"), {"n": 0})
    for number in range(1, 100):
        config, checkpoint = step(saver, config, {"n": number}, previous=checkpoint)
    step(saver, thread("long", "child"), {"n": -1})
    saver.copy_thread("long", "copy")  # same checkpoint ids in another thread: sort-key ties

    ns_only = [found.checkpoint["channel_values"]["n"] for found in saver.list(thread("long"))]
    assert ns_only == list(range(99, -1, -1))
    whole_thread = list(saver.list({"configurable": {"thread_id": "long"}}))
    assert len(whole_thread) == 101
    everything = list(saver.list(None))
    keys = [
        (found.config["configurable"]["thread_id"], found.checkpoint["id"]) for found in everything
    ]
    assert len(keys) == len(set(keys)) == 202
    ids = [found.checkpoint["id"] for found in everything]
    assert ids == sorted(ids, reverse=True)
    assert len(list(saver.list(None, limit=37))) == 37


# -- metadata filter ----------------------------------------------------------------------------

HOSTILE_KEYS = [
    "a') OR 1=1 --",
    '$.x"',
    "x' OR '1'='1",
    '"; DROP TABLE checkpoints; --',
    "$",
    "a.b",
    "[0]",
    "",
    "ключ\x00",
]


def test_filter_keys_and_values_cannot_inject_sql(saver: SqliteSaver) -> None:
    metadata = {key: f"value of {key}" for key in HOSTILE_KEYS}
    target, _ = step(saver, thread("t"), {"a": 1}, metadata)
    step(saver, thread("t"), {"a": 2}, {"other": "row"})
    target_id = target["configurable"]["checkpoint_id"]

    for key in HOSTILE_KEYS:
        found = list(saver.list(None, filter={key: f"value of {key}"}))
        assert [item.checkpoint["id"] for item in found] == [target_id], key
        assert list(saver.list(None, filter={key: "' OR 1=1 --"})) == [], key
    assert list(saver.list(None, filter={"a": "1') OR ('1'='1"})) == []
    assert count(saver, "checkpoints") == 2


def test_filter_compares_types_exactly(saver: SqliteSaver) -> None:
    rows: dict[str, dict[str, Any]] = {
        "true": {"v": True},
        "one": {"v": 1},
        "float": {"v": 1.5},
        "null": {"v": None},
        "text": {"v": "1"},
        "nested": {"v": {"b": [1, {"c": None}], "a": False}},
        "list": {"v": [True, 1]},
    }
    made = {
        name: step(saver, thread(name), {"x": 0}, metadata)[0] for name, metadata in rows.items()
    }

    def matching(value: Any) -> set[str]:
        found = saver.list(None, filter={"v": value})
        ids = {item.config["configurable"]["checkpoint_id"] for item in found}
        return {
            name for name, config in made.items() if config["configurable"]["checkpoint_id"] in ids
        }

    assert matching(True) == {"true"}
    assert matching(1) == {"one"}
    assert matching(1.0) == {"one"}
    assert matching(1.5) == {"float"}
    assert matching(None) == {"null"}
    assert matching("1") == {"text"}
    assert matching({"a": False, "b": [1, {"c": None}]}) == {"nested"}
    assert matching({"a": False}) == {"nested"}
    assert matching({"a": 0}) == set()
    assert matching([True]) == {"list"}
    assert matching([1]) == {"list"}


def test_metadata_round_trips_exactly(saver: SqliteSaver) -> None:
    metadata = {
        "nul": "a\x00b",
        "surrogate": "lone \ud800 surrogate",
        "big": 2**70,
        "nan": float("inf"),
        "tuple": (1, 2),
        "bytes": b"\x00\x01",
    }
    step(saver, thread("t"), {"a": 1}, metadata)
    found = saver.get_tuple(thread("t"))
    assert found is not None
    for key, value in metadata.items():
        assert found.metadata[key] == value  # type: ignore[literal-required]
    assert [f.metadata["big"] for f in saver.list(None, filter={"big": 2**70})] == [2**70]  # type: ignore[typeddict-item]
    assert len(list(saver.list(None, filter={"surrogate": "lone \ud800 surrogate"}))) == 1


def test_filter_on_values_json_cannot_hold(saver: SqliteSaver) -> None:
    step(saver, thread("t"), {"a": 1}, {"inf": float("inf"), "when": b"\x00"})
    assert len(list(saver.list(None, filter={"inf": float("inf")}))) == 1
    assert len(list(saver.list(None, filter={"when": b"\x00"}))) == 1
    assert list(saver.list(None, filter={"when": b"\x01"})) == []


def test_delete_for_runs_with_unusual_run_ids(saver: SqliteSaver) -> None:
    runs = ["run\x00one", "run-two", "r\u00e9"]
    config, checkpoint = step(saver, thread("t"), {"a": [0]}, {"run_id": runs[0]})
    for number, run in enumerate(runs[1:], start=1):
        config, checkpoint = step(saver, config, {"a": [number]}, {"run_id": run}, checkpoint)
    saver.delete_for_runs([runs[0], runs[2]])
    left = [found.metadata.get("run_id") for found in saver.list(thread("t"))]
    assert left == ["run-two"]
    assert count(saver, "checkpoint_values") == 1  # the versions only deleted runs needed


# -- corruption ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "damage",
    [
        "UPDATE checkpoint_values SET value = x'c1' WHERE channel = 'broken'",
        "UPDATE checkpoint_values SET value = substr(value, 1, length(value) - 3)"
        " WHERE channel = 'broken'",
        "DELETE FROM checkpoint_values WHERE channel = 'broken'",
    ],
)
def test_corrupted_value_names_its_place_and_spares_other_threads(
    saver: SqliteSaver, damage: str
) -> None:
    config, _ = step(saver, thread("victim", "ns"), {"broken": {"a": "b" * 100}, "fine": 1})
    step(saver, thread("bystander"), {"broken": {"a": "b"}})
    saver.conn.execute(damage + " AND thread_id = 'victim'")

    with pytest.raises(CorruptCheckpointError) as caught:
        saver.get_tuple(thread("victim", "ns"))
    message = str(caught.value)
    for part in ("'victim'", "'ns'", config["configurable"]["checkpoint_id"], "'broken'"):
        assert part in message
    with pytest.raises(CorruptCheckpointError):
        list(saver.list({"configurable": {"thread_id": "victim"}}))

    bystander = saver.get_tuple(thread("bystander"))
    assert bystander is not None
    assert bystander.checkpoint["channel_values"] == {"broken": {"a": "b"}}
    step(saver, thread("bystander"), {"more": 1})


def test_corrupted_checkpoint_blob_is_reported(saver: SqliteSaver) -> None:
    config, _ = step(saver, thread("victim"), {"a": 1})
    saver.conn.execute("UPDATE checkpoints SET checkpoint = x'00ff'")
    with pytest.raises(CorruptCheckpointError, match=config["configurable"]["checkpoint_id"]):
        saver.get_tuple(thread("victim"))


# -- schema, migrations, fixture ------------------------------------------------------------------


def _load_fixture_module(name: str = "make_schema_v1") -> Any:
    spec = importlib.util.spec_from_file_location(name, FIXTURES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _everything(saver: SqliteSaver) -> list[CheckpointTuple]:
    return sorted(saver.list(None), key=lambda found: tuple(found.config["configurable"].values()))


def test_fixture_database_of_the_first_format_stays_readable(tmp_path: Path) -> None:
    fixture = _load_fixture_module()
    copy = tmp_path / "schema_v1.sqlite"
    shutil.copyfile(FIXTURES / "schema_v1.sqlite", copy)

    with (
        SqliteSaver.from_conn_string(copy) as old,
        SqliteSaver.from_conn_string(tmp_path / "fresh.sqlite") as fresh,
    ):
        fixture.write_history(fresh)
        assert _everything(old) == _everything(fresh)

        latest = old.get_tuple(thread(fixture.THREAD))
        assert latest is not None
        assert latest.checkpoint["channel_values"] == {"messages": ["hi", "yo"]}
        middle = old.get_tuple(latest.parent_config)  # type: ignore[arg-type]
        assert middle is not None
        assert middle.metadata["note"] == "é\x00"  # type: ignore[typeddict-item]
        assert middle.pending_writes == [("task-b", "__error__", "boom")]
        first = old.get_tuple(middle.parent_config)  # type: ignore[arg-type]
        assert first is not None  # put_step saved the step's writes against its parent
        assert first.pending_writes == [("task-a", "messages", "yo"), ("task-a", "state", {"n": 2})]
        other = old.get_tuple(thread(fixture.OTHER_THREAD))
        assert other is not None and other.checkpoint["channel_values"] == {"x": b"\x00\xff"}
        # Old rows take part in every operation, not only reads.
        old.prune([fixture.THREAD])
        assert len(list(old.list({"configurable": {"thread_id": fixture.THREAD}}))) == 2
        versions = old.conn.execute("SELECT version FROM checkpoint_migrations").fetchall()
        assert versions == [(version,) for version in range(1, SCHEMA_VERSION + 1)]


STORED_TABLES = ("checkpoints", "checkpoint_values", "checkpoint_writes", "thread_runs")


def _stored_rows(path: Path, columns: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """Every row of the saver's tables as stored, sorted: ``{table: (columns, rows)}``. With
    ``columns``, only those tables and columns (what an older file had)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        if columns is None:
            tables = [row[0] for row in conn.execute("SELECT name FROM sqlite_master")]
            columns = {
                table: [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]
                for table in STORED_TABLES
                if table in tables
            }
        return {
            table: (
                names,
                sorted(conn.execute(f"SELECT {', '.join(names)} FROM {table}"), key=repr),
            )
            for table, names in columns.items()
        }
    finally:
        conn.close()


def _schema(path: Path) -> dict[str, str | None]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return dict(conn.execute("SELECT name, sql FROM sqlite_master"))
    finally:
        conn.close()


def _assert_rowid_layout(path: Path) -> None:
    """Schema version 4: rowid checkpoints and values with their keys as UNIQUE constraints,
    the run_id index back, nothing left of the rebuild."""
    schema = _schema(path)
    for table, key in (
        ("checkpoints", "UNIQUE (thread_id, checkpoint_ns, checkpoint_id)"),
        ("checkpoint_values", "UNIQUE (thread_id, checkpoint_ns, channel, version)"),
    ):
        sql = schema[table]
        assert sql is not None and key in sql and "WITHOUT ROWID" not in sql, sql
        assert f"sqlite_autoindex_{table}_1" in schema
    assert schema["checkpoints_by_run"] == (
        "CREATE INDEX checkpoints_by_run ON checkpoints (run_id) WHERE run_id IS NOT NULL"
    )
    assert not [name for name in schema if name.startswith("new_")]
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        versions = conn.execute("SELECT version FROM checkpoint_migrations").fetchall()
        assert versions == [(version,) for version in range(1, SCHEMA_VERSION + 1)]
    finally:
        conn.close()


@pytest.mark.parametrize("version", [1, 2, 3])
def test_fixture_databases_upgrade_row_for_row(tmp_path: Path, version: int) -> None:
    """A database of every released format gets rowid checkpoints and values (schema version
    4) with every stored row unchanged, and reads back as the history current code writes:
    state, history, pending writes, appended items, the run registry."""
    fixture = _load_fixture_module(f"make_schema_v{version}")
    copy = tmp_path / f"schema_v{version}.sqlite"
    shutil.copyfile(FIXTURES / f"schema_v{version}.sqlite", copy)
    before = _stored_rows(copy)
    assert "WITHOUT ROWID" in str(_schema(copy)["checkpoints"])  # the fixture is the old layout

    with (
        SqliteSaver.from_conn_string(copy) as old,
        SqliteSaver.from_conn_string(tmp_path / "fresh.sqlite") as fresh,
    ):
        fixture.write_history(fresh)
        assert _everything(old) == _everything(fresh)
        v1 = _load_fixture_module()
        latest = old.get_tuple(thread(v1.THREAD))
        assert latest is not None and latest.checkpoint["channel_values"] == {
            "messages": ["hi", "yo"]
        }
        middle = old.get_tuple(latest.parent_config)  # type: ignore[arg-type]
        assert middle is not None and middle.pending_writes == [("task-b", "__error__", "boom")]
        if version >= 2:
            v2 = _load_fixture_module("make_schema_v2")
            appended = old.get_tuple(thread(v2.APPENDS_THREAD))
            assert appended is not None
            assert appended.checkpoint["channel_values"]["items"] == list(range(19))
        if version >= 3:
            large = old.get_tuple(thread(fixture.LARGE_THREAD))
            assert large is not None
            assert large.checkpoint["channel_values"]["document"] == "e" * 3000
            parent = old.get_tuple(large.parent_config)  # type: ignore[arg-type]
            assert parent is not None
            assert parent.pending_writes == [("task-large", "document", "e" * 2000)]
            for thread_id in (fixture.RUNS_THREAD, fixture.DEAD_THREAD, fixture.DELETED_THREAD):
                stored, written = old.get_run(thread_id), fresh.get_run(thread_id)
                assert stored is not None and written is not None
                untimed = replace(stored, expires_at=written.expires_at, updated_at=0.0)
                assert untimed == replace(written, updated_at=0.0)
            dead = [info.thread_id for info in old.list_incomplete()]
            assert dead == [fixture.DEAD_THREAD]

    _assert_rowid_layout(copy)
    assert _stored_rows(copy, {table: names for table, (names, _) in before.items()}) == before


def test_fixture_database_of_the_fourth_format_upgrades_and_chains_on(tmp_path: Path) -> None:
    """Schema version 5 adds ``chain_start`` (NULL: every older blob is whole) and
    ``checkpoint_writes.kind`` (0: one write a row) and changes no stored row; the database
    reads back as the history current code writes, a new step after a whole row of the old
    format is stored as changes to it, a task's new writes share one row, and metadata JSON
    holds exactly is stored once."""
    fixture = _load_fixture_module("make_schema_v4")
    copy = tmp_path / "schema_v4.sqlite"
    shutil.copyfile(FIXTURES / "schema_v4.sqlite", copy)
    before = _stored_rows(copy)
    assert "chain_start" not in before["checkpoints"][0]  # the fixture is the old layout

    with (
        SqliteSaver.from_conn_string(copy) as old,
        SqliteSaver.from_conn_string(tmp_path / "fresh.sqlite") as fresh,
    ):
        fixture.write_history(fresh)
        assert _everything(old) == _everything(fresh)
        latest = old.get_tuple(thread(fixture.CHAIN_THREAD))
        assert latest is not None
        config, ids = latest.config, []
        for number in (98, 99):  # the first new step is whole: no chain is remembered yet
            checkpoint = copy_checkpoint(latest.checkpoint)
            checkpoint["id"] = f"1f000000-0000-6000-8000-0000000004{number}"
            checkpoint["channel_values"] = {"x": number}
            checkpoint["channel_versions"] = {**checkpoint["channel_versions"], "x": f"ff.{number}"}
            checkpoint["versions_seen_changes"] = []  # as the executor says what changed
            config = old.put(config, checkpoint, {}, {"x": f"ff.{number}"})
            ids.append(checkpoint["id"])
        starts = old.conn.execute(
            "SELECT chain_start FROM checkpoints WHERE checkpoint_id IN (?, ?) ORDER BY 1", ids
        ).fetchall()
        assert starts == [(None,), (ids[0],)]
        again = old.get_tuple(config)
        assert again is not None and again.checkpoint["channel_values"] == {"x": 99}
        assert again.checkpoint["versions_seen"] == latest.checkpoint["versions_seen"]
        old.put_writes(config, [("x", 100), ("y", [1])], "task-new")
        kinds = old.conn.execute("SELECT kind, count(*) FROM checkpoint_writes GROUP BY 1")
        assert kinds.fetchall() == [(0, len(before["checkpoint_writes"][1])), (1, 1)]
        found = old.get_tuple(config)
        assert found is not None
        assert found.pending_writes == [("task-new", "x", 100), ("task-new", "y", [1])]
        metadata = old.conn.execute(
            "SELECT metadata_type, metadata, metadata_json FROM checkpoints"
            " WHERE checkpoint_id IN (?, ?)",
            ids,
        )
        assert metadata.fetchall() == [("", b"", "{}")] * 2
        assert found.metadata == {}

    names = {table: names for table, (names, _) in before.items()}
    after = _stored_rows(copy, names)
    new_writes = [row for row in after["checkpoint_writes"][1] if row[3] == "task-new"]
    assert len(new_writes) == 1
    after["checkpoint_writes"][1].remove(new_writes[0])
    assert {table: rows for table, rows in after.items() if table != "checkpoints"} == {
        table: rows for table, rows in before.items() if table != "checkpoints"
    }
    assert set(before["checkpoints"][1]) <= set(after["checkpoints"][1])
    _assert_rowid_layout(copy)


def test_fixture_database_of_the_fifth_format_stays_readable(tmp_path: Path) -> None:
    """The fifth format's rows (blobs stored as changes, appended items, small values in the
    checkpoint row, a task's writes in one row, metadata stored as JSON) read back as the
    history current code writes, every checkpoint of the chained thread exactly; opening the
    file changes no row, and a run goes on from its last checkpoint."""
    fixture = _load_fixture_module("make_schema_v5")
    copy = tmp_path / "schema_v5.sqlite"
    shutil.copyfile(FIXTURES / "schema_v5.sqlite", copy)
    before = _stored_rows(copy)
    conn = sqlite3.connect(copy)
    try:  # the fixture holds what the fifth format added
        chained = "SELECT count(chain_start) FROM checkpoints"
        assert conn.execute(chained).fetchone()[0] > 30
        appended = "SELECT count(*) FROM checkpoint_values WHERE kind = 1"
        assert conn.execute(appended).fetchone()[0] > 20
        task_rows = "SELECT count(*) FROM checkpoint_writes WHERE kind = 1"
        assert conn.execute(task_rows).fetchone()[0] > 30
        in_json = "SELECT count(*) FROM checkpoints WHERE metadata_type = ''"
        assert conn.execute(in_json).fetchone()[0] > 30
    finally:
        conn.close()

    with (
        SqliteSaver.from_conn_string(copy) as old,
        SqliteSaver.from_conn_string(tmp_path / "fresh.sqlite") as fresh,
    ):
        fixture.write_history(fresh)
        assert _everything(old) == _everything(fresh)
        # Each checkpoint as the generator made it: values, metadata, and the writes of the
        # step after it (a reader shared by both databases would hide its own bugs above).
        listed = list(old.list(thread(fixture.CHAINED_THREAD)))
        assert len(listed) == fixture.CHAINED_STEPS
        for number, found in enumerate(reversed(listed)):
            assert found.checkpoint["channel_values"] == fixture.chained_values(number)
            assert found.metadata == fixture.chained_metadata(number)
            writes = fixture.chained_writes(number + 1) if number + 1 < len(listed) else []
            expected = [(t.task_id, c, v) for t in writes for c, v in t.writes]
            pending = found.pending_writes or []
            assert sorted(pending, key=repr) == sorted(expected, key=repr), number
            read = old.get_tuple(found.config)
            assert read is not None and read.checkpoint == found.checkpoint
        assert any(type(v) is bytes for _, _, v in listed[-1].pending_writes or [])  # step 1's
        latest = listed[0]
        checkpoint = copy_checkpoint(latest.checkpoint)
        checkpoint["id"] = "1f000000-0000-6000-8000-000000000599"
        checkpoint["channel_values"] = {**checkpoint["channel_values"], "n": 99}
        checkpoint["channel_versions"] = {**checkpoint["channel_versions"], "n": "ff.99"}
        config = old.put(latest.config, checkpoint, {}, {"n": "ff.99"})
        again = old.get_tuple(config)
        assert again is not None and again.checkpoint["channel_values"]["n"] == 99
        last = fixture.chained_values(fixture.CHAINED_STEPS - 1)
        assert again.checkpoint["channel_values"]["items"] == last["items"]

    names = {table: names for table, (names, _) in before.items()}
    after = _stored_rows(copy, names)
    assert set(before["checkpoints"][1]) <= set(after["checkpoints"][1])
    assert {table: rows for table, rows in after.items() if table != "checkpoints"} == {
        table: rows for table, rows in before.items() if table != "checkpoints"
    }


def _crash_at(path: Path, statement: str) -> None:
    """Migrate ``path`` in another process that dies (``os._exit``, no cleanup) as it starts
    ``statement``. A one-page cache makes it spill the migration's pages to the WAL first."""
    code = (
        "import os, sys\n"
        "from stepgraph.checkpoint.sqlite import SqliteSaver\n"
        "with SqliteSaver.from_conn_string(sys.argv[1]) as saver:\n"
        "    saver.conn.execute('PRAGMA cache_size = 1')\n"
        "    saver.conn.set_trace_callback(\n"
        "        lambda sql: sql.strip().startswith(sys.argv[2]) and os._exit(3))\n"
        "    saver.setup()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(path), statement], capture_output=True, timeout=60
    )
    assert done.returncode == 3, done.stderr


@pytest.mark.parametrize(
    "statement",
    [
        "DROP TABLE checkpoints",
        "ALTER TABLE new_checkpoint_values RENAME",
        "INSERT INTO checkpoint_migrations",
    ],
)
def test_a_crash_during_the_migration_leaves_the_old_format(tmp_path: Path, statement: str) -> None:
    """setup() runs the migration in one transaction: a process dying part-way leaves the
    third format with every row, and the next setup() migrates it."""
    copy = tmp_path / "schema_v3.sqlite"
    shutil.copyfile(FIXTURES / "schema_v3.sqlite", copy)
    before = _stored_rows(copy)
    schema = _schema(copy)

    _crash_at(copy, statement)
    assert copy.with_name(copy.name + "-wal").stat().st_size > 0  # it wrote, uncommitted
    assert _schema(copy) == schema
    assert _stored_rows(copy) == before

    with SqliteSaver.from_conn_string(copy) as saver:
        saver.setup()
    _assert_rowid_layout(copy)
    assert _stored_rows(copy, {table: names for table, (names, _) in before.items()}) == before


def test_views_and_triggers_of_the_user_survive_the_migration(tmp_path: Path) -> None:
    """A view or trigger of the user's that names the rebuilt tables neither stops the
    migration (SQLite checks every view when a table is renamed, and the old table is gone
    by then) nor breaks: it names the new tables."""
    copy = tmp_path / "schema_v3.sqlite"
    shutil.copyfile(FIXTURES / "schema_v3.sqlite", copy)
    conn = sqlite3.connect(copy, isolation_level=None)
    conn.execute("CREATE TABLE audit (n INTEGER)")
    conn.execute(
        "CREATE VIEW per_thread AS SELECT c.thread_id, count(DISTINCT c.checkpoint_id) AS n,"
        " count(DISTINCT v.version) AS m FROM checkpoints AS c"
        " LEFT JOIN checkpoint_values AS v USING (thread_id) GROUP BY 1"
    )
    conn.execute(
        "CREATE TRIGGER count_writes AFTER INSERT ON checkpoint_writes"
        " BEGIN INSERT INTO audit SELECT count(*) FROM checkpoints; END"
    )
    per_thread = conn.execute("SELECT * FROM per_thread ORDER BY 1").fetchall()
    conn.close()

    with SqliteSaver.from_conn_string(copy) as saver:
        saver.setup()
        assert saver.conn.execute("PRAGMA legacy_alter_table").fetchone() == (0,)
        assert saver.conn.execute("SELECT * FROM per_thread ORDER BY 1").fetchall() == per_thread
        latest = saver.get_tuple(thread(_load_fixture_module().THREAD))
        assert latest is not None
        saver.put_writes(latest.config, [("messages", "more")], "task-c")
        assert saver.conn.execute("SELECT n FROM audit").fetchall() == [
            (count(saver, "checkpoints"),)
        ]
    _assert_rowid_layout(copy)


def test_concurrent_setups_migrate_once(tmp_path: Path) -> None:
    """Processes that open an old file together: each setup() waits for the write lock, the
    first migrates, the others find the latest version; every process then reads the same history."""
    copy = tmp_path / "schema_v3.sqlite"
    shutil.copyfile(FIXTURES / "schema_v3.sqlite", copy)
    before = _stored_rows(copy)
    code = (
        "import sys\n"
        "from stepgraph.checkpoint.sqlite import SqliteSaver\n"
        "with SqliteSaver.from_conn_string(sys.argv[1]) as saver:\n"
        "    print('ready', flush=True)\n"
        "    sys.stdin.readline()\n"
        "    saver.setup()\n"
        "    print(len(list(saver.list(None))), flush=True)\n"
    )
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(copy)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    for process in processes:
        assert process.stdout is not None and process.stdout.readline() == "ready\n"
    for process in processes:
        assert process.stdin is not None
        process.stdin.write("go\n")
        process.stdin.flush()
    listed = []
    for process in processes:
        output, errors = process.communicate(timeout=120)
        assert process.returncode == 0, errors
        listed.append(int(output))
    assert listed == [len(before["checkpoints"][1])] * 4
    _assert_rowid_layout(copy)
    assert _stored_rows(copy, {table: names for table, (names, _) in before.items()}) == before


def test_a_saver_opened_before_the_upgrade_keeps_working(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection set up in the third format keeps writing and reading once another one
    upgraded the file: SQLite prepares its statements again for the rebuilt tables."""
    path = tmp_path / "db.sqlite"
    monkeypatch.setattr(_plans, "SCHEMA_VERSION", 3)
    with SqliteSaver.from_conn_string(path) as before:
        before.setup()
        for table in ("checkpoints", "checkpoint_values"):  # statements on the old tables
            before.conn.execute(f"SELECT count(*) FROM {table}").fetchall()
        monkeypatch.setattr(_plans, "SCHEMA_VERSION", SCHEMA_VERSION)
        with SqliteSaver.from_conn_string(path) as after:
            after.setup()
            _assert_rowid_layout(path)
            config, checkpoint = step(before, thread("t"), {"doc": "a" * 2000})
            config, checkpoint = step(before, config, {"doc": "b" * 2000}, previous=checkpoint)
            step(after, config, {"doc": "c" * 2000}, previous=checkpoint)
        for table in ("checkpoints", "checkpoint_values"):
            assert before.conn.execute(f"SELECT count(*) FROM {table}").fetchall() == [(3,)]
        docs = [found.checkpoint["channel_values"]["doc"] for found in before.list(thread("t"))]
        assert docs == ["c" * 2000, "b" * 2000, "a" * 2000]


def test_setup_is_idempotent_and_implicit(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    with SqliteSaver.from_conn_string(path) as saver:
        assert not saver.is_setup
        step(saver, thread("t"), {"a": 1})  # first use sets up
        saver.setup()
        saver.setup()
    with SqliteSaver.from_conn_string(path) as saver:
        saver.setup()
        assert saver.get_tuple(thread("t")) is not None
        assert count(saver, "checkpoint_migrations") == SCHEMA_VERSION


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    with SqliteSaver.from_conn_string(path) as saver:
        saver.setup()
        saver.conn.execute("INSERT INTO checkpoint_migrations VALUES (?, 'later')", (99,))
    with SqliteSaver.from_conn_string(path) as saver, pytest.raises(RuntimeError, match="99"):
        saver.get_tuple(thread("t"))


def test_foreign_table_of_the_same_name_fails_clearly(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    sqlite3.connect(path).execute("CREATE TABLE checkpoints (something TEXT)").connection.close()
    with SqliteSaver.from_conn_string(path) as saver:
        with pytest.raises(sqlite3.OperationalError, match="already exists"):
            saver.setup()
        assert not saver.conn.in_transaction


# -- connection settings --------------------------------------------------------------------------


@pytest.mark.parametrize(("synchronous", "level"), [("NORMAL", 1), ("FULL", 2), ("OFF", 0)])
def test_pragmas(tmp_path: Path, synchronous: Any, level: int) -> None:
    path = tmp_path / "db.sqlite"
    with SqliteSaver.from_conn_string(path, synchronous=synchronous, busy_timeout=2.5) as saver:
        saver.setup()
        assert saver.conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert saver.conn.execute("PRAGMA synchronous").fetchone() == (level,)
        assert saver.conn.execute("PRAGMA busy_timeout").fetchone() == (2500,)


def test_invalid_synchronous_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "db"
    with (
        SqliteSaver.from_conn_string(path, synchronous="SOMETIMES") as saver,  # type: ignore[arg-type]
        pytest.raises(ValueError, match="synchronous"),
    ):
        saver.setup()


def test_memory_database(tmp_path: Path) -> None:
    with SqliteSaver.from_conn_string(":memory:") as saver:
        step(saver, thread("t"), {"a": 1})
        assert saver.conn.execute("PRAGMA journal_mode").fetchone() == ("memory",)
        assert saver.get_tuple(thread("t")) is not None


def test_a_plain_user_connection_works(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "db.sqlite")  # default isolation level, same thread
    try:
        saver = SqliteSaver(conn)
        step(saver, thread("t"), {"a": 1})
        assert saver.get_tuple(thread("t")) is not None
        assert not conn.in_transaction
    finally:
        conn.close()


# -- several processes on one file ------------------------------------------------------------------


@pytest.mark.slow
def test_concurrent_processes_share_one_file(tmp_path: Path) -> None:
    path = tmp_path / "shared.sqlite"
    processes, threads = 4, 200
    writers = [
        subprocess.Popen(
            [sys.executable, str(TESTS / "concurrent_writer.py"), str(path), f"p{n}", str(threads)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(processes)
    ]
    for writer in writers:  # every writer has opened the file (and raced through setup)
        assert writer.stdout is not None and writer.stdout.readline() == "ready\n"
    for writer in writers:
        assert writer.stdin is not None
        writer.stdin.write("go\n")
        writer.stdin.flush()
    for writer in writers:
        _, errors = writer.communicate(timeout=240)
        assert writer.returncode == 0, errors

    with SqliteSaver.from_conn_string(path) as saver:
        assert count(saver, "checkpoints") == processes * threads * 2
        assert count(saver, "checkpoint_writes") == processes * threads
        for n in range(processes):
            for number in (0, threads // 2, threads - 1):
                found = saver.get_tuple(thread(f"p{n}-{number}"))
                assert found is not None
                assert found.checkpoint["channel_values"] == {"count": number}
                assert found.parent_config is not None
                parent = saver.get_tuple(found.parent_config)
                assert parent is not None
                assert parent.pending_writes == [("task", "count", number)]


def test_killed_process_loses_no_committed_step(tmp_path: Path) -> None:
    """synchronous=NORMAL in WAL mode: a commit that returned survives a SIGKILL."""
    path = tmp_path / "crash.sqlite"
    writer = subprocess.Popen(
        [sys.executable, str(TESTS / "crash_writer.py"), str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert writer.stdout is not None
    committed = [writer.stdout.readline().strip() for _ in range(200)]
    writer.kill()
    writer.communicate(timeout=60)
    assert writer.returncode == -signal.SIGKILL

    with SqliteSaver.from_conn_string(path) as saver:
        stored = {found.checkpoint["id"] for found in saver.list(thread("crash"))}
        assert set(committed) <= stored
        latest = saver.get_tuple(thread("crash"))
        assert latest is not None and latest.checkpoint["id"] >= committed[-1]


# -- async ----------------------------------------------------------------------------------------


async def test_async_saver_sync_call_inside_its_loop_raises(tmp_path: Path) -> None:
    async with AsyncSqliteSaver.from_conn_string(tmp_path / "db.sqlite") as saver:
        with pytest.raises(asyncio.InvalidStateError, match="aget_tuple"):
            saver.get_tuple(thread("t"))
        with pytest.raises(asyncio.InvalidStateError):
            list(saver.list(None))
        # From another thread the sync methods work, on the saver's loop.
        checkpoint = empty_checkpoint()
        checkpoint["channel_values"] = {"a": 1}
        checkpoint["channel_versions"] = {"a": saver.get_next_version(None)}
        versions = checkpoint["channel_versions"]
        await asyncio.to_thread(saver.put, thread("t"), checkpoint, {}, versions)
        found = await asyncio.to_thread(saver.get_tuple, thread("t"))
        assert found is not None and found.checkpoint["channel_values"] == {"a": 1}
        assert len(await asyncio.to_thread(lambda: list(saver.list(None)))) == 1


async def test_async_saver_keeps_the_loop_free(tmp_path: Path) -> None:
    """Disk work happens in aiosqlite's thread: the loop keeps running other tasks meanwhile."""
    async with AsyncSqliteSaver.from_conn_string(tmp_path / "db.sqlite") as saver:
        loop_thread = asyncio.get_running_loop()
        statements_on_loop: list[str] = []

        def record(sql: str) -> None:
            try:
                if asyncio.get_running_loop() is loop_thread:
                    statements_on_loop.append(sql)
            except RuntimeError:
                pass

        await saver.conn.set_trace_callback(record)
        checkpoint = empty_checkpoint()
        checkpoint["channel_values"] = {"a": 1}
        checkpoint["channel_versions"] = {"a": saver.get_next_version(None)}
        config = await saver.aput(thread("t"), checkpoint, {}, checkpoint["channel_versions"])
        await saver.aput_writes(config, [("a", 2)], "task")
        assert (await saver.aget_tuple(thread("t"))) is not None
        assert [found async for found in saver.alist(None)]
        assert statements_on_loop == []


async def test_async_and_sync_savers_share_one_file(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    async with AsyncSqliteSaver.from_conn_string(path) as async_saver:
        with SqliteSaver.from_conn_string(path) as sync_saver:
            config, _ = step(sync_saver, thread("t"), {"a": 1})
            await async_saver.aput_writes(config, [("a", 5)], "task")
            found = sync_saver.get_tuple(thread("t"))
            assert found is not None and found.pending_writes == [("task", "a", 5)]
            again = await async_saver.aget_tuple(thread("t"))
            assert again == found


# -- the caller's transaction -----------------------------------------------------------------


def test_calls_join_the_callers_transaction(tmp_path: Path) -> None:
    """Inside a transaction of the caller's, the saver works in a savepoint: its writes commit
    or roll back with the caller's, and its own failure leaves the caller's work alone."""
    conn = sqlite3.connect(tmp_path / "app.sqlite", isolation_level=None)
    conn.execute("CREATE TABLE orders (id INTEGER)")
    saver = SqliteSaver(conn)
    saver.setup()
    conn.execute("BEGIN")
    conn.execute("INSERT INTO orders VALUES (1)")
    step(saver, thread("rolled back"), {"n": 1})
    assert saver.get_tuple(thread("rolled back")) is not None
    conn.rollback()
    assert saver.get_tuple(thread("rolled back")) is None
    assert count(saver, "orders") == 0

    config, _ = step(saver, thread("t"), {"n": 1})
    step(saver, config, {"n": 2})
    conn.execute("UPDATE checkpoints SET checkpoint = x'c1' WHERE thread_id = 't'")
    conn.execute("BEGIN")
    conn.execute("INSERT INTO orders VALUES (2)")
    step(saver, thread("kept"), {"n": 1})
    with pytest.raises(CorruptCheckpointError):
        saver.prune(["t"])  # fails inside its savepoint
    assert conn.in_transaction
    assert count(saver, "checkpoints") == 3
    conn.commit()
    assert count(saver, "orders") == 1
    assert saver.get_tuple(thread("kept")) is not None
    conn.close()
