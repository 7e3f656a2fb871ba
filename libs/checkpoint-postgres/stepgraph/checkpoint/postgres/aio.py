"""``AsyncPostgresSaver``: ``PostgresSaver``'s async twin, on psycopg's async connections.

Same SQL, same rows, same transaction rules (``stepgraph.checkpoint.postgres._plans``); only the
I/O is awaited.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from psycopg import AsyncConnection, AsyncCursor
from psycopg.pq import TransactionStatus
from psycopg_pool import AsyncConnectionPool

from stepgraph.checkpoint.base import Retention
from stepgraph.checkpoint.postgres import _plans
from stepgraph.checkpoint.postgres._plans import Scope
from stepgraph.checkpoint.serde.base import SerializerProtocol
from stepgraph.checkpoint.storage.plans import AsyncPlanSaver, Job, Plan, Statement, arun_steps

__all__ = ["AsyncPostgresSaver", "arun_plan"]

T = TypeVar("T")

_UNFINISHED = (TransactionStatus.INTRANS, TransactionStatus.INERROR)


async def arun_plan(conn: AsyncConnection[Any], plan: Plan[T], scope: Scope) -> T:
    """Execute ``plan`` on ``conn`` in the transaction ``scope`` asks for (see ``run_plan``)."""
    cursor: AsyncCursor[Any] = _plans.cursor_of(conn)
    if conn.info.transaction_status != TransactionStatus.IDLE:
        async with conn.transaction():  # a savepoint in the caller's transaction
            return await _steps(cursor, plan)
    autocommit = conn.autocommit
    if not autocommit:  # as in ``run_plan``: setting it costs a lock and a wait
        await conn.set_autocommit(True)
    try:
        if (first := _plans.begin(scope)) is None:
            return await _steps(cursor, plan)
        async with conn.pipeline():
            await cursor.execute(first.sql)
            result = await _steps(cursor, plan)
            await cursor.execute(_plans.COMMIT.sql)
        return result
    finally:
        if conn.info.transaction_status in _UNFINISHED:  # failed or interrupted
            await conn.rollback()
        if not autocommit and conn.info.transaction_status == TransactionStatus.IDLE:
            await conn.set_autocommit(autocommit)


async def _steps(cursor: AsyncCursor[Any], plan: Plan[T]) -> T:
    pending: list[tuple[Statement, AsyncCursor[Any]]] = []  # as in ``PostgresSaver``'s

    async def execute(statement: Statement) -> list[Any]:
        if pending and pending[0][0] is statement:
            ahead_cursor = pending.pop(0)[1]
            return await ahead_cursor.fetchall() if statement.fetch else []
        pending.clear()
        if statement.ahead is None:
            await cursor.execute(statement.sql, statement.params)
        else:
            pending[:] = _plans.sent_ahead(cursor.connection, statement)
            async with cursor.connection.pipeline():
                await cursor.execute(statement.sql, statement.params)
                for ahead, ahead_cursor in pending:
                    await ahead_cursor.execute(ahead.sql, ahead.params)
        return await cursor.fetchall() if statement.fetch else []

    return await arun_steps(plan, execute)


class AsyncPostgresSaver(AsyncPlanSaver[Scope]):
    """A checkpoint saver on a ``psycopg.AsyncConnection`` or a
    ``psycopg_pool.AsyncConnectionPool``; create it inside the event loop.

    Connections, transactions and retries behave as ``PostgresSaver``'s. The sync methods
    (``get_tuple``, ``put``, ...) are for other threads: they run the async ones on the saver's
    loop and wait. Called from the loop itself they would deadlock, so they raise
    ``asyncio.InvalidStateError`` instead.
    """

    conn: AsyncConnection[Any] | AsyncConnectionPool[Any]
    plans = _plans.PLANS

    def __init__(
        self,
        conn: AsyncConnection[Any] | AsyncConnectionPool[Any],
        *,
        serde: SerializerProtocol | None = None,
        retention: Retention | None = None,
    ) -> None:
        super().__init__(serde=serde, retention=retention)
        self.conn = conn
        self.lock = asyncio.Lock()
        self.loop = asyncio.get_running_loop()
        self.is_setup = False

    @classmethod
    @asynccontextmanager
    async def from_conn_string(
        cls,
        conn_string: str,
        *,
        pool: Mapping[str, Any] | None = None,
        prepare_threshold: int | None = 0,
        serde: SerializerProtocol | None = None,
        retention: Retention | None = None,
    ) -> AsyncIterator[AsyncPostgresSaver]:
        """A saver on a new ``AsyncConnectionPool`` to ``conn_string``, closed on exit.

        Options are ``PostgresSaver.from_conn_string``'s.
        """
        connections: AsyncConnectionPool[Any] = AsyncConnectionPool(
            **_plans.pool_options(conn_string, pool, prepare_threshold)
        )
        try:
            await connections.open(wait=True, timeout=connections.timeout)
            yield cls(connections, serde=serde, retention=retention)
        finally:
            await connections.close()

    async def setup(self) -> None:
        """Create or migrate the schema. Idempotent, and safe to call from many processes at
        once (they serialize on an advisory lock); runs on first use anyway."""
        await self._execute(_plans.setup, Scope.TRANSACTION)
        self.is_setup = True

    async def _execute(self, make_plan: Callable[[], Plan[T]], scope: Scope) -> T:
        attempt = 0
        while True:
            attempt += 1
            owned = broken = False
            try:
                if isinstance(self.conn, AsyncConnectionPool):
                    async with self.conn.connection() as conn:
                        owned = conn.info.transaction_status == TransactionStatus.IDLE
                        try:
                            return await arun_plan(conn, make_plan(), scope)
                        finally:
                            broken = conn.broken
                async with self.lock:
                    owned = self.conn.info.transaction_status == TransactionStatus.IDLE
                    return await arun_plan(self.conn, make_plan(), scope)
            except Exception as error:
                if not _plans.should_retry(error, attempt, owned=owned, broken=broken):
                    raise
                if broken and isinstance(self.conn, AsyncConnectionPool):
                    await self.conn.check()  # the other idle connections are likely broken too

    async def _run(self, job: Job[T, Scope]) -> T:
        if not self.is_setup:
            await self.setup()
        return await self._execute(job.make, job.scope)
