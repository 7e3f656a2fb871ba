"""Thread ownership, fencing, the run registry and retention, against a real server: what the
backend-neutral contract cannot see (processes racing, row locks, round trips, the SQL's clock).
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypedDict, TypeVar

import psycopg
import pytest
from pg_test_helpers import (
    PrivateServer,
    RestartingProxy,
    next_checkpoint,
    protocol_messages,
    run_steps,
    thread,
)

from stepgraph.checkpoint.base import BaseCheckpointSaver, Retention, Step, TaskWrites
from stepgraph.checkpoint.base.runs import with_fence
from stepgraph.checkpoint.postgres import PostgresSaver, _plans
from stepgraph.checkpoint.postgres.aio import AsyncPostgresSaver
from stepgraph.config import RunnableConfig
from stepgraph.errors import LeaseLostError, ThreadBusyError
from stepgraph.graph import END, START, StateGraph

WORKER = Path(__file__).with_name("pg_worker.py")
T = TypeVar("T")


@pytest.fixture
def saver(postgres_uri: str) -> Iterator[PostgresSaver]:
    with PostgresSaver.from_conn_string(postgres_uri) as saver:
        saver.setup()
        yield saver


def put_one(saver: BaseCheckpointSaver, config: RunnableConfig, value: Any) -> RunnableConfig:
    checkpoint, versions = next_checkpoint(saver, None, {"x": value})
    return saver.put(config, checkpoint, {"source": "loop"}, versions)


def contents(saver: BaseCheckpointSaver, thread_id: str) -> tuple[list[str], list[Any]]:
    """The thread's checkpoint ids, and every pending write of every checkpoint."""
    found = list(saver.list(thread(thread_id)))
    ids = sorted(str(one.config["configurable"]["checkpoint_id"]) for one in found)
    writes = sorted(write for one in found for write in (one.pending_writes or []))
    return ids, writes


def expire(uri: str, thread_id: str) -> None:
    """Run the thread's lease out now (as if its ttl had passed)."""
    with psycopg.connect(uri, autocommit=True) as conn:
        conn.execute(
            "UPDATE stepgraph_thread_runs SET expires_at = 0 WHERE thread_id = %s",
            (thread_id.encode(),),
        )


def wait_for_lock_wait(uri: str, timeout: float = 10.0) -> None:
    """Wait until some session of this database waits for a lock."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(uri, autocommit=True) as conn:
        while time.monotonic() < deadline:
            waiting = conn.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            ).fetchone()
            if waiting and waiting[0]:
                return
            time.sleep(0.01)
    raise AssertionError("no session waited for a lock")


class Background(threading.Thread):
    """``action`` in a thread; ``result()`` returns its value or raises its exception."""

    def __init__(self, action: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.action = action
        self.value: Any = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.value = self.action()
        except BaseException as error:
            self.error = error

    def result(self, timeout: float = 10.0) -> Any:
        self.join(timeout)
        assert not self.is_alive(), "still running"
        if self.error is not None:
            raise self.error
        return self.value


# -- taking the lease -------------------------------------------------------------------------


def test_processes_racing_for_a_lease_one_wins(postgres_uri: str, saver: PostgresSaver) -> None:
    def race(thread_id: str) -> list[str]:
        start = time.time() + 2.0  # every worker acquires at the same moment
        command = [sys.executable, str(WORKER), "acquire", postgres_uri, thread_id]
        workers = [
            subprocess.Popen(
                [*command, f"run-{i}", str(start)],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            for i in range(8)
        ]
        outputs = [worker.communicate(timeout=120)[0].decode().strip() for worker in workers]
        assert [worker.returncode for worker in workers] == [0] * 8, outputs
        return outputs

    # A thread no run took yet (the primary key decides), then a take-over of an expired
    # lease (the row lock decides).
    for round_, expected_epoch in ((1, 1), (2, 2)):
        outputs = race("contested")
        won = [output for output in outputs if output.startswith("won")]
        assert won == [f"won {expected_epoch}"], outputs
        winner = f"run-{outputs.index(won[0])}"
        assert sorted(outputs) == sorted([won[0]] + [f"busy {winner}"] * 7), outputs
        run = saver.get_run("contested")
        assert run is not None and run.run_id == winner
        assert run.attempts == round_  # the first winner never finished: the second retries
        expire(postgres_uri, "contested")


def test_acquire_again_by_the_holder_extends_without_a_new_epoch(saver: PostgresSaver) -> None:
    # What a retry after a dropped connection does: the lease was taken, the answer was lost.
    first = saver.acquire_lease("t", "run-a", ttl=30, input={"q": 1})
    again = saver.acquire_lease("t", "run-a", ttl=60, input={"q": 2})
    assert (again.epoch, again.attempts) == (first.epoch, first.attempts)
    assert again.expires_at > first.expires_at
    run = saver.get_run("t")
    assert run is not None and run.input == {"q": 1}  # the run that started keeps its input


def test_busy_error_says_who_holds_the_thread_and_for_how_long(saver: PostgresSaver) -> None:
    saver.acquire_lease("t", "run-a", ttl=30)
    with pytest.raises(ThreadBusyError) as busy:
        saver.acquire_lease("t", "run-b", ttl=30)
    assert busy.value.holder == "run-a"
    assert busy.value.expires_in is not None and 28 < busy.value.expires_in <= 30


def test_lease_times_are_the_databases_clock(postgres_uri: str, saver: PostgresSaver) -> None:
    lease = saver.acquire_lease("t", "run-a", ttl=30)
    with psycopg.connect(postgres_uri) as conn:
        row = conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8").fetchone()
    assert row is not None
    assert 0 < lease.expires_at - row[0] <= 30


def test_identifiers_of_the_registry_round_trip_exactly(saver: PostgresSaver) -> None:
    thread_id, owner = "t\x00\udc80é", "run\x00\ud800"
    lease = saver.acquire_lease(thread_id, owner, ttl=30)
    assert (lease.thread_id, lease.owner) == (thread_id, owner)
    saver.renew_lease(lease, ttl=30)
    saver.release_lease(lease, "error", "boom\x00\udc80")
    run = saver.get_run(thread_id)
    assert run is not None and (run.thread_id, run.run_id, run.status) == (
        thread_id,
        owner,
        "error",
    )
    assert run.error is not None and run.error.startswith("boom")


# -- fencing ----------------------------------------------------------------------------------


def test_stale_writes_are_refused_after_a_takeover_and_a_delete(
    postgres_uri: str, saver: PostgresSaver
) -> None:
    old = saver.acquire_lease("t", "run-old", ttl=30)
    saved = put_one(saver, with_fence(thread("t"), old.epoch), 1)
    saver.put_writes(with_fence(saved, old.epoch), [("x", 2)], "task")
    before = contents(saver, "t"), saver.storage_report("t")
    expire(postgres_uri, "t")
    new = saver.acquire_lease("t", "run-new", ttl=30)
    stale = with_fence(saved, old.epoch)

    checkpoint, versions = next_checkpoint(saver, None, {"x": 3})
    attempts: list[Callable[[], Any]] = [
        lambda: saver.put(stale, checkpoint, {}, versions),
        lambda: saver.put_step(stale, [TaskWrites("t2", [("x", 4)])], checkpoint, {}, versions),
        lambda: saver.put_writes(stale, [("x", 5)], "task-2"),
        lambda: saver.put_writes_batch(stale, [TaskWrites("t3", [("x", 6)])]),
    ]
    for attempt in attempts:
        with pytest.raises(LeaseLostError, match=r"epoch 1\) expired .* \(epoch 2\)"):
            attempt()
    assert (contents(saver, "t"), saver.storage_report("t")) == before

    saver.delete_thread("t")
    run = saver.get_run("t")
    assert run is not None and (run.status, run.attempts) == ("deleted", 0)
    for config in (stale, with_fence(saved, new.epoch)):
        with pytest.raises(LeaseLostError, match="deleted"):
            saver.put(config, checkpoint, {}, versions)
        with pytest.raises(LeaseLostError, match="deleted"):
            saver.put_writes(config, [("x", 5)], "task-2")
    assert contents(saver, "t") == ([], [])


def test_a_fenced_write_to_a_thread_never_leased_is_refused(saver: PostgresSaver) -> None:
    with pytest.raises(LeaseLostError, match="no lease record"):
        put_one(saver, with_fence(thread("t"), 1), 1)
    assert contents(saver, "t") == ([], [])


async def test_async_stale_writes_are_refused(postgres_uri: str) -> None:
    async with AsyncPostgresSaver.from_conn_string(postgres_uri) as saver:
        old = await saver.aacquire_lease("t", "run-old", ttl=0.1)
        checkpoint, versions = next_checkpoint(saver, None, {"x": 1})
        saved = await saver.aput(with_fence(thread("t"), old.epoch), checkpoint, {}, versions)
        await asyncio.sleep(0.2)
        await saver.aacquire_lease("t", "run-new", ttl=30)
        stale = with_fence(saved, old.epoch)
        with pytest.raises(LeaseLostError, match="took the thread over"):
            await saver.aput_writes(stale, [("x", 2)], "task")
        with pytest.raises(LeaseLostError, match="took the thread over"):
            await saver.aput(stale, *next_checkpoint(saver, checkpoint, {"x": 3})[:1], {}, {})
        await saver.adelete_thread("t")
        with pytest.raises(LeaseLostError, match="deleted"):
            await saver.aput_writes(stale, [("x", 2)], "task")
        assert [one async for one in saver.alist(thread("t"))] == []
        report = await saver.astorage_report("t")
        assert (report.checkpoints, report.writes, report.values, report.bytes) == (0, 0, 0, 0)


@pytest.mark.parametrize("autocommit", [True, False], ids=["autocommit", "no-autocommit"])
def test_a_fenced_write_is_one_statement_and_one_round_trip(
    postgres_uri: str, autocommit: bool
) -> None:
    with psycopg.connect(postgres_uri, autocommit=autocommit) as conn:
        saver = PostgresSaver(conn)
        lease = saver.acquire_lease("t", "run", ttl=30)
        config = run_steps(saver, with_fence(thread("t"), lease.epoch), 1)
        previous = saver.get_tuple(config)
        assert previous is not None
        checkpoint, versions = next_checkpoint(saver, previous.checkpoint, {"count": 9})
        writes = [TaskWrites("task", [("count", 9)])]

        def step() -> None:
            saver.put_step(config, writes, checkpoint, {"step": 9}, versions)

        def write() -> None:
            saver.put_writes(config, [("count", 10)], "task-2")

        def refused() -> None:
            with pytest.raises(LeaseLostError):
                saver.put_writes(with_fence(config, lease.epoch - 1), [("count", 1)], "task-3")

        for action in (step, write, refused):
            messages = protocol_messages(conn, action)
            assert messages.count("F:Execute") == 1, action  # refused: not run again either
            assert messages.count("F:Sync") == 1, action
            assert messages[-1] == "B:ReadyForQuery"


@pytest.mark.parametrize("autocommit", [True, False], ids=["autocommit", "no-autocommit"])
def test_a_run_starts_with_one_round_trip(postgres_uri: str, autocommit: bool) -> None:
    """Taking the thread and reading it: one round trip for a new thread and for one the saver
    knows (the checkpoint row, its value rows and writes are sent ahead of the lease's
    statement); on a busy thread the rows read ahead are dropped and nothing is taken."""
    with psycopg.connect(postgres_uri, autocommit=autocommit) as conn:
        saver = PostgresSaver(conn)
        saver.setup()
        config = run_steps(saver, thread("t"), 3)  # "log" is a list: value rows to fetch
        saver.put_writes(config, [("count", 7)], "pending")
        for number in range(6):  # psycopg prepares a statement at its fifth use: one more Sync
            for thread_id in ("t", f"new-{number}"):
                warm, _ = saver.acquire_lease_and_get_tuple(thread(thread_id), "warm", ttl=30)
                saver.release_lease(warm, "done")

        for thread_id in ("t", "new"):
            started: list[Any] = []

            def start(thread_id: str = thread_id, started: list[Any] = started) -> None:
                started.append(saver.acquire_lease_and_get_tuple(thread(thread_id), "run", ttl=30))

            messages = protocol_messages(conn, start)
            assert messages.count("F:Sync") == 1, thread_id
            lease, found = started[0]
            assert (lease.thread_id, lease.owner) == (thread_id, "run")
            assert found == saver.get_tuple(thread(thread_id))
        assert found is None
        assert started and lease.attempts == 1
        known = saver.get_tuple(thread("t"))
        assert known is not None and known.pending_writes == [("pending", "count", 7)]

        with pytest.raises(ThreadBusyError):
            saver.acquire_lease_and_get_tuple(thread("t"), "another", ttl=30)
        run = saver.get_run("t")
        assert run is not None and (run.run_id, run.status) == ("run", "running")


def test_a_refused_start_locks_nothing(postgres_uri: str) -> None:
    """The lease statement of a start refused because another run holds the thread proposes
    no row, so no conflict locks the holder's row: a start reads the thread in the same
    transaction, and the holder's renewals and saves must not wait for that read. (Here the
    refused statement's transaction is left open.)"""
    with psycopg.connect(postgres_uri, autocommit=True) as conn:
        saver = PostgresSaver(conn)
        saver.setup()
        holder = saver.acquire_lease("t", "holder", ttl=30)
        take = _plans.acquire_lease(saver.serde, "t", "other", 30, None, None)()
        statement = next(take)
        with psycopg.connect(postgres_uri) as refused:  # its locks last until the rollback
            cursor = _plans.cursor_of(refused)
            assert cursor.execute(statement.sql, statement.params).fetchall() == []
            conn.execute(
                "SELECT 1 FROM stepgraph_thread_runs WHERE thread_id = %b FOR UPDATE NOWAIT",
                [b"t"],
            )
            refused.rollback()
        assert saver.renew_lease(holder, ttl=30).epoch == holder.epoch
        with pytest.raises(ThreadBusyError):
            saver.acquire_lease_and_get_tuple(thread("t"), "other", ttl=30)


class Count(TypedDict):
    n: int


def test_a_one_node_run_is_three_round_trips(postgres_uri: str) -> None:
    """Take the thread and read it; the input's checkpoint and START's step (two statements in
    one pipeline); the node's step, whose statement also lets go of the lease."""
    builder = StateGraph(Count)
    builder.add_node("add", lambda state: {"n": state["n"] + 1})
    builder.add_edge(START, "add")
    builder.add_edge("add", END)
    with psycopg.connect(postgres_uri, autocommit=True) as conn:
        saver = PostgresSaver(conn)
        saver.setup()
        graph = builder.compile(checkpointer=saver)
        for number in range(6):  # psycopg prepares a statement at its fifth use: one more Sync
            graph.invoke({"n": 1}, thread(f"warm-{number}"), durability="sync")
        messages = protocol_messages(
            conn, lambda: graph.invoke({"n": 1}, thread("t"), durability="sync")
        )
        assert messages.count("F:Sync") == 3
        run = saver.get_run("t")
        assert run is not None and (run.status, run.expires_at) == ("done", None)
        assert graph.get_state(thread("t")).values == {"n": 2}


def test_a_retried_step_whose_first_attempt_landed_is_saved(postgres_uri: str) -> None:
    """The pool runs a step's statement again when its connection broke, also after the
    first attempt committed (the reply was lost). If that attempt let go of the lease and
    another run took the thread meanwhile, the retry's fence refuses it, but the step is
    saved: the call returns as saved, not with ``LeaseLostError`` (a chain of steps too). A
    step that never landed is still refused."""
    with PostgresSaver.from_conn_string(postgres_uri) as saver:
        saver.setup()
        for thread_id, chained in (("one", False), ("chain", True)):
            lease = saver.acquire_lease(thread_id, "run-a", ttl=30)
            config = with_fence(thread(thread_id), lease.epoch)
            first, versions = next_checkpoint(saver, None, {"x": 1})
            steps = [Step([], first, {}, versions)]
            if chained:
                second, more = next_checkpoint(saver, first, {"x": 2})
                steps.append(Step([TaskWrites("task", [("x", 2)])], second, {}, more))
            release = (lease, "done")
            job = (
                _plans.PLANS.put_steps(saver.serde, config, steps, saver.heads, release)
                if chained
                else _plans.PLANS.put_step(saver.serde, config, *steps[0], saver.heads, release)
            )
            saved = saver._run(job)
            assert saver.get_run(thread_id).status == "done"  # type: ignore[union-attr]
            taken = saver.acquire_lease(thread_id, "run-b", ttl=30)
            assert saver._run(job) == saved  # the pool's retry of the same statements
            run = saver.get_run(thread_id)
            assert run is not None and (run.run_id, run.epoch) == ("run-b", taken.epoch)

            late, versions = next_checkpoint(saver, steps[-1].checkpoint, {"x": 3})
            with pytest.raises(LeaseLostError):
                saver.put(with_fence(saved, lease.epoch), late, {}, versions)
            assert saver.get_tuple(thread(thread_id)).config == saved  # type: ignore[union-attr]


def test_a_takeover_waits_for_a_fenced_write_in_flight(postgres_uri: str) -> None:
    # The fenced write's transaction stays open: the take-over must wait for it to commit and
    # then its new holder reads what it wrote.
    with (
        PostgresSaver.from_conn_string(postgres_uri) as saver,
        psycopg.connect(postgres_uri) as conn,
    ):
        saver.setup()
        old = saver.acquire_lease("t", "run-old", ttl=30)
        saved = put_one(saver, with_fence(thread("t"), old.epoch), 1)
        expire(postgres_uri, "t")

        writer = PostgresSaver(conn)
        conn.execute("SELECT 1")  # a transaction of the caller's: the write joins it
        writer.put_writes(with_fence(saved, old.epoch), [("x", "in flight")], "task")
        takeover = Background(lambda: saver.acquire_lease("t", "run-new", ttl=30))
        wait_for_lock_wait(postgres_uri)
        assert takeover.is_alive()
        conn.commit()
        new = takeover.result()
        assert new.epoch == old.epoch + 1
        found = saver.get_tuple(saved)
        assert found is not None and found.pending_writes == [("task", "x", "in flight")]


def test_a_fenced_write_waits_for_a_takeover_in_flight_and_is_refused(
    postgres_uri: str,
) -> None:
    with (
        PostgresSaver.from_conn_string(postgres_uri) as saver,
        psycopg.connect(postgres_uri) as conn,
    ):
        saver.setup()
        old = saver.acquire_lease("t", "run-old", ttl=30)
        saved = put_one(saver, with_fence(thread("t"), old.epoch), 1)
        expire(postgres_uri, "t")

        taker = PostgresSaver(conn)
        conn.execute("SELECT 1")
        taker.acquire_lease("t", "run-new", ttl=30)  # not committed yet
        write = Background(
            lambda: saver.put_writes(with_fence(saved, old.epoch), [("x", 2)], "task")
        )
        wait_for_lock_wait(postgres_uri)
        assert write.is_alive()
        conn.commit()
        with pytest.raises(LeaseLostError, match="took the thread over"):
            write.result()
        assert contents(saver, "t")[1] == []


def test_a_delete_waits_for_a_fenced_write_in_flight_and_deletes_it(postgres_uri: str) -> None:
    with (
        PostgresSaver.from_conn_string(postgres_uri) as saver,
        psycopg.connect(postgres_uri) as conn,
    ):
        saver.setup()
        lease = saver.acquire_lease("t", "run", ttl=30)
        saved = put_one(saver, with_fence(thread("t"), lease.epoch), 1)
        writer = PostgresSaver(conn)
        conn.execute("SELECT 1")
        put_one(writer, with_fence(saved, lease.epoch), 2)
        delete = Background(lambda: saver.delete_thread("t"))
        wait_for_lock_wait(postgres_uri)
        conn.commit()
        delete.result()
        assert contents(saver, "t") == ([], [])  # the write that got in first went too
        report = saver.storage_report("t")
        assert (report.checkpoints, report.writes, report.values) == (0, 0, 0)


def _race_once(saver: PostgresSaver, uri: str, thread_id: str) -> int:
    """An old holder writes on and on while a new run takes its thread over; return how many
    writes the old holder got in."""
    old = saver.acquire_lease(thread_id, "run-old", ttl=30)
    base = put_one(saver, with_fence(thread(thread_id), old.epoch), 0)
    stale = with_fence(base, old.epoch)

    def write_until_refused() -> int:
        n = 0
        while True:
            n += 1
            try:
                if n % 2:
                    saver.put_writes(stale, [("x", n)], f"task-{n}")
                else:
                    put_one(saver, stale, n)
            except LeaseLostError:
                return n - 1

    writer = Background(write_until_refused)
    time.sleep(random.uniform(0.0, 0.02))
    expire(uri, thread_id)
    saver.acquire_lease(thread_id, "run-new", ttl=30)
    seen = contents(saver, thread_id)  # what the new holder starts from
    written: int = writer.result()
    assert contents(saver, thread_id) == seen  # nothing got in after the take-over
    ids, writes = seen
    assert len(ids) - 1 + len(writes) == written  # every write the old holder was told of
    return written


def test_takeovers_racing_fenced_writes(postgres_uri: str) -> None:
    with PostgresSaver.from_conn_string(postgres_uri, pool={"min_size": 3}) as saver:
        saver.setup()
        written = [_race_once(saver, postgres_uri, f"race-{i}") for i in range(20)]
    assert sum(written) > 0


async def _arace_once(saver: AsyncPostgresSaver, uri: str, thread_id: str) -> int:
    old = await saver.aacquire_lease(thread_id, "run-old", ttl=30)
    checkpoint, versions = next_checkpoint(saver, None, {"x": 0})
    base = await saver.aput(with_fence(thread(thread_id), old.epoch), checkpoint, {}, versions)
    stale = with_fence(base, old.epoch)

    async def write_until_refused() -> int:
        n = 0
        while True:
            try:
                await saver.aput_writes(stale, [("x", n)], f"task-{n}")
            except LeaseLostError:
                return n
            n += 1

    writer = asyncio.ensure_future(write_until_refused())
    await asyncio.sleep(random.uniform(0.0, 0.02))
    await asyncio.to_thread(expire, uri, thread_id)
    await saver.aacquire_lease(thread_id, "run-new", ttl=30)
    seen = await saver.aget_tuple(base)
    written = await writer
    after = await saver.aget_tuple(base)
    assert seen is not None and after is not None
    assert after.pending_writes == seen.pending_writes
    assert len(seen.pending_writes or []) == written
    return written


async def test_async_takeovers_racing_fenced_writes(postgres_uri: str) -> None:
    async with AsyncPostgresSaver.from_conn_string(postgres_uri, pool={"min_size": 3}) as saver:
        await saver.setup()
        written = [await _arace_once(saver, postgres_uri, f"race-{i}") for i in range(10)]
    assert sum(written) > 0


# -- the run registry -------------------------------------------------------------------------


def test_list_incomplete_oldest_first(saver: PostgresSaver) -> None:
    for name in ("a", "b", "c"):
        saver.acquire_lease(name, f"run-{name}", ttl=0.1, input=name)
        time.sleep(0.01)
    saver.acquire_lease("live", "run-live", ttl=30)
    finished = saver.acquire_lease("finished", "run-finished", ttl=0.1)
    saver.release_lease(finished, "cancelled")
    time.sleep(0.2)
    found = saver.list_incomplete()
    assert [run.thread_id for run in found] == ["a", "b", "c"]
    assert [run.input for run in found] == ["a", "b", "c"]
    assert [run.thread_id for run in saver.list_incomplete(limit=2)] == ["a", "b"]
    assert saver.list_incomplete(limit=0) == []
    renewed = saver.acquire_lease("b", "run-b2", ttl=30)
    assert renewed.attempts == 2
    assert [run.thread_id for run in saver.list_incomplete()] == ["a", "c"]


def test_a_renewed_lease_that_was_released_is_lost(saver: PostgresSaver) -> None:
    lease = saver.acquire_lease("t", "run", ttl=30)
    saver.release_lease(lease, "done")
    with pytest.raises(LeaseLostError, match="let go"):
        saver.renew_lease(lease, ttl=30)
    saver.release_lease(lease._replace(epoch=lease.epoch + 5), "error", "not mine")
    run = saver.get_run("t")
    assert run is not None and (run.status, run.error) == ("done", None)


# -- retention --------------------------------------------------------------------------------


def test_storage_report_matches_the_tables(postgres_uri: str, saver: PostgresSaver) -> None:
    config = run_steps(saver, thread("t"), 3)
    saver.put_writes(config, [("x", "y" * 1000)], "task")
    run_steps(saver, thread("other"), 2)
    report = saver.storage_report("t")
    with psycopg.connect(postgres_uri) as conn:
        row = conn.execute(
            """
            SELECT (SELECT count(*) FROM stepgraph_checkpoints WHERE thread_id = 't'),
                (SELECT count(*) FROM stepgraph_checkpoint_writes WHERE thread_id = 't'),
                (SELECT count(*) FROM stepgraph_checkpoint_values WHERE thread_id = 't'),
                (SELECT sum(octet_length(checkpoint) + octet_length(metadata))
                    FROM stepgraph_checkpoints WHERE thread_id = 't')
                + (SELECT sum(octet_length(value)) FROM stepgraph_checkpoint_writes
                    WHERE thread_id = 't')
                + (SELECT coalesce(sum(octet_length(value)), 0)
                    FROM stepgraph_checkpoint_values WHERE thread_id = 't')
            """
        ).fetchone()
    assert row is not None
    assert (report.checkpoints, report.writes, report.values, report.bytes) == row
    # Rows of writes: each step's task's two writes share one.
    assert report.checkpoints == 4 and report.writes == 4 and report.bytes > 1000


def _put_at(saver: PostgresSaver, thread_id: str, ts: str) -> RunnableConfig:
    checkpoint, versions = next_checkpoint(saver, None, {"x": ts})
    checkpoint["ts"] = ts
    return saver.put(thread(thread_id), checkpoint, {}, versions)


def test_sweep(postgres_uri: str) -> None:
    old = (datetime.now(UTC) - timedelta(days=10)).isoformat()
    with PostgresSaver.from_conn_string(
        postgres_uri, retention=Retention(ttl=timedelta(days=5))
    ) as saver:
        _put_at(saver, "idle", old)
        _put_at(saver, "idle-naive", "2001-02-03T04:05:06")
        _put_at(saver, "idle-offset", "2001-02-03T04:05:06+05:00")
        _put_at(saver, "idle-z", "2001-02-03T04:05:06Z")
        _put_at(saver, "odd-ts", "not a time")  # kept: its age is unknown
        _put_at(saver, "recent", old)
        _put_at(saver, "recent", datetime.now(UTC).isoformat())
        _put_at(saver, "held", old)
        held = saver.acquire_lease("held", "run-held", ttl=30)
        _put_at(saver, "expired", old)
        expired = saver.acquire_lease("expired", "run-dead", ttl=30)
        expire(postgres_uri, "expired")
        saved = _put_at(saver, "finished", old)
        finished = saver.acquire_lease("finished", "run-finished", ttl=30)
        saver.release_lease(finished, "done")

        swept = saver.sweep()  # Retention.ttl
        assert sorted(swept) == [
            "expired",
            "finished",
            "idle",
            "idle-naive",
            "idle-offset",
            "idle-z",
        ]
        for thread_id in swept:
            assert contents(saver, thread_id) == ([], [])
            run = saver.get_run(thread_id)
            assert run is not None and run.status == "deleted"
        run = saver.get_run("expired")
        assert run is not None and run.attempts == 0
        for thread_id in ("odd-ts", "recent", "held"):
            assert contents(saver, thread_id)[0]
        with pytest.raises(LeaseLostError, match="deleted"):
            saver.put_writes(with_fence(saved, finished.epoch), [("x", 1)], "task")
        with pytest.raises(LeaseLostError, match="deleted"):
            saver.renew_lease(expired, ttl=30)
        assert saver.renew_lease(held, ttl=30).epoch == held.epoch
        assert saver.sweep(timedelta(days=5)) == []


async def test_async_sweep_and_report(postgres_uri: str) -> None:
    async with AsyncPostgresSaver.from_conn_string(postgres_uri) as saver:
        checkpoint, versions = next_checkpoint(saver, None, {"x": 1})
        checkpoint["ts"] = (datetime.now(UTC) - timedelta(hours=2)).isoformat()
        await saver.aput(thread("t"), checkpoint, {}, versions)
        report = await saver.astorage_report("t")
        assert report.checkpoints == 1 and report.bytes > 0
        assert await saver.asweep(timedelta(hours=3)) == []
        assert await saver.asweep(timedelta(hours=1)) == ["t"]
        run = await saver.aget_run("t")
        assert run is not None and (run.status, run.run_id) == ("deleted", None)
        report = await saver.astorage_report("t")
        assert (report.checkpoints, report.writes, report.values, report.bytes) == (0, 0, 0, 0)
        with pytest.raises(ValueError, match="older_than"):
            await saver.asweep()


# -- faults -----------------------------------------------------------------------------------


def test_pool_recovers_from_idle_connections_cut_by_a_proxy(postgres_uri: str) -> None:
    # A proxy (or a firewall) closing connections that sat idle, with the server up all along:
    # the next call finds its pooled connection dead and runs again on a fresh one.
    proxy = RestartingProxy(postgres_uri)
    try:
        with PostgresSaver.from_conn_string(proxy.conninfo, pool={"min_size": 2}) as saver:
            lease = saver.acquire_lease("t", "run", ttl=30)
            saved = put_one(saver, with_fence(thread("t"), lease.epoch), 1)
            for _ in range(3):
                assert proxy.restart(down_for=0) >= 1
                lease = saver.renew_lease(lease, ttl=30)
                saver.put_writes(with_fence(saved, lease.epoch), [("x", 2)], "task")
                assert saver.acquire_lease("t", "run", ttl=30).epoch == lease.epoch
            assert contents(saver, "t")[1] == [("task", "x", 2)]
    finally:
        proxy.close()


async def test_async_pool_recovers_from_idle_connections_cut_by_a_proxy(
    postgres_uri: str,
) -> None:
    proxy = RestartingProxy(postgres_uri)
    try:
        async with AsyncPostgresSaver.from_conn_string(
            proxy.conninfo, pool={"min_size": 2}
        ) as saver:
            lease = await saver.aacquire_lease("t", "run", ttl=30)
            checkpoint, versions = next_checkpoint(saver, None, {"x": 1})
            saved = await saver.aput(with_fence(thread("t"), lease.epoch), checkpoint, {}, versions)
            for _ in range(3):
                assert proxy.restart(down_for=0) >= 1
                lease = await saver.arenew_lease(lease, ttl=30)
                await saver.aput_writes(with_fence(saved, lease.epoch), [("x", 2)], "task")
            found = await saver.aget_tuple(saved)
            assert found is not None and found.pending_writes == [("task", "x", 2)]
    finally:
        proxy.close()


@pytest.fixture
def private_server() -> Iterator[PrivateServer]:
    server = PrivateServer()  # Postgres tests never skip: binaries come from PyPI if need be
    try:
        yield server
    finally:
        server.close()


def test_pool_rides_out_a_real_server_restart(private_server: PrivateServer) -> None:
    # A crash-like stop of the real server (not a proxy imitating one): what was committed is
    # still there, leases included, and a call made while the server is down waits for it.
    with PostgresSaver.from_conn_string(private_server.conninfo, pool={"min_size": 2}) as saver:
        lease = saver.acquire_lease("t", "run", ttl=60)
        config = run_steps(saver, with_fence(thread("t"), lease.epoch), 3)
        saver.put_writes(config, [("x", 1)], "task")
        before = contents(saver, "t")
        private_server.stop()
        waiting = Background(lambda: contents(saver, "t"))
        time.sleep(0.5)
        private_server.start()
        assert waiting.result(timeout=30) == before
        assert saver.renew_lease(lease, ttl=60).epoch == lease.epoch
        saver.put_writes(config, [("x", 2)], "task-2")
        assert len(contents(saver, "t")[1]) == len(before[1]) + 1


async def test_async_pool_rides_out_a_real_server_restart(private_server: PrivateServer) -> None:
    async with AsyncPostgresSaver.from_conn_string(
        private_server.conninfo, pool={"min_size": 2}
    ) as saver:
        lease = await saver.aacquire_lease("t", "run", ttl=60)
        checkpoint, versions = next_checkpoint(saver, None, {"x": 1})
        saved = await saver.aput(with_fence(thread("t"), lease.epoch), checkpoint, {}, versions)
        await saver.aput_writes(saved, [("x", 2)], "task")
        await asyncio.to_thread(private_server.stop)
        await asyncio.to_thread(private_server.start)
        found = await saver.aget_tuple(saved)
        assert found is not None and found.pending_writes == [("task", "x", 2)]
        assert (await saver.arenew_lease(lease, ttl=60)).epoch == lease.epoch
