"""Chaos: worker processes run many threads on one Postgres while the test kills them.

Three ``chaos_worker.py`` processes share a job table (claimed with ``FOR UPDATE SKIP LOCKED``)
and recover each other's crashed runs (``graph.recover()``, lease of one second). Meanwhile the
test, at random moments, SIGKILLs a worker (and starts a new one in its slot) or terminates one
of the workers' database connections (``pg_terminate_backend``). When every job is done:

* every accepted run finished: the thread's run is ``done`` and its state is complete;
* no fork: each thread's checkpoints form one chain (every parent is distinct);
* no duplicated step: the final ``log`` lists each node exactly once. The side-effect ledger
  (one row per node execution, committed before the node's step is) shows the re-runs of steps
  whose checkpoint was not committed when their worker died; they are counted, not failed.

Bounded in ``make test`` (about 15 s of faults); ``make chaos`` sets ``STEPGRAPH_CHAOS=1`` and
runs ``STEPGRAPH_CHAOS_SECONDS`` (default 120) of faults.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from stepgraph.checkpoint.postgres import PostgresSaver

WORKER = Path(__file__).with_name("chaos_worker.py")
NODES = ["a", "b", "c", "d", "e"]
FULL = os.environ.get("STEPGRAPH_CHAOS", "") not in ("", "0")
SECONDS = float(os.environ.get("STEPGRAPH_CHAOS_SECONDS", "120" if FULL else "12"))
WORKERS = 3
THREADS = int(SECONDS * (25 if FULL else 15))  # work to outlast the faults (15-20 runs/s)
LEASE_TTL = 1.0


def show(request: pytest.FixtureRequest, line: str) -> None:
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print(f"\n{line}", flush=True)


class Workers:
    def __init__(self, target: str, app: str, tmp_path: Path) -> None:
        self.app = app
        self.target = make_conninfo(target, application_name=app)
        self.tmp_path = tmp_path
        self.slots: dict[int, subprocess.Popen[str]] = {}
        self.outputs: list[dict[str, int]] = []
        self.started = 0

    def start(self, slot: int) -> None:
        spec = {"target": self.target, "slot": slot, "lease_ttl": LEASE_TTL}
        log = open(self.tmp_path / f"worker-{slot}-{self.started}.err", "w")  # noqa: SIM115
        with log:
            self.slots[slot] = subprocess.Popen(
                [sys.executable, str(WORKER), json.dumps(spec)],
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        self.started += 1

    def kill(self, slot: int) -> None:
        process = self.slots[slot]
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=30)

    def wait(self, deadline: float) -> None:
        for slot, process in self.slots.items():
            try:
                out, _ = process.communicate(timeout=max(deadline - time.monotonic(), 1))
            except subprocess.TimeoutExpired:
                errors = sorted(self.tmp_path.glob(f"worker-{slot}-*.err"))[-1].read_text()
                raise AssertionError(f"worker {slot} never finished: {errors[-3000:]}") from None
            assert process.returncode == 0, f"worker {slot} failed ({process.returncode})"
            self.outputs.append(json.loads(out))

    def close(self) -> None:
        for process in self.slots.values():
            if process.poll() is None:
                process.kill()
                process.communicate()


@pytest.fixture
def workers(postgres_uri: str, tmp_path: Path) -> Iterator[Workers]:
    app = f"chaos-{os.getpid()}-{random.randrange(1 << 30)}"
    started = Workers(postgres_uri, app, tmp_path)
    try:
        yield started
    finally:
        started.close()


def jobs_left(conn: psycopg.Connection) -> int:
    return conn.execute("SELECT count(*) FROM chaos_jobs WHERE status <> 'done'").fetchone()[0]


@pytest.mark.slow
@pytest.mark.timeout(SECONDS + 300)
def test_workers_killed_at_random_finish_every_run_once(
    postgres_uri: str, workers: Workers, request: pytest.FixtureRequest
) -> None:
    seed = int(os.environ.get("STEPGRAPH_CHAOS_SEED", random.randrange(1 << 30)))
    chance = random.Random(seed)
    threads = [f"t-{i:05d}" for i in range(THREADS)]
    with psycopg.connect(postgres_uri, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE chaos_jobs (thread_id text PRIMARY KEY, status text NOT NULL, slot int)"
        )
        conn.execute(
            "CREATE TABLE chaos_ledger (thread_id text, node text, execution text PRIMARY KEY,"
            " pid int, at timestamptz DEFAULT clock_timestamp())"
        )
        with conn.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO chaos_jobs VALUES (%s, 'pending', NULL)", [(t,) for t in threads]
            )
        # The checkpoint schema exists before the workers race to create it.
        with PostgresSaver.from_conn_string(postgres_uri) as saver:
            saver.setup()

        faults: collections.Counter[str] = collections.Counter()
        started = time.monotonic()
        for slot in range(WORKERS):
            workers.start(slot)
        window = started + SECONDS
        while time.monotonic() < window and jobs_left(conn) > 0:
            time.sleep(chance.uniform(0.15, 0.6))
            if chance.random() < 0.5:
                slot = chance.randrange(WORKERS)
                workers.kill(slot)
                workers.start(slot)
                faults["SIGKILL"] += 1
            else:
                terminated = conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE application_name = %s ORDER BY random() LIMIT 1",
                    [workers.app],
                ).fetchall()
                faults["pg_terminate_backend"] += len(terminated)
        chaos_seconds = time.monotonic() - started
        workers.wait(deadline=time.monotonic() + 180)
        total_seconds = time.monotonic() - started
        assert jobs_left(conn) == 0

        executions = collections.Counter(
            (thread, node)
            for thread, node in conn.execute("SELECT thread_id, node FROM chaos_ledger").fetchall()
        )

    # Every accepted run finished exactly once, on one chain of checkpoints.
    checked = 0
    with PostgresSaver.from_conn_string(postgres_uri) as saver:
        for thread in threads:
            config = {"configurable": {"thread_id": thread, "checkpoint_ns": ""}}
            run = saver.get_run(thread)
            assert run is not None and run.status == "done", (thread, run)
            history = list(saver.list(config))[::-1]
            assert history[-1].checkpoint["channel_values"]["log"] == NODES, thread
            assert history[-1].checkpoint["channel_values"]["thread"] == thread
            parents = [
                t.parent_config and t.parent_config["configurable"]["checkpoint_id"]
                for t in history
            ]
            ids = [t.config["configurable"]["checkpoint_id"] for t in history]
            assert len(set(parents)) == len(parents), f"{thread}: the history forked"
            assert parents == [None, *ids[:-1]], f"{thread}: the history is not one chain"
            assert [t.metadata["step"] for t in history] == list(range(-1, len(NODES) + 1))
            for node in NODES:
                assert executions[(thread, node)] >= 1, (thread, node)
            checked += 1
    reruns = sum(n - 1 for n in executions.values())
    rerun_threads = len({thread for (thread, _), n in executions.items() if n > 1})
    counts = collections.Counter[str]()
    for output in workers.outputs:
        counts.update(output)
    show(
        request,
        f"chaos (seed {seed}): {WORKERS} workers, {workers.started} worker processes, "
        f"{THREADS} threads in {total_seconds:.1f} s ({chaos_seconds:.1f} s of faults); "
        f"faults: {faults['SIGKILL']} SIGKILLs, {faults['pg_terminate_backend']} "
        f"connections terminated; {checked} threads checked done, complete and unforked; "
        f"{reruns} node re-runs in {rerun_threads} threads (steps not committed when their "
        f"worker died); surviving workers' counters: {dict(counts)}",
    )
