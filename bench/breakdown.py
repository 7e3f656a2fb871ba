"""Where a stepgraph step's time goes: the bench's 20-node chain at durability "sync", with every
statement the saver sends timed by its kind, and the rest (the executor, building and
serializing the rows, the saver's own Python) as one figure.

    .venv-bench/bin/python bench/breakdown.py [--invocations N] [--postgres URI]

SQLite runs on a fresh file at NORMAL and at FULL; Postgres (when reachable) on a fresh schema
of the server. Each statement's time is the call into the driver up to its rows (for Postgres
that includes the round trip and psycopg adapting the parameters). Nothing here is compared
with LangGraph: `run.py` does that.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from workloads import Api, build_chain

Timings = dict[str, list[int]]


def kind_of(sql: str) -> str:
    """A statement's kind: its first words, enough to tell the saver's statements apart."""
    words = " ".join(sql.split()).replace("(", " ").split()
    if words[:1] == ["WITH"]:  # the Postgres step statement and its kin: name the first write
        for i, word in enumerate(words):
            if word in ("INSERT", "UPDATE", "DELETE") and i + 2 < len(words):
                return f"WITH ... {word} {words[i + 2]}"
    return " ".join(words[:4])[:60]


class TimedSqlite:
    """A sqlite3 connection whose execute/executemany calls are timed by statement kind."""

    def __init__(self, conn: sqlite3.Connection, timings: Timings) -> None:
        self._conn = conn
        self._timings = timings

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    def execute(self, sql: str, params: Any = ()) -> Any:
        start = time.perf_counter_ns()
        rows = self._conn.execute(sql, params).fetchall()
        self._timings[kind_of(sql)].append(time.perf_counter_ns() - start)
        return _Rows(rows)

    def executemany(self, sql: str, params: Any) -> Any:
        start = time.perf_counter_ns()
        cursor = self._conn.executemany(sql, params)
        self._timings["many " + kind_of(sql)].append(time.perf_counter_ns() - start)
        return cursor


class _Rows:
    def __init__(self, rows: list[Any]) -> None:
        self._rows = rows

    def fetchall(self) -> list[Any]:
        return self._rows

    def fetchone(self) -> Any:
        return self._rows[0] if self._rows else None

    def __iter__(self) -> Iterator[Any]:
        return iter(self._rows)


@contextlib.contextmanager
def timed_postgres(timings: Timings) -> Iterator[None]:
    """Time each statement the Postgres saver runs (its one place that executes them)."""
    import stepgraph.checkpoint.postgres as module

    original = module._steps

    def steps(cursor: Any, plan: Any) -> Any:
        def execute(statement: Any) -> list[Any]:
            start = time.perf_counter_ns()
            cursor.execute(statement.sql, statement.params)
            rows = cursor.fetchall() if statement.fetch else []
            timings[kind_of(statement.sql)].append(time.perf_counter_ns() - start)
            return rows

        return module.run_steps(plan, execute)

    module._steps = steps
    try:
        yield
    finally:
        module._steps = original


def measure(saver: Any, invocations: int, timings: Timings) -> tuple[float, int]:
    """Warm up, then time ``invocations`` runs of the chain; returns (ns, supersteps)."""
    graph = build_chain(Api.load("stepgraph"), saver)
    for i in range(5):
        graph.invoke({"x": 0, "log": []}, {"configurable": {"thread_id": f"warm-{i}"}})
    timings.clear()
    steps = 0
    start = time.perf_counter_ns()
    for i in range(invocations):
        config = {"configurable": {"thread_id": f"timed-{i}"}}
        graph.invoke({"x": 0, "log": []}, config, durability="sync")
        steps += 20
    return time.perf_counter_ns() - start, steps


def report(title: str, total_ns: float, steps: int, timings: Timings) -> None:
    per_step = total_ns / steps / 1000
    in_statements = sum(sum(samples) for samples in timings.values()) / steps / 1000
    print(f"\n### {title}: {per_step:.1f} µs per superstep\n")
    print("| statement | calls/step | µs/step | median µs | p99 µs |")
    print("|---|---|---|---|---|")
    ordered = sorted(timings.items(), key=lambda item: -sum(item[1]))
    for kind, samples in ordered:
        share = sum(samples) / steps / 1000
        if share < 0.05:
            continue
        ordered_samples = sorted(samples)
        p99 = ordered_samples[int(len(ordered_samples) * 0.99)]
        print(
            f"| `{kind}` | {len(samples) / steps:.2f} | {share:.1f} "
            f"| {statistics.median(samples) / 1000:.1f} | {p99 / 1000:.1f} |"
        )
    print(
        f"| everything else (executor, rows, serialization) | - | {per_step - in_statements:.1f} | - | - |"
    )


def sqlite_breakdown(invocations: int) -> None:
    from stepgraph.checkpoint.sqlite import SqliteSaver

    for synchronous in ("NORMAL", "FULL"):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "breakdown.sqlite")
            timings: Timings = collections.defaultdict(list)
            conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            try:
                saver = SqliteSaver(TimedSqlite(conn, timings), synchronous=synchronous)  # type: ignore[arg-type]
                total, steps = measure(saver, invocations, timings)
            finally:
                conn.close()
            report(f"SqliteSaver, synchronous={synchronous}", total, steps, timings)


def postgres_breakdown(invocations: int, uri: str) -> None:
    import psycopg
    from psycopg.conninfo import make_conninfo

    from stepgraph.checkpoint.postgres import PostgresSaver

    schema = f"breakdown_{uuid.uuid4().hex[:8]}"
    try:
        with psycopg.connect(uri, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
    except psycopg.OperationalError as error:
        print(f"\n(Postgres left out: {str(error).strip().splitlines()[0]})")
        return
    try:
        timings: Timings = collections.defaultdict(list)
        conninfo = make_conninfo(uri, options=f"-c search_path={schema}")
        with PostgresSaver.from_conn_string(conninfo) as saver, timed_postgres(timings):
            total, steps = measure(saver, invocations, timings)
        report("PostgresSaver", total, steps, timings)
    finally:
        with psycopg.connect(uri, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--invocations", type=int, default=100)
    parser.add_argument(
        "--postgres",
        default=os.environ.get("BENCH_POSTGRES_URI", "postgresql://postgres@127.0.0.1:5432/test"),
    )
    args = parser.parse_args()
    print(f"{args.invocations} invocations of the 20-node chain per saver, durability sync.")
    sqlite_breakdown(args.invocations)
    postgres_breakdown(args.invocations, args.postgres)


if __name__ == "__main__":
    main()
