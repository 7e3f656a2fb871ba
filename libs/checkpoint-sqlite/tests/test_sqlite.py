"""SQLite-specific behaviour, beyond the shared contract (see test_contract.py)."""

from __future__ import annotations

import asyncio
import importlib.util
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stepgraph.checkpoint.base import (
    Checkpoint,
    CheckpointTuple,
    TaskWrites,
    empty_checkpoint,
)
from stepgraph.checkpoint.sqlite import SqliteSaver
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
) -> tuple[RunnableConfig, Checkpoint]:
    """Save the checkpoint after ``previous`` with ``updates`` applied, as the executor would."""
    checkpoint = empty_checkpoint()
    if previous is not None:
        checkpoint["channel_values"] = dict(previous["channel_values"])
        checkpoint["channel_versions"] = dict(previous["channel_versions"])
    new_versions = {}
    for channel, value in updates.items():
        version = saver.get_next_version(checkpoint["channel_versions"].get(channel))
        checkpoint["channel_versions"][channel] = new_versions[channel] = version
        checkpoint["channel_values"][channel] = value
    stored_metadata: Any = metadata or {"source": "loop"}
    saved = saver.put(config, checkpoint, stored_metadata, new_versions)
    return saved, checkpoint


def count(saver: SqliteSaver, table: str) -> int:
    return int(saver.conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


# -- storage layout ---------------------------------------------------------------------------


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


def test_reads_use_the_primary_keys(saver: SqliteSaver) -> None:
    """Latest, by id and list(limit) are index range reads, whatever the thread's length."""
    step(saver, thread("t"), {"a": 1})
    statements: list[str] = []
    saver.conn.set_trace_callback(statements.append)
    saver.get_tuple(thread("t"))
    saver.list(thread("t"), limit=10).__next__()
    saver.conn.set_trace_callback(None)

    selects = [sql for sql in statements if sql.lstrip().startswith("SELECT")]
    assert selects
    for sql in selects:
        plan = " | ".join(row[3] for row in saver.conn.execute(f"EXPLAIN QUERY PLAN {sql}"))
        assert "SCAN checkpoint" not in plan, plan
        assert "TEMP B-TREE" not in plan, plan
        assert "USING PRIMARY KEY" in plan, plan


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
    plan = " | ".join(row[3] for row in saver.conn.execute(f"EXPLAIN QUERY PLAN {page}"))
    assert "SCAN checkpoints" not in plan, plan
    assert plan.count("USING PRIMARY KEY") == 3, plan


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


def _load_fixture_module() -> Any:
    spec = importlib.util.spec_from_file_location("make_schema_v1", FIXTURES / "make_schema_v1.py")
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
