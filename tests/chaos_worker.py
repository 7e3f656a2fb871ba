"""A worker of the chaos test (tests/test_chaos.py): runs threads from a shared job table on
Postgres until every job is done, while the test kills it and its connections.

    python chaos_worker.py SPEC_JSON      (keys: target, slot, lease_ttl)

Each thread is a 5-node chain a -> b -> c -> d -> e; each node, as it starts, inserts
``(thread, node, execution id, pid)`` into ``chaos_ledger`` on a connection of its own
(autocommit), so every execution is visible, committed or not. Odd threads run with
``durability="sync"``, even ones ``"async"``.

The loop: ``graph.recover()`` (runs whose worker died: their lease ran out), then each job this
slot holds (``chaos_jobs.slot``, kept across restarts of the slot), else a new job claimed with
``FOR UPDATE SKIP LOCKED``. A job is run according to the thread's run record: done (mark the
job done), running (another run holds it, or it died and ``recover()`` will find it: leave it),
anything else (run it: from its last checkpoint, or from its input if it has none). The worker
exits, printing its counters as JSON, once every job is done.
"""

from __future__ import annotations

import collections
import itertools
import json
import operator
import os
import random
import sys
import time
import uuid
from collections.abc import Callable
from typing import Annotated, Any, TypedDict, TypeVar

import psycopg

from stepgraph.checkpoint.postgres import PostgresSaver
from stepgraph.errors import LeaseLostError, ThreadBusyError
from stepgraph.graph import END, START, StateGraph

NODES = ("a", "b", "c", "d", "e")
T = TypeVar("T")


class State(TypedDict):
    thread: str
    log: Annotated[list[str], operator.add]


class Db:
    """The worker's own connection (jobs, ledger), reopened whenever it breaks."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.conn: psycopg.Connection[Any] | None = None

    def run(self, work: Callable[[psycopg.Connection[Any]], T]) -> T:
        for _ in range(100):
            try:
                if self.conn is None or self.conn.closed or self.conn.broken:
                    self.conn = psycopg.connect(self.target, autocommit=True)
                return work(self.conn)
            except psycopg.OperationalError:
                COUNTS["connection errors"] += 1
                self.conn = None
                time.sleep(0.05)
        raise RuntimeError("the database stayed unreachable")


COUNTS: collections.Counter[str] = collections.Counter()


def build(db: Db) -> StateGraph:
    def make_node(name: str) -> Any:
        def node(state: State) -> dict:
            execution = uuid.uuid4().hex
            db.run(
                lambda c: c.execute(
                    "INSERT INTO chaos_ledger (thread_id, node, execution, pid)"
                    " VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING",
                    [state["thread"], name, execution, os.getpid()],
                )
            )
            time.sleep(random.uniform(0.005, 0.03))
            return {"log": [name]}

        return node

    builder = StateGraph(State)
    for name in NODES:
        builder.add_node(name, make_node(name))
    builder.add_edge(START, NODES[0])
    for before, after in itertools.pairwise(NODES):
        builder.add_edge(before, after)
    builder.add_edge(NODES[-1], END)
    return builder


def durability_of(thread: str) -> str:
    return "sync" if int(thread.rsplit("-", 1)[1]) % 2 else "async"


def main(spec: dict) -> None:
    slot = spec["slot"]
    db = Db(spec["target"])

    def mark_done(thread: str) -> None:
        db.run(
            lambda c: c.execute(
                "UPDATE chaos_jobs SET status = 'done' WHERE thread_id = %s", [thread]
            )
        )

    def mine() -> list[str]:
        return [
            t
            for (t,) in db.run(
                lambda c: c.execute(
                    "SELECT thread_id FROM chaos_jobs WHERE slot = %s AND status = 'taken'"
                    " ORDER BY thread_id",
                    [slot],
                ).fetchall()
            )
        ]

    def claim() -> str | None:
        def work(c: psycopg.Connection[Any]) -> str | None:
            row = c.execute(
                "UPDATE chaos_jobs SET status = 'taken', slot = %s WHERE thread_id = ("
                " SELECT thread_id FROM chaos_jobs WHERE status = 'pending'"
                " ORDER BY thread_id LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING thread_id",
                [slot],
            ).fetchone()
            return row[0] if row else None

        return db.run(work)

    def left() -> int:
        return db.run(
            lambda c: c.execute("SELECT count(*) FROM chaos_jobs WHERE status <> 'done'").fetchone()
        )[0]

    with PostgresSaver.from_conn_string(spec["target"]) as saver:
        saver.lease_ttl = spec["lease_ttl"]
        graph = build(db).compile(checkpointer=saver)

        def process(thread: str) -> None:
            config = {"configurable": {"thread_id": thread}}
            run = saver.get_run(thread)
            if run is not None and run.status == "done":
                mark_done(thread)
                return
            if run is not None and run.status == "running":
                return  # held, or crashed: recover() takes it once its lease runs out
            saved = saver.get_tuple(config)
            start = None if saved is not None else {"thread": thread, "log": []}
            COUNTS["runs"] += 1
            graph.invoke(start, config, durability=durability_of(thread))
            mark_done(thread)
            COUNTS["finished"] += 1

        while True:
            try:
                report = graph.recover(max_attempts=50)  # a thread may be hit often
                COUNTS["recovered"] += len(report.resumed)
                COUNTS["recover failed"] += len(report.failed)
                COUNTS["abandoned"] += len(report.abandoned)
                for thread in report.resumed:
                    mark_done(thread)
                held = mine()
                if not held:
                    claimed = claim()
                    held = [claimed] if claimed else []
                for thread in held:
                    try:
                        process(thread)
                    except ThreadBusyError:
                        COUNTS["busy"] += 1
                    except LeaseLostError:
                        COUNTS["lease lost"] += 1
                if not held:
                    if left() == 0:
                        break
                    time.sleep(0.1)
            except (psycopg.Error, OSError) as error:
                COUNTS[f"error {type(error).__name__}"] += 1
                time.sleep(0.05)
            except Exception as error:  # a run that failed (a broken connection mid-write)
                COUNTS[f"run error {type(error).__name__}"] += 1
                time.sleep(0.05)
    print(json.dumps(dict(COUNTS)), flush=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
