"""Fault injection: SIGKILL at every persistence boundary, then recovery in a new process.

A child process (``fault_program.py``) runs the fan-out graph a -> (p1, p2, p3, p4) -> z on a
saver whose N-th write call (``put``, ``put_step``, ``put_writes``, ``put_writes_batch``) kills
the process: ``before`` the call, ``mid`` transaction (SQLite: as its first write statement
starts; Postgres: statement sent, blocked on a row lock the test holds, and aborted by the server
when it notices the client is gone), at ``commit`` (SQLite: inside ``COMMIT``, at its first
progress-handler call, which comes before the commit reaches the WAL; Postgres:
statement sent and blocked, then finished and committed by the server after the client died)
or ``after`` it returned. A second process waits until the saver lists the run as crashed
(its one-second lease ran out) and finishes it with ``graph.recover()``.

Checked for every kill, in every durability mode, on SQLite and Postgres:

(a) a node runs again only if its effect was not committed: the side-effect ledger (each node
    appends ``node:attempt`` as it starts) shows the recovery ran exactly the nodes whose
    ``log`` entry was not in the store at the kill;
(b) the final state and the checkpoint history equal a crash-free run's, the run is ``done``,
    and the history is one chain (no fork);
(c) nothing committed is lost: every checkpoint in the store right after the kill is still
    there afterwards, unchanged, with its pending writes;
(d) every write call that returned before the kill is committed (so ``sync`` loses no
    finished task, and ``async`` at most the saves not made yet); the killed call is committed
    whole or not at all; with ``exit`` nothing is saved before the end and recovery starts the
    run again from the input the run registry kept.

``make test`` runs a bounded selection (every write kind and every boundary at least once per
backend and durability mode, the sync API); ``STEPGRAPH_CHAOS=1`` (``make chaos``) runs every
write index x boundary x mode x backend, under the sync and the async API.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from stepgraph.checkpoint.postgres import PostgresSaver
from stepgraph.checkpoint.sqlite import SqliteSaver

PROGRAM = Path(__file__).with_name("fault_program.py")
NODES = ("a", "p1", "p2", "p3", "p4", "z")
BOUNDARIES = ("before", "commit", "mid", "after")
# The write calls that save a checkpoint (fault_program.CHECKPOINT_SAVES); the last of a run
# also lets go of its lease.
CHECKPOINT_SAVES = ("put", "put_step", "put_step_and_release", "put_steps")
FULL = os.environ.get("STEPGRAPH_CHAOS", "") not in ("", "0")
PARALLEL = 4  # cases in flight at once (each is two short processes, mostly waiting)
THREAD = "faulty"

STATS: collections.Counter[str] = collections.Counter()
_STATS_LOCK = threading.Lock()


def count(key: str, n: int = 1) -> None:
    with _STATS_LOCK:
        STATS[key] += n


def check(condition: bool, message: str) -> None:
    """An invariant check, counted."""
    count("invariant checks")
    if not condition:
        raise AssertionError(message)


@pytest.fixture(scope="module", autouse=True)
def fault_summary(request: pytest.FixtureRequest) -> Iterator[None]:
    started = time.monotonic()
    yield
    if not STATS:
        return
    outcomes = ", ".join(
        f"{k.removeprefix('outcome ')} {v}"
        for k, v in sorted(STATS.items())
        if k.startswith("outcome")
    )
    boundaries = ", ".join(f"{b} {STATS['at ' + b]}" for b in BOUNDARIES)
    line = (
        f"fault injection ({'full' if FULL else 'bounded'}): {STATS['cases']} cases, "
        f"{STATS['processes']} processes, {STATS['kills']} SIGKILLs ({boundaries}), "
        f"{STATS['resumes']} recoveries, {STATS['finished at the kill']} runs done at the kill, "
        f"{STATS['invariant checks']} invariant checks, "
        f"{STATS['reruns']} node re-runs (all of uncommitted work); killed inside a write: "
        f"{outcomes}; "
        f"{time.monotonic() - started:.1f} s"
    )
    show(request, line)


def show(request: pytest.FixtureRequest, line: str) -> None:
    """Print ``line`` past pytest's output capture (so ``make test``'s ``-q`` run shows it)."""
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print(f"\n{line}", flush=True)


# -- the store as the test sees it ---------------------------------------------------------------


@dataclass(frozen=True)
class Saved:
    """One checkpoint of the thread, as read back from the store."""

    id: str
    parent: str | None
    source: str
    step: int
    values: dict[str, Any]
    writes: frozenset[tuple[str, str, str]]  # (task_id, channel, repr(value))

    @property
    def nodes(self) -> set[str]:
        logged = set(self.values.get("log", []))
        for _, channel, value in self.writes:
            if channel == "log":
                logged.update(json.loads(value))
        return logged


def open_store(store: str, target: str) -> contextlib.AbstractContextManager[Any]:
    if store == "sqlite":
        return SqliteSaver.from_conn_string(target)
    return PostgresSaver.from_conn_string(target, pool={"min_size": 1, "max_size": 1})


def read_store(store: str, target: str) -> tuple[list[Saved], Any]:
    """The thread's checkpoints (oldest first) and its run record."""
    with open_store(store, target) as saver:
        saved = [
            Saved(
                t.config["configurable"]["checkpoint_id"],
                t.parent_config["configurable"]["checkpoint_id"] if t.parent_config else None,
                t.metadata["source"],
                t.metadata["step"],
                dict(t.checkpoint["channel_values"]),
                frozenset(
                    (task, channel, json.dumps(value, default=repr))
                    for task, channel, value in t.pending_writes
                ),
            )
            for t in saver.list({"configurable": {"thread_id": THREAD, "checkpoint_ns": ""}})
        ]
        return saved[::-1], saver.get_run(THREAD)


def committed_nodes(history: list[Saved]) -> set[str]:
    return history[-1].nodes if history else set()


def assert_one_chain(history: list[Saved]) -> None:
    parents = [s.parent for s in history]
    check(len(set(parents)) == len(parents), f"a fork: two checkpoints share a parent: {parents}")
    for before, after in itertools.pairwise(history):
        check(after.parent == before.id, f"the history is not one chain: {history}")


# -- the processes -----------------------------------------------------------------------------


@dataclass
class Case:
    store: str
    durability: str
    api: str
    index: int
    kind: str
    boundary: str

    @property
    def name(self) -> str:
        return f"{self.store}-{self.api}-{self.durability}-{self.index}-{self.kind}-{self.boundary}"


@dataclass
class Clean:
    """What a crash-free run did."""

    calls: list[tuple[str, list[str]]]  # (kind, nodes made durable) in call order
    history: list[Saved]
    final: dict[str, Any]


@dataclass
class Calls:
    started: dict[int, tuple[str, list[str]]] = field(default_factory=dict)
    done: set[int] = field(default_factory=set)
    saved: dict[int, int] = field(default_factory=dict)  # checkpoints each call saves


def read_calls(work: Path) -> Calls:
    calls = Calls()
    path = work / "calls"
    for line in path.read_text().splitlines() if path.exists() else []:
        parts = line.split(" ")
        if parts[0] == "start":
            calls.started[int(parts[2])] = (parts[1], [n for n in parts[3].split(",") if n])
            calls.saved[int(parts[2])] = int(parts[4])
        else:
            calls.done.add(int(parts[2]))
    return calls


def read_ledger(work: Path) -> list[tuple[str, int]]:
    path = work / "ledger"
    if not path.exists():
        return []
    return [(n, int(a)) for n, a in (line.split(":") for line in path.read_text().split())]


def spawn(spec: dict) -> subprocess.Popen[str]:
    count("processes")
    return subprocess.Popen(
        [sys.executable, str(PROGRAM), json.dumps(spec)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen[str], timeout: float = 120) -> tuple[int, str, str]:
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        raise AssertionError(f"a child process hung: {err}") from None
    return process.returncode, out, err


class Stores:
    """A store of its own for each case: a SQLite file, or a Postgres schema."""

    def __init__(self, store: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
        self.store = store
        self.tmp_path = tmp_path
        self.server = request.getfixturevalue("postgres_server") if store == "postgres" else None

    def new(self, name: str) -> tuple[Path, str]:
        work = self.tmp_path / name
        work.mkdir()
        if self.server is None:
            return work, str(work / "store.sqlite")
        return work, self.server.new_schema_uri()


def base_spec(case_store: str, durability: str, api: str, work: Path, target: str) -> dict:
    return {
        "store": case_store,
        "target": target,
        "thread": THREAD,
        "dir": str(work),
        "durability": durability,
        "api": api,
        "lease_ttl": 1.0,
    }


def clean_run(stores: Stores, durability: str, api: str) -> Clean:
    work, target = stores.new(f"clean-{api}-{durability}")
    spec = {**base_spec(stores.store, durability, api, work, target), "phase": "clean"}
    code, out, err = finish(spawn(spec))
    assert code == 0, err
    calls = read_calls(work)
    history, run = read_store(stores.store, target)
    assert run.status == "done"
    assert json.loads(out) == {"log": list(NODES), "total": 63}
    assert sorted(n for n, _ in read_ledger(work)) == sorted(NODES)
    return Clean([calls.started[i] for i in sorted(calls.started)], history, history[-1].values)


# -- Postgres: a kill while the write waits on the server ---------------------------------------


def app_name(case: Case) -> str:
    return f"fault-{case.name}"[:63]


def kill_while_blocked(process: subprocess.Popen[str], work: Path, target: str, case: Case) -> None:
    """Lock the thread's run row (a fenced write locks it FOR SHARE), let the child send its
    write, SIGKILL the child while the server has the statement waiting, then release the lock
    and wait for the server to be done with the statement: aborted (``mid``: the server checks
    for a vanished client) or committed (``commit``)."""
    deadline = time.monotonic() + 60
    while not (work / "at-write").exists():
        assert process.poll() is None, f"{case.name}: the child died early: {process.stderr}"
        assert time.monotonic() < deadline, f"{case.name}: the child never reached its write"
        time.sleep(0.005)
    with psycopg.connect(target, autocommit=True) as watcher, psycopg.connect(target) as locker:
        locker.execute("SELECT 1 FROM stepgraph_thread_runs FOR UPDATE")
        (work / "locked").touch()
        blocked = None
        while blocked is None:
            # Waiting on the lock, or behind the child's own lease renewal that waits on it.
            rows = watcher.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = %s"
                " AND wait_event_type = 'Lock' AND query LIKE '%%stepgraph_checkpoint%%'",
                [app_name(case)],
            ).fetchall()
            if rows:
                blocked = rows[0][0]
            else:
                assert process.poll() is None, f"{case.name}: the write was not blocked"
                assert time.monotonic() < deadline, f"{case.name}: the write never blocked"
                time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)

        def gone() -> bool:
            return not watcher.execute(
                "SELECT 1 FROM pg_stat_activity WHERE pid = %s", [blocked]
            ).fetchall()

        if case.boundary == "mid":
            # The server notices the vanished client while the statement still waits.
            while not gone():
                assert time.monotonic() < deadline, f"{case.name}: the server kept the statement"
                time.sleep(0.01)
        locker.rollback()  # release the row: a statement still waiting runs, and commits
        while not gone():
            assert time.monotonic() < deadline, f"{case.name}: the statement never finished"
            time.sleep(0.01)


# -- one case ----------------------------------------------------------------------------------


def run_case(stores: Stores, clean: Clean, case: Case) -> None:
    work, target = stores.new(case.name)
    spec = base_spec(case.store, case.durability, case.api, work, target)
    if case.store == "postgres":  # so the test finds the child's connections
        target = make_conninfo(target, application_name=app_name(case))
    crash = spawn(
        {
            **spec,
            "target": target,
            "phase": "crash",
            "attempt": 1,
            "kill": {"index": case.index, "boundary": case.boundary},
        }
    )
    if case.store == "postgres" and case.boundary in ("mid", "commit"):
        kill_while_blocked(crash, work, target, case)
    code, _, err = finish(crash)
    assert code == -signal.SIGKILL, f"{case.name}: the child was not killed ({code}): {err}"
    count("kills")
    count(f"at {case.boundary}")

    # What the dead process left.
    calls = read_calls(work)
    at_kill, run = read_store(case.store, target)
    committed = committed_nodes(at_kill)
    first = read_ledger(work)
    check(
        [kind for kind, _ in (calls.started[i] for i in sorted(calls.started))]
        == [kind for kind, _ in clean.calls[: len(calls.started)]],
        f"{case.name}: the write calls differ from the clean run's: {calls.started}",
    )
    check(max(calls.started) == case.index, f"{case.name}: killed at the wrong call")
    check(all(a == 1 for _, a in first), f"{case.name}: ledger {first}")
    check(committed <= {n for n, _ in first}, f"{case.name}: committed {committed} never ran")
    # (d) every call that returned is committed; the killed one is all or nothing.
    for index in calls.done:
        check(
            set(calls.started[index][1]) <= committed,
            f"{case.name}: call {index} returned but its effect {calls.started[index]} is lost",
        )
    earlier = set().union(*(set(calls.started[i][1]) for i in calls.done - {case.index}))
    killed = set(calls.started[case.index][1]) - earlier
    check(
        killed <= committed or not (killed & committed),
        f"{case.name}: the killed call was half committed: {killed} vs {committed}",
    )
    # The killed call itself: a checkpoint save is committed iff the store has its checkpoints
    # (a chain of them, ``put_steps``, is one transaction) more than the saves that returned; a
    # writes save iff its nodes are in the store.
    returned = sum(calls.saved[i] for i in calls.done - {case.index})
    if case.kind in CHECKPOINT_SAVES:
        saving = calls.saved[case.index]
        check(
            len(at_kill) in (returned, returned + saving),
            f"{case.name}: {len(at_kill)} checkpoints stored, {returned} saves returned",
        )
        landed = len(at_kill) == returned + saving
    else:
        check(len(at_kill) == returned, f"{case.name}: {len(at_kill)} checkpoints, {returned}")
        landed = bool(killed) and killed <= committed
    if case.boundary == "before":
        check(not landed, f"{case.name}: a call killed before it was made is in the store")
    if case.boundary == "after":
        check(landed, f"{case.name}: a call that returned is not in the store")
    if case.boundary in ("mid", "commit"):
        count(f"outcome {case.store} {case.boundary} {'committed' if landed else 'rolled back'}")
    if case.durability == "exit":
        expected = [] if case.boundary in ("before", "mid") else None
        if expected is not None:
            check(at_kill == [], f"{case.name}: exit mode saved before the end: {at_kill}")
    if case.store == "sqlite":
        assert_sqlite_intact(target)
    # The run's last save lets go of its lease in its own transaction: once it landed, the run
    # is done, and there is nothing to recover. Before that, the dead run holds the thread.
    finished = landed and case.kind == "put_step_and_release"
    check(
        run is not None and run.status == ("done" if finished else "running"),
        f"{case.name}: run record {run}",
    )
    if finished:
        check(at_kill[-1].values == clean.final, f"{case.name}: stored state {at_kill[-1].values}")
        check(
            [(s.source, s.step) for s in at_kill] == [(s.source, s.step) for s in clean.history],
            f"{case.name}: history {[(s.source, s.step) for s in at_kill]}",
        )
        count("finished at the kill")
        count("cases")
        return

    # A new process recovers the run once its lease runs out.
    resume = spawn({**spec, "phase": "resume", "attempt": 2})
    code, out, err = finish(resume)
    assert code == 0, f"{case.name}: recovery failed: {err}"
    count("resumes")
    result = json.loads(out)
    after, run = read_store(case.store, target)
    ledger = read_ledger(work)
    second = [n for n, a in ledger if a == 2]

    # (a) only what was not committed ran again, each node once per process.
    check(
        sorted(second) == sorted(set(NODES) - committed),
        f"{case.name}: recovery ran {second}, the store had {sorted(committed)} at the kill",
    )
    check(len(set(second)) == len(second), f"{case.name}: a node ran twice in recovery: {ledger}")
    count("reruns", len({n for n, _ in first} & set(second)))
    # (b) the end is a crash-free run's end.
    check(result["report"]["resumed"] == [THREAD], f"{case.name}: report {result['report']}")
    check(result["state"] == clean.final, f"{case.name}: state {result['state']}")
    check(after[-1].values == clean.final, f"{case.name}: stored state {after[-1].values}")
    check(run.status == "done", f"{case.name}: the run ended {run}")
    check(
        [(s.source, s.step) for s in after] == [(s.source, s.step) for s in clean.history],
        f"{case.name}: history {[(s.source, s.step) for s in after]}",
    )
    assert_one_chain(after)
    # (c) nothing committed at the kill was lost or changed.
    kept = {s.id: s for s in after}
    for saved in at_kill:
        check(saved.id in kept, f"{case.name}: checkpoint {saved.id} was lost")
        check(kept[saved.id].values == saved.values, f"{case.name}: checkpoint {saved.id} changed")
        check(
            saved.writes <= kept[saved.id].writes,
            f"{case.name}: pending writes of {saved.id} were lost",
        )
    if case.store == "sqlite":
        assert_sqlite_intact(target)
    count("cases")


def assert_sqlite_intact(path: str) -> None:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        check(conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)], "SQLite corrupt")


def select_cases(store: str, durability: str, api: str, clean: Clean) -> list[Case]:
    """Every write index x boundary (full), or the first call of each kind and the last call,
    with the boundaries dealt round so each one comes up (bounded)."""
    kinds = [kind for kind, _ in clean.calls]
    if FULL:
        picks = [(i, b) for i in range(len(kinds)) for b in BOUNDARIES]
    else:
        indices = sorted({kinds.index(kind) for kind in kinds} | {len(kinds) - 1})
        if len(indices) == 1:
            picks = [(indices[0], b) for b in BOUNDARIES]
        else:
            picks = [(i, BOUNDARIES[n % len(BOUNDARIES)]) for n, i in enumerate(indices)]
    return [Case(store, durability, api, i, kinds[i], b) for i, b in picks]


APIS = ["sync", "async"] if FULL else ["sync"]


@pytest.mark.slow
@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("durability", ["sync", "async", "exit"])
@pytest.mark.parametrize("store", ["sqlite", "postgres"])
def test_sigkill_at_every_persistence_boundary(
    store: str, durability: str, api: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    stores = Stores(store, tmp_path, request)
    clean = clean_run(stores, durability, api)
    cases = select_cases(store, durability, api, clean)
    assert {c.boundary for c in cases} == set(BOUNDARIES)
    if not FULL:
        assert {c.kind for c in cases} == {kind for kind, _ in clean.calls}
    failures: list[str] = []

    def attempt(case: Case) -> None:
        try:
            run_case(stores, clean, case)
        except Exception as error:
            failures.append(f"{case.name}: {type(error).__name__}: {error}")

    with ThreadPoolExecutor(PARALLEL) as pool:
        list(pool.map(attempt, cases))
    assert not failures, "\n".join(failures)
