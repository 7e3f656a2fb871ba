"""``InMemorySaver``: a checkpoint saver that keeps everything in process memory.

For tests, demos and benchmarks. It stores the same serialized rows a database saver does
(``stepgraph.checkpoint.storage``), so stored state is isolated from later mutation of the
objects passed in, and serialization errors surface at the same moments as with a database.
"""

from __future__ import annotations

import bisect
import heapq
import threading
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from datetime import timedelta
from typing import Any, NamedTuple

from stepgraph.checkpoint.base import (
    BaseCheckpointSaver,
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
    PruneStrategy,
    TaskWrites,
    get_checkpoint_id,
    get_checkpoint_ns,
    get_thread_id,
)
from stepgraph.checkpoint.serde.base import SerializerProtocol
from stepgraph.checkpoint.storage import (
    APPENDED_ITEMS,
    CheckpointRow,
    CheckpointRows,
    ValueKey,
    ValueRow,
    WriteRow,
    checkpoint_config,
    checkpoint_rows,
    checkpoints_to_keep,
    load_checkpoint,
    load_metadata,
    load_tuple,
    metadata_matches,
    referenced_values,
    rekey,
    stored_versions,
    write_rows,
)
from stepgraph.config import RunnableConfig

__all__ = ["InMemorySaver", "MemorySaver"]


class _Namespace(dict[str, CheckpointRow]):
    """One namespace's checkpoints by id, with the ids in order: reading the latest is O(1),
    and listing the newest ``limit`` costs O(limit), however long the history."""

    __slots__ = ("ids",)

    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []

    @property
    def latest(self) -> str:
        return self.ids[-1] if self.ids else ""

    def add(self, row: CheckpointRow) -> None:
        checkpoint_id = row.checkpoint_id
        if checkpoint_id not in self:
            ids = self.ids
            if not ids or checkpoint_id > ids[-1]:  # ids are time-ordered: the usual case
                ids.append(checkpoint_id)
            else:
                bisect.insort(ids, checkpoint_id)
        self[checkpoint_id] = row

    def newest_first(self, before: str | None) -> Iterator[CheckpointRow]:
        ids = self.ids
        end = len(ids) if before is None else bisect.bisect_left(ids, before)
        return (self[ids[i]] for i in range(end - 1, -1, -1))


# thread_id -> checkpoint_ns -> checkpoint_id -> row
_Checkpoints = dict[str, dict[str, _Namespace]]
# thread_id -> (checkpoint_ns, checkpoint_id) -> (task_id, idx) -> row
_Writes = dict[str, dict[tuple[str, str], dict[tuple[str, int], WriteRow]]]


def _checkpoint_id(row: CheckpointRow) -> str:
    return row.checkpoint_id


class _Found(NamedTuple):
    """The rows of one checkpoint, gathered under the lock and decoded outside it."""

    row: CheckpointRow
    checkpoint: Checkpoint
    values: list[ValueRow]
    writes: list[WriteRow]
    metadata: CheckpointMetadata | None


class InMemorySaver(BaseCheckpointSaver):
    """A thread-safe in-memory checkpoint saver. Async methods run the sync ones directly."""

    background_saves = False  # nothing to wait for: durability="async" saves inline

    def __init__(self, *, serde: SerializerProtocol | None = None) -> None:
        super().__init__(serde=serde)
        self._lock = threading.Lock()
        self._checkpoints: _Checkpoints = {}
        self._values: dict[str, dict[ValueKey, ValueRow]] = {}
        self._writes: _Writes = {}

    # -- reading -----------------------------------------------------------------------------

    def get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        thread_id = get_thread_id(config)
        checkpoint_id = get_checkpoint_id(config)
        with self._lock:
            checkpoints = self._checkpoints.get(thread_id, {}).get(get_checkpoint_ns(config))
            if not checkpoints:
                return None
            row = checkpoints.get(checkpoint_id or checkpoints.latest)
            if row is None:
                return None
            found = self._gather(row, None)
        return self._load(found)

    def list(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> Iterator[CheckpointTuple]:
        configurable = (config or {}).get("configurable") or {}
        thread_id = configurable.get("thread_id")
        checkpoint_ns = configurable.get("checkpoint_ns")
        checkpoint_id = configurable.get("checkpoint_id")
        before_id = get_checkpoint_id(before) if before else None
        with self._lock:
            if thread_id is None:
                threads: Iterable[dict[str, _Namespace]] = self._checkpoints.values()
            else:
                threads = [self._checkpoints.get(str(thread_id), {})]
            histories = [
                rows
                for namespaces in threads
                for ns, rows in namespaces.items()
                if checkpoint_ns is None or ns == checkpoint_ns
            ]
            candidates: Iterable[CheckpointRow]
            if checkpoint_id is not None:
                candidates = [
                    rows[checkpoint_id]
                    for rows in histories
                    if checkpoint_id in rows and (before_id is None or checkpoint_id < before_id)
                ]
            else:  # each history newest first, merged: only the rows handed out are visited
                candidates = heapq.merge(
                    *(rows.newest_first(before_id) for rows in histories),
                    key=_checkpoint_id,
                    reverse=True,
                )
            found: list[_Found] = []
            for row in candidates:
                if limit is not None and len(found) >= limit:
                    break
                metadata = None
                if filter:
                    metadata = load_metadata(self.serde, row)
                    if not metadata_matches(metadata, filter):
                        continue
                found.append(self._gather(row, metadata))
        # Decoding happens outside the lock, lazily, like a database cursor.
        for one in found:
            yield self._load(one)

    def _gather(self, row: CheckpointRow, metadata: CheckpointMetadata | None) -> _Found:
        """The rows ``load_tuple`` needs for ``row``. Call with the lock held."""
        checkpoint = load_checkpoint(self.serde, row)
        values = self._values.get(row.thread_id, {})
        ns = row.checkpoint_ns
        named = []
        for channel, version in stored_versions(checkpoint).items():
            value = values.get((ns, channel, version))
            # Appended items: the rows down their chain of base versions are needed too.
            while value is not None:
                named.append(value)
                if value.kind != APPENDED_ITEMS or len(named) > len(values):
                    break
                value = values.get((ns, channel, value.base_version or ""))
        writes = self._writes.get(row.thread_id, {}).get((ns, row.checkpoint_id))
        return _Found(row, checkpoint, named, list(writes.values()) if writes else [], metadata)

    def _load(self, found: _Found) -> CheckpointTuple:
        return load_tuple(self.serde, *found)

    # -- writing -----------------------------------------------------------------------------

    def put(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        rows = checkpoint_rows(
            self.serde, config, checkpoint, metadata, new_versions, deltas=True, inline=True
        )
        return self._store(rows)

    def put_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        rows = write_rows(self.serde, config, writes, task_id, task_path)
        with self._lock:
            self._store_writes(rows)

    def put_step(
        self,
        config: RunnableConfig,
        writes: Sequence[TaskWrites],
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        rows = checkpoint_rows(
            self.serde, config, checkpoint, metadata, new_versions, writes, deltas=True, inline=True
        )
        return self._store(rows)

    def _store(self, rows: CheckpointRows) -> RunnableConfig:
        """Store fully serialized rows in one locked section: readers see all of them or none."""
        row = rows.checkpoint
        with self._lock:
            self._insert((row,), rows.values, rows.writes)
        return checkpoint_config(row.thread_id, row.checkpoint_ns, row.checkpoint_id)

    def _insert(
        self,
        checkpoints: Iterable[CheckpointRow],
        values: Iterable[ValueRow],
        writes: Iterable[WriteRow],
    ) -> None:
        """Call with the lock held."""
        self._store_writes(writes)
        for row in checkpoints:
            namespaces = self._checkpoints.setdefault(row.thread_id, {})
            history = namespaces.get(row.checkpoint_ns)
            if history is None:
                history = namespaces[row.checkpoint_ns] = _Namespace()
            history.add(row)
        for value in values:
            by_key = self._values.setdefault(value.thread_id, {})
            by_key[(value.checkpoint_ns, value.channel, value.version)] = value

    def _store_writes(self, rows: Iterable[WriteRow]) -> None:
        """Call with the lock held."""
        for row in rows:
            by_checkpoint = self._writes.setdefault(row.thread_id, {})
            writes = by_checkpoint.setdefault((row.checkpoint_ns, row.checkpoint_id), {})
            key = (row.task_id, row.idx)
            if row.replaces_existing or key not in writes:
                writes[key] = row

    # -- thread management -------------------------------------------------------------------

    def delete_thread(self, thread_id: str) -> None:
        thread_id = str(thread_id)
        with self._lock:
            self._drop_thread(thread_id)

    def _drop_thread(self, thread_id: str) -> None:
        self._checkpoints.pop(thread_id, None)
        self._values.pop(thread_id, None)
        self._writes.pop(thread_id, None)

    def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        source, target = str(source_thread_id), str(target_thread_id)
        with self._lock:
            checkpoints = [
                row for rows in self._checkpoints.get(source, {}).values() for row in rows.values()
            ]
            values = list(self._values.get(source, {}).values())
            writes = [
                row for by_task in self._writes.get(source, {}).values() for row in by_task.values()
            ]
            self._insert(rekey(checkpoints, target), rekey(values, target), rekey(writes, target))

    def delete_for_runs(self, run_ids: Sequence[str]) -> None:
        runs = {str(run_id) for run_id in run_ids}
        with self._lock:
            for thread_id, namespaces in list(self._checkpoints.items()):
                keep = {
                    (ns, checkpoint_id)
                    for ns, rows in namespaces.items()
                    for checkpoint_id, row in rows.items()
                    if row.run_id not in runs
                }
                self._retain(thread_id, keep)

    def prune(
        self,
        thread_ids: Sequence[str],
        *,
        strategy: PruneStrategy = "keep_latest",
        keep_last: int | None = None,
        older_than: timedelta | None = None,
    ) -> None:
        if strategy not in ("keep_latest", "delete"):
            raise ValueError(f"Unknown prune strategy {strategy!r}: use 'keep_latest' or 'delete'.")
        with self._lock:
            for thread_id in map(str, thread_ids):
                if strategy == "delete":
                    self._drop_thread(thread_id)
                    continue
                rows = [
                    row
                    for rows in self._checkpoints.get(thread_id, {}).values()
                    for row in rows.values()
                ]
                keep = checkpoints_to_keep(rows, keep_last=keep_last, older_than=older_than)
                self._retain(thread_id, keep)

    def _retain(self, thread_id: str, keep: set[tuple[str, str]]) -> None:
        """Keep only the ``keep`` checkpoints of a thread, with their writes and value rows.

        Call with the lock held. Nothing changes if the kept checkpoints cannot be decoded.
        """
        namespaces = self._checkpoints.get(thread_id, {})
        total = sum(len(rows) for rows in namespaces.values())
        if len(keep) == total:
            return
        if not keep:
            self._drop_thread(thread_id)
            return
        kept = [namespaces[ns][checkpoint_id] for ns, checkpoint_id in keep]
        values = self._values.get(thread_id, {})
        bases = {
            key: row.base_version
            for key, row in values.items()
            if row.kind == APPENDED_ITEMS and row.base_version is not None
        }
        needed = referenced_values(self.serde, kept, bases)
        remaining: dict[str, _Namespace] = {}
        for row in kept:
            remaining.setdefault(row.checkpoint_ns, _Namespace()).add(row)
        self._checkpoints[thread_id] = remaining
        self._values[thread_id] = {key: row for key, row in values.items() if key in needed}
        writes = self._writes.get(thread_id, {})
        self._writes[thread_id] = {key: rows for key, rows in writes.items() if key in keep}

    # -- async twins: in memory nothing blocks, so they run the sync methods ----------------

    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        return self.get_tuple(config)

    async def alist(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[CheckpointTuple]:
        for found in self.list(config, filter=filter, before=before, limit=limit):
            yield found

    async def aput(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        return self.put(config, checkpoint, metadata, new_versions)

    async def aput_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        self.put_writes(config, writes, task_id, task_path)

    async def aput_step(
        self,
        config: RunnableConfig,
        writes: Sequence[TaskWrites],
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        return self.put_step(config, writes, checkpoint, metadata, new_versions)

    async def adelete_thread(self, thread_id: str) -> None:
        self.delete_thread(thread_id)

    async def acopy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        self.copy_thread(source_thread_id, target_thread_id)

    async def adelete_for_runs(self, run_ids: Sequence[str]) -> None:
        self.delete_for_runs(run_ids)

    async def aprune(
        self,
        thread_ids: Sequence[str],
        *,
        strategy: PruneStrategy = "keep_latest",
        keep_last: int | None = None,
        older_than: timedelta | None = None,
    ) -> None:
        self.prune(thread_ids, strategy=strategy, keep_last=keep_last, older_than=older_than)


MemorySaver = InMemorySaver
"""LangGraph's older name for ``InMemorySaver``."""
