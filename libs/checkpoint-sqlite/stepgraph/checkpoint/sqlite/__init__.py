"""``SqliteSaver``: checkpoints in a SQLite file (or ``:memory:``), through ``sqlite3``.

Several processes can share one file: the database runs in WAL mode and every write is one
``BEGIN IMMEDIATE`` transaction that waits up to ``busy_timeout`` for the write lock.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from stepgraph.checkpoint.base import (
    BaseCheckpointSaver,
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
    PruneStrategy,
    TaskWrites,
)
from stepgraph.checkpoint.serde.base import SerializerProtocol
from stepgraph.checkpoint.sqlite import _plans
from stepgraph.checkpoint.sqlite._plans import ListPager, Plan, Statement
from stepgraph.checkpoint.sqlite._schema import Synchronous
from stepgraph.config import RunnableConfig

__all__ = ["SqliteSaver", "Synchronous", "run_plan"]

T = TypeVar("T")


def run_plan(conn: sqlite3.Connection, plan: Plan[T]) -> T:
    """Execute ``plan`` on ``conn``; roll back its transaction if anything fails."""
    try:
        statement = next(plan)
        while True:
            if statement.many:
                conn.executemany(statement.sql, statement.params)
                rows = []
            elif statement.retry_when_locked:
                rows = _retry_when_locked(conn, statement)
            else:
                rows = conn.execute(statement.sql, statement.params).fetchall()
            statement = plan.send(rows)
    except StopIteration as done:
        return done.value
    except BaseException:
        if conn.in_transaction:
            conn.rollback()
        raise


def _retry_when_locked(conn: sqlite3.Connection, statement: Statement) -> list[Any]:
    deadline = time.monotonic() + statement.retry_when_locked
    while True:
        try:
            return conn.execute(statement.sql, statement.params).fetchall()
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() >= deadline:
                raise
        time.sleep(0.005)


class SqliteSaver(BaseCheckpointSaver):
    """A checkpoint saver on a ``sqlite3.Connection``.

    The saver issues its own ``BEGIN``/``COMMIT``: hand it a connection with no transaction
    open (``isolation_level=None`` or the default; not Python 3.12's ``autocommit=False``). One saver may be used from several threads: calls are
    serialized by a lock. The async methods (``aget_tuple``, ``aput``, ...) run the sync ones in
    a worker thread, which needs a connection opened with ``check_same_thread=False`` (as
    ``from_conn_string`` does); ``AsyncSqliteSaver`` is the native async saver.

    ``synchronous`` is SQLite's durability setting: ``"NORMAL"`` (default) loses no committed
    step if the process crashes, ``"FULL"`` also none on power loss, at the cost of an fsync per
    commit. ``busy_timeout`` (seconds) is how long a writer waits for another process's lock.
    """

    conn: sqlite3.Connection

    # A commit is CPU work under the GIL plus a write to the page cache (and one fsync with
    # FULL): a background thread cannot overlap it with the run, and handing saves to one made
    # durability="async" about twice as slow as saving inline (docs/executor.md, "Durability modes").
    background_saves = False

    def __init__(
        self,
        conn: sqlite3.Connection,
        *,
        serde: SerializerProtocol | None = None,
        synchronous: Synchronous = "NORMAL",
        busy_timeout: float = 30.0,
    ) -> None:
        super().__init__(serde=serde)
        self.conn = conn
        self.synchronous = synchronous
        self.busy_timeout = busy_timeout
        self.lock = threading.Lock()
        self.is_setup = False

    @classmethod
    @contextmanager
    def from_conn_string(
        cls,
        conn_string: str | Path,
        *,
        serde: SerializerProtocol | None = None,
        synchronous: Synchronous = "NORMAL",
        busy_timeout: float = 30.0,
    ) -> Iterator[SqliteSaver]:
        """A saver on a new connection to ``conn_string`` (a path or ``":memory:"``), closed
        on exit."""
        conn = sqlite3.connect(
            conn_string, check_same_thread=False, isolation_level=None, timeout=busy_timeout
        )
        try:
            yield cls(conn, serde=serde, synchronous=synchronous, busy_timeout=busy_timeout)
        finally:
            conn.close()

    def setup(self) -> None:
        """Set pragmas and create or migrate the schema. Idempotent; runs on first use."""
        with self.lock:
            self._setup()

    def _setup(self) -> None:
        run_plan(self.conn, _plans.setup(self.synchronous, self.busy_timeout))
        self.is_setup = True

    def _run(self, plan: Plan[T]) -> T:
        with self.lock:
            if not self.is_setup:
                self._setup()
            return run_plan(self.conn, plan)

    # -- reading -----------------------------------------------------------------------------

    def get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        return self._run(_plans.get_tuple(self.serde, config))

    def list(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> Iterator[CheckpointTuple]:
        pager = ListPager(config, filter, before, limit)
        while (plan := pager.next_page(self.serde)) is not None:
            yield from self._run(plan)

    # -- writing -----------------------------------------------------------------------------

    def put(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        return self._run(
            _plans.put_step(self.serde, config, (), checkpoint, metadata, new_versions)
        )

    def put_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        self._run(_plans.put_writes(self.serde, config, writes, task_id, task_path))

    def put_step(
        self,
        config: RunnableConfig,
        writes: Sequence[TaskWrites],
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        return self._run(
            _plans.put_step(self.serde, config, writes, checkpoint, metadata, new_versions)
        )

    # -- thread management -------------------------------------------------------------------

    def delete_thread(self, thread_id: str) -> None:
        self._run(_plans.delete_threads([thread_id]))

    def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        self._run(_plans.copy_thread(source_thread_id, target_thread_id))

    def delete_for_runs(self, run_ids: Sequence[str]) -> None:
        self._run(_plans.delete_for_runs(self.serde, run_ids))

    def prune(
        self,
        thread_ids: Sequence[str],
        *,
        strategy: PruneStrategy = "keep_latest",
        keep_last: int | None = None,
        older_than: timedelta | None = None,
    ) -> None:
        self._run(_plans.prune(self.serde, thread_ids, strategy, keep_last, older_than))

    # -- async twins: the sync methods in a worker thread -----------------------------------

    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        return await asyncio.to_thread(self.get_tuple, config)

    async def alist(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[CheckpointTuple]:
        pager = ListPager(config, filter, before, limit)
        while (plan := pager.next_page(self.serde)) is not None:
            for found in await asyncio.to_thread(self._run, plan):
                yield found

    async def aput(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        return await asyncio.to_thread(self.put, config, checkpoint, metadata, new_versions)

    async def aput_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        await asyncio.to_thread(self.put_writes, config, writes, task_id, task_path)

    async def aput_step(
        self,
        config: RunnableConfig,
        writes: Sequence[TaskWrites],
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        return await asyncio.to_thread(
            self.put_step, config, writes, checkpoint, metadata, new_versions
        )

    async def adelete_thread(self, thread_id: str) -> None:
        await asyncio.to_thread(self.delete_thread, thread_id)

    async def acopy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        await asyncio.to_thread(self.copy_thread, source_thread_id, target_thread_id)

    async def adelete_for_runs(self, run_ids: Sequence[str]) -> None:
        await asyncio.to_thread(self.delete_for_runs, run_ids)

    async def aprune(
        self,
        thread_ids: Sequence[str],
        *,
        strategy: PruneStrategy = "keep_latest",
        keep_last: int | None = None,
        older_than: timedelta | None = None,
    ) -> None:
        await asyncio.to_thread(
            self.prune, thread_ids, strategy=strategy, keep_last=keep_last, older_than=older_than
        )
