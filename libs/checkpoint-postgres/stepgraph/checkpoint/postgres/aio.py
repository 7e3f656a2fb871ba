"""``AsyncPostgresSaver``: ``PostgresSaver``'s async twin, on psycopg's async connections.

Same SQL, same rows, same transaction rules (``stepgraph.checkpoint.postgres._plans``); only the
I/O is awaited.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any, TypeVar

from psycopg import AsyncConnection, AsyncCursor
from psycopg.pq import TransactionStatus
from psycopg_pool import AsyncConnectionPool

from stepgraph.checkpoint.base import (
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
    PruneStrategy,
    SyncFromAsyncSaver,
    TaskWrites,
)
from stepgraph.checkpoint.postgres import _plans
from stepgraph.checkpoint.postgres._plans import Scope
from stepgraph.checkpoint.serde.base import SerializerProtocol
from stepgraph.checkpoint.storage import ListPager
from stepgraph.checkpoint.storage.plans import Plan, Statement, arun_steps
from stepgraph.config import RunnableConfig

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
        if conn.info.transaction_status == TransactionStatus.IDLE:
            await conn.set_autocommit(autocommit)


async def _steps(cursor: AsyncCursor[Any], plan: Plan[T]) -> T:
    async def execute(statement: Statement) -> list[Any]:
        await cursor.execute(statement.sql, statement.params)
        return await cursor.fetchall() if statement.fetch else []

    return await arun_steps(plan, execute)


class AsyncPostgresSaver(SyncFromAsyncSaver):
    """A checkpoint saver on a ``psycopg.AsyncConnection`` or a
    ``psycopg_pool.AsyncConnectionPool``; create it inside the event loop.

    Connections, transactions and retries behave as ``PostgresSaver``'s. The sync methods
    (``get_tuple``, ``put``, ...) are for other threads: they run the async ones on the saver's
    loop and wait. Called from the loop itself they would deadlock, so they raise
    ``asyncio.InvalidStateError`` instead.
    """

    conn: AsyncConnection[Any] | AsyncConnectionPool[Any]

    def __init__(
        self,
        conn: AsyncConnection[Any] | AsyncConnectionPool[Any],
        *,
        serde: SerializerProtocol | None = None,
    ) -> None:
        super().__init__(serde=serde)
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
    ) -> AsyncIterator[AsyncPostgresSaver]:
        """A saver on a new ``AsyncConnectionPool`` to ``conn_string``, closed on exit.

        Options are ``PostgresSaver.from_conn_string``'s.
        """
        connections: AsyncConnectionPool[Any] = AsyncConnectionPool(
            **_plans.pool_options(conn_string, pool, prepare_threshold)
        )
        try:
            await connections.open(wait=True, timeout=connections.timeout)
            yield cls(connections, serde=serde)
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

    async def _run(self, make_plan: Callable[[], Plan[T]], scope: Scope = Scope.STATEMENT) -> T:
        if not self.is_setup:
            await self.setup()
        return await self._execute(make_plan, scope)

    # -- reading -----------------------------------------------------------------------------

    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        return await self._run(lambda: _plans.get_tuple(self.serde, config))

    async def alist(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[CheckpointTuple]:
        pager = ListPager(config, filter, before, limit)
        page = functools.partial(_plans.list_page, self.serde)
        async for found in pager.arun(lambda query: self._run(functools.partial(page, query))):
            yield found

    # -- writing -----------------------------------------------------------------------------

    async def aput(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        return await self.aput_step(config, (), checkpoint, metadata, new_versions)

    async def aput_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        await self.aput_writes_batch(config, [TaskWrites(task_id, writes, task_path)])

    async def aput_writes_batch(self, config: RunnableConfig, writes: Sequence[TaskWrites]) -> None:
        statement = _plans.put_writes(self.serde, config, writes)
        if statement is not None:
            await self._run(lambda: _plans.execute(statement))

    async def aput_step(
        self,
        config: RunnableConfig,
        writes: Sequence[TaskWrites],
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        plan, saved = _plans.put_step(
            self.serde, config, writes, checkpoint, metadata, new_versions
        )
        await self._run(plan)
        return saved

    # -- thread management -------------------------------------------------------------------

    async def adelete_thread(self, thread_id: str) -> None:
        await self._run(lambda: _plans.delete_threads([thread_id]))

    async def acopy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        await self._run(lambda: _plans.copy_thread(source_thread_id, target_thread_id))

    async def adelete_for_runs(self, run_ids: Sequence[str]) -> None:
        await self._run(lambda: _plans.delete_for_runs(self.serde, run_ids), Scope.TRANSACTION)

    async def aprune(
        self,
        thread_ids: Sequence[str],
        *,
        strategy: PruneStrategy = "keep_latest",
        keep_last: int | None = None,
        older_than: timedelta | None = None,
    ) -> None:
        await self._run(
            lambda: _plans.prune(self.serde, thread_ids, strategy, keep_last, older_than),
            _plans.prune_scope(strategy),
        )
