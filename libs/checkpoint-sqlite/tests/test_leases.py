"""Thread ownership (leases, fencing), the run registry and retention, on SQLite files on disk.

The backend-neutral rules are in the contract (test_contract.py); these tests cover what only
a real file shows: processes racing for a thread, refused writes leaving no row behind, the
statements a write runs, migrations of the committed fixtures.
"""

from __future__ import annotations

import asyncio
import importlib.util
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypedDict

import pytest

from stepgraph.checkpoint.base import (
    Checkpoint,
    CheckpointTuple,
    Lease,
    Retention,
    RunStatus,
    TaskWrites,
    empty_checkpoint,
)
from stepgraph.checkpoint.base.runs import with_fence
from stepgraph.checkpoint.sqlite import SqliteSaver, _plans
from stepgraph.checkpoint.sqlite._schema import SCHEMA_VERSION
from stepgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
from stepgraph.checkpoint.storage import CorruptCheckpointError
from stepgraph.checkpoint.storage.plans import Job, Statement
from stepgraph.config import RunnableConfig
from stepgraph.errors import InvalidUpdateError, LeaseLostError, ThreadBusyError
from stepgraph.graph import END, START, StateGraph
from stepgraph.types import Command, Send

TESTS = Path(__file__).parent
FIXTURES = TESTS / "fixtures"
TABLES = ("checkpoints", "checkpoint_values", "checkpoint_writes")
SHORT = 0.5  # seconds: a lease that runs out during the test


@pytest.fixture
def saver(tmp_path: Path) -> Iterator[SqliteSaver]:
    with SqliteSaver.from_conn_string(tmp_path / "leases.sqlite") as saver:
        yield saver


def thread(thread_id: str) -> RunnableConfig:
    return {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}


def checkpoint_after(
    saver: Any, previous: Checkpoint | None, updates: dict[str, Any], ts: datetime | None = None
) -> tuple[Checkpoint, dict[str, str]]:
    checkpoint = empty_checkpoint()
    if ts is not None:
        checkpoint["ts"] = ts.isoformat()
    if previous is not None:
        checkpoint["channel_values"] = dict(previous["channel_values"])
        checkpoint["channel_versions"] = dict(previous["channel_versions"])
    versions = {}
    for channel, value in updates.items():
        version = saver.get_next_version(checkpoint["channel_versions"].get(channel))
        checkpoint["channel_versions"][channel] = versions[channel] = version
        checkpoint["channel_values"][channel] = value
    return checkpoint, versions


def put(
    saver: SqliteSaver,
    config: RunnableConfig,
    updates: dict[str, Any],
    previous: Checkpoint | None = None,
    ts: datetime | None = None,
) -> tuple[RunnableConfig, Checkpoint]:
    checkpoint, versions = checkpoint_after(saver, previous, updates, ts)
    return saver.put(config, checkpoint, {"source": "loop", "step": 0}, versions), checkpoint


def snapshot(saver: SqliteSaver) -> dict[str, list[Any]]:
    """Every row of the saver's tables (thread_runs included)."""
    return {
        table: saver.conn.execute(f"SELECT * FROM {table} ORDER BY 1, 2, 3").fetchall()
        for table in (*TABLES, "thread_runs")
    }


def count(saver: SqliteSaver, table: str, thread_id: str | None = None) -> int:
    where, params = ("WHERE thread_id = ?", (thread_id,)) if thread_id else ("", ())
    return int(saver.conn.execute(f"SELECT count(*) FROM {table} {where}", params).fetchone()[0])


def assert_refused_and_nothing_written(
    saver: SqliteSaver, stale: RunnableConfig, match: str
) -> None:
    """``stale`` carries a lost lease: put, put_step and put_writes all fail, writing nothing."""
    before = snapshot(saver)
    found = saver.get_tuple(stale)
    previous = found.checkpoint if found else None
    if "checkpoint_id" not in stale["configurable"]:  # writes name a checkpoint, gone or not
        stale = {"configurable": {**stale["configurable"], "checkpoint_id": "gone"}}
    checkpoint, versions = checkpoint_after(saver, previous, {"n": "stale", "big": "x" * 500})
    metadata: Any = {"source": "loop", "step": 9}
    with pytest.raises(LeaseLostError, match=match):
        saver.put(stale, checkpoint, metadata, versions)
    with pytest.raises(LeaseLostError, match=match):
        saver.put_step(stale, [TaskWrites("task", [("n", 1)])], checkpoint, metadata, versions)
    with pytest.raises(LeaseLostError, match=match):
        saver.put_writes(stale, [("n", "stale")], "task")
    with pytest.raises(LeaseLostError, match=match):
        saver.put_writes_batch(stale, [TaskWrites("a", [("n", 1)]), TaskWrites("b", [("n", 2)])])
    assert not saver.conn.in_transaction  # rolled back, the saver stays usable
    assert snapshot(saver) == before


# -- processes racing for a thread --------------------------------------------------------------


@pytest.mark.slow
def test_processes_racing_for_a_thread_one_wins(tmp_path: Path) -> None:
    path = tmp_path / "race.sqlite"
    with SqliteSaver.from_conn_string(path) as saver:
        saver.setup()
    racers = [
        subprocess.Popen(
            [sys.executable, str(TESTS / "lease_racer.py"), str(path), f"run-{n}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(4)
    ]
    try:
        for racer in racers:
            assert racer.stdout is not None and racer.stdout.readline() == "ready\n"
        for round in range(5):
            for racer in racers:  # all at once, then read the answers
                assert racer.stdin is not None
                racer.stdin.write(f"contested-{round}\n")
                racer.stdin.flush()
            answers = [racer.stdout.readline().strip() for racer in racers]  # type: ignore[union-attr]
            assert sorted(answers) == ["busy", "busy", "busy", "got 1"], answers
            winner = f"run-{answers.index('got 1')}"
            with SqliteSaver.from_conn_string(path) as saver:
                info = saver.get_run(f"contested-{round}")
                assert info is not None and info.run_id == winner and info.status == "running"
    finally:
        for racer in racers:
            _, errors = racer.communicate(timeout=60)
            assert racer.returncode == 0, errors


def test_two_connections_to_one_file_exclude_each_other(tmp_path: Path) -> None:
    path = tmp_path / "shared.sqlite"
    with (
        SqliteSaver.from_conn_string(path) as first,
        SqliteSaver.from_conn_string(path) as second,
    ):
        lease = first.acquire_lease("t", "run-1", ttl=60, input={"question": "why"})
        with pytest.raises(ThreadBusyError) as busy:
            second.acquire_lease("t", "run-2", ttl=60)
        assert busy.value.holder == "run-1" and 0 < (busy.value.expires_in or 0) <= 60
        assert not second.conn.in_transaction
        info = second.get_run("t")
        assert info is not None and info.run_id == "run-1" and info.input == {"question": "why"}
        # Retried by its holder: the same lease, extended.
        again = first.acquire_lease("t", "run-1", ttl=60)
        assert again.epoch == lease.epoch and again.expires_at >= lease.expires_at
        first.release_lease(lease, "done")
        taken = second.acquire_lease("t", "run-2", ttl=60)
        assert (taken.epoch, taken.attempts) == (lease.epoch + 1, 1)


# -- fencing ------------------------------------------------------------------------------------


def test_writes_of_a_run_whose_lease_was_taken_over_are_refused(saver: SqliteSaver) -> None:
    old = saver.acquire_lease("t", "run-old", ttl=SHORT)
    config, checkpoint = put(saver, with_fence(thread("t"), old.epoch), {"n": 1})
    saver.put_writes(with_fence(config, old.epoch), [("n", 2)], "task")  # still holds it
    time.sleep(SHORT * 1.5)
    new = saver.acquire_lease("t", "run-new", ttl=60)
    assert (new.epoch, new.attempts) == (old.epoch + 1, 2)  # the old run died while running

    assert_refused_and_nothing_written(saver, with_fence(config, old.epoch), "took the thread")
    with pytest.raises(LeaseLostError):
        saver.renew_lease(old, ttl=60)
    saver.release_lease(old, "error", "late")  # a lost lease: does nothing
    info = saver.get_run("t")
    assert info is not None and (info.run_id, info.status, info.error) == (
        "run-new",
        "running",
        None,
    )

    # The new holder writes; so do writes that carry no fence at all (direct saver use).
    put(saver, with_fence(config, new.epoch), {"n": 3}, checkpoint)
    put(saver, config, {"n": 4}, checkpoint)
    saver.put_writes(config, [("n", 5)], "task-unfenced")
    assert count(saver, "checkpoints") == 3


def test_writes_after_delete_thread_are_refused(saver: SqliteSaver) -> None:
    lease = saver.acquire_lease("t", "run-1", ttl=60)
    config, _ = put(saver, with_fence(thread("t"), lease.epoch), {"n": 1})
    saver.delete_thread("t")
    info = saver.get_run("t")
    assert info is not None and info.status == "deleted" and info.expires_at is None
    stale = with_fence(config, lease.epoch)
    assert_refused_and_nothing_written(saver, stale, "deleted")
    assert count(saver, "checkpoints", "t") == 0

    # A new run takes the thread at once (the tombstone holds no lease) with a newer epoch,
    # and the deleted run's writes stay refused.
    again = saver.acquire_lease("t", "run-2", ttl=60)
    assert again.epoch == lease.epoch + 2 and again.attempts == 1
    assert_refused_and_nothing_written(saver, stale, "another run")
    put(saver, with_fence(thread("t"), again.epoch), {"n": 1})


def test_prune_delete_strategy_leaves_tombstones(saver: SqliteSaver) -> None:
    leases = [saver.acquire_lease(name, "run", ttl=60) for name in ("a", "b")]
    for name in ("a", "b", "c"):
        put(saver, thread(name), {"n": 1})
    saver.prune(["a", "b", "c"], strategy="delete")
    for name, lease in zip(("a", "b"), leases, strict=True):
        assert_refused_and_nothing_written(saver, with_fence(thread(name), lease.epoch), "deleted")
    rows = saver.conn.execute("SELECT thread_id, epoch, status FROM thread_runs").fetchall()
    assert sorted(rows) == [("a", 2, "deleted"), ("b", 2, "deleted"), ("c", 1, "deleted")]


def test_a_fence_on_a_thread_no_run_leased_is_refused(saver: SqliteSaver) -> None:
    saver.setup()
    assert_refused_and_nothing_written(saver, with_fence(thread("t"), 1), "no lease record")


def test_only_fenced_writes_read_the_run_registry(saver: SqliteSaver) -> None:
    """The fence check is one primary-key read inside the write's transaction (in a put, in
    the statement that also looks for the parent checkpoint); a write without a fence runs
    exactly the statements it ran before leases existed."""
    saver.setup()
    lease = saver.acquire_lease("t", "run", ttl=60)
    statements: list[str] = []
    saver.conn.set_trace_callback(statements.append)
    try:
        config, checkpoint = put(saver, thread("t"), {"n": 1})
        saver.put_writes(config, [("n", 2)], "task")
        unfenced = list(statements)
        statements.clear()
        fenced = with_fence(config, lease.epoch)
        put(saver, fenced, {"n": 3}, checkpoint)
        saver.put_writes(fenced, [("n", 4)], "task")
    finally:
        saver.conn.set_trace_callback(None)
    assert not [sql for sql in unfenced if "thread_runs" in sql]
    reads = [sql for sql in statements if "thread_runs" in sql]
    assert len(reads) == 2
    assert "EXISTS" in reads[0] and reads[1].startswith("SELECT epoch, status")
    assert [sql.split()[0] for sql in statements][:2] == ["BEGIN", "SELECT"]  # first in the tx
    put_statements = statements[: statements.index("COMMIT")]
    assert len([sql for sql in put_statements if sql.lstrip().startswith("SELECT")]) == 1
    plan = saver.conn.execute(f"EXPLAIN QUERY PLAN {_plans._SELECT_FENCE}", ("t",)).fetchall()
    assert "PRIMARY KEY" in str(plan) and "SCAN" not in str(plan)
    plan = saver.conn.execute(
        f"EXPLAIN QUERY PLAN {_plans._FENCE_AND_PARENT}", ("t", "", "c", "t")
    ).fetchall()
    tables = [step for *_, step in plan if "SCAN" in step and "CONSTANT" not in step]
    assert tables == ["SCAN (subquery-2)"], plan  # the one constant row; the rest are seeks


class Count(TypedDict):
    n: int


def one_node_graph(saver: SqliteSaver, **compile_options: Any) -> Any:
    builder = StateGraph(Count)
    builder.add_node("add", lambda state: {"n": state["n"] + 1})
    builder.add_edge(START, "add")
    builder.add_edge("add", END)
    return builder.compile(checkpointer=saver, **compile_options)


@pytest.mark.parametrize("durability", ["sync", "async", "exit"])
def test_a_runs_last_commit_lets_go_of_its_lease(tmp_path: Path, durability: str) -> None:
    """A run of one node commits three times with ``sync`` and ``async``: its lease, the
    input's checkpoint with START's step, and the node's step, which also lets go of the lease
    (``exit``: the lease, then the final checkpoint). A run that stops on a breakpoint lets go
    in its last commit too. Not when a retention policy must run under the lease first."""
    folded = {"sync": 3, "async": 3, "exit": 2}[durability]
    cases: list[tuple[dict[str, Any], dict[str, Any], int, str, int]] = [
        ({}, {}, folded, "done", 2),
        ({}, {"interrupt_after": ["add"]}, folded, "interrupted", 2),
        ({}, {"interrupt_before": ["add"]}, folded - 1 if folded > 2 else 2, "interrupted", 1),
        ({"retention": Retention(keep_last=10)}, {}, folded + 2, "done", 2),  # prune, release
    ]
    for number, (options, compile_options, commits, status, n) in enumerate(cases):
        path = tmp_path / f"run{number}.sqlite"
        with SqliteSaver.from_conn_string(path, **options) as saver:
            saver.setup()
            graph = one_node_graph(saver, **compile_options)
            statements: list[str] = []
            saver.conn.set_trace_callback(statements.append)
            try:
                result = graph.invoke({"n": 1}, thread("t"), durability=durability)
            finally:
                saver.conn.set_trace_callback(None)
            assert result == {"n": n}
            assert statements.count("BEGIN IMMEDIATE") == commits, options or compile_options
            run = saver.get_run("t")
            assert run is not None and (run.status, run.expires_at) == (status, None)
            assert graph.get_state(thread("t")).values == {"n": n}
            assert saver.acquire_lease("t", "next", ttl=30).epoch == run.epoch + 1


def test_update_state_lets_go_of_its_lease_in_its_save(tmp_path: Path) -> None:
    """``update_state`` commits twice: its lease, then its checkpoint, which also lets go of
    the lease with the status the thread had. A status with an error text (which the save
    cannot carry) is let go of on its own, the text kept."""
    with SqliteSaver.from_conn_string(tmp_path / "update.sqlite") as saver:
        saver.setup()
        graph = one_node_graph(saver, interrupt_after=["add"])
        graph.invoke({"n": 1}, thread("paused"))
        failed = saver.acquire_lease("failed", "run", ttl=30)
        saver.release_lease(failed, "error", "boom")
        for thread_id, commits, kept in (
            ("paused", 2, ("interrupted", None)),
            ("failed", 3, ("error", "boom")),
        ):
            statements: list[str] = []
            saver.conn.set_trace_callback(statements.append)
            try:
                graph.update_state(thread(thread_id), {"n": 7}, as_node="add")
            finally:
                saver.conn.set_trace_callback(None)
            assert statements.count("BEGIN IMMEDIATE") == commits, thread_id
            run = saver.get_run(thread_id)
            assert run is not None and (run.status, run.error, run.expires_at) == (*kept, None)
            assert graph.get_state(thread(thread_id)).values == {"n": 7}


def test_a_release_that_fails_after_the_save_does_not_fail_the_update(tmp_path: Path) -> None:
    """Where the last save and the release are two calls (a subclass intercepting
    ``release_lease``), a release that fails after the save leaves the save done: the call
    returns, and the lease runs out as an unreleased one does."""

    class Flaky(SqliteSaver):
        failures = 0

        def release_lease(self, lease: Any, status: Any, error: Any = None) -> None:
            if Flaky.failures:
                Flaky.failures -= 1
                raise sqlite3.OperationalError("database is locked")
            super().release_lease(lease, status, error)

    with Flaky.from_conn_string(tmp_path / "flaky.sqlite") as saver:
        saver.setup()
        graph = one_node_graph(saver, interrupt_after=["add"])
        graph.invoke({"n": 1}, thread("t"))
        Flaky.failures = 1
        graph.update_state(thread("t"), {"n": 7}, as_node="add")
        assert Flaky.failures == 0  # the release failed
        assert graph.get_state(thread("t")).values == {"n": 7}
        run = saver.get_run("t")
        assert run is not None and run.status == "running" and run.expires_at is not None


def test_a_subclass_that_intercepts_a_save_still_sees_every_one(tmp_path: Path) -> None:
    """A subclass overriding ``put_step`` or ``get_tuple`` (to log them, say) sees the run's
    first read and last step too: the calls that fold them into one transaction make them
    one after the other instead."""
    calls: list[str] = []

    class Logging(SqliteSaver):
        def get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
            calls.append("get_tuple")
            return super().get_tuple(config)

        def put_step(self, *args: Any, **kwargs: Any) -> RunnableConfig:
            calls.append("put_step")
            return super().put_step(*args, **kwargs)

    class Ends(SqliteSaver):
        def release_lease(self, lease: Lease, status: RunStatus, error: str | None = None) -> None:
            calls.append(f"release_lease {status}")
            super().release_lease(lease, status, error)

    class AsyncLogging(SqliteSaver):  # used by ainvoke: the async twins are what it calls
        async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
            calls.append("aget_tuple")
            return await super().aget_tuple(config)

        async def aput_step(self, *args: Any, **kwargs: Any) -> RunnableConfig:
            calls.append("aput_step")
            return await super().aput_step(*args, **kwargs)

    # The read; the input's checkpoint (put calls put_step), START's step, the node's.
    expected = {
        Logging: ["get_tuple", "put_step", "put_step", "put_step"],
        Ends: ["release_lease done"],
        AsyncLogging: ["aget_tuple", "aput_step", "aput_step"],  # aput does not call aput_step
    }
    for cls, seen in expected.items():
        calls.clear()
        with cls.from_conn_string(tmp_path / f"{cls.__name__}.sqlite") as saver:
            graph = one_node_graph(saver)
            if cls is AsyncLogging:
                assert asyncio.run(graph.ainvoke({"n": 1}, thread("t"))) == {"n": 2}
            else:
                assert graph.invoke({"n": 1}, thread("t")) == {"n": 2}
            assert calls == seen, cls.__name__
            run = saver.get_run("t")
            assert run is not None and (run.status, run.expires_at) == ("done", None)


class FailingReads:
    """A saver's plans whose next ``get_tuple`` fails after its first statement."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.failure: BaseException | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def get_tuple(self, serde: Any, config: RunnableConfig, heads: Any = None) -> Job[Any, Any]:
        job = self.inner.get_tuple(serde, config, heads)
        failure, self.failure = self.failure, None
        if failure is None:
            return job

        def plan() -> Iterator[Statement]:
            yield Statement("SELECT 1")
            raise failure

        return Job(plan, job.scope)


@pytest.mark.parametrize(
    ("failure", "status"),
    [
        (sqlite3.OperationalError("disk I/O error (simulated)"), "error"),
        (CorruptCheckpointError("a value row is gone (simulated)"), "error"),
        (KeyboardInterrupt(), "cancelled"),
    ],
    ids=["transient", "corrupt", "ctrl-c"],
)
def test_a_run_whose_start_read_fails_lets_go_of_the_thread(
    saver: SqliteSaver, failure: BaseException, status: str
) -> None:
    """The lease and the read are one call: when the read fails, the thread is let go, as the
    run's failure says (not left to run out and be taken for a run that died), and taken once
    only (a read's SerializationError is not the input's, which a run may drop)."""
    plans = FailingReads(saver.plans)
    saver.plans = plans  # type: ignore[assignment]
    graph = one_node_graph(saver)
    graph.invoke({"n": 1}, thread("t"))
    epoch = saver.get_run("t").epoch  # type: ignore[union-attr]
    plans.failure = failure
    with pytest.raises(type(failure)):
        graph.invoke({"n": 5}, thread("t"))
    run = saver.get_run("t")
    assert run is not None and (run.status, run.expires_at, run.epoch) == (status, None, epoch + 1)
    assert saver.list_incomplete() == []
    assert graph.invoke({"n": 5}, thread("t")) == {"n": 6}


def test_update_state_whose_read_fails_keeps_the_run_record(saver: SqliteSaver) -> None:
    """``update_state`` leaves the record as it found it, even when its read fails."""
    plans = FailingReads(saver.plans)
    saver.plans = plans  # type: ignore[assignment]
    graph = one_node_graph(saver, interrupt_before=["add"])
    graph.invoke({"n": 1}, thread("t"))
    plans.failure = sqlite3.OperationalError("disk I/O error (simulated)")
    with pytest.raises(sqlite3.OperationalError):
        graph.update_state(thread("t"), {"n": 5})
    run = saver.get_run("t")
    assert run is not None and (run.status, run.error) == ("interrupted", None)


@pytest.mark.parametrize("durability", ["sync", "async"])
def test_a_step_whose_next_plan_fails_is_saved(saver: SqliteSaver, durability: str) -> None:
    """Knowing whether a step is the run's last plans the next step before the step's save:
    a plan that raises (a ``Send`` to no node) must not cost the step its save."""
    ran: list[int] = []

    def send_nowhere(state: Count) -> Command[Any]:
        ran.append(state["n"])
        return Command(update={"n": state["n"] + 1}, goto=Send("nowhere", {"n": 0}))

    builder = StateGraph(Count)
    builder.add_node("a", send_nowhere)
    builder.add_edge(START, "a")
    graph = builder.compile(checkpointer=saver)
    for graph_input in ({"n": 1}, None):
        with pytest.raises(InvalidUpdateError, match="nowhere"):
            graph.invoke(graph_input, thread("t"), durability=durability)
    steps = [found.metadata["step"] for found in saver.list(thread("t"))]
    assert (steps, ran) == ([1, 0, -1], [1])
    assert saver.get_run("t").status == "error"  # type: ignore[union-attr]


def test_refused_write_inside_the_callers_transaction_undoes_only_itself(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "db.sqlite")  # default isolation: the caller's BEGINs
    try:
        saver = SqliteSaver(conn)
        lease = saver.acquire_lease("t", "run", ttl=60)
        saver.delete_thread("t")
        conn.execute("CREATE TABLE mine (x)")
        conn.execute("INSERT INTO mine VALUES (1)")
        assert conn.in_transaction
        with pytest.raises(LeaseLostError):
            put(saver, with_fence(thread("t"), lease.epoch), {"n": 1})
        with pytest.raises(ThreadBusyError):
            saver.acquire_lease("u", "run-a", ttl=60)
            saver.acquire_lease("u", "run-b", ttl=60)
        assert conn.in_transaction
        conn.commit()
        assert conn.execute("SELECT x FROM mine").fetchall() == [(1,)]
        assert count(saver, "checkpoints") == 0
        info = saver.get_run("u")  # the caller's transaction committed run-a's lease
        assert info is not None and info.run_id == "run-a"
    finally:
        conn.close()


# -- the run registry ---------------------------------------------------------------------------


def test_list_incomplete_finds_runs_that_died(saver: SqliteSaver) -> None:
    crashed_first = saver.acquire_lease("crashed-1", "run-1", ttl=SHORT, input={"q": 1})
    time.sleep(0.01)
    saver.acquire_lease("crashed-2", "run-2", ttl=SHORT, input=[2])
    saver.acquire_lease("live", "run-3", ttl=60)
    for name, status in (("done", "done"), ("paused", "interrupted"), ("failed", "error")):
        saver.release_lease(saver.acquire_lease(name, f"run-{name}", ttl=SHORT), status)  # type: ignore[arg-type]
    assert saver.list_incomplete() == []
    time.sleep(SHORT * 1.5)

    found = saver.list_incomplete()
    assert [info.thread_id for info in found] == ["crashed-1", "crashed-2"]  # oldest first
    first = found[0]
    assert (first.run_id, first.status, first.attempts, first.input) == (
        "run-1",
        "running",
        1,
        {"q": 1},
    )
    assert first.expires_at == pytest.approx(crashed_first.expires_at)
    assert [info.thread_id for info in saver.list_incomplete(limit=1)] == ["crashed-1"]

    # Recovery takes the thread over: one more attempt, and it is no longer incomplete.
    retry = saver.acquire_lease("crashed-1", "run-1b", ttl=60, input={"q": 1})
    assert retry.attempts == 2
    assert [info.thread_id for info in saver.list_incomplete()] == ["crashed-2"]
    plan = saver.conn.execute(
        f"EXPLAIN QUERY PLAN {_plans._SELECT_INCOMPLETE}", (time.time(), -1)
    ).fetchall()
    assert "thread_runs_by_status" in str(plan)


def test_release_records_how_the_run_ended(saver: SqliteSaver) -> None:
    assert saver.get_run("t") is None
    lease = saver.acquire_lease("t", "run", ttl=60, input={"big": "x" * 10_000})
    renewed = saver.renew_lease(lease, ttl=120)
    assert renewed.epoch == lease.epoch and renewed.expires_at > lease.expires_at
    saver.release_lease(renewed, "error", "boom")
    info = saver.get_run("t")
    assert info is not None
    assert (info.status, info.error, info.expires_at, info.input) == ("error", "boom", None, None)
    row = saver.conn.execute("SELECT input_type, input_blob FROM thread_runs").fetchone()
    assert row == (None, None)  # the input is dropped once the run ended
    with pytest.raises(LeaseLostError):
        saver.renew_lease(renewed, ttl=60)
    with pytest.raises(ValueError):
        saver.release_lease(renewed, "started")
    assert not saver.conn.in_transaction


def test_copy_thread_does_not_copy_the_run(saver: SqliteSaver) -> None:
    saver.acquire_lease("source", "run", ttl=60)
    put(saver, thread("source"), {"n": 1})
    saver.copy_thread("source", "target")
    assert saver.get_run("target") is None
    assert saver.acquire_lease("target", "other", ttl=60).epoch == 1


async def test_async_saver_leases_and_fences(tmp_path: Path) -> None:
    path = tmp_path / "async.sqlite"
    async with (
        AsyncSqliteSaver.from_conn_string(path) as first,
        AsyncSqliteSaver.from_conn_string(path) as second,
    ):
        old = await first.aacquire_lease("t", "run-1", ttl=SHORT, input="go")
        with pytest.raises(ThreadBusyError):
            await second.aacquire_lease("t", "run-2", ttl=60)
        checkpoint, versions = checkpoint_after(first, None, {"n": 1})
        config = await first.aput(with_fence(thread("t"), old.epoch), checkpoint, {}, versions)
        time.sleep(SHORT * 1.5)
        assert [info.thread_id for info in await second.alist_incomplete()] == ["t"]
        new = await second.aacquire_lease("t", "run-2", ttl=60)
        assert (new.epoch, new.attempts) == (2, 2)

        stale = with_fence(config, old.epoch)
        following, versions = checkpoint_after(first, checkpoint, {"n": 2})
        with pytest.raises(LeaseLostError):
            await first.aput(stale, following, {}, versions)
        with pytest.raises(LeaseLostError):
            await first.aput_step(stale, [TaskWrites("a", [("n", 1)])], following, {}, versions)
        with pytest.raises(LeaseLostError):
            await first.aput_writes(stale, [("n", 1)], "a")
        with pytest.raises(LeaseLostError):
            await first.arenew_lease(old, ttl=60)
        await first.arelease_lease(old, "done")  # lost: does nothing
        assert [found.config async for found in second.alist(thread("t"))] == [config]
        report = await second.astorage_report("t")
        assert (report.checkpoints, report.writes) == (1, 0)

        await second.aput_writes(with_fence(config, new.epoch), [("n", 3)], "b")
        await second.adelete_thread("t")
        with pytest.raises(LeaseLostError, match="deleted"):
            await second.aput_writes(with_fence(config, new.epoch), [("n", 3)], "b")
        info = await first.aget_run("t")
        assert info is not None and info.status == "deleted"


# -- retention ----------------------------------------------------------------------------------


def test_storage_report_adds_up_the_rows(saver: SqliteSaver) -> None:
    config, checkpoint = put(saver, thread("t"), {"text": "x" * 1000, "n": 1})
    checkpoint_2, versions = checkpoint_after(saver, checkpoint, {"text": "y" * 2000})
    writes = [TaskWrites("a", [("text", "z" * 300), ("n", 2)]), TaskWrites("b", [("n", 3)])]
    saver.put_step(config, writes, checkpoint_2, {"source": "loop", "step": 1}, versions)
    put(saver, thread("other"), {"text": "w" * 5000})

    report = saver.storage_report("t")
    # Rows of writes: task a's two writes share one.
    assert (report.thread_id, report.checkpoints, report.writes) == ("t", 2, 2)
    assert report.values == count(saver, "checkpoint_values", "t") == 2  # "n" travels inline
    blobs = saver.conn.execute(
        # Metadata that JSON holds exactly is stored once, as its JSON copy.
        "SELECT checkpoint, iif(metadata_type = '', metadata_json, metadata) FROM checkpoints"
        " WHERE thread_id = 't'"
        " UNION ALL SELECT value, NULL FROM checkpoint_values WHERE thread_id = 't'"
        " UNION ALL SELECT value, NULL FROM checkpoint_writes WHERE thread_id = 't'"
    ).fetchall()
    assert report.bytes == sum(len(part or b"") for row in blobs for part in row)
    assert 3300 < report.bytes < 3300 + 2000  # the strings, plus modest framing

    empty = saver.storage_report("nothing")
    assert (empty.checkpoints, empty.writes, empty.values, empty.bytes) == (0, 0, 0, 0)


def test_sweep_deletes_idle_threads_only(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    with SqliteSaver.from_conn_string(
        tmp_path / "sweep.sqlite", retention=Retention(ttl=timedelta(days=5))
    ) as saver:
        assert saver.retention == Retention(ttl=timedelta(days=5))

        def history(name: str, *ages: timedelta, ts: str | None = None) -> None:
            config, checkpoint = thread(name), None
            for age in ages:
                config, checkpoint = put(saver, config, {"n": str(age)}, checkpoint, now - age)
            if ts is not None:  # a checkpoint whose ts is written by hand
                assert checkpoint is not None
                following, versions = checkpoint_after(saver, checkpoint, {"n": 0})
                following["ts"] = ts
                saver.put(config, following, {}, versions)

        days = timedelta(days=1)
        history("idle", 20 * days, 10 * days)
        history("recent", 20 * days, 1 * days)  # only its newest checkpoint counts
        history("held", 20 * days, 10 * days)
        history("crashed", 20 * days, 10 * days)
        history("finished", 20 * days, 10 * days)
        # Compared as times, not text: 6 days ago in UTC+14 reads later as text than 4 days ago
        # in UTC-12, but is earlier.
        history("offset-old", 20 * days, ts=(now - 6 * days).astimezone(_tz(14)).isoformat())
        history("offset-new", 20 * days, ts=(now - 4 * days).astimezone(_tz(-12)).isoformat())
        history("unreadable-ts", 20 * days, ts="yesterday, roughly")
        held = saver.acquire_lease("held", "live-run", ttl=60)
        crashed = saver.acquire_lease("crashed", "dead-run", ttl=SHORT)
        saver.release_lease(saver.acquire_lease("finished", "run", ttl=60), "done")
        saver.acquire_lease("no-checkpoints", "run", ttl=SHORT)
        time.sleep(SHORT * 1.5)

        swept = saver.sweep()
        assert swept == ["crashed", "finished", "idle", "offset-old"]
        assert {row[0] for row in saver.conn.execute("SELECT thread_id FROM checkpoints")} == {
            "recent",
            "held",
            "offset-new",
            "unreadable-ts",
        }
        for name in swept:
            info = saver.get_run(name)
            assert info is not None and info.status == "deleted"
        assert_refused_and_nothing_written(
            saver, with_fence(thread("crashed"), crashed.epoch), "deleted"
        )
        put(saver, with_fence(thread("held"), held.epoch), {"n": "still mine"})
        assert saver.sweep(timedelta(days=30)) == []
        assert saver.sweep(timedelta(seconds=1)) == ["offset-new", "recent"]
        assert not saver.conn.in_transaction


def _tz(hours: int) -> timezone:
    return timezone(timedelta(hours=hours))


# -- migrations ---------------------------------------------------------------------------------


def _load(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, FIXTURES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _everything(saver: SqliteSaver) -> list[CheckpointTuple]:
    return sorted(saver.list(None), key=lambda found: tuple(found.config["configurable"].values()))


@pytest.mark.parametrize("version", [1, 2, 3])
def test_fixture_databases_migrate_to_the_run_registry(tmp_path: Path, version: int) -> None:
    fixture = _load(f"make_schema_v{version}")
    copy = tmp_path / f"schema_v{version}.sqlite"
    shutil.copyfile(FIXTURES / f"schema_v{version}.sqlite", copy)
    raw = sqlite3.connect(copy)
    stored = raw.execute("SELECT max(version) FROM checkpoint_migrations").fetchone()[0]
    has_runs = raw.execute("SELECT 1 FROM sqlite_master WHERE name = 'thread_runs'").fetchall()
    raw.close()
    assert (stored, bool(has_runs)) == (version, version >= 3)  # the fixture is what it says

    with (
        SqliteSaver.from_conn_string(copy) as old,
        SqliteSaver.from_conn_string(tmp_path / "fresh.sqlite") as fresh,
    ):
        fixture.write_history(fresh)
        assert _everything(old) == _everything(fresh)
        versions = old.conn.execute("SELECT version FROM checkpoint_migrations").fetchall()
        assert versions == [(number,) for number in range(1, SCHEMA_VERSION + 1)]
        if version >= 2:
            latest = old.get_tuple(thread(_load("make_schema_v2").APPENDS_THREAD))
            assert latest is not None
            assert latest.checkpoint["channel_values"]["items"] == list(range(19))

        # The old threads take part in leases, fencing, reports and sweeps.
        thread_id = _load("make_schema_v1").THREAD
        lease = old.acquire_lease(thread_id, "run", ttl=60)
        latest = old.get_tuple(thread(thread_id))
        assert latest is not None
        following, new_versions = checkpoint_after(old, latest.checkpoint, {"messages": ["new"]})
        saved = old.put(with_fence(latest.config, lease.epoch), following, {}, new_versions)
        assert old.storage_report(thread_id).checkpoints == 5
        old.release_lease(lease, "done")
        old.delete_thread(thread_id)
        assert_refused_and_nothing_written(old, with_fence(saved, lease.epoch), "deleted")
        assert len(old.sweep(timedelta(days=1))) >= 1  # the fixtures' checkpoints are from 2026-01
