"""The checkpoint protocol: what every saver stores and the methods it implements.

Shapes and semantics follow LangGraph's ``langgraph.checkpoint.base`` so that knowledge and code
carry over. Differences, all additive:

* ``copy_thread``, ``delete_for_runs`` and ``prune`` (declared but unimplemented in LangGraph) are
  part of the protocol and implemented by every stepgraph saver.
* Thread ownership and a run registry (``stepgraph.checkpoint.base.runs``): ``acquire_lease``,
  ``renew_lease``, ``release_lease``, ``get_run``, ``list_incomplete``; writes carrying a lease
  epoch are fenced. Retention: ``storage_report`` and ``sweep``.
* ``put_step`` saves a task's writes and the next checkpoint together, so a saver can commit a
  one-task superstep in a single transaction (``durability="sync"`` costs one commit per step).
  ``put_steps`` saves a chain of such steps together (a run's input checkpoint and its first
  step, say).
* Channel versions are always strings that sort in creation order.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import itertools
import random
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, Literal, NamedTuple, NotRequired, TypedDict, TypeVar

from stepgraph._twins import call, drive
from stepgraph.checkpoint.base.id import uuid6
from stepgraph.checkpoint.base.runs import (
    Lease,
    Retention,
    RunInfo,
    RunStatus,
    StorageReport,
    check_finished_status,
    failure_outcome,
)
from stepgraph.checkpoint.serde.base import SerializerProtocol
from stepgraph.config import RunnableConfig, ensure_thread_id

__all__ = [
    "ERROR",
    "INTERRUPT",
    "LATEST_VERSION",
    "RESUME",
    "SCHEDULED",
    "WRITES_IDX_MAP",
    "AsyncFromSyncSaver",
    "BaseCheckpointSaver",
    "ChannelVersions",
    "Checkpoint",
    "CheckpointMetadata",
    "CheckpointTuple",
    "Lease",
    "PendingWrite",
    "PruneStrategy",
    "Retention",
    "RunInfo",
    "RunStatus",
    "Step",
    "StorageReport",
    "SyncFromAsyncSaver",
    "TaskWrites",
    "child_config",
    "copy_checkpoint",
    "empty_checkpoint",
    "get_checkpoint_id",
    "get_checkpoint_metadata",
    "get_checkpoint_ns",
    "get_thread_id",
    "uuid6",
    "write_index",
]

LATEST_VERSION = 1
"""Version of the ``Checkpoint`` dict layout (the ``v`` key)."""

# Special pending-write channels. Their writes replace earlier ones for the same task instead of
# accumulating, which is why they get fixed negative indices (see ``write_index``).
ERROR = "__error__"
SCHEDULED = "__scheduled__"
INTERRUPT = "__interrupt__"
RESUME = "__resume__"
WRITES_IDX_MAP: dict[str, int] = {ERROR: -1, SCHEDULED: -2, INTERRUPT: -3, RESUME: -4}

ChannelVersions = dict[str, str]
PendingWrite = tuple[str, str, Any]
"""``(task_id, channel, value)``."""
PruneStrategy = Literal["keep_latest", "delete"]


class CheckpointMetadata(TypedDict, total=False):
    """Metadata saved with a checkpoint. User metadata from ``config["metadata"]`` is merged in."""

    source: Literal["input", "loop", "update", "fork"]
    """``input``: from the input of a run; ``loop``: after a superstep; ``update``: from
    ``update_state``; ``fork``: a copy of another checkpoint."""
    step: int
    """-1 for the first input checkpoint, 0 for the first loop checkpoint, then +1 per step."""
    parents: dict[str, str]
    """Checkpoint ids of the parent graphs, by checkpoint namespace."""
    run_id: str
    """The run that wrote this checkpoint (used by ``delete_for_runs``)."""


class Checkpoint(TypedDict):
    """The state of a graph between two supersteps."""

    v: int
    id: str
    """Unique and time-ordered: sorting ids as strings sorts checkpoints by creation."""
    ts: str
    """Creation time, ISO 8601 in UTC."""
    channel_values: dict[str, Any]
    channel_versions: ChannelVersions
    versions_seen: dict[str, ChannelVersions]
    """For each node, the channel versions it has already been triggered by."""
    updated_channels: list[str] | None
    """Channels updated by the superstep that produced this checkpoint."""
    channel_appends: NotRequired[dict[str, tuple[str, list[Any]]]]
    """Optional, set by the executor on a checkpoint it saves: ``{channel: (base_version,
    items)}`` for list channels that only grew since ``base_version``, an earlier version of the
    channel this saver stored (or the run loaded), so that ``channel_values[channel]`` equals
    the value at ``base_version`` followed by ``items``. A saver may store just the items; one
    that ignores the key stays correct by storing the whole value. Never stored itself, and
    absent from checkpoints read back."""
    versions_seen_changes: NotRequired[list[str]]
    """Optional, set by the executor on a checkpoint it saves: the nodes whose
    ``versions_seen`` entry changed since the parent checkpoint (the one the save's config
    names). Its presence also vouches that ``new_versions`` names every channel whose version
    changed since then. A saver may store just those entries (``storage.ChainHeads``). Never
    stored itself, and absent from checkpoints read back."""


class CheckpointTuple(NamedTuple):
    config: RunnableConfig
    checkpoint: Checkpoint
    metadata: CheckpointMetadata
    parent_config: RunnableConfig | None = None
    pending_writes: list[PendingWrite] | None = None


class TaskWrites(NamedTuple):
    """The writes one task produced, as handed to ``put_writes`` / ``put_step``."""

    task_id: str
    writes: Sequence[tuple[str, Any]]
    task_path: str = ""


class Step(NamedTuple):
    """One step of a chain handed to ``put_steps``: tasks' writes against the checkpoint before
    it, and the checkpoint they led to, as ``put_step`` takes them."""

    writes: Sequence[TaskWrites]
    checkpoint: Checkpoint
    metadata: CheckpointMetadata
    new_versions: ChannelVersions


def child_config(config: RunnableConfig, checkpoint_id: str) -> RunnableConfig:
    """``config`` naming checkpoint ``checkpoint_id`` instead (its other keys, the fence among
    them, kept): the parent config of the step after that checkpoint in ``put_steps``."""
    configurable = config.get("configurable") or {}
    return {**config, "configurable": {**configurable, "checkpoint_id": checkpoint_id}}


def empty_checkpoint() -> Checkpoint:
    return Checkpoint(
        v=LATEST_VERSION,
        id=str(uuid6()),
        ts=datetime.now(UTC).isoformat(),
        channel_values={},
        channel_versions={},
        versions_seen={},
        updated_channels=None,
    )


def copy_checkpoint(checkpoint: Checkpoint) -> Checkpoint:
    return Checkpoint(
        v=checkpoint["v"],
        id=checkpoint["id"],
        ts=checkpoint["ts"],
        channel_values=dict(checkpoint["channel_values"]),
        channel_versions=dict(checkpoint["channel_versions"]),
        versions_seen={node: dict(seen) for node, seen in checkpoint["versions_seen"].items()},
        updated_channels=checkpoint.get("updated_channels"),
    )


def get_thread_id(config: RunnableConfig) -> str:
    return ensure_thread_id(config)


def get_checkpoint_ns(config: RunnableConfig) -> str:
    return str(config.get("configurable", {}).get("checkpoint_ns", ""))


def get_checkpoint_id(config: RunnableConfig) -> str | None:
    return config.get("configurable", {}).get("checkpoint_id")


# Keys of ``configurable`` and ``metadata`` that describe where a checkpoint lives or which task
# ran, not what the run was about (LangGraph leaves out the same).
_EXCLUDED_METADATA_KEYS = frozenset(
    {
        "thread_id",
        "checkpoint_id",
        "checkpoint_ns",
        "checkpoint_map",
        "task_id",
        "langgraph_step",
        "langgraph_node",
        "langgraph_triggers",
        "langgraph_path",
        "langgraph_checkpoint_ns",
    }
)


def get_checkpoint_metadata(
    config: RunnableConfig, metadata: CheckpointMetadata
) -> CheckpointMetadata:
    """The metadata to store: the runtime's own keys plus the run's scalar user metadata.

    Scalars from ``config["metadata"]`` and ``config["configurable"]`` are merged in (as LangGraph
    does), without overriding the runtime's keys; private ``__keys`` and ``None`` values are left
    out. (LangGraph also strips NULs from strings; stepgraph stores them as they are.)
    """
    merged: dict[str, Any] = dict(metadata)
    for source in (config.get("metadata"), config.get("configurable")):
        if not source:
            continue
        for key, value in source.items():
            if key in merged or key in _EXCLUDED_METADATA_KEYS or key.startswith("__"):
                continue
            if isinstance(value, (str, int, float, bool)):
                merged[key] = value
    return merged  # type: ignore[return-value]


def write_index(channel: str, idx: int) -> int:
    """Storage index of a pending write: special channels replace, regular writes accumulate."""
    return WRITES_IDX_MAP.get(channel, idx)


class BaseCheckpointSaver(ABC):
    """Base class for checkpoint savers, with sync and async twins of every method.

    Subclasses implement the abstract methods. ``put_step`` has a correct but non-atomic default;
    database savers override it to commit a step in one transaction.
    """

    serde: SerializerProtocol

    background_saves: ClassVar[bool] = True
    """Whether ``durability="async"`` makes this saver's saves off the run's critical path (on
    a worker thread, or as asyncio tasks). True for savers that wait on I/O. A saver whose saves
    are CPU work only (``InMemorySaver``) sets False: there is nothing to overlap, and under the
    GIL a background thread would only slow the run down, so its saves are made inline."""

    lease_ttl: float = 30.0
    """Seconds a run's lease on its thread lasts without renewal. A running graph renews it
    every third of that; a process that dies holds the thread for at most this long."""

    def __init__(
        self, *, serde: SerializerProtocol | None = None, retention: Retention | None = None
    ) -> None:
        if serde is None:
            from stepgraph.checkpoint.serde import MsgpackSerializer

            serde = MsgpackSerializer()
        self.serde = serde
        self.retention = retention
        """Applied when a run finishes, and by ``sweep()``; None keeps everything."""

    # -- reading -----------------------------------------------------------------------------

    def get(self, config: RunnableConfig) -> Checkpoint | None:
        found = self.get_tuple(config)
        return found.checkpoint if found else None

    async def aget(self, config: RunnableConfig) -> Checkpoint | None:
        found = await self.aget_tuple(config)
        return found.checkpoint if found else None

    @abstractmethod
    def get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        """The checkpoint named by ``checkpoint_id``, or the thread's latest in the namespace."""

    @abstractmethod
    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None: ...

    @abstractmethod
    def list(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> Iterator[CheckpointTuple]:
        """Checkpoints newest first, optionally only those whose metadata contains ``filter``."""

    @abstractmethod
    def alist(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[CheckpointTuple]: ...

    # -- writing -----------------------------------------------------------------------------

    @abstractmethod
    def put(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        """Save a checkpoint; only channels in ``new_versions`` changed since its parent.

        ``config`` names the parent checkpoint (``checkpoint_id``) if there is one. Returns the
        config of the saved checkpoint.
        """

    @abstractmethod
    async def aput(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig: ...

    @abstractmethod
    def put_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        """Save a task's writes against the checkpoint named by ``config``.

        Idempotent per ``(task_id, index)``: repeating a call does not duplicate writes. Writes to
        the special channels (error, interrupt, resume, scheduled) replace earlier ones.
        """

    @abstractmethod
    async def aput_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None: ...

    def put_writes_batch(self, config: RunnableConfig, writes: Sequence[TaskWrites]) -> None:
        """Save the writes of several tasks against the checkpoint named by ``config``, as
        ``put_writes`` of each would.

        Database savers do it in one transaction; this default is one ``put_writes`` per task.
        """
        for task in writes:
            self.put_writes(config, task.writes, task.task_id, task.task_path)

    async def aput_writes_batch(self, config: RunnableConfig, writes: Sequence[TaskWrites]) -> None:
        for task in writes:
            await self.aput_writes(config, task.writes, task.task_id, task.task_path)

    def put_step(
        self,
        config: RunnableConfig,
        writes: Sequence[TaskWrites],
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        """Save tasks' writes against ``config``'s checkpoint, then the next checkpoint.

        Database savers do both in one transaction; this default is two separate saves.
        """
        for task in writes:
            self.put_writes(config, task.writes, task.task_id, task.task_path)
        return self.put(config, checkpoint, metadata, new_versions)

    async def aput_step(
        self,
        config: RunnableConfig,
        writes: Sequence[TaskWrites],
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        for task in writes:
            await self.aput_writes(config, task.writes, task.task_id, task.task_path)
        return await self.aput(config, checkpoint, metadata, new_versions)

    def put_steps(
        self,
        config: RunnableConfig,
        steps: Sequence[Step],
        *,
        lease: Lease | None = None,
        status: RunStatus = "done",
    ) -> RunnableConfig:
        """Save a chain of steps, as ``put_step`` each in turn: the first against ``config``'s
        checkpoint, each next one against the checkpoint of the one before (``config`` with
        that checkpoint's id). With ``lease``, the last step is saved as by
        ``put_step_and_release``. Returns the config of the last checkpoint.

        Database savers commit the chain in one transaction (Postgres: in one round trip);
        this default makes the calls one by one."""
        return drive(_steps_in_turn(self, False, config, steps, lease, status))

    async def aput_steps(
        self,
        config: RunnableConfig,
        steps: Sequence[Step],
        *,
        lease: Lease | None = None,
        status: RunStatus = "done",
    ) -> RunnableConfig:
        return await _steps_in_turn(self, True, config, steps, lease, status)

    def put_step_and_release(
        self,
        config: RunnableConfig,
        writes: Sequence[TaskWrites],
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
        lease: Lease,
        status: RunStatus = "done",
    ) -> RunnableConfig:
        """``put_step``, then ``release_lease(lease, status)``: the save that ends a run.

        Database savers commit both in one transaction (the lease is let go only if the step
        is saved); this default makes the two calls, and a release that fails once the step is
        saved is not an error: the lease then runs out."""
        options = (config, writes, checkpoint, metadata, new_versions, lease, status)
        return drive(_step_then_release(self, False, *options))

    async def aput_step_and_release(
        self,
        config: RunnableConfig,
        writes: Sequence[TaskWrites],
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
        lease: Lease,
        status: RunStatus = "done",
    ) -> RunnableConfig:
        options = (config, writes, checkpoint, metadata, new_versions, lease, status)
        return await _step_then_release(self, True, *options)

    # -- thread management -------------------------------------------------------------------

    @abstractmethod
    def delete_thread(self, thread_id: str) -> None:
        """Delete every checkpoint and write of a thread, in all namespaces."""

    @abstractmethod
    async def adelete_thread(self, thread_id: str) -> None: ...

    @abstractmethod
    def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        """Copy a thread's whole history (all namespaces, checkpoints and writes) to a new id."""

    @abstractmethod
    async def acopy_thread(self, source_thread_id: str, target_thread_id: str) -> None: ...

    @abstractmethod
    def delete_for_runs(self, run_ids: Sequence[str]) -> None:
        """Delete the checkpoints (and their writes) whose metadata ``run_id`` is in ``run_ids``."""

    @abstractmethod
    async def adelete_for_runs(self, run_ids: Sequence[str]) -> None: ...

    @abstractmethod
    def prune(
        self,
        thread_ids: Sequence[str],
        *,
        strategy: PruneStrategy = "keep_latest",
        keep_last: int | None = None,
        older_than: timedelta | None = None,
    ) -> None:
        """Shrink the history of threads.

        ``strategy="delete"`` removes the threads entirely. ``"keep_latest"`` keeps, in every
        namespace, the latest checkpoint plus the ``keep_last`` newest (default: only the latest)
        and, when ``older_than`` is given, also every checkpoint newer than that age. A kept
        checkpoint always stays fully readable.
        """

    @abstractmethod
    async def aprune(
        self,
        thread_ids: Sequence[str],
        *,
        strategy: PruneStrategy = "keep_latest",
        keep_last: int | None = None,
        older_than: timedelta | None = None,
    ) -> None: ...

    # -- ownership and the run registry (``stepgraph.checkpoint.base.runs``) ----------------

    @abstractmethod
    def acquire_lease(
        self,
        thread_id: str,
        owner: str,
        *,
        ttl: float,
        input: Any = None,
        expect_epoch: int | None = None,
    ) -> Lease:
        """Take the thread for run ``owner`` for ``ttl`` seconds, or raise ``ThreadBusyError``.

        Free (no lease, or an expired one, or a finished/deleted run): the epoch is bumped,
        the status becomes ``running``, ``input`` and the thread's latest root checkpoint id
        (``RunInfo.head``) are kept with it. ``attempts`` becomes 1, or one more than before
        if the previous run's status was still ``running`` (it died). With ``expect_epoch``
        the thread is taken only from a dead run at that epoch (recovery's take-over).
        """

    @abstractmethod
    async def aacquire_lease(
        self,
        thread_id: str,
        owner: str,
        *,
        ttl: float,
        input: Any = None,
        expect_epoch: int | None = None,
    ) -> Lease: ...

    def acquire_lease_and_get_tuple(
        self,
        config: RunnableConfig,
        owner: str,
        *,
        ttl: float,
        input: Any = None,
        expect_epoch: int | None = None,
    ) -> tuple[Lease, CheckpointTuple | None]:
        """``acquire_lease`` on ``config``'s thread, then ``get_tuple(config)`` under the lease:
        how a run starts. If the read fails, the lease is let go before the error is raised,
        recorded as a run's failure would be (``runs.failure_outcome``: ``"error"``, or
        ``"cancelled"`` for ``KeyboardInterrupt`` and the like). A database saver does both in
        one call (Postgres: one round trip); this default makes the calls one after the
        other."""
        options = {"ttl": ttl, "input": input, "expect_epoch": expect_epoch}
        return drive(_lease_then_read(self, False, config, owner, options))

    async def aacquire_lease_and_get_tuple(
        self,
        config: RunnableConfig,
        owner: str,
        *,
        ttl: float,
        input: Any = None,
        expect_epoch: int | None = None,
    ) -> tuple[Lease, CheckpointTuple | None]:
        options = {"ttl": ttl, "input": input, "expect_epoch": expect_epoch}
        return await _lease_then_read(self, True, config, owner, options)

    @abstractmethod
    def renew_lease(self, lease: Lease, *, ttl: float) -> Lease:
        """Extend ``lease`` to ``ttl`` seconds from now; ``LeaseLostError`` if the epoch moved
        on (renewing a lease that expired but was not taken over succeeds)."""

    @abstractmethod
    async def arenew_lease(self, lease: Lease, *, ttl: float) -> Lease: ...

    @abstractmethod
    def release_lease(self, lease: Lease, status: RunStatus, error: str | None = None) -> None:
        """Let go of ``lease``, recording how the run ended. Does nothing if it was lost."""

    @abstractmethod
    async def arelease_lease(
        self, lease: Lease, status: RunStatus, error: str | None = None
    ) -> None: ...

    @abstractmethod
    def get_run(self, thread_id: str) -> RunInfo | None:
        """The record of the thread's last run, None if no run ever took its lease."""

    @abstractmethod
    async def aget_run(self, thread_id: str) -> RunInfo | None: ...

    @abstractmethod
    def list_incomplete(self, *, limit: int | None = None) -> builtins.list[RunInfo]:
        """Runs that started and died: status ``running`` with an expired lease, oldest
        first. Runs paused for a human (``interrupted``) or finished are not listed."""

    @abstractmethod
    async def alist_incomplete(self, *, limit: int | None = None) -> builtins.list[RunInfo]: ...

    # -- retention ---------------------------------------------------------------------------

    @abstractmethod
    def storage_report(self, thread_id: str) -> StorageReport:
        """What the thread occupies: checkpoints, writes, value rows, bytes."""

    @abstractmethod
    async def astorage_report(self, thread_id: str) -> StorageReport: ...

    @abstractmethod
    def sweep(self, older_than: timedelta | None = None) -> builtins.list[str]:
        """Delete threads whose newest checkpoint is older than ``older_than`` (default: the
        retention ``ttl``) and that no live run holds; return their ids."""

    @abstractmethod
    async def asweep(self, older_than: timedelta | None = None) -> builtins.list[str]: ...

    def _sweep_age(self, older_than: timedelta | None) -> timedelta:
        age = older_than if older_than is not None else getattr(self.retention, "ttl", None)
        if age is None:
            raise ValueError("sweep() needs older_than=, or a saver built with Retention(ttl=...)")
        if age <= timedelta(0):
            raise ValueError(f"older_than must be positive, not {age}")
        return age

    # -- versions ----------------------------------------------------------------------------

    def get_next_version(self, current: str | int | None, channel: None = None) -> str:
        """The version after ``current``: a zero-padded counter plus a random part.

        The counter keeps versions sortable as strings; the random part keeps versions unique
        across forked branches of one thread, so per-version value rows never collide. An
        integer ``current`` (LangGraph's simplest savers count so) counts on from it.
        """
        if isinstance(current, int):
            counter = current + 1
        else:
            counter = int(current.split(".", 1)[0], 16) + 1 if current else 1
        return f"{counter:08x}.{random.getrandbits(64):016x}"


# The calls a folded method (``acquire_lease_and_get_tuple``, ``put_step_and_release``) does
# the work of, sync and async: a subclass that overrides one of them keeps seeing them.
LEASE_AND_READ = ("acquire_lease", "get_tuple")
ALEASE_AND_READ = ("aacquire_lease", "aget_tuple")
STEP_AND_RELEASE = ("put", "put_step", "release_lease")
ASTEP_AND_RELEASE = ("aput", "aput_step", "arelease_lease")
STEPS = ("put", "put_step", "put_step_and_release", "release_lease")
ASTEPS = ("aput", "aput_step", "aput_step_and_release", "arelease_lease")


def intercepted(saver: object, home: type, whole: str, parts: tuple[str, ...]) -> bool:
    """Whether ``saver``'s class overrides one of the methods ``parts`` (to log or change
    every ``put_step``, say) but not ``whole``, the method that does their work in one
    transaction: then ``whole`` keeps making those calls, one after the other (the base
    class's way), so the override still sees them."""
    cls = type(saver)
    if getattr(cls, whole) is not getattr(home, whole):
        return False
    return any(getattr(cls, part) is not getattr(home, part) for part in parts)


async def _step_then_release(
    saver: BaseCheckpointSaver,
    use_async: bool,
    config: RunnableConfig,
    writes: Sequence[TaskWrites],
    checkpoint: Checkpoint,
    metadata: CheckpointMetadata,
    new_versions: ChannelVersions,
    lease: Lease,
    status: RunStatus,
) -> RunnableConfig:
    check_finished_status(status)
    if writes:
        step = (config, writes, checkpoint, metadata, new_versions)
        saved = await call(saver, "put_step", use_async, *step)
    else:
        saved = await call(saver, "put", use_async, config, checkpoint, metadata, new_versions)
    # The step is saved: a failed release must not report it lost (a caller would save it
    # again). Unreleased, the lease simply runs out, as when a run lets go on its own.
    with contextlib.suppress(Exception):
        await call(saver, "release_lease", use_async, lease, status)
    return saved


async def _steps_in_turn(
    saver: BaseCheckpointSaver,
    use_async: bool,
    config: RunnableConfig,
    steps: Sequence[Step],
    lease: Lease | None,
    status: RunStatus,
) -> RunnableConfig:
    if not steps:
        raise ValueError("put_steps needs at least one step")
    if lease is not None:
        check_finished_status(status)
    saved = config
    for index, step in enumerate(steps):
        if lease is not None and index == len(steps) - 1:
            saved = await call(
                saver, "put_step_and_release", use_async, config, *step, lease, status
            )
        elif step.writes:
            saved = await call(saver, "put_step", use_async, config, *step)
        else:
            saved = await call(saver, "put", use_async, config, *step[1:])
        config = child_config(config, step.checkpoint["id"])
    return saved


async def _lease_then_read(
    saver: BaseCheckpointSaver,
    use_async: bool,
    config: RunnableConfig,
    owner: str,
    options: dict[str, Any],
) -> tuple[Lease, CheckpointTuple | None]:
    lease = await call(saver, "acquire_lease", use_async, get_thread_id(config), owner, **options)
    try:
        return lease, await call(saver, "get_tuple", use_async, config)
    except BaseException as error:
        with contextlib.suppress(Exception):  # unreleased, the lease simply runs out
            await call(saver, "release_lease", use_async, lease, *failure_outcome(error))
        raise


# -- twins written once ------------------------------------------------------------------------

_T = TypeVar("_T")
_BATCH = 64  # list items handed over per hop between threads (or to the loop)


class AsyncFromSyncSaver(BaseCheckpointSaver):
    """A saver written with sync methods; its async twins run them in a worker thread.

    ``async_inline = True``: the async twins call the sync methods directly instead (a saver
    that never blocks, like ``InMemorySaver``). ``alist`` hands items over in batches, so a
    listing costs a thread hop per batch, not per checkpoint.
    """

    async_inline: ClassVar[bool] = False

    async def _call(self, method: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        if self.async_inline:
            return method(*args, **kwargs)
        return await asyncio.to_thread(method, *args, **kwargs)

    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        return await self._call(self.get_tuple, config)

    async def alist(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[CheckpointTuple]:
        found = self.list(config, filter=filter, before=before, limit=limit)
        while batch := await self._call(_take, found, _BATCH):
            for one in batch:
                yield one

    async def aput(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        return await self._call(self.put, config, checkpoint, metadata, new_versions)

    async def aput_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        await self._call(self.put_writes, config, writes, task_id, task_path)

    async def aput_writes_batch(self, config: RunnableConfig, writes: Sequence[TaskWrites]) -> None:
        await self._call(self.put_writes_batch, config, writes)

    async def aput_step(
        self,
        config: RunnableConfig,
        writes: Sequence[TaskWrites],
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        return await self._call(self.put_step, config, writes, checkpoint, metadata, new_versions)

    async def aput_steps(
        self,
        config: RunnableConfig,
        steps: Sequence[Step],
        *,
        lease: Lease | None = None,
        status: RunStatus = "done",
    ) -> RunnableConfig:
        if intercepted(self, AsyncFromSyncSaver, "aput_steps", ASTEPS):
            return await _steps_in_turn(self, True, config, steps, lease, status)
        return await self._call(self.put_steps, config, steps, lease=lease, status=status)

    async def aput_step_and_release(
        self,
        config: RunnableConfig,
        writes: Sequence[TaskWrites],
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
        lease: Lease,
        status: RunStatus = "done",
    ) -> RunnableConfig:
        options = (config, writes, checkpoint, metadata, new_versions, lease, status)
        if intercepted(self, AsyncFromSyncSaver, "aput_step_and_release", ASTEP_AND_RELEASE):
            return await _step_then_release(self, True, *options)
        return await self._call(self.put_step_and_release, *options)

    async def adelete_thread(self, thread_id: str) -> None:
        await self._call(self.delete_thread, thread_id)

    async def acopy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        await self._call(self.copy_thread, source_thread_id, target_thread_id)

    async def adelete_for_runs(self, run_ids: Sequence[str]) -> None:
        await self._call(self.delete_for_runs, run_ids)

    async def aprune(
        self,
        thread_ids: Sequence[str],
        *,
        strategy: PruneStrategy = "keep_latest",
        keep_last: int | None = None,
        older_than: timedelta | None = None,
    ) -> None:
        await self._call(
            self.prune, thread_ids, strategy=strategy, keep_last=keep_last, older_than=older_than
        )

    async def aacquire_lease(
        self,
        thread_id: str,
        owner: str,
        *,
        ttl: float,
        input: Any = None,
        expect_epoch: int | None = None,
    ) -> Lease:
        return await self._call(
            self.acquire_lease, thread_id, owner, ttl=ttl, input=input, expect_epoch=expect_epoch
        )

    async def aacquire_lease_and_get_tuple(
        self,
        config: RunnableConfig,
        owner: str,
        *,
        ttl: float,
        input: Any = None,
        expect_epoch: int | None = None,
    ) -> tuple[Lease, CheckpointTuple | None]:
        options = {"ttl": ttl, "input": input, "expect_epoch": expect_epoch}
        if intercepted(self, AsyncFromSyncSaver, "aacquire_lease_and_get_tuple", ALEASE_AND_READ):
            return await _lease_then_read(self, True, config, owner, options)
        return await self._call(self.acquire_lease_and_get_tuple, config, owner, **options)

    async def arenew_lease(self, lease: Lease, *, ttl: float) -> Lease:
        return await self._call(self.renew_lease, lease, ttl=ttl)

    async def arelease_lease(
        self, lease: Lease, status: RunStatus, error: str | None = None
    ) -> None:
        await self._call(self.release_lease, lease, status, error)

    async def aget_run(self, thread_id: str) -> RunInfo | None:
        return await self._call(self.get_run, thread_id)

    async def alist_incomplete(self, *, limit: int | None = None) -> builtins.list[RunInfo]:
        return await self._call(self.list_incomplete, limit=limit)

    async def astorage_report(self, thread_id: str) -> StorageReport:
        return await self._call(self.storage_report, thread_id)

    async def asweep(self, older_than: timedelta | None = None) -> builtins.list[str]:
        return await self._call(self.sweep, older_than)


def _take(items: Iterator[_T], count: int) -> list[_T]:
    return list(itertools.islice(items, count))


class SyncFromAsyncSaver(BaseCheckpointSaver):
    """A saver written with async methods, bound to the event loop it was created in; its
    sync twins are for other threads: they run the async method on that loop and wait.

    Called from the loop itself they would deadlock, so they raise
    ``asyncio.InvalidStateError`` instead.
    """

    loop: asyncio.AbstractEventLoop

    def _wait(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        """Run ``coroutine`` on the saver's loop from another thread, and return its result."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            coroutine.close()
            raise asyncio.InvalidStateError(
                f"A synchronous method of {type(self).__name__} was called from inside its own "
                "event loop, where waiting for the result would deadlock. Use the async method "
                "instead (e.g. `await saver.aget_tuple(...)`, `await graph.ainvoke(...)`), or "
                "call the sync method from another thread."
            )
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        return self._wait(self.aget_tuple(config))

    def list(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> Iterator[CheckpointTuple]:
        found = self.alist(config, filter=filter, before=before, limit=limit)
        try:
            while batch := self._wait(_atake(found, _BATCH)):
                yield from batch
        finally:
            self._wait(found.aclose())  # type: ignore[attr-defined]

    def put(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        return self._wait(self.aput(config, checkpoint, metadata, new_versions))

    def put_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        self._wait(self.aput_writes(config, writes, task_id, task_path))

    def put_writes_batch(self, config: RunnableConfig, writes: Sequence[TaskWrites]) -> None:
        self._wait(self.aput_writes_batch(config, writes))

    def put_step(
        self,
        config: RunnableConfig,
        writes: Sequence[TaskWrites],
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        return self._wait(self.aput_step(config, writes, checkpoint, metadata, new_versions))

    def put_steps(
        self,
        config: RunnableConfig,
        steps: Sequence[Step],
        *,
        lease: Lease | None = None,
        status: RunStatus = "done",
    ) -> RunnableConfig:
        if intercepted(self, SyncFromAsyncSaver, "put_steps", STEPS):
            return drive(_steps_in_turn(self, False, config, steps, lease, status))
        return self._wait(self.aput_steps(config, steps, lease=lease, status=status))

    def put_step_and_release(
        self,
        config: RunnableConfig,
        writes: Sequence[TaskWrites],
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
        lease: Lease,
        status: RunStatus = "done",
    ) -> RunnableConfig:
        options = (config, writes, checkpoint, metadata, new_versions, lease, status)
        if intercepted(self, SyncFromAsyncSaver, "put_step_and_release", STEP_AND_RELEASE):
            return drive(_step_then_release(self, False, *options))
        return self._wait(self.aput_step_and_release(*options))

    def delete_thread(self, thread_id: str) -> None:
        self._wait(self.adelete_thread(thread_id))

    def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        self._wait(self.acopy_thread(source_thread_id, target_thread_id))

    def delete_for_runs(self, run_ids: Sequence[str]) -> None:
        self._wait(self.adelete_for_runs(run_ids))

    def prune(
        self,
        thread_ids: Sequence[str],
        *,
        strategy: PruneStrategy = "keep_latest",
        keep_last: int | None = None,
        older_than: timedelta | None = None,
    ) -> None:
        self._wait(
            self.aprune(thread_ids, strategy=strategy, keep_last=keep_last, older_than=older_than)
        )

    def acquire_lease(
        self,
        thread_id: str,
        owner: str,
        *,
        ttl: float,
        input: Any = None,
        expect_epoch: int | None = None,
    ) -> Lease:
        return self._wait(
            self.aacquire_lease(thread_id, owner, ttl=ttl, input=input, expect_epoch=expect_epoch)
        )

    def acquire_lease_and_get_tuple(
        self,
        config: RunnableConfig,
        owner: str,
        *,
        ttl: float,
        input: Any = None,
        expect_epoch: int | None = None,
    ) -> tuple[Lease, CheckpointTuple | None]:
        options = {"ttl": ttl, "input": input, "expect_epoch": expect_epoch}
        if intercepted(self, SyncFromAsyncSaver, "acquire_lease_and_get_tuple", LEASE_AND_READ):
            return drive(_lease_then_read(self, False, config, owner, options))
        return self._wait(self.aacquire_lease_and_get_tuple(config, owner, **options))

    def renew_lease(self, lease: Lease, *, ttl: float) -> Lease:
        return self._wait(self.arenew_lease(lease, ttl=ttl))

    def release_lease(self, lease: Lease, status: RunStatus, error: str | None = None) -> None:
        self._wait(self.arelease_lease(lease, status, error))

    def get_run(self, thread_id: str) -> RunInfo | None:
        return self._wait(self.aget_run(thread_id))

    def list_incomplete(self, *, limit: int | None = None) -> builtins.list[RunInfo]:
        return self._wait(self.alist_incomplete(limit=limit))

    def storage_report(self, thread_id: str) -> StorageReport:
        return self._wait(self.astorage_report(thread_id))

    def sweep(self, older_than: timedelta | None = None) -> builtins.list[str]:
        return self._wait(self.asweep(older_than))


async def _atake(items: AsyncIterator[_T], count: int) -> list[_T]:
    taken: list[_T] = []
    async for item in items:
        taken.append(item)
        if len(taken) >= count:
            break
    return taken
