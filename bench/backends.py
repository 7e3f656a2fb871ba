"""Where checkpoints go: opening each saver, calling graphs through it, measuring what it stored,
and the raw one-commit-per-step floors of SQLite and Postgres."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

import psycopg

PAYLOAD = b"\x01" * 512  # the row each raw-floor iteration inserts


@dataclass(frozen=True)
class SaverKind:
    name: str
    module: str  # under the import root; "" for no checkpointer
    backend: str  # "none", "memory", "sqlite" or "postgres"
    is_async: bool = False
    # Forces SQLite's PRAGMA synchronous on both libraries, so their commits pay the same fsyncs.
    synchronous: str | None = None

    @property
    def label(self) -> str:
        return f"{self.name} {self.synchronous}" if self.synchronous else self.name


SAVERS = {
    s.label: s
    for s in [
        SaverKind("none", "", "none"),
        SaverKind("InMemorySaver", "checkpoint.memory", "memory"),
        SaverKind("SqliteSaver", "checkpoint.sqlite", "sqlite"),
        SaverKind("AsyncSqliteSaver", "checkpoint.sqlite.aio", "sqlite", is_async=True),
        SaverKind("SqliteSaver", "checkpoint.sqlite", "sqlite", synchronous="FULL"),
        SaverKind("AsyncSqliteSaver", "checkpoint.sqlite.aio", "sqlite", True, synchronous="FULL"),
        SaverKind("PostgresSaver", "checkpoint.postgres", "postgres"),
        SaverKind("AsyncPostgresSaver", "checkpoint.postgres.aio", "postgres", is_async=True),
    ]
}
DURABILITIES = ("exit", "async", "sync")


async def open_saver(
    root: str, kind: SaverKind, target: str, stack: contextlib.AsyncExitStack
) -> Any:
    """Opens the saver on `target` (a SQLite path or a Postgres conninfo) and sets it up."""
    if kind.backend == "none":
        return None
    cls = getattr(importlib.import_module(f"{root}.{kind.module}"), kind.name)
    if kind.backend == "memory":
        return cls()
    if kind.is_async:
        saver = await stack.enter_async_context(cls.from_conn_string(target))
        await saver.setup()
        if kind.synchronous:
            await saver.conn.execute(f"PRAGMA synchronous={kind.synchronous}")
    else:
        saver = stack.enter_context(cls.from_conn_string(target))
        saver.setup()
        if kind.synchronous:
            saver.conn.execute(f"PRAGMA synchronous={kind.synchronous}")
    return saver


async def sqlite_synchronous(saver: Any) -> str | None:
    """The saver connection's `PRAGMA synchronous`, when the saver exposes its connection."""
    conn = getattr(saver, "conn", None)
    if isinstance(conn, sqlite3.Connection):
        value = conn.execute("PRAGMA synchronous").fetchone()[0]
    elif conn is not None and hasattr(conn, "execute"):  # aiosqlite
        async with conn.execute("PRAGMA synchronous") as cursor:
            value = (await cursor.fetchone())[0]
    else:
        return None
    return {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}.get(value, str(value))


class Driver:
    """Calls graphs with sync methods, or with async ones on `loop` for an async saver."""

    def __init__(
        self, saver: Any, is_async: bool, durability: str, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.saver = saver
        self.is_async = is_async
        self.durability = durability
        self.loop = loop

    def _config(
        self, thread_id: str, kwargs: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        config: dict[str, Any] = {"configurable": {"thread_id": thread_id}}
        if "recursion_limit" in kwargs:
            config["recursion_limit"] = kwargs.pop("recursion_limit")
        if self.saver is not None:  # durability means nothing (and warns) without a checkpointer
            kwargs.setdefault("durability", self.durability)
        return config, kwargs

    def invoke(self, graph: Any, graph_input: Any, thread_id: str, **kwargs: Any) -> int:
        config, kwargs = self._config(thread_id, kwargs)
        if self.is_async:
            return self.loop.run_until_complete(
                _timed(graph.ainvoke(graph_input, config, **kwargs))
            )[0]
        start = time.perf_counter_ns()
        graph.invoke(graph_input, config, **kwargs)
        return time.perf_counter_ns() - start

    def get_state(self, graph: Any, thread_id: str) -> tuple[int, Any]:
        config = {"configurable": {"thread_id": thread_id}}
        if self.is_async:
            return self.loop.run_until_complete(_timed(graph.aget_state(config)))
        start = time.perf_counter_ns()
        state = graph.get_state(config)
        return time.perf_counter_ns() - start, state

    def list_checkpoints(self, graph: Any, thread_id: str, limit: int) -> tuple[int, list[Any]]:
        config = {"configurable": {"thread_id": thread_id}}
        if self.is_async:
            return self.loop.run_until_complete(
                _timed(_collect(self.saver.alist(config, limit=limit)))
            )
        start = time.perf_counter_ns()
        found = list(self.saver.list(config, limit=limit))
        return time.perf_counter_ns() - start, found

    def get_state_history(self, graph: Any, thread_id: str, limit: int) -> tuple[int, list[Any]]:
        config = {"configurable": {"thread_id": thread_id}}
        if self.is_async:
            history = graph.aget_state_history(config, limit=limit)
            return self.loop.run_until_complete(_timed(_collect(history)))
        start = time.perf_counter_ns()
        found = list(graph.get_state_history(config, limit=limit))
        return time.perf_counter_ns() - start, found


async def _timed(awaitable: Any) -> tuple[int, Any]:
    # Timed inside the loop, so run_until_complete's own cost stays out of the figure.
    start = time.perf_counter_ns()
    result = await awaitable
    return time.perf_counter_ns() - start, result


async def _collect(items: Any) -> list[Any]:
    return [item async for item in items]


# What a saver stored -----------------------------------------------------------------------------


def sqlite_storage(path: str) -> tuple[int, int]:
    """Rows in all tables, and bytes on disk after folding the WAL into the database file."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        # A TRUNCATE checkpoint gives up (busy) while another connection checkpoints, as the
        # saver's background pass may be doing right now: try again until it folds the WAL,
        # or the log would count as bytes (and a later fold as negative bytes).
        for _ in range(200):
            busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
            if not busy:
                break
            time.sleep(0.01)
        tables = conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        ).fetchall()
        rows = sum(conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for (t,) in tables)
    # A reader still open elsewhere can keep part of the WAL from folding: count what is left.
    wal = path + "-wal"
    return rows, os.path.getsize(path) + (os.path.getsize(wal) if os.path.exists(wal) else 0)


def postgres_storage(conninfo: str) -> tuple[int, int]:
    """Rows in the tables of the connection's schema, and their pg_total_relation_size."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        tables = conn.execute(
            "SELECT c.oid::regclass::text, pg_total_relation_size(c.oid) FROM pg_class c"
            " WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind IN ('r', 'p')"
        ).fetchall()
        rows = 0
        for name, _size in tables:
            count = conn.execute(f"SELECT count(*) FROM {name}").fetchone()
            rows += count[0] if count else 0
    return rows, sum(size for _name, size in tables)


def storage(backend: str, target: str) -> tuple[int, int] | None:
    if backend == "sqlite":
        return sqlite_storage(target)
    if backend == "postgres":
        return postgres_storage(target)
    return None


# Raw floors: one INSERT + COMMIT per iteration -----------------------------------------------------


def wal_bytes(path: str) -> int:
    """Size of the database's WAL file. SQLite reuses the WAL from its start after each automatic
    checkpoint (every 1,000 pages by default), so about 4 MB here means checkpoints happened."""
    wal = path + "-wal"
    return os.path.getsize(wal) if os.path.exists(wal) else 0


def sqlite_floor(
    path: str, synchronous: str, warmup: int, iterations: int
) -> tuple[list[int], int]:
    """Timed commits on a fresh file, and the WAL's size at the end (before closing)."""
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={synchronous}")
        conn.execute("CREATE TABLE floor (id INTEGER PRIMARY KEY, v BLOB)")
        samples = []
        for _ in range(warmup + iterations):
            start = time.perf_counter_ns()
            conn.execute("BEGIN")
            conn.execute("INSERT INTO floor (v) VALUES (?)", (PAYLOAD,))
            conn.execute("COMMIT")
            samples.append(time.perf_counter_ns() - start)
        wal = wal_bytes(path)
    return samples[warmup:], wal


def postgres_floor(conninfo: str, warmup: int, iterations: int) -> list[int]:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("CREATE TABLE floor (id bigserial PRIMARY KEY, v bytea)")
        samples = []
        for _ in range(warmup + iterations):
            start = time.perf_counter_ns()
            conn.execute("INSERT INTO floor (v) VALUES (%s)", (PAYLOAD,))
            samples.append(time.perf_counter_ns() - start)
    return samples[warmup:]
