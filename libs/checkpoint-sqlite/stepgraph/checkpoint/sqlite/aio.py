"""``AsyncSqliteSaver``: ``SqliteSaver``'s async twin, on an ``aiosqlite`` connection.

Same SQL, same rows, same transactions (``stepgraph.checkpoint.sqlite._plans``); plans run in
aiosqlite's connection thread, so disk I/O never blocks the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TypeVar

import aiosqlite

from stepgraph.checkpoint.base import Retention
from stepgraph.checkpoint.serde.base import SerializerProtocol
from stepgraph.checkpoint.sqlite import _plans, run_job, run_plan, setup_connection
from stepgraph.checkpoint.sqlite._schema import Synchronous
from stepgraph.checkpoint.sqlite._wal import WalCheckpoints
from stepgraph.checkpoint.storage.plans import AsyncPlanSaver, Job, Plan

__all__ = ["AsyncSqliteSaver", "arun_plan"]

T = TypeVar("T")


async def arun_plan(conn: aiosqlite.Connection, plan: Plan[T]) -> T:
    """Execute ``plan`` in ``conn``'s thread with the sync driver, in one hand-off.

    Handing over each statement would cost a thread round trip per statement (a put_step has
    five); handing over the plan costs one, and no other user of ``conn`` can slip statements
    into the plan's transaction. This uses aiosqlite's internal ``_execute``/``_conn`` (stable
    since aiosqlite 0.x; the contract tests exercise it on every run).
    """
    return await conn._execute(run_plan, conn._conn, plan)


class AsyncSqliteSaver(AsyncPlanSaver[None]):
    """A checkpoint saver on an ``aiosqlite.Connection``; create it inside the event loop.

    Each call hands its whole plan (statements and the (de)serialization between them) to
    aiosqlite's connection thread, so transactions never interleave. The sync methods (``get_tuple``,
    ``put``, ...) are for other threads: they run the async ones on the saver's loop and wait.
    Called from the loop itself they would deadlock, so they raise
    ``asyncio.InvalidStateError`` instead. Options are ``SqliteSaver``'s.
    """

    conn: aiosqlite.Connection
    plans = _plans.PLANS

    # As SqliteSaver: saving as asyncio tasks in the background was no faster than awaiting
    # each save (slower at synchronous=NORMAL), so durability="async" awaits them.
    background_saves = False

    def __init__(
        self,
        conn: aiosqlite.Connection,
        *,
        serde: SerializerProtocol | None = None,
        synchronous: Synchronous = "NORMAL",
        busy_timeout: float = 30.0,
        retention: Retention | None = None,
    ) -> None:
        super().__init__(serde=serde, retention=retention)
        self.conn = conn
        self.synchronous = synchronous
        self.busy_timeout = busy_timeout
        self.lock = asyncio.Lock()
        self.loop = asyncio.get_running_loop()
        self.is_setup = False
        self.wal: WalCheckpoints | None = None

    @classmethod
    @asynccontextmanager
    async def from_conn_string(
        cls,
        conn_string: str | Path,
        *,
        serde: SerializerProtocol | None = None,
        synchronous: Synchronous = "NORMAL",
        busy_timeout: float = 30.0,
        retention: Retention | None = None,
    ) -> AsyncIterator[AsyncSqliteSaver]:
        """A saver on a new connection to ``conn_string`` (a path or ``":memory:"``), closed
        on exit."""
        async with aiosqlite.connect(
            conn_string, isolation_level=None, timeout=busy_timeout
        ) as conn:
            yield cls(
                conn,
                serde=serde,
                synchronous=synchronous,
                busy_timeout=busy_timeout,
                retention=retention,
            )

    async def setup(self) -> None:
        """Set pragmas and create or migrate the schema. Idempotent; runs on first use."""
        async with self.lock:
            await self._setup()

    async def _setup(self) -> None:
        self.wal = await self.conn._execute(
            setup_connection, self.conn._conn, self.synchronous, self.busy_timeout
        )
        self.is_setup = True

    async def _run(self, job: Job[T, None]) -> T:
        if not self.is_setup:
            async with self.lock:
                if not self.is_setup:
                    await self._setup()
        return await self.conn._execute(run_job, self.conn._conn, job.make(), self.wal)
