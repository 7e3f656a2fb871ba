"""``AsyncSqliteSaver``: ``SqliteSaver``'s async twin, on an ``aiosqlite`` connection.

Same SQL, same rows, same transactions (``stepgraph.checkpoint.sqlite._plans``); plans run in
aiosqlite's connection thread, so disk I/O never blocks the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from stepgraph.checkpoint.base import (
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
    PruneStrategy,
    SyncFromAsyncSaver,
    TaskWrites,
)
from stepgraph.checkpoint.serde.base import SerializerProtocol
from stepgraph.checkpoint.sqlite import _plans, run_plan
from stepgraph.checkpoint.sqlite._schema import Synchronous
from stepgraph.checkpoint.storage import ListPager
from stepgraph.checkpoint.storage.plans import Plan
from stepgraph.config import RunnableConfig

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


class AsyncSqliteSaver(SyncFromAsyncSaver):
    """A checkpoint saver on an ``aiosqlite.Connection``; create it inside the event loop.

    Each call hands its whole plan (statements and the (de)serialization between them) to
    aiosqlite's connection thread, so transactions never interleave. The sync methods (``get_tuple``,
    ``put``, ...) are for other threads: they run the async ones on the saver's loop and wait.
    Called from the loop itself they would deadlock, so they raise
    ``asyncio.InvalidStateError`` instead. Options are ``SqliteSaver``'s.
    """

    conn: aiosqlite.Connection

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
    ) -> None:
        super().__init__(serde=serde)
        self.conn = conn
        self.synchronous = synchronous
        self.busy_timeout = busy_timeout
        self.lock = asyncio.Lock()
        self.loop = asyncio.get_running_loop()
        self.is_setup = False

    @classmethod
    @asynccontextmanager
    async def from_conn_string(
        cls,
        conn_string: str | Path,
        *,
        serde: SerializerProtocol | None = None,
        synchronous: Synchronous = "NORMAL",
        busy_timeout: float = 30.0,
    ) -> AsyncIterator[AsyncSqliteSaver]:
        """A saver on a new connection to ``conn_string`` (a path or ``":memory:"``), closed
        on exit."""
        async with aiosqlite.connect(
            conn_string, isolation_level=None, timeout=busy_timeout
        ) as conn:
            yield cls(conn, serde=serde, synchronous=synchronous, busy_timeout=busy_timeout)

    async def setup(self) -> None:
        """Set pragmas and create or migrate the schema. Idempotent; runs on first use."""
        async with self.lock:
            await self._setup()

    async def _setup(self) -> None:
        await arun_plan(self.conn, _plans.setup(self.synchronous, self.busy_timeout))
        self.is_setup = True

    async def _run(self, plan: Plan[T]) -> T:
        if not self.is_setup:
            async with self.lock:
                if not self.is_setup:
                    await self._setup()
        return await arun_plan(self.conn, plan)

    # -- reading -----------------------------------------------------------------------------

    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        return await self._run(_plans.get_tuple(self.serde, config))

    async def alist(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[CheckpointTuple]:
        pager = ListPager(config, filter, before, limit)
        async for found in pager.arun(lambda query: self._run(_plans.list_page(self.serde, query))):
            yield found

    # -- writing -----------------------------------------------------------------------------

    async def aput(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        plan = _plans.put_step(self.serde, config, (), checkpoint, metadata, new_versions)
        return await self._run(plan)

    async def aput_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        await self.aput_writes_batch(config, [TaskWrites(task_id, writes, task_path)])

    async def aput_writes_batch(self, config: RunnableConfig, writes: Sequence[TaskWrites]) -> None:
        await self._run(_plans.put_writes(self.serde, config, writes))

    async def aput_step(
        self,
        config: RunnableConfig,
        writes: Sequence[TaskWrites],
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        plan = _plans.put_step(self.serde, config, writes, checkpoint, metadata, new_versions)
        return await self._run(plan)

    # -- thread management -------------------------------------------------------------------

    async def adelete_thread(self, thread_id: str) -> None:
        await self._run(_plans.delete_threads([thread_id]))

    async def acopy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        await self._run(_plans.copy_thread(source_thread_id, target_thread_id))

    async def adelete_for_runs(self, run_ids: Sequence[str]) -> None:
        await self._run(_plans.delete_for_runs(self.serde, run_ids))

    async def aprune(
        self,
        thread_ids: Sequence[str],
        *,
        strategy: PruneStrategy = "keep_latest",
        keep_last: int | None = None,
        older_than: timedelta | None = None,
    ) -> None:
        await self._run(_plans.prune(self.serde, thread_ids, strategy, keep_last, older_than))
