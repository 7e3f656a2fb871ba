"""`make bench`: the same workloads on LangGraph and stepgraph, side by side, in one interpreter.

The parent keeps one worker process per library and sends them each cell (workload x saver x
durability) in turn, A B A B, so drift of a shared, busy machine falls on both libraries alike.
Each cell gets fresh storage: its own SQLite file, its own schema in a database made for this run.

    python bench/run.py [--quick] [--only WORKLOAD ...] [--postgres URI]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import os
import platform
import select
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import report
from backends import (
    DURABILITIES,
    SAVERS,
    Driver,
    open_saver,
    postgres_floor,
    sqlite_floor,
    sqlite_synchronous,
    storage,
    wal_bytes,
)
from psycopg.conninfo import make_conninfo
from workloads import (
    CHAIN_LENGTH,
    READS,
    WORKLOADS,
    Api,
    build_ticker,
    prepare_long_thread,
)

LIBS = ("langgraph", "stepgraph")
PACKAGES = (
    "langgraph",
    "langgraph-checkpoint",
    "langgraph-checkpoint-sqlite",
    "langgraph-checkpoint-postgres",
    "stepgraph",
    "stepgraph-checkpoint-sqlite",
    "stepgraph-checkpoint-postgres",
    "aiosqlite",
    "psycopg",
    "psycopg-binary",
    "psycopg-pool",
    "msgpack",
    "ormsgpack",
)
BENCH_DIR = Path(__file__).resolve().parent
CELL_TIMEOUT_S = 300


@dataclass
class Settings:
    rounds: int  # A B rounds per cell
    warmup: int  # untimed invocations before each cell's timed ones
    repeats: int  # timed invocations per cell and round
    other_threads: int  # threads beside the long one in the long-thread workload
    long_thread_async: bool = True  # run the long-thread reads on the async savers too
    workloads: list[str] = field(default_factory=lambda: [*WORKLOADS, "long_thread"])
    savers: list[str] = field(default_factory=lambda: list(SAVERS))
    durabilities: list[str] = field(default_factory=lambda: list(DURABILITIES))


FULL = Settings(rounds=2, warmup=3, repeats=15, other_threads=100)
QUICK = Settings(
    rounds=2,
    warmup=1,
    repeats=3,
    other_threads=20,
    long_thread_async=False,
    durabilities=["exit", "sync"],
)


# Worker side: runs cells in its own process -------------------------------------------------------


def run_cell(spec: dict[str, Any]) -> dict[str, Any]:
    kind = SAVERS[spec["saver"]]
    loop = asyncio.new_event_loop()
    stack = contextlib.AsyncExitStack()
    try:
        api = Api.load(spec["root"])
        saver = loop.run_until_complete(open_saver(spec["root"], kind, spec["target"], stack))
        driver = Driver(saver, kind.is_async, spec["durability"], loop)
        result: dict[str, Any] = {}
        if kind.backend == "sqlite":
            result["synchronous"] = loop.run_until_complete(sqlite_synchronous(saver))
        if spec["workload"] == "long_thread":
            result.update(long_thread(api, saver, driver, spec))
        else:
            result.update(invocations(api, saver, driver, spec))
        return result
    finally:
        loop.run_until_complete(stack.aclose())
        loop.close()


def invocations(api: Api, saver: Any, driver: Driver, spec: dict[str, Any]) -> dict[str, Any]:
    workload = WORKLOADS[spec["workload"]]
    backend = SAVERS[spec["saver"]].backend
    graph = workload.build(api, saver)
    workload.prepare(graph, driver)
    for i in range(spec["warmup"]):
        workload.run(graph, driver, f"warmup-{i}")
    before = storage(backend, spec["target"])  # folds the WAL (SQLite): it starts empty
    samples = [workload.run(graph, driver, f"timed-{i}") for i in range(spec["repeats"])]
    wal = wal_bytes(spec["target"]) if backend == "sqlite" else None
    after = storage(backend, spec["target"])
    result: dict[str, Any] = {
        "ns": [s.ns for s in samples],
        "unit": workload.unit,
        "units": samples[0].units,
        "commits": samples[0].commits,
        "extra": {k: [s.extra[k] for s in samples] for k in samples[0].extra},
    }
    if wal is not None:
        result["wal_bytes"] = wal
    if before and after:
        result["rows"] = (after[0] - before[0]) / len(samples)
        result["bytes"] = (after[1] - before[1]) / len(samples)
    return result


def long_thread(api: Api, saver: Any, driver: Driver, spec: dict[str, Any]) -> dict[str, Any]:
    graph = build_ticker(api, saver)
    checkpoints = prepare_long_thread(graph, driver, spec["other_threads"])
    reads: dict[str, list[int]] = {}
    for name, read in READS.items():
        for _ in range(spec["warmup"]):
            read(graph, driver, "long")
            read(graph, driver, "short")
        for _ in range(spec["repeats"]):  # long and short interleaved, so drift hits both
            for thread in ("long", "short"):
                reads.setdefault(f"{name} {thread}", []).append(read(graph, driver, thread)[0])
    return {"checkpoints": checkpoints, "reads": reads}


def worker() -> None:
    # Replies go to a private copy of stdout; anything a library prints goes to stderr.
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    for line in sys.stdin:
        try:
            result = run_cell(json.loads(line))
        except Exception as error:
            where = traceback.extract_tb(error.__traceback__)[-1]
            place = f"{Path(where.filename).name}:{where.lineno}"
            result = {"error": f"{type(error).__name__}: {error}"[:400] + f" (at {place})"}
        replies.write(json.dumps(result) + "\n")
        replies.flush()


# Parent side -------------------------------------------------------------------------------------


class Worker:
    """One long-lived worker process per library; restarted if it dies or hangs."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.proc: subprocess.Popen[str] | None = None

    def run(self, spec: dict[str, Any]) -> dict[str, Any]:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen(
                [sys.executable, __file__, "--worker"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps({**spec, "root": self.root}) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], CELL_TIMEOUT_S)
        line = self.proc.stdout.readline() if ready else ""
        if line:
            return json.loads(line)
        self.stop()
        return {"error": f"timed out after {CELL_TIMEOUT_S} s" if not ready else "worker died"}

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def plan(settings: Settings, postgres: bool) -> list[dict[str, str]]:
    cells = []
    for workload in settings.workloads:
        for saver in settings.savers:
            kind = SAVERS[saver]
            if kind.backend == "postgres" and not postgres:
                continue
            if workload == "long_thread" and kind.is_async and not settings.long_thread_async:
                continue
            if kind.synchronous and workload != "chain":
                continue  # the matched-fsync SQLite cells are for the per-step verdicts only
            if kind.backend == "none" and (
                workload == "long_thread" or WORKLOADS[workload].needs_checkpointer
            ):
                continue
            # Durability only matters with a checkpointer, and not at all for pure reads; the
            # chain always runs all three, as the verdicts compare them.
            if kind.backend == "none" or workload == "long_thread":
                durabilities = ["sync"]
            else:
                durabilities = list(DURABILITIES) if workload == "chain" else settings.durabilities
            cells += [{"workload": workload, "saver": saver, "durability": d} for d in durabilities]
    return cells


@contextlib.contextmanager
def bench_database(uri: str) -> Iterator[tuple[str | None, str]]:
    """(conninfo of a database of this run's own, dropped at the end, ""), or (None, why Postgres
    cannot be used)."""
    try:
        admin = psycopg.connect(uri, autocommit=True)
    except psycopg.OperationalError as error:
        reason = f"Postgres not reachable at {uri}: {str(error).strip().splitlines()[0]}"
        print(f"{reason}; its cells are skipped", file=sys.stderr)
        yield None, reason
        return
    name = f"stepgraph_bench_{time.strftime('%Y%m%d_%H%M%S')}_{os.getpid()}"
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_conninfo(uri, dbname=name), ""
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def postgres_schema(dbinfo: str, schema: str) -> str:
    with psycopg.connect(dbinfo, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    return make_conninfo(dbinfo, options=f"-c search_path={schema}")


def measure_floors(
    tmp: Path, dbinfo: str | None, settings: Settings, tag: str
) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """The raw floors, each loop as long as one round of a chain cell at durability "sync": as
    many untimed then timed commits as that cell's warm-up and timed invocations have supersteps,
    on a fresh file (schema) per round. A saver's commit writes more WAL pages than the floor's
    one row, so the WAL's size at the end of each SQLite loop is returned too, beside the timed
    samples, for the report to set against the cells' own."""
    floors: dict[str, list[int]] = {}
    wal: dict[str, list[int]] = {}
    warmup, n = settings.warmup * CHAIN_LENGTH, settings.repeats * CHAIN_LENGTH
    for round_ in range(settings.rounds):
        for synchronous in ("NORMAL", "FULL"):
            name = f"sqlite {synchronous}"
            path = tmp / f"floor-{tag}-{round_}-{synchronous}.sqlite"
            samples, size = sqlite_floor(str(path), synchronous, warmup, n)
            floors.setdefault(name, []).extend(samples)
            wal.setdefault(name, []).append(size)
        if dbinfo:
            schema = postgres_schema(dbinfo, f"floor_{tag}_{round_}")
            floors.setdefault("postgres", []).extend(postgres_floor(schema, warmup, n))
    return floors, wal


def machine(dbinfo: str | None) -> dict[str, Any]:
    cpu = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else platform.processor()
    )
    info: dict[str, Any] = {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "loadavg_at_start": os.getloadavg(),
        "packages": {},
    }
    for package in PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            info["packages"][package] = importlib.metadata.version(package)
    if dbinfo:
        with psycopg.connect(dbinfo) as conn:
            settings = ("server_version", "fsync", "synchronous_commit", "wal_sync_method")
            info["postgres"] = {s: conn.execute(f"SHOW {s}").fetchone()[0] for s in settings}  # type: ignore[index]
    info["libpq"] = psycopg.pq.version()
    git = subprocess.run(
        ["git", "-C", str(BENCH_DIR), "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
    )
    dirty = subprocess.run(
        ["git", "-C", str(BENCH_DIR), "status", "--porcelain"], capture_output=True, text=True
    )
    info["stepgraph_commit"] = git.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    return info


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer repeats, for a pass under two minutes"
    )
    parser.add_argument(
        "--only", nargs="+", choices=[*WORKLOADS, "long_thread"], help="run only these workloads"
    )
    parser.add_argument(
        "--postgres",
        default=os.environ.get("BENCH_POSTGRES_URI", "postgresql://postgres@127.0.0.1:5432/test"),
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker()

    settings = QUICK if args.quick else FULL
    if args.only:
        settings.workloads = args.only
    started = time.time()
    workers = {lib: Worker(lib) for lib in LIBS}
    tmp = Path(tempfile.mkdtemp(prefix="stepgraph-bench-"))
    with bench_database(args.postgres) as (dbinfo, postgres_skipped):
        try:
            results: dict[str, Any] = {
                "mode": "quick" if args.quick else "full",
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                "machine": machine(dbinfo),
                "settings": asdict(settings),
                "postgres_skipped": postgres_skipped,
                "cells": [],
            }
            floors, floor_wal = measure_floors(tmp, dbinfo, settings, "start")
            cells = plan(settings, dbinfo is not None)
            for number, cell in enumerate(cells, 1):
                cell_started = time.time()
                rounds: dict[str, list[dict[str, Any]]] = {lib: [] for lib in LIBS}
                for round_ in range(settings.rounds):
                    for lib in LIBS:  # A B A B
                        if rounds[lib] and "error" in rounds[lib][-1]:
                            continue  # a cell that failed once is not retried
                        spec = {
                            **cell,
                            "target": cell_target(cell, tmp, dbinfo, f"c{number}_{lib}_{round_}"),
                            "warmup": settings.warmup,
                            "repeats": settings.repeats,
                            "other_threads": settings.other_threads,
                        }
                        rounds[lib].append(workers[lib].run(spec))
                results["cells"].append({**cell, **{lib: merge(rounds[lib]) for lib in LIBS}})
                took = time.time() - cell_started
                print(
                    f"[{number}/{len(cells)}, {took:.1f} s] {report.progress_line(results['cells'][-1])}",
                    file=sys.stderr,
                )
            end_floors, end_wal = measure_floors(tmp, dbinfo, settings, "end")
            for name, samples in end_floors.items():
                floors[name] += samples
            for name, sizes in end_wal.items():
                floor_wal[name] += sizes
            results["floors"] = floors
            results["floor_wal_bytes"] = floor_wal
            results["floor_commits"] = {
                "warmup": settings.warmup * CHAIN_LENGTH,
                "timed": settings.repeats * CHAIN_LENGTH,
                "loops": 2 * settings.rounds,
            }
        finally:
            for w in workers.values():
                w.stop()
            shutil.rmtree(tmp, ignore_errors=True)
    results["duration_s"] = round(time.time() - started, 1)
    out = (
        BENCH_DIR
        / "results"
        / f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(started))}-{results['mode']}.json"
    )
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(report.markdown(results))
    where = out.relative_to(BENCH_DIR.parent)
    print(
        f"\nRaw results: {where} ({results['duration_s']} s); README table: bench/summary.py {where}"
    )


def cell_target(cell: dict[str, str], tmp: Path, dbinfo: str | None, tag: str) -> str:
    backend = SAVERS[cell["saver"]].backend
    if backend == "sqlite":
        return str(tmp / f"{tag}.sqlite")
    if backend == "postgres" and dbinfo:
        return postgres_schema(dbinfo, tag)
    return ""


def merge(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One library's rounds of a cell as one result: samples pooled, storage averaged."""
    ok = [r for r in rounds if "error" not in r]
    if not ok:
        return {"error": rounds[0]["error"]}
    pooled = ("ns", "reads", "rows", "bytes", "extra", "wal_bytes")
    merged: dict[str, Any] = {k: v for k, v in ok[-1].items() if k not in pooled}
    if "ns" in ok[0]:
        merged["ns"] = [ns for r in ok for ns in r["ns"]]
    if "extra" in ok[0]:
        merged["extra"] = {k: [x for r in ok for x in r["extra"][k]] for k in ok[0]["extra"]}
    if "wal_bytes" in ok[0]:
        merged["wal_bytes"] = [r["wal_bytes"] for r in ok]
    if "reads" in ok[0]:
        merged["reads"] = {k: [ns for r in ok for ns in r["reads"][k]] for k in ok[0]["reads"]}
    for key in ("rows", "bytes"):
        if key in ok[0]:
            merged[key] = sum(r[key] for r in ok) / len(ok)
    return merged


if __name__ == "__main__":
    main()
