"""One writer per thread, across processes: leases, take-over, fencing, on SQLite and Postgres.

Each process runs ``fault_program.py`` (phases ``own-run`` / ``own-recover``): the chain
a -> b -> c -> d -> e, whose node b can wait for a ``go`` file so the test chooses when the run
moves on. Every node appends ``node:<process tag>`` to a ledger as it starts.

(i) two processes start one thread at once: one runs; the other is refused (``reject``) or
    waits and runs after it (``enqueue``);
(ii) a holder paused (SIGSTOP) past its lease is taken over by another process, which finishes
    the thread; resumed (SIGCONT), the old holder's next write is refused (``LeaseLostError``),
    and the history has no fork;
(iii) a SIGKILLed holder keeps the thread until its lease runs out, then recovery in another
    process takes it over;
(iv) a run's writes after another process deleted its thread are refused.
"""

from __future__ import annotations

import collections
import contextlib
import json
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from stepgraph.checkpoint.postgres import PostgresSaver
from stepgraph.checkpoint.sqlite import SqliteSaver
from stepgraph.errors import ThreadBusyError

PROGRAM = Path(__file__).with_name("fault_program.py")
CHAIN = ["a", "b", "c", "d", "e"]
THREAD = "owned"
STATS: collections.Counter[str] = collections.Counter()


@pytest.fixture(scope="module", autouse=True)
def ownership_summary(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if STATS:
        line = "ownership across processes: " + ", ".join(f"{k} {v}" for k, v in STATS.items())
        capture = request.config.pluginmanager.get_plugin("capturemanager")
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            print(f"\n{line}", flush=True)


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    if request.param == "sqlite":
        return "sqlite", str(tmp_path / "owned.sqlite")
    return "postgres", request.getfixturevalue("postgres_uri")


@contextlib.contextmanager
def open_store(kind: str, target: str) -> Iterator[Any]:
    if kind == "sqlite":
        with SqliteSaver.from_conn_string(target) as saver:
            yield saver
    else:
        with PostgresSaver.from_conn_string(target, pool={"min_size": 1, "max_size": 2}) as saver:
            yield saver


class Runs:
    """Processes of one test, on one store and one work folder."""

    def __init__(self, store: tuple[str, str], work: Path) -> None:
        self.kind, self.target = store
        self.work = work
        self.processes: list[subprocess.Popen[str]] = []

    def start(self, tag: str, phase: str = "own-run", **spec: Any) -> subprocess.Popen[str]:
        target = self.target
        if self.kind == "postgres":  # so the test can find the process's connections
            target = make_conninfo(target, application_name=f"owner-{tag}")
        full = {
            "phase": phase,
            "store": self.kind,
            "target": target,
            "thread": THREAD,
            "dir": str(self.work),
            "tag": tag,
            "durability": "sync",
            **spec,
        }
        process = subprocess.Popen(
            [sys.executable, str(PROGRAM), json.dumps(full)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        STATS["processes"] += 1
        self.processes.append(process)
        return process

    def wait_in_b(self, *processes: subprocess.Popen[str], tags: tuple[str, ...]) -> str:
        """The tag of the first process to reach node b (its others may be anywhere)."""
        deadline = time.monotonic() + 60
        while True:
            for tag in tags:
                if (self.work / f"{tag}.in-b").exists():
                    return tag
            for process in processes:
                if process.poll() is not None:
                    raise AssertionError(f"a run ended early: {process.communicate()}")
            assert time.monotonic() < deadline, "no run reached node b"
            time.sleep(0.01)

    def go(self) -> None:
        (self.work / "go").touch()

    def ledger(self) -> list[tuple[str, str]]:
        path = self.work / "ledger"
        lines = path.read_text().split() if path.exists() else []
        return [(node, tag) for node, tag in (line.split(":") for line in lines)]

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGCONT)
                process.kill()
            process.communicate()


@pytest.fixture
def runs(store: tuple[str, str], tmp_path: Path) -> Iterator[Runs]:
    started = Runs(store, tmp_path)
    try:
        yield started
    finally:
        started.close()


def finish(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=120)
    return process.returncode, out, err


def history(kind: str, target: str) -> list[Any]:
    with open_store(kind, target) as saver:
        return list(saver.list({"configurable": {"thread_id": THREAD, "checkpoint_ns": ""}}))[::-1]


def assert_one_chain(saved: list[Any]) -> None:
    ids = [t.config["configurable"]["checkpoint_id"] for t in saved]
    parents = [
        t.parent_config["configurable"]["checkpoint_id"] if t.parent_config else None for t in saved
    ]
    assert parents == [None, *ids[:-1]], "the history forked or has a gap"


def run_status(kind: str, target: str) -> Any:
    with open_store(kind, target) as saver:
        return saver.get_run(THREAD)


# -- (i) two processes, one thread --------------------------------------------------------------


def test_two_processes_start_one_thread_and_one_is_refused(runs: Runs) -> None:
    first = runs.start("A", block=True, lease_ttl=5.0)
    second = runs.start("B", block=True, lease_ttl=5.0)
    winner = runs.wait_in_b(first, second, tags=("A", "B"))
    loser = second if winner == "A" else first
    code, out, _ = finish(loser)
    assert code == 2 and out.startswith("BUSY: "), out
    assert "holds its lease" in out
    STATS["refused (reject)"] += 1
    runs.go()
    code, out, err = finish(first if winner == "A" else second)
    assert code == 0, err
    assert json.loads(out)["log"] == CHAIN
    assert runs.ledger() == [(node, winner) for node in CHAIN]
    assert run_status(runs.kind, runs.target).status == "done"
    assert_one_chain(history(runs.kind, runs.target))


def test_two_processes_start_one_thread_and_one_waits_its_turn(runs: Runs) -> None:
    first = runs.start("A", block=True, lease_ttl=5.0, strategy="enqueue")
    second = runs.start("B", block=True, lease_ttl=5.0, strategy="enqueue")
    winner = runs.wait_in_b(first, second, tags=("A", "B"))
    waiting = second if winner == "A" else first
    time.sleep(1.0)  # the other one is queued: it has not started, and is still there
    assert waiting.poll() is None
    assert {tag for _, tag in runs.ledger()} == {winner}
    runs.go()
    for process in (first, second):
        code, _, err = finish(process)
        assert code == 0, err
    other = "B" if winner == "A" else "A"
    # The second run started after the first ended, and ran on from its final state.
    assert runs.ledger() == [(node, winner) for node in CHAIN] + [(node, other) for node in CHAIN]
    saved = history(runs.kind, runs.target)
    assert saved[-1].checkpoint["channel_values"]["log"] == CHAIN + CHAIN
    assert_one_chain(saved)
    STATS["queued (enqueue)"] += 1


# -- (ii) a paused holder loses its lease ----------------------------------------------------------


def holds_a_transaction(runs: Runs, tag: str) -> bool:
    """Whether the process ``tag`` has a transaction open (a lease renewal, say): pausing it
    then would block everyone else on its locks."""
    if runs.kind == "sqlite":
        conn = sqlite3.connect(runs.target, timeout=0, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
            return False
        except sqlite3.OperationalError:
            return True
        finally:
            conn.close()
    with psycopg.connect(runs.target, autocommit=True) as conn:
        return bool(
            conn.execute(
                "SELECT 1 FROM pg_stat_activity WHERE application_name = %s AND state <> 'idle'",
                [f"owner-{tag}"],
            ).fetchall()
        )


def pause(runs: Runs, process: subprocess.Popen[str], tag: str) -> None:
    """SIGSTOP ``process`` at a moment it holds no transaction."""
    for _ in range(200):
        process.send_signal(signal.SIGSTOP)
        if not holds_a_transaction(runs, tag):
            STATS["SIGSTOPs"] += 1
            return
        process.send_signal(signal.SIGCONT)
        time.sleep(0.02)
    raise AssertionError("the process was always inside a transaction")


def test_a_paused_holder_is_taken_over_and_its_late_write_refused(runs: Runs) -> None:
    holder = runs.start("A", block=True, lease_ttl=1.0)
    runs.wait_in_b(holder, tags=("A",))
    pause(runs, holder, "A")
    # Past its lease, another process recovers the run and finishes the thread.
    taker = runs.start("B", phase="own-recover", lease_ttl=1.0)
    code, out, err = finish(taker)
    assert code == 0, err
    result = json.loads(out)
    assert result["report"]["resumed"] == [THREAD]
    assert result["state"]["log"] == CHAIN
    # The old holder wakes up in node b, which now returns: its step's save is refused.
    runs.go()
    holder.send_signal(signal.SIGCONT)
    code, out, err = finish(holder)
    assert code == 3, (out, err)
    assert out.startswith("LEASE LOST: ") and "another run took the thread over" in out, out
    STATS["late writes refused"] += 1
    assert runs.ledger() == [("a", "A"), ("b", "A"), ("b", "B"), ("c", "B"), ("d", "B"), ("e", "B")]
    saved = history(runs.kind, runs.target)
    assert_one_chain(saved)
    assert saved[-1].checkpoint["channel_values"]["log"] == CHAIN
    assert [t.metadata["step"] for t in saved] == list(range(-1, len(CHAIN) + 1))
    run = run_status(runs.kind, runs.target)
    assert run.status == "done" and run.attempts == 2


# -- (iii) a killed holder's lease runs out --------------------------------------------------------


def test_a_killed_holder_keeps_the_thread_until_its_lease_runs_out(runs: Runs) -> None:
    holder = runs.start("A", block=True, lease_ttl=3.0)
    runs.wait_in_b(holder, tags=("A",))
    holder.send_signal(signal.SIGKILL)
    assert holder.wait(timeout=30) == -signal.SIGKILL
    STATS["SIGKILLs"] += 1
    with open_store(runs.kind, runs.target) as saver:
        with pytest.raises(ThreadBusyError):
            saver.acquire_lease(THREAD, "intruder", ttl=1.0)
        assert THREAD not in [run.thread_id for run in saver.list_incomplete()]
    taker = runs.start("B", phase="own-recover", lease_ttl=1.0)
    code, out, err = finish(taker)
    assert code == 0, err
    result = json.loads(out)
    assert result["report"]["resumed"] == [THREAD]
    assert result["state"]["log"] == CHAIN
    STATS["take-overs after a kill"] += 1
    assert runs.ledger() == [("a", "A"), ("b", "A"), ("b", "B"), ("c", "B"), ("d", "B"), ("e", "B")]
    assert_one_chain(history(runs.kind, runs.target))
    run = run_status(runs.kind, runs.target)
    assert run.status == "done" and run.attempts == 2


# -- (iv) deleted under a running run --------------------------------------------------------------


def test_writes_after_another_process_deleted_the_thread_are_refused(runs: Runs) -> None:
    holder = runs.start("A", block=True, lease_ttl=5.0)
    runs.wait_in_b(holder, tags=("A",))
    with open_store(runs.kind, runs.target) as saver:
        assert len(list(saver.list({"configurable": {"thread_id": THREAD}}))) == 3
        saver.delete_thread(THREAD)
    runs.go()
    code, out, err = finish(holder)
    assert code == 3, (out, err)
    assert out.startswith("LEASE LOST: ") and "deleted" in out, out
    STATS["writes refused after delete"] += 1
    assert history(runs.kind, runs.target) == []
    assert run_status(runs.kind, runs.target).status == "deleted"
