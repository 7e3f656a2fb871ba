"""One awaitable view of a saver, over either its sync or its async methods.

Contract scenarios are written once, as coroutines against ``SaverApi``. Over the sync methods
the coroutines never really suspend, so ``drive`` runs a scenario to completion without an event
loop (the saver sees plain sync calls); over the async twins they run on the test's event loop.
"""

from __future__ import annotations

import asyncio
import builtins
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any, TypeVar

from stepgraph._twins import call, drive
from stepgraph.checkpoint.base import (
    BaseCheckpointSaver,
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
    PruneStrategy,
    TaskWrites,
)
from stepgraph.config import RunnableConfig

__all__ = ["SaverApi", "drive"]

T = TypeVar("T")


class SaverApi:
    """The saver methods scenarios use, all awaitable, each calling the sync or the async twin."""

    def __init__(self, saver: BaseCheckpointSaver, *, use_async: bool) -> None:
        self.saver = saver
        self.use_async = use_async

    async def get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        if self.use_async:
            return await self.saver.aget_tuple(config)
        return self.saver.get_tuple(config)

    async def list(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> builtins.list[CheckpointTuple]:
        if self.use_async:
            found = self.saver.alist(config, filter=filter, before=before, limit=limit)
            return [item async for item in found]
        return list(self.saver.list(config, filter=filter, before=before, limit=limit))

    async def put(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        if self.use_async:
            return await self.saver.aput(config, checkpoint, metadata, new_versions)
        return self.saver.put(config, checkpoint, metadata, new_versions)

    async def put_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        if self.use_async:
            await self.saver.aput_writes(config, writes, task_id, task_path)
        else:
            self.saver.put_writes(config, writes, task_id, task_path)

    async def put_writes_batch(self, config: RunnableConfig, writes: Sequence[TaskWrites]) -> None:
        if self.use_async:
            await self.saver.aput_writes_batch(config, writes)
        else:
            self.saver.put_writes_batch(config, writes)

    async def put_step(
        self,
        config: RunnableConfig,
        writes: Sequence[TaskWrites],
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        if self.use_async:
            return await self.saver.aput_step(config, writes, checkpoint, metadata, new_versions)
        return self.saver.put_step(config, writes, checkpoint, metadata, new_versions)

    async def delete_thread(self, thread_id: str) -> None:
        if self.use_async:
            await self.saver.adelete_thread(thread_id)
        else:
            self.saver.delete_thread(thread_id)

    async def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        if self.use_async:
            await self.saver.acopy_thread(source_thread_id, target_thread_id)
        else:
            self.saver.copy_thread(source_thread_id, target_thread_id)

    async def delete_for_runs(self, run_ids: Sequence[str]) -> None:
        if self.use_async:
            await self.saver.adelete_for_runs(run_ids)
        else:
            self.saver.delete_for_runs(run_ids)

    async def prune(
        self,
        thread_ids: Sequence[str],
        *,
        strategy: PruneStrategy = "keep_latest",
        keep_last: int | None = None,
        older_than: timedelta | None = None,
    ) -> None:
        options: dict[str, Any] = {
            "strategy": strategy,
            "keep_last": keep_last,
            "older_than": older_than,
        }
        if self.use_async:
            await self.saver.aprune(thread_ids, **options)
        else:
            self.saver.prune(thread_ids, **options)

    async def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """The saver method ``name`` (or its async twin ``a<name>``), called and awaited."""
        return await call(self.saver, name, self.use_async, *args, **kwargs)

    async def sleep(self, seconds: float) -> None:
        if self.use_async:
            await asyncio.sleep(seconds)
        else:
            time.sleep(seconds)

    async def pause(self) -> None:
        """Let concurrent jobs run: yield to the event loop, or to other OS threads."""
        if self.use_async:
            await asyncio.sleep(0)
        else:
            time.sleep(0)

    async def concurrently(self, jobs: Sequence[Callable[[], Awaitable[T]]]) -> builtins.list[T]:
        """Run ``jobs`` at the same time: OS threads for the sync API, tasks for the async."""
        if self.use_async:
            return list(await asyncio.gather(*(job() for job in jobs)))
        with ThreadPoolExecutor(max_workers=8) as pool:
            return list(pool.map(lambda job: drive(job()), jobs))
