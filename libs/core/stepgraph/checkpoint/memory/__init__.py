"""``InMemorySaver``: a checkpoint saver that keeps everything in process memory.

For tests, demos and benchmarks. It stores the same serialized rows a database saver does
(``stepgraph.checkpoint.storage``), so stored state is isolated from later mutation of the
objects passed in, and serialization errors surface at the same moments as with a database.
"""

from __future__ import annotations

import bisect
import builtins
import heapq
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from stepgraph.checkpoint.base import (
    AsyncFromSyncSaver,
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
    Lease,
    PruneStrategy,
    Retention,
    RunInfo,
    RunStatus,
    StorageReport,
    TaskWrites,
    get_checkpoint_id,
    get_checkpoint_ns,
    get_thread_id,
)
from stepgraph.checkpoint.base.runs import fence_of
from stepgraph.checkpoint.serde.base import SerializerProtocol
from stepgraph.checkpoint.storage import (
    APPENDED_ITEMS,
    Candidate,
    CheckpointRow,
    CheckpointRows,
    ValueKey,
    ValueRow,
    WriteRow,
    assemble_page,
    check_key,
    check_prune_strategy,
    checkpoint_config,
    checkpoint_rows,
    deleted_values,
    id_list,
    page_candidates,
    prune_doomed,
    rekey,
    related_keys,
    runs,
    task_write_rows,
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


class InMemorySaver(AsyncFromSyncSaver):
    """A thread-safe in-memory checkpoint saver. Async methods run the sync ones directly."""

    async_inline = True  # nothing blocks

    background_saves = False  # nothing to wait for: durability="async" saves inline

    def __init__(
        self, *, serde: SerializerProtocol | None = None, retention: Retention | None = None
    ) -> None:
        super().__init__(serde=serde, retention=retention)
        self._lock = threading.Lock()
        self._checkpoints: _Checkpoints = {}
        self._values: dict[str, dict[ValueKey, ValueRow]] = {}
        self._writes: _Writes = {}
        self._runs: dict[str, runs.RunRow] = {}

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
            page = self._gather(page_candidates(self.serde, [row]))
        return next(page)

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
            found: list[Candidate] = []
            for row in candidates:
                if limit is not None and len(found) >= limit:
                    break
                found += page_candidates(self.serde, [row], filter)
            page = self._gather(found)
        # Decoding happens outside the lock, lazily, like a database cursor.
        yield from page

    def _gather(self, candidates: Sequence[Candidate]) -> Iterator[CheckpointTuple]:
        """The tuples of ``candidates``, from the rows gathered now (call with the lock held),
        decoded as iterated."""
        value_keys, checkpoint_keys = related_keys(candidates)
        values = []
        for thread_id, ns, channel, version in value_keys:
            stored = self._values.get(thread_id, {})
            value = stored.get((ns, channel, version))
            # Appended items: the rows down their chain of base versions are needed too.
            for _ in range(len(stored)):
                if value is None:
                    break
                values.append(value)
                if value.kind != APPENDED_ITEMS:
                    break
                value = stored.get((ns, channel, value.base_version or ""))
        writes = [
            write
            for thread_id, ns, checkpoint_id in checkpoint_keys
            for write in self._writes.get(thread_id, {}).get((ns, checkpoint_id), {}).values()
        ]
        return assemble_page(self.serde, candidates, values, writes)

    # -- writing -----------------------------------------------------------------------------

    def put(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        return self.put_step(config, (), checkpoint, metadata, new_versions)

    def put_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        rows = write_rows(self.serde, config, writes, task_id, task_path)
        with self._lock:
            self._check_fence(config)
            self._store_writes(rows)

    def put_writes_batch(self, config: RunnableConfig, writes: Sequence[TaskWrites]) -> None:
        rows = task_write_rows(self.serde, config, writes)
        with self._lock:
            self._check_fence(config)
            self._store_writes(rows)

    def _check_fence(self, config: RunnableConfig) -> None:
        """Call with the lock held."""
        if (epoch := fence_of(config)) is not None:
            thread_id = get_thread_id(config)
            runs.check_fence(thread_id, epoch, self._runs.get(thread_id))

    def put_step(
        self,
        config: RunnableConfig,
        writes: Sequence[TaskWrites],
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        def rows(self_contained: bool) -> CheckpointRows:
            return checkpoint_rows(
                self.serde,
                config,
                checkpoint,
                metadata,
                new_versions,
                writes,
                deltas=True,
                inline=True,
                self_contained=self_contained,
            )

        saved = rows(False)
        row = saved.checkpoint
        # Stored in one locked section: readers see all of the rows or none.
        with self._lock:
            self._check_fence(config)
            if not self._has_parent(row):
                saved = rows(True)  # the unchanged channels' rows may have gone with it
            self._insert((row,), saved.values, saved.writes)
        return checkpoint_config(row.thread_id, row.checkpoint_ns, row.checkpoint_id)

    def _has_parent(self, row: CheckpointRow) -> bool:
        """Whether the parent of ``row`` is stored (or it has none). Call with the lock held."""
        parent = row.parent_checkpoint_id
        history = self._checkpoints.get(row.thread_id, {}).get(row.checkpoint_ns)
        return parent is None or (history is not None and parent in history)

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
            # A version names one value: the first row stored for it stays (as in SQL).
            by_key = self._values.setdefault(value.thread_id, {})
            by_key.setdefault((value.checkpoint_ns, value.channel, value.version), value)

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
            self._drop_thread(thread_id, time.time())

    def _drop_thread(self, thread_id: str, now: float | None = None) -> None:
        """Call with the lock held. With ``now``, the thread is being deleted: it gets a
        tombstone (a run still writing to it is refused)."""
        self._checkpoints.pop(thread_id, None)
        self._values.pop(thread_id, None)
        self._writes.pop(thread_id, None)
        if now is not None:
            self._runs[thread_id] = runs.deleted(self._runs.get(thread_id), thread_id, now)

    def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        source, target = str(source_thread_id), str(target_thread_id)
        check_key("thread_id", target)
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
        runs = set(id_list(run_ids, "run_ids"))
        with self._lock:
            self._delete_all(
                {
                    thread_id: {
                        (ns, checkpoint_id)
                        for ns, rows in namespaces.items()
                        for checkpoint_id, row in rows.items()
                        if row.run_id in runs
                    }
                    for thread_id, namespaces in self._checkpoints.items()
                }
            )

    def prune(
        self,
        thread_ids: Sequence[str],
        *,
        strategy: PruneStrategy = "keep_latest",
        keep_last: int | None = None,
        older_than: timedelta | None = None,
    ) -> None:
        check_prune_strategy(strategy)
        threads = id_list(thread_ids, "thread_ids")
        with self._lock:
            if strategy == "delete":
                for thread_id in threads:
                    self._drop_thread(thread_id, time.time())
                return
            self._delete_all(
                {
                    thread_id: prune_doomed(
                        self._rows(thread_id), keep_last=keep_last, older_than=older_than
                    )
                    for thread_id in threads
                }
            )

    def _rows(self, thread_id: str) -> Sequence[CheckpointRow]:
        return [
            row for rows in self._checkpoints.get(thread_id, {}).values() for row in rows.values()
        ]

    def _delete_all(self, doomed: dict[str, set[tuple[str, str]]]) -> None:
        """Delete the ``doomed`` checkpoints of each thread, their writes and the value rows
        only they needed: all of it, or (if some thread's checkpoints cannot be decoded)
        nothing, like a database transaction. Call with the lock held."""
        changes = [self._deletion(thread_id, chosen) for thread_id, chosen in doomed.items()]
        for apply in changes:
            apply()

    def _deletion(self, thread_id: str, doomed: set[tuple[str, str]]) -> Callable[[], None]:
        """What deleting ``doomed`` from a thread changes, worked out (decoding what it must)
        without changing anything yet."""
        if not doomed:
            return lambda: None
        rows = self._rows(thread_id)
        deleted = [row for row in rows if (row.checkpoint_ns, row.checkpoint_id) in doomed]
        kept = [row for row in rows if (row.checkpoint_ns, row.checkpoint_id) not in doomed]
        if not kept:  # under the lock nothing else can be using the thread's rows
            return lambda: self._drop_thread(thread_id)
        values = self._values.get(thread_id, {})
        bases = {
            key: row.base_version
            for key, row in values.items()
            if row.kind == APPENDED_ITEMS and row.base_version is not None
        }
        garbage = deleted_values(self.serde, deleted, kept, bases)

        def apply() -> None:
            remaining: dict[str, _Namespace] = {}
            for row in kept:
                remaining.setdefault(row.checkpoint_ns, _Namespace()).add(row)
            self._checkpoints[thread_id] = remaining
            self._values[thread_id] = {k: row for k, row in values.items() if k not in garbage}
            writes = self._writes.get(thread_id, {})
            self._writes[thread_id] = {k: rows for k, rows in writes.items() if k not in doomed}

        return apply

    # -- ownership and the run registry ------------------------------------------------------

    def acquire_lease(
        self,
        thread_id: str,
        owner: str,
        *,
        ttl: float,
        input: Any = None,
        expect_epoch: int | None = None,
    ) -> Lease:
        thread_id = str(thread_id)
        stored = runs.encode_input(self.serde, input)
        with self._lock:
            head = self._checkpoints.get(thread_id, {}).get("")
            row = runs.take_lease(
                self._runs.get(thread_id),
                thread_id,
                owner,
                ttl,
                time.time(),
                stored,
                head=head.latest or None if head is not None else None,
                expect_epoch=expect_epoch,
            )
            self._runs[thread_id] = row
        return runs.lease_of(row)

    def renew_lease(self, lease: Lease, *, ttl: float) -> Lease:
        with self._lock:
            row = runs.renewed(self._runs.get(lease.thread_id), lease, ttl, time.time())
            self._runs[lease.thread_id] = row
        return runs.lease_of(row)

    def release_lease(self, lease: Lease, status: RunStatus, error: str | None = None) -> None:
        with self._lock:
            now = time.time()
            row = runs.released(self._runs.get(lease.thread_id), lease, status, error, now)
            if row is not None:
                self._runs[lease.thread_id] = row

    def get_run(self, thread_id: str) -> RunInfo | None:
        with self._lock:
            row = self._runs.get(str(thread_id))
        return None if row is None else runs.run_info(self.serde, row)

    def list_incomplete(self, *, limit: int | None = None) -> builtins.list[RunInfo]:
        runs.check_limit(limit)
        now = time.time()
        with self._lock:
            found = sorted(
                (row for row in self._runs.values() if runs.is_incomplete(row, now)),
                key=lambda row: row.updated_at,
            )
        return [runs.run_info(self.serde, row) for row in found[:limit]]

    # -- retention ---------------------------------------------------------------------------

    def storage_report(self, thread_id: str) -> StorageReport:
        thread_id = str(thread_id)
        with self._lock:
            checkpoints = self._rows(thread_id)
            values = list(self._values.get(thread_id, {}).values())
            writes = [
                row
                for by_task in self._writes.get(thread_id, {}).values()
                for row in by_task.values()
            ]
        size = sum(len(row.checkpoint or b"") + len(row.metadata or b"") for row in checkpoints)
        size += sum(len(row.value or b"") for row in values)
        size += sum(len(row.value or b"") for row in writes)
        return StorageReport(thread_id, len(checkpoints), len(writes), len(values), size)

    def sweep(self, older_than: timedelta | None = None) -> builtins.list[str]:
        cutoff = (datetime.now(UTC) - self._sweep_age(older_than)).isoformat()
        now = time.time()
        swept = []
        with self._lock:
            for thread_id in list(self._checkpoints):
                lease = self._runs.get(thread_id)
                if lease is not None and lease.expires_at is not None and lease.expires_at > now:
                    continue
                if max(row.ts for row in self._rows(thread_id)) < cutoff:
                    self._drop_thread(thread_id, now)
                    swept.append(thread_id)
        return swept


MemorySaver = InMemorySaver
"""LangGraph's older name for ``InMemorySaver``."""
