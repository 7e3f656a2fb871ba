"""What the contract cannot see: SQL safety, connections, transactions, round trips, faults."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pg_test_helpers import (
    RestartingProxy,
    next_checkpoint,
    protocol_messages,
    run_steps,
    thread,
    traced,
)
from psycopg import sql
from psycopg.pq import TransactionStatus
from psycopg.rows import dict_row, tuple_row

from stepgraph.checkpoint.base import TaskWrites
from stepgraph.checkpoint.postgres import PostgresSaver
from stepgraph.checkpoint.postgres._arrays import ByteaArray, Int2Array, Int4Array, TextArray
from stepgraph.checkpoint.postgres._plans import cursor_of
from stepgraph.checkpoint.postgres._schema import SCHEMA_VERSION
from stepgraph.checkpoint.postgres.aio import AsyncPostgresSaver

WORKER = Path(__file__).with_name("pg_worker.py")


@pytest.fixture
def saver(postgres_uri: str) -> Iterator[PostgresSaver]:
    with PostgresSaver.from_conn_string(postgres_uri) as saver:
        saver.setup()
        yield saver


def put_with_metadata(saver: PostgresSaver, thread_id: str, metadata: dict[str, Any]) -> str:
    checkpoint, versions = next_checkpoint(saver, None, {"x": 1})
    saved = saver.put(thread(thread_id), checkpoint, metadata, versions)  # type: ignore[arg-type]
    return str(saved["configurable"]["checkpoint_id"])


def listed_ids(saver: PostgresSaver, **kwargs: Any) -> list[str]:
    return [found.config["configurable"]["checkpoint_id"] for found in saver.list(None, **kwargs)]


# -- list(filter=...) -------------------------------------------------------------------------

HOSTILE = [
    "x') OR TRUE --",
    "'; DROP TABLE stepgraph_checkpoints; --",
    '"}, "source": "loop',
    "%s",
    "%(thread_id)s",
    "$1",
    "\\",
    "a'b\"c",
]


def test_filter_keys_and_values_cannot_inject_sql(saver: PostgresSaver) -> None:
    plain = put_with_metadata(saver, "plain", {"source": "loop"})
    hostile = {text: text for text in HOSTILE}
    target = put_with_metadata(saver, "hostile", {"source": "update", **hostile})

    for text in HOSTILE:
        assert listed_ids(saver, filter={text: text}) == [target]
        assert listed_ids(saver, filter={"source": text}) == []
        assert listed_ids(saver, filter={text: "other"}) == []
    assert listed_ids(saver, filter=hostile) == [target]
    assert sorted(listed_ids(saver)) == sorted([plain, target])  # nothing dropped or altered


def test_filter_is_exact_for_strings_json_cannot_hold(saver: PostgresSaver) -> None:
    # NUL and lone surrogates are escaped in the JSON copy; the escape must not collide with
    # ordinary strings, including ones that look like an escaped form.
    texts = ["a\x00b", "a\ufffdb", "a\\u0000b", "\ud800", "?", "\uffff", "\uffff61", "a"]
    ids = {text: put_with_metadata(saver, f"t{i}", {"k": text}) for i, text in enumerate(texts)}
    for text, checkpoint_id in ids.items():
        assert listed_ids(saver, filter={"k": text}) == [checkpoint_id]
        assert listed_ids(saver, filter={text: 1}) == []
        found = next(saver.list(None, filter={"k": text}, limit=1))
        assert found.metadata["k"] == text  # type: ignore[typeddict-item]


def test_filter_on_values_json_cannot_hold_pages_past_false_candidates(
    saver: PostgresSaver,
) -> None:
    # Values JSON cannot hold (a datetime here) only narrow the SQL to "null"; the exact check
    # then rejects the newer checkpoints and the listing pages on until it finds the match.
    moment = datetime(2024, 5, 17, 12, 30)
    wanted = put_with_metadata(saver, "dt", {"when": moment})
    for _ in range(40):
        put_with_metadata(saver, "dt", {"when": None})
    assert listed_ids(saver, filter={"when": moment}, limit=1) == [wanted]
    assert listed_ids(saver, filter={"when": moment}) == [wanted]
    assert len(listed_ids(saver, filter={"when": None})) == 40


def test_filter_types_match_like_metadata_matches(saver: PostgresSaver) -> None:
    as_bool = put_with_metadata(saver, "types", {"n": True})
    as_int = put_with_metadata(saver, "types", {"n": 1})
    as_float = put_with_metadata(saver, "types", {"n": 1.0})
    nested = put_with_metadata(saver, "types", {"n": {"a": [1, 2], "b": None}})
    assert listed_ids(saver, filter={"n": True}) == [as_bool]
    assert set(listed_ids(saver, filter={"n": 1})) == {as_int, as_float}
    assert listed_ids(saver, filter={"n": {"a": [2]}}) == [nested]
    assert listed_ids(saver, filter={"n": {"b": None}}) == [nested]
    assert listed_ids(saver, filter={"n": {"b": False}}) == []


# -- identifiers ------------------------------------------------------------------------------


def test_identifiers_round_trip_nul_and_lone_surrogates(saver: PostgresSaver) -> None:
    config = thread("thread\x00\ud800", "ns\udfff\x00")
    checkpoint, versions = next_checkpoint(saver, None, {"chan\x00nel\ud83d": "v"})
    saved = saver.put(config, checkpoint, {"source": "input"}, versions)
    saver.put_writes(saved, [("chan\x00nel\ud83d", 1)], "task\x00\udc00", "path\ud800")

    found = saver.get_tuple(config)
    assert found is not None
    assert found.config == saved
    assert found.checkpoint["channel_values"] == {"chan\x00nel\ud83d": "v"}
    assert found.pending_writes == [("task\x00\udc00", "chan\x00nel\ud83d", 1)]
    saver.copy_thread("thread\x00\ud800", "copy\ud800")
    assert saver.get_tuple(thread("copy\ud800", "ns\udfff\x00")) is not None


def test_list_pages_through_ties_across_threads(saver: PostgresSaver) -> None:
    # Copied threads share checkpoint ids: paging over all threads must not skip or repeat.
    run_steps(saver, thread("original"), 39)
    saver.copy_thread("original", "copy")
    listed = [
        (found.config["configurable"]["checkpoint_id"], found.config["configurable"]["thread_id"])
        for found in saver.list(None)
    ]
    assert len(listed) == 80
    assert listed == sorted(set(listed), reverse=True)
    assert len(list(saver.list(None, limit=50))) == 50


def test_one_call_repeating_a_write_key_keeps_what_separate_calls_would(
    saver: PostgresSaver,
) -> None:
    # One INSERT ... ON CONFLICT DO UPDATE may not touch a row twice: repeated keys within one
    # call are settled before the statement, as a sequence of separate calls would settle them.
    config = run_steps(saver, thread("t"), 1)
    previous = saver.get_tuple(config)
    assert previous is not None
    checkpoint, versions = next_checkpoint(saver, previous.checkpoint, {"count": 5})
    writes = [
        TaskWrites("task", [("__error__", "first"), ("__error__", "second")]),
        TaskWrites("task", [("count", 1)]),
        TaskWrites("task", [("count", 2)]),  # same (task, idx 0): the first one stays
    ]
    saver.put_step(config, writes, checkpoint, {"step": 5}, versions)
    found = saver.get_tuple(config)
    assert found is not None
    assert found.pending_writes == [("task", "__error__", "second"), ("task", "count", 1)]


# -- setup ------------------------------------------------------------------------------------


def test_concurrent_setup_from_several_processes(postgres_uri: str) -> None:
    start = time.time() + 2.0  # all workers call setup() at the same moment
    workers = [
        subprocess.Popen(
            [sys.executable, str(WORKER), "setup", postgres_uri, str(start)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for _ in range(6)
    ]
    outputs = [worker.communicate(timeout=120)[0].decode() for worker in workers]
    assert [worker.returncode for worker in workers] == [0] * 6, outputs

    with psycopg.connect(postgres_uri) as conn:
        versions = conn.execute("SELECT version FROM stepgraph_migrations ORDER BY 1").fetchall()
    assert versions == [(version,) for version in range(1, SCHEMA_VERSION + 1)]


def test_setup_inside_the_callers_transaction(postgres_uri: str) -> None:
    with psycopg.connect(postgres_uri) as conn:
        conn.execute("SELECT 1")  # the caller's transaction is open
        saver = PostgresSaver(conn)
        saver.setup()
        assert conn.info.transaction_status == TransactionStatus.INTRANS
        conn.rollback()  # the caller decides: the tables go with its transaction
        assert conn.execute("SELECT to_regclass('stepgraph_checkpoints')").fetchone() == (None,)

        conn.execute("SELECT 1")
        saver.setup()
        conn.commit()
        run_steps(saver, thread("t"), 2)
        assert saver.get_tuple(thread("t")) is not None


def test_setup_of_a_current_schema_needs_no_create_rights(saver: PostgresSaver) -> None:
    # An application role that may only read the schema can still start a saver.
    role = f"stepgraph_reader_{uuid.uuid4().hex[:12]}"
    conninfo = saver.conn.conninfo  # type: ignore[union-attr]
    with psycopg.connect(conninfo, autocommit=True) as conn:
        schema = conn.execute("SELECT current_schema()").fetchone()[0]  # type: ignore[index]
        conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(role)))
        try:
            for grant in (
                "GRANT USAGE ON SCHEMA {} TO {}",
                "GRANT SELECT ON {}.stepgraph_migrations TO {}",
            ):
                conn.execute(sql.SQL(grant).format(sql.Identifier(schema), sql.Identifier(role)))
            conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("CREATE TABLE not_allowed (a int)")
            PostgresSaver(conn).setup()
        finally:
            conn.execute("RESET ROLE")
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


# -- connections and transactions -------------------------------------------------------------


@pytest.mark.parametrize("autocommit", [True, False], ids=["autocommit", "no-autocommit"])
@pytest.mark.parametrize("row_factory", [tuple_row, dict_row], ids=["tuple_row", "dict_row"])
def test_any_connection_is_left_as_found(
    postgres_uri: str, autocommit: bool, row_factory: Any
) -> None:
    with psycopg.connect(postgres_uri, autocommit=autocommit, row_factory=row_factory) as conn:
        saver = PostgresSaver(conn)

        def unchanged() -> None:
            assert conn.info.transaction_status == TransactionStatus.IDLE
            assert conn.autocommit is autocommit
            assert conn.row_factory is row_factory

        saver.setup()
        unchanged()
        config = run_steps(saver, thread("t"), 3, run_id="r1")
        unchanged()
        assert saver.get_tuple(config) is not None
        assert len(list(saver.list(thread("t")))) == 4
        unchanged()
        saver.prune(["t"], keep_last=2)
        saver.delete_for_runs(["r1"])
        unchanged()
        assert list(saver.list(thread("t"))) == []


def test_writes_join_the_callers_transaction(postgres_uri: str) -> None:
    with psycopg.connect(postgres_uri) as conn:
        saver = PostgresSaver(conn)
        saver.setup()
        conn.execute("SELECT 1")
        run_steps(saver, thread("t"), 2)
        assert saver.get_tuple(thread("t")) is not None  # visible inside the transaction
        conn.rollback()
        assert saver.get_tuple(thread("t")) is None


@pytest.mark.parametrize("autocommit", [True, False], ids=["autocommit", "no-autocommit"])
def test_put_step_is_one_statement_and_one_round_trip(postgres_uri: str, autocommit: bool) -> None:
    with psycopg.connect(postgres_uri, autocommit=autocommit) as conn:
        saver = PostgresSaver(conn)
        saver.setup()
        config = run_steps(saver, thread("t"), 1)
        previous = saver.get_tuple(config)
        assert previous is not None
        checkpoint, versions = next_checkpoint(saver, previous.checkpoint, {"count": 9})
        writes = [TaskWrites("task", [("count", 9), ("log", [1])])]

        messages = protocol_messages(
            conn, lambda: saver.put_step(config, writes, checkpoint, {"step": 9}, versions)
        )
        assert messages.count("F:Execute") == 1
        assert messages.count("F:Sync") == 1  # the client waits once: one round trip
        assert messages[-1] == "B:ReadyForQuery"
        found = saver.get_tuple(thread("t"))
        assert found is not None
        assert found.checkpoint["channel_values"]["count"] == 9


@pytest.mark.parametrize("autocommit", [True, False], ids=["autocommit", "no-autocommit"])
def test_reading_a_checkpoint_the_saver_knows_is_one_round_trip(
    postgres_uri: str, autocommit: bool
) -> None:
    def read(reader: PostgresSaver) -> tuple[Any, list[str]]:
        found: list[Any] = []
        messages = protocol_messages(conn, lambda: found.append(reader.get_tuple(thread("t"))))
        assert found[0] is not None
        config, checkpoint, metadata, _, pending_writes = found[0]
        return (config, checkpoint, metadata, pending_writes), messages

    with psycopg.connect(postgres_uri, autocommit=autocommit) as conn:
        saver = PostgresSaver(conn)
        saver.setup()
        config = run_steps(saver, thread("t"), 3)  # "log" is a list: value rows to fetch
        saver.put_writes(config, [("count", 7)], "pending")
        for _ in range(6):  # psycopg prepares a statement at its fifth use: one more Sync
            PostgresSaver(conn).get_tuple(thread("t"))
        # The writer keeps the blob of what it saved: the checkpoint row, its value rows and
        # its writes come in one round trip.
        known, messages = read(saver)
        assert messages.count("F:Sync") == 1
        assert known[1]["channel_values"]["log"] == [0, 1, 2]
        assert known[3] == [("pending", "count", 7)]
        # A saver that knows nothing reads the same in two; then it knows the checkpoint
        # (stored whole: a read keeps no blob of it, only what it names).
        other = PostgresSaver(conn)
        other.setup()
        for round_trips in (2, 1):
            first, messages = read(other)
            assert messages.count("F:Sync") == round_trips
            assert first == known
        # Another saver saves a newer checkpoint: the writer's guess is wrong, its read right.
        run_steps(other, thread("t"), 1)
        newer, messages = read(saver)
        assert messages.count("F:Sync") == 2
        assert newer == read(other)[0]
        assert newer[0] != known[0] and newer[1]["channel_values"]["log"] == [0]


def test_a_blob_the_saver_keeps_spares_reading_its_chain(postgres_uri: str) -> None:
    with psycopg.connect(postgres_uri, autocommit=True) as conn:
        writer = PostgresSaver(conn)
        writer.setup()
        config, previous = thread("c"), None
        for number in range(6):
            checkpoint, versions = next_checkpoint(writer, previous, {"count": number})
            checkpoint["versions_seen_changes"] = []  # the executor's word: rows of changes
            config = writer.put(config, checkpoint, {}, versions)
            del checkpoint["versions_seen_changes"]  # never read back
            previous = checkpoint
        chained = conn.execute(
            "SELECT count(*) FROM stepgraph_checkpoints WHERE chain_start IS NOT NULL"
        ).fetchone()
        assert chained == (5,)
        reader = PostgresSaver(conn)
        reader.setup()
        for saver, rows in ((writer, 1), (reader, 6)):  # the reader gets the chain's rows
            with traced(conn) as messages:
                found = saver.get_tuple(config)
            assert found is not None and found.checkpoint == previous
            assert messages.count("B:DataRow") == rows


def test_a_wrong_guess_still_serves_the_value_rows_it_fetched(
    saver: PostgresSaver, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stepgraph.checkpoint.postgres import _plans

    other = PostgresSaver(saver.conn)
    document = "d" * 10_000
    first, versions = next_checkpoint(saver, None, {"doc": document, "count": 0})
    config = saver.put(thread("t"), first, {}, versions)
    # Another saver moves the thread on; the document keeps its version (and value row).
    second, versions = next_checkpoint(other, first, {"count": 1})
    other.put(config, second, {}, versions)

    asked: list[Any] = []
    select_related = _plans._select_related
    monkeypatch.setattr(
        _plans, "_select_related", lambda keys: asked.append(keys) or select_related(keys)
    )
    found = saver.get_tuple(thread("t"))
    assert found is not None and found.checkpoint["channel_values"] == {"doc": document, "count": 1}
    # The guess asked for the document; the second statement only for the found one's writes.
    assert [[key[2] for key in keys[0]] for keys in asked] == [["doc"], []]
    assert [checkpoint_id for *_, checkpoint_id in asked[1][1]] == [second["id"]]


async def test_async_read_of_a_checkpoint_the_saver_knows_is_one_round_trip(
    postgres_uri: str,
) -> None:
    async with await psycopg.AsyncConnection.connect(postgres_uri, autocommit=True) as conn:
        saver = AsyncPostgresSaver(conn)
        await saver.setup()
        config = await asyncio.to_thread(run_steps, saver, thread("t"), 3)
        await saver.aput_writes(config, [("count", 7)], "pending")
        other = AsyncPostgresSaver(conn)
        await other.setup()
        found = []
        for reader, round_trips in ((saver, 1), (other, 2)):
            with traced(conn) as messages:
                found.append(await reader.aget_tuple(thread("t")))
            assert messages.count("F:Sync") == round_trips
        assert found[0] == found[1]
        assert found[0] is not None and found[0].pending_writes == [("pending", "count", 7)]


def test_prepare_threshold_none_prepares_nothing(postgres_uri: str) -> None:
    # Behind PgBouncer in transaction mode a prepared statement may land on another server
    # connection: with prepare_threshold=None nothing is ever prepared.
    with PostgresSaver.from_conn_string(postgres_uri, prepare_threshold=None) as saver:
        run_steps(saver, thread("t"), 10)
        assert len(list(saver.list(thread("t")))) == 11
        with saver.conn.connection() as conn:  # type: ignore[union-attr]
            assert conn.execute("SELECT count(*) FROM pg_prepared_statements").fetchone() == (0,)
    with PostgresSaver.from_conn_string(postgres_uri) as saver:  # prepared on first use
        run_steps(saver, thread("u"), 2)
        with saver.conn.connection() as conn:  # type: ignore[union-attr]
            row = conn.execute("SELECT count(*) FROM pg_prepared_statements").fetchone()
            assert row is not None and row[0] > 0


def test_prepared_statements_get_generic_plans(postgres_uri: str) -> None:
    def settings(saver: PostgresSaver) -> tuple[Any, ...] | None:
        with saver.conn.connection() as conn:  # type: ignore[union-attr]
            return conn.execute(
                "SELECT current_setting('plan_cache_mode'), current_setting('work_mem')"
            ).fetchone()

    with PostgresSaver.from_conn_string(postgres_uri) as saver:
        assert settings(saver) is not None
        assert settings(saver)[0] == "force_generic_plan"  # type: ignore[index]
    # The connection's own options are kept.
    own = {"kwargs": {"options": "-c work_mem=3MB"}}
    with PostgresSaver.from_conn_string(postgres_uri, pool=own) as saver:
        assert settings(saver) == ("force_generic_plan", "3MB")
    uri = psycopg.conninfo.make_conninfo(postgres_uri, options="-c work_mem=5MB")
    with PostgresSaver.from_conn_string(uri) as saver:
        assert settings(saver) == ("force_generic_plan", "5MB")
    # Nothing is prepared without a prepare threshold, and nothing is added (PgBouncer).
    with PostgresSaver.from_conn_string(postgres_uri, prepare_threshold=None) as saver:
        found = settings(saver)
        assert found is not None and found[0] != "force_generic_plan"


def test_step_statement_is_planned_once_on_any_connection(postgres_uri: str) -> None:
    # A caller's own connection keeps the server's plan_cache_mode (auto): the statements
    # must still earn a generic plan there, or every step is planned again.
    with psycopg.connect(postgres_uri, autocommit=True) as conn:
        saver = PostgresSaver(conn)
        saver.setup()
        run_steps(saver, thread("t"), 20)
        rows = conn.execute(
            "SELECT statement, generic_plans, custom_plans FROM pg_prepared_statements"
            " WHERE statement LIKE '%%INSERT INTO stepgraph_checkpoints %%'"
        ).fetchall()
        assert rows, "the step statement was never prepared"
        for statement, generic, custom in rows:
            assert custom <= 5, (statement[:80], generic, custom)  # the first five are custom
            if generic + custom > 5:
                assert generic > 0


@pytest.mark.parametrize("others", [0, 300, 30000])
def test_reads_probe_keys_under_generic_plans(
    saver: PostgresSaver, postgres_uri: str, monkeypatch: pytest.MonkeyPatch, others: int
) -> None:
    # A generic plan (what from_conn_string's connections use) cannot see how few keys a read
    # names. Every read of one thread must still look its keys up one by one, never join them
    # with a whole table: the values-and-writes read once hashed its keys and scanned every
    # stored write (some hundred microseconds a read on a table of a thousand writes). Only on
    # a table of a page or two may the lookup itself be a scan.
    import stepgraph.checkpoint.postgres as module

    reads: dict[str, Any] = {}

    def recording(cursor: Any, plan: Any) -> Any:
        def execute(statement: Any) -> list[Any]:
            if statement.sql.lstrip().startswith(("WITH page", "WITH spans")):
                reads[statement.sql] = statement.params
            cursor.execute(statement.sql, statement.params)
            return cursor.fetchall() if statement.fetch else []

        return module.run_steps(plan, execute)

    config = run_steps(saver, thread("t"), 5)
    saver.put_writes(config, [("count", 7)], "pending-task")
    monkeypatch.setattr(module, "_steps", recording)
    found = saver.get_tuple(thread("t"))
    assert found is not None and found.pending_writes == [("pending-task", "count", 7)]
    assert len(list(saver.list(thread("t"), limit=3))) == 3
    assert len(list(saver.list({"configurable": {"thread_id": "t"}}, limit=3))) == 3
    assert len(reads) == 3  # by thread and namespace, by thread alone, values and writes
    monkeypatch.undo()

    with psycopg.connect(postgres_uri, autocommit=True) as conn:
        # Rows of other threads: whatever the tables' size, a few probes must win.
        many = f"FROM generate_series(1, {others}) AS g"
        conn.execute(
            "INSERT INTO stepgraph_checkpoints (thread_id, checkpoint_ns, checkpoint_id, ts,"
            " checkpoint_type, checkpoint, metadata_type, metadata, metadata_json)"
            f" SELECT ('o' || g)::bytea, '', 'c', 'ts', 'msgpack', '', 'msgpack', '', '{{}}' {many}"
        )
        conn.execute(
            "INSERT INTO stepgraph_checkpoint_values (thread_id, checkpoint_ns, channel, version)"
            f" SELECT ('o' || g)::bytea, '', 'c', 'v' {many}"
        )
        conn.execute(
            "INSERT INTO stepgraph_checkpoint_writes (thread_id, checkpoint_ns, checkpoint_id,"
            " task_id, idx, channel, type, value, task_path)"
            f" SELECT ('o' || g)::bytea, '', 'c', 't', 0, 'c', 'msgpack', '', '' {many}"
        )
        conn.execute("ANALYZE")
        conn.execute("SET plan_cache_mode = force_generic_plan")
        cursor = cursor_of(conn)
        for statement, params in reads.items():
            cursor.execute(f"EXPLAIN {statement}", params, prepare=True)
            plan = "\n".join(line for (line,) in cursor.fetchall())
            assert "Hash Join" not in plan and "Merge Join" not in plan, plan
            if others >= 30000:
                assert "Seq Scan on stepgraph_" not in plan, plan


@pytest.mark.parametrize(
    ("column", "cast", "items"),
    [
        (ByteaArray, "bytea[]", [b"a", b"", None, b"\x00\xff" * 3000]),
        (TextArray, "text[]", ["msgpack", None, "é€😀", ""]),
        (Int4Array, "integer[]", [0, -1, 2**31 - 1, -(2**31)]),
        (Int2Array, "smallint[]", [0, 1, -(2**15), 2**15 - 1]),
        (ByteaArray, "bytea[]", []),
        (Int2Array, "smallint[]", []),
    ],
)
def test_array_columns_reach_the_server_exactly(
    postgres_uri: str, column: type, cast: str, items: list[Any]
) -> None:
    with psycopg.connect(postgres_uri, autocommit=True) as conn:
        cursor = cursor_of(conn)
        cursor.execute(
            f"SELECT %b::{cast}, cardinality(%b::{cast}), array_ndims(%b::{cast})",
            [column(items)] * 3,
        )
        found, length, dimensions = cursor.fetchone()
        assert [bytes(item) if isinstance(item, memoryview) else item for item in found] == items
        assert length == len(items)
        assert dimensions == (1 if items else None)


def test_one_connection_shared_by_threads(postgres_uri: str) -> None:
    with psycopg.connect(postgres_uri) as conn:
        saver = PostgresSaver(conn)
        errors: list[BaseException] = []

        def work(name: str) -> None:
            try:
                run_steps(saver, thread(name), 10)
            except BaseException as error:
                errors.append(error)

        workers = [threading.Thread(target=work, args=(f"t{i}",)) for i in range(8)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        assert errors == []
        for i in range(8):
            found = saver.get_tuple(thread(f"t{i}"))
            assert found is not None
            assert found.checkpoint["channel_values"]["count"] == 10


# -- faults -----------------------------------------------------------------------------------


def _terminate(postgres_uri: str, application_name: str) -> int:
    with psycopg.connect(postgres_uri, autocommit=True) as admin:
        rows = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            [application_name],
        ).fetchall()
    return len(rows)


def test_pool_replaces_terminated_connections(postgres_uri: str) -> None:
    name = f"stepgraph-terminated-{time.monotonic_ns()}"
    options = {"min_size": 3, "max_size": 3, "kwargs": {"application_name": name}}
    with PostgresSaver.from_conn_string(postgres_uri, pool=options) as saver:
        config = run_steps(saver, thread("t"), 2)
        saver.conn.wait()  # type: ignore[union-attr]  # all three connections open
        assert _terminate(postgres_uri, name) == 3
        config = run_steps(saver, thread("t"), 2)  # no error: the plan reran on a new one
        assert saver.get_tuple(config) is not None
        assert len(list(saver.list(thread("t")))) == 6


def test_lone_connection_reports_its_termination(postgres_uri: str) -> None:
    name = f"stepgraph-terminated-{time.monotonic_ns()}"
    with psycopg.connect(postgres_uri, application_name=name) as conn:
        saver = PostgresSaver(conn)
        run_steps(saver, thread("t"), 1)
        assert _terminate(postgres_uri, name) == 1
        with pytest.raises(psycopg.OperationalError):
            saver.get_tuple(thread("t"))  # the caller owns the connection: no silent retry


def test_processes_writing_at_once(postgres_uri: str) -> None:
    # Eight processes: each runs its own thread step by step, writes after every step to one
    # checkpoint they all share, and prunes its thread while the others still write.
    with PostgresSaver.from_conn_string(postgres_uri) as saver:
        checkpoint, versions = next_checkpoint(saver, None, {"log": []})
        shared = saver.put(thread("shared"), checkpoint, {"source": "input"}, versions)
    shared_id = str(shared["configurable"]["checkpoint_id"])
    start = time.time() + 2.0
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                "steps",
                postgres_uri,
                f"p{i}",
                "25",
                shared_id,
                str(start),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in range(8)
    ]
    outputs = [worker.communicate(timeout=240)[0].decode() for worker in workers]
    assert [worker.returncode for worker in workers] == [0] * 8, outputs

    with PostgresSaver.from_conn_string(postgres_uri) as saver:
        for i in range(8):
            history = list(saver.list(thread(f"p{i}")))
            assert len(history) == 3  # pruned to the newest three, all readable
            assert history[0].checkpoint["channel_values"] == {
                "count": 25,
                "log": list(range(25)),
            }
            assert history[2].checkpoint["channel_values"]["count"] == 23
        found = saver.get_tuple(shared)
        assert found is not None
        assert sorted(found.pending_writes or []) == sorted(
            (f"p{i}-{step}", "log", step) for i in range(8) for step in range(25)
        )
        saver.delete_for_runs(["p0", "p1"])
        assert list(saver.list(thread("p0"))) == []
        assert len(list(saver.list(thread("p2")))) == 3


# -- async ------------------------------------------------------------------------------------


async def test_async_saver_on_plain_connection_leaves_it_as_found(postgres_uri: str) -> None:
    async with await psycopg.AsyncConnection.connect(postgres_uri, row_factory=dict_row) as conn:
        saver = AsyncPostgresSaver(conn)
        await saver.setup()
        checkpoint, versions = next_checkpoint(saver, None, {"x": 1})
        saved = await saver.aput(thread("t"), checkpoint, {"source": "input"}, versions)
        await saver.aput_writes(saved, [("x", 2)], "task")
        await saver.aprune(["t"])
        assert conn.info.transaction_status == TransactionStatus.IDLE
        assert conn.autocommit is False
        found = await saver.aget_tuple(thread("t"))
        assert found is not None
        assert found.pending_writes == [("task", "x", 2)]


async def test_async_sync_methods_refuse_to_deadlock_the_loop(postgres_uri: str) -> None:
    async with AsyncPostgresSaver.from_conn_string(postgres_uri) as saver:
        with pytest.raises(asyncio.InvalidStateError):
            saver.get_tuple(thread("t"))
        found = await asyncio.to_thread(saver.get_tuple, thread("t"))  # another thread: fine
        assert found is None


def test_pool_rides_out_a_server_restart(postgres_uri: str) -> None:
    proxy = RestartingProxy(postgres_uri)
    try:
        with PostgresSaver.from_conn_string(proxy.conninfo, pool={"min_size": 2}) as saver:
            run_steps(saver, thread("t"), 2)
            assert proxy.restart(down_for=1.0) >= 1
            config = run_steps(saver, thread("t"), 2)  # waits for the server, then succeeds
            assert saver.get_tuple(config) is not None
            assert len(list(saver.list(thread("t")))) == 6
    finally:
        proxy.close()


async def test_async_pool_rides_out_a_server_restart(postgres_uri: str) -> None:
    proxy = RestartingProxy(postgres_uri)
    try:
        async with AsyncPostgresSaver.from_conn_string(proxy.conninfo) as saver:
            await saver.setup()
            checkpoint, versions = next_checkpoint(saver, None, {"x": 1})
            await saver.aput(thread("t"), checkpoint, {}, versions)
            assert proxy.restart(down_for=1.0) >= 1
            found = await saver.aget_tuple(thread("t"))
            assert found is not None
            assert found.checkpoint["channel_values"] == {"x": 1}
    finally:
        proxy.close()


# -- prune racing concurrent saves -----------------------------------------------------------


@pytest.mark.parametrize("in_callers_transaction", [False, True], ids=["own", "callers"])
def test_prune_keeps_values_of_checkpoints_committed_meanwhile(
    postgres_uri: str, in_callers_transaction: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint another connection commits while prune runs stays readable, also when
    prune runs in the caller's READ COMMITTED transaction (no snapshot of its own)."""
    from stepgraph.checkpoint.postgres import _plans

    with (
        psycopg.connect(postgres_uri, autocommit=not in_callers_transaction) as conn,
        psycopg.connect(postgres_uri, autocommit=True) as other_conn,
    ):
        pruner, other = PostgresSaver(conn), PostgresSaver(other_conn)
        pruner.setup()
        if not in_callers_transaction:
            conn.commit()
        first, versions = next_checkpoint(other, None, {"a": "v1"})
        config = other.put(thread("r"), first, {}, versions)
        second, versions = next_checkpoint(other, first, {"a": "v2"})
        config = other.put(config, second, {}, versions)
        third, third_versions = next_checkpoint(other, second, {"a": "v3"})
        saved: list[Any] = []
        deleted_values = _plans.deleted_values

        def commit_a_step_first(*args: Any) -> Any:
            if not saved:  # between prune's reads and its deletes
                saved.append(other.put(config, third, {}, third_versions))
            return deleted_values(*args)

        monkeypatch.setattr(_plans, "deleted_values", commit_a_step_first)
        if in_callers_transaction:
            conn.execute("SELECT 1")
        pruner.prune(["r"])
        conn.commit()
        found = other.get_tuple(thread("r"))
        assert found is not None and found.config == saved[0]
        assert found.checkpoint["channel_values"] == {"a": "v3"}


def test_fork_racing_a_prune_of_its_parent_stays_readable(postgres_uri: str) -> None:
    """A step forking from a checkpoint that a concurrent prune deletes is readable, whichever
    commits first: the step locks its parent, so the prune either waits for it or deletes the
    parent first and the step then stores every value."""
    with (
        psycopg.connect(postgres_uri, autocommit=True) as conn,
        psycopg.connect(postgres_uri) as forking_conn,
    ):
        pruner, forker = PostgresSaver(conn), PostgresSaver(forking_conn)
        pruner.setup()
        forking_conn.commit()
        first, versions = next_checkpoint(pruner, None, {"a": "only in the first", "b": 1})
        first_config = pruner.put(thread("f"), first, {}, versions)
        second, versions = next_checkpoint(pruner, first, {"a": "second", "b": 2})
        pruner.put(first_config, second, {}, versions)

        # The fork is saved inside forking_conn's open transaction: it holds its parent locked.
        fork, versions = next_checkpoint(forker, first, {"b": 3})
        forking_conn.execute("SELECT 1")
        fork_config = forker.put(first_config, fork, {}, versions)
        pruning = threading.Thread(target=pruner.prune, args=(["f"],), kwargs={"keep_last": 1})
        pruning.start()
        pruning.join(0.5)
        assert pruning.is_alive()  # waiting for the fork's lock on its parent
        forking_conn.commit()
        pruning.join()
        # keep_last=1 keeps the fork (the latest): its channel "a" is the first's row
        found = pruner.get_tuple(fork_config)
        assert found is not None
        assert found.checkpoint["channel_values"] == {"a": "only in the first", "b": 3}


def test_delete_thread_racing_a_step_leaves_nothing_of_the_thread(postgres_uri: str) -> None:
    """A step saved while delete_thread runs (no lease fences it: a direct saver call) holds
    its parent locked, so the delete waits for it; the rows the step committed meanwhile are
    deleted too, and none is left without its parent."""
    with (
        psycopg.connect(postgres_uri, autocommit=True) as conn,
        psycopg.connect(postgres_uri) as stepping_conn,
    ):
        deleter, stepper = PostgresSaver(conn), PostgresSaver(stepping_conn)
        deleter.setup()
        stepping_conn.commit()
        config = run_steps(stepper, thread("d"), 3)
        stepping_conn.commit()
        previous = stepper.get_tuple(config)
        assert previous is not None
        stepping_conn.commit()

        # The step is saved inside stepping_conn's open transaction: its parent stays locked.
        checkpoint, versions = next_checkpoint(stepper, previous.checkpoint, {"count": 9})
        checkpoint["versions_seen_changes"] = []  # a row of changes to its parent
        stepping_conn.execute("SELECT 1")
        writes = [TaskWrites("task", [("count", 9)])]
        stepper.put_step(config, writes, checkpoint, {"step": 9}, versions)
        deleting = threading.Thread(target=deleter.delete_thread, args=("d",))
        deleting.start()
        deleting.join(0.5)
        assert deleting.is_alive()  # waiting for the step's lock on its parent
        stepping_conn.commit()
        deleting.join()

        assert deleter.get_tuple(thread("d")) is None
        for table in ("checkpoints", "checkpoint_values", "checkpoint_writes"):
            left = conn.execute(
                f"SELECT count(*) FROM stepgraph_{table} WHERE thread_id = %s", (b"d",)
            ).fetchone()
            assert left == (0,), table
