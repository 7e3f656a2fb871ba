"""Plans: database work written once for a saver's sync and async twins.

A plan is a generator that yields ``Statement``s and is sent back each statement's rows; it
returns the operation's result. Which statements to run, and what to make of their rows, lives
in the plan; a driver only executes statements on a connection, with ``run_steps`` (sync) or
``arun_steps`` (async). So a sync saver and its async twin share their SQL, row mapping and
serialization, and differ only in the few lines that do I/O.

``PlanSaver`` and ``AsyncPlanSaver`` write the saver methods once on top of that: each method
asks the backend's ``SaverPlans`` for the ``Job`` of the operation and runs it with the saver's
``_run``, so a saver keeps only its connection handling and its runner.
"""

from __future__ import annotations

import builtins
import contextlib
from abc import abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, Generic, Protocol, TypeVar

from stepgraph.checkpoint.base import (
    ALEASE_AND_READ,
    ASTEP_AND_RELEASE,
    ASTEPS,
    LEASE_AND_READ,
    STEP_AND_RELEASE,
    STEPS,
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
    Step,
    StorageReport,
    SyncFromAsyncSaver,
    TaskWrites,
    get_thread_id,
    intercepted,
)
from stepgraph.checkpoint.base.runs import check_finished_status, failure_outcome
from stepgraph.checkpoint.serde.base import SerializerProtocol
from stepgraph.checkpoint.storage import ChainHeads, CheckpointRow, ListPager, PageQuery
from stepgraph.checkpoint.storage.runs import check_limit
from stepgraph.config import RunnableConfig

__all__ = [
    "AsyncPlanSaver",
    "Job",
    "Plan",
    "PlanSaver",
    "SaverPlans",
    "Statement",
    "arun_steps",
    "run_steps",
]

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)
S = TypeVar("S")
S_co = TypeVar("S_co", covariant=True)


@dataclass(frozen=True, slots=True)
class Statement:
    sql: str
    params: Any = ()
    """Parameters of one execution, or an iterable of them when ``many`` is true."""
    many: bool = False
    """Execute once per parameter set (``executemany``); the plan is sent no rows."""
    fetch: bool = False
    """The plan reads the statement's rows. A driver that fetches every statement's rows
    anyway (sqlite3, where that is free) may ignore it; others send back ``[]`` without it."""
    retry_when_locked: float = 0.0
    """SQLite: seconds to keep retrying while the statement fails with "database is locked",
    for statements SQLite does not wait on by itself (its busy handler is skipped for them)."""
    ahead: Statement | None = None
    """A statement the plan will likely yield next, to send in the same round trip (drivers
    without round trips ignore it). If the plan's next statement is this very object, the
    driver sends back the rows it already has instead of executing it again; otherwise they
    are dropped. So a plan can guess its next statement without depending on the guess."""


Plan = Generator[Statement, list[Any], T]


def run_steps(plan: Plan[T], execute: Callable[[Statement], list[Any]]) -> T:
    """Run ``plan``, executing each statement with ``execute`` (which returns its rows)."""
    try:
        statement = next(plan)
        while True:
            statement = plan.send(execute(statement))
    except StopIteration as done:
        return done.value


async def arun_steps(plan: Plan[T], execute: Callable[[Statement], Awaitable[list[Any]]]) -> T:
    """``run_steps`` with an awaited ``execute``."""
    try:
        statement = next(plan)
        while True:
            statement = plan.send(await execute(statement))
    except StopIteration as done:
        return done.value


# -- savers written once ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Job(Generic[T_co, S_co]):
    """One operation of a saver, ready to run."""

    make: Callable[[], Plan[T_co]]
    """Builds the plan; a runner that retries on a fresh connection builds it again."""
    scope: S_co
    """What the backend's runner needs around the plan (Postgres: a ``Scope``; SQLite, whose
    plans open their own transactions: None)."""


def lease_then_read(
    take: Job[Lease, S_co], read: Job[T_co, S_co], taken: list[Lease]
) -> Job[tuple[Lease, T_co], S_co]:
    """``take`` then ``read`` as one job (both need the same scope); the lease is appended to
    ``taken`` once it is taken, so a caller whose read failed can let go of it. The read's
    first statement is sent ahead of the lease's (``Statement.ahead``): where the driver
    pipelines, taking a thread and reading it cost one round trip. If the lease is refused,
    those rows are dropped."""

    def plan() -> Plan[tuple[Lease, T_co]]:
        reading = read.make()
        try:
            first = next(reading)
        except StopIteration as done:  # a read that needs no statement
            taken.append((yield from take.make()))
            return taken[-1], done.value
        taken.append((yield from _sending_ahead(take.make(), first)))
        return taken[-1], (yield from _resumed(reading, (yield first)))

    return Job(plan, take.scope)


def _start(
    plans: SaverPlans[S],
    serde: SerializerProtocol,
    heads: ChainHeads,
    config: RunnableConfig,
    owner: str,
    ttl: float,
    input: Any,
    expect_epoch: int | None,
) -> tuple[Job[Lease, S], Job[CheckpointTuple | None, S]]:
    """The jobs ``acquire_lease_and_get_tuple`` runs as one: how a run starts."""
    take = plans.acquire_lease(serde, get_thread_id(config), owner, ttl, input, expect_epoch)
    return take, plans.get_tuple(serde, config, heads)


def _last_step(
    plans: SaverPlans[S],
    serde: SerializerProtocol,
    heads: ChainHeads,
    step: tuple[RunnableConfig, Sequence[TaskWrites], Checkpoint, CheckpointMetadata, Any],
    lease: Lease,
    status: RunStatus,
) -> Job[RunnableConfig, S]:
    """The job of ``put_step_and_release``: the step, and the lease let go in its transaction."""
    check_finished_status(status)
    return plans.put_step(serde, *step, heads, release=(lease, status))


def _chain(
    plans: SaverPlans[S],
    serde: SerializerProtocol,
    heads: ChainHeads,
    config: RunnableConfig,
    steps: Sequence[Step],
    release: tuple[Lease, RunStatus] | None,
) -> Job[RunnableConfig, S]:
    """The job of ``put_steps``: a chain of one step is ``put_step``'s."""
    if not steps:
        raise ValueError("put_steps needs at least one step")
    if release is not None:
        check_finished_status(release[1])
    if len(steps) == 1:
        return plans.put_step(serde, config, *steps[0], heads, release=release)
    return plans.put_steps(serde, config, steps, heads, release)


def _sending_ahead(plan: Plan[T], ahead: Statement) -> Plan[T]:
    """``plan``, its first statement carrying ``ahead`` (unless it has one of its own)."""
    try:
        statement = next(plan)
        if statement.ahead is None:
            statement = replace(statement, ahead=ahead)
        while True:
            statement = plan.send((yield statement))
    except StopIteration as done:
        return done.value


def _resumed(plan: Plan[T], rows: list[Any]) -> Plan[T]:
    """The rest of ``plan``, whose first statement was run and gave ``rows``."""
    try:
        statement = plan.send(rows)
        while True:
            statement = plan.send((yield statement))
    except StopIteration as done:
        return done.value


class SaverPlans(Protocol[S_co]):
    """A backend's saver operations, each as a ``Job``. Making a job may do work that needs no
    connection (Postgres serializes a checkpoint then, before a connection is taken)."""

    def get_tuple(
        self, serde: SerializerProtocol, config: RunnableConfig, heads: ChainHeads | None = None
    ) -> Job[CheckpointTuple | None, S_co]:
        """``heads``: the saver's, whose kept blobs shorten the chains a read applies."""
        ...

    def list_page(
        self, serde: SerializerProtocol, query: PageQuery, heads: ChainHeads | None = None
    ) -> Job[tuple[list[CheckpointRow], list[CheckpointTuple]], S_co]: ...

    def put_step(
        self,
        serde: SerializerProtocol,
        config: RunnableConfig,
        writes: Sequence[TaskWrites],
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
        heads: ChainHeads,
        release: tuple[Lease, RunStatus] | None = None,
    ) -> Job[RunnableConfig, S_co]:
        """Stores the checkpoint's blob as changes to its parent's when ``heads`` allows
        (``storage.checkpoint_rows``), and calls ``heads.saved(rows, serde)`` once the rows are
        committed. With ``release``, the lease is let go with that status in the same
        transaction, once the step is saved."""
        ...

    def put_steps(
        self,
        serde: SerializerProtocol,
        config: RunnableConfig,
        steps: Sequence[Step],
        heads: ChainHeads,
        release: tuple[Lease, RunStatus] | None = None,
    ) -> Job[RunnableConfig, S_co]:
        """``put_step`` of each step in turn (``BaseCheckpointSaver.put_steps``), in one
        transaction (and on Postgres one round trip). A step's blob may be stored as changes
        to the one before's. With
        ``release``, the last step's save lets go of the lease, as in ``put_step``."""
        ...

    def put_writes(
        self, serde: SerializerProtocol, config: RunnableConfig, writes: Sequence[TaskWrites]
    ) -> Job[None, S_co] | None:
        """None when there is nothing to run."""

    def delete_threads(self, thread_ids: Sequence[str]) -> Job[None, S_co]: ...

    def copy_thread(self, source_thread_id: str, target_thread_id: str) -> Job[None, S_co]: ...

    def delete_for_runs(
        self, serde: SerializerProtocol, run_ids: Sequence[str]
    ) -> Job[None, S_co]: ...

    def prune(
        self,
        serde: SerializerProtocol,
        thread_ids: Sequence[str],
        strategy: PruneStrategy,
        keep_last: int | None,
        older_than: timedelta | None,
    ) -> Job[None, S_co]: ...

    # ownership and the run registry (``stepgraph.checkpoint.storage.runs``)

    def acquire_lease(
        self,
        serde: SerializerProtocol,
        thread_id: str,
        owner: str,
        ttl: float,
        input: Any,
        expect_epoch: int | None,
    ) -> Job[Lease, S_co]: ...

    def renew_lease(self, lease: Lease, ttl: float) -> Job[Lease, S_co]: ...

    def release_lease(
        self, lease: Lease, status: RunStatus, error: str | None
    ) -> Job[None, S_co]: ...

    def get_run(self, serde: SerializerProtocol, thread_id: str) -> Job[RunInfo | None, S_co]: ...

    def list_incomplete(
        self, serde: SerializerProtocol, limit: int | None
    ) -> Job[list[RunInfo], S_co]: ...

    # retention

    def storage_report(self, thread_id: str) -> Job[StorageReport, S_co]: ...

    def sweep(self, older_than: timedelta) -> Job[list[str], S_co]:
        """Delete (leaving tombstones) the threads whose newest checkpoint is older than
        ``older_than`` and whose lease no live run holds; return their ids."""


class PlanSaver(AsyncFromSyncSaver, Generic[S]):
    """A sync saver whose methods run its backend's ``plans`` with ``_run``.

    A subclass sets ``plans`` and implements ``_run`` (connections, locks, setup on first use);
    the async twins run the sync methods in a worker thread (``AsyncFromSyncSaver``).
    """

    plans: SaverPlans[S]

    def __init__(
        self, *, serde: SerializerProtocol | None = None, retention: Retention | None = None
    ) -> None:
        super().__init__(serde=serde, retention=retention)
        self.heads = ChainHeads()

    @abstractmethod
    def _run(self, job: Job[T, S]) -> T:
        """Run ``job`` on the saver's connection and return the plan's result."""

    # -- reading -----------------------------------------------------------------------------

    def get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        return self._run(self.plans.get_tuple(self.serde, config, self.heads))

    def list(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> Iterator[CheckpointTuple]:
        pager = ListPager(config, filter, before, limit)
        yield from pager.run(
            lambda query: self._run(self.plans.list_page(self.serde, query, self.heads))
        )

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
        self.put_writes_batch(config, [TaskWrites(task_id, writes, task_path)])

    def put_writes_batch(self, config: RunnableConfig, writes: Sequence[TaskWrites]) -> None:
        if (job := self.plans.put_writes(self.serde, config, writes)) is not None:
            self._run(job)

    def put_step(
        self,
        config: RunnableConfig,
        writes: Sequence[TaskWrites],
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        return self._run(
            self.plans.put_step(
                self.serde, config, writes, checkpoint, metadata, new_versions, self.heads
            )
        )

    def put_steps(
        self,
        config: RunnableConfig,
        steps: Sequence[Step],
        *,
        lease: Lease | None = None,
        status: RunStatus = "done",
    ) -> RunnableConfig:
        if intercepted(self, PlanSaver, "put_steps", STEPS):
            return super().put_steps(config, steps, lease=lease, status=status)
        release = None if lease is None else (lease, status)
        return self._run(_chain(self.plans, self.serde, self.heads, config, steps, release))

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
        step = (config, writes, checkpoint, metadata, new_versions)
        if intercepted(self, PlanSaver, "put_step_and_release", STEP_AND_RELEASE):
            return super().put_step_and_release(*step, lease, status)
        return self._run(_last_step(self.plans, self.serde, self.heads, step, lease, status))

    # -- thread management -------------------------------------------------------------------

    def delete_thread(self, thread_id: str) -> None:
        self._run(self.plans.delete_threads([thread_id]))
        self.heads.forget([thread_id])

    def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        self._run(self.plans.copy_thread(source_thread_id, target_thread_id))
        # The copy may have replaced rows of the target that had the same ids.
        self.heads.forget([target_thread_id])

    def delete_for_runs(self, run_ids: Sequence[str]) -> None:
        self._run(self.plans.delete_for_runs(self.serde, run_ids))

    def prune(
        self,
        thread_ids: Sequence[str],
        *,
        strategy: PruneStrategy = "keep_latest",
        keep_last: int | None = None,
        older_than: timedelta | None = None,
    ) -> None:
        self._run(self.plans.prune(self.serde, thread_ids, strategy, keep_last, older_than))

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
        job = self.plans.acquire_lease(self.serde, thread_id, owner, ttl, input, expect_epoch)
        return self._run(job)

    def acquire_lease_and_get_tuple(
        self,
        config: RunnableConfig,
        owner: str,
        *,
        ttl: float,
        input: Any = None,
        expect_epoch: int | None = None,
    ) -> tuple[Lease, CheckpointTuple | None]:
        if intercepted(self, PlanSaver, "acquire_lease_and_get_tuple", LEASE_AND_READ):
            options = {"ttl": ttl, "input": input, "expect_epoch": expect_epoch}
            return super().acquire_lease_and_get_tuple(config, owner, **options)
        taken: builtins.list[Lease] = []
        job = _start(self.plans, self.serde, self.heads, config, owner, ttl, input, expect_epoch)
        try:
            return self._run(lease_then_read(*job, taken))
        except BaseException as error:
            if taken:  # as the default: the lease was taken, the read failed
                with contextlib.suppress(Exception):
                    self.release_lease(taken[-1], *failure_outcome(error))
            raise

    def renew_lease(self, lease: Lease, *, ttl: float) -> Lease:
        return self._run(self.plans.renew_lease(lease, ttl))

    def release_lease(self, lease: Lease, status: RunStatus, error: str | None = None) -> None:
        self._run(self.plans.release_lease(lease, status, error))

    def get_run(self, thread_id: str) -> RunInfo | None:
        return self._run(self.plans.get_run(self.serde, thread_id))

    def list_incomplete(self, *, limit: int | None = None) -> builtins.list[RunInfo]:
        check_limit(limit)
        return self._run(self.plans.list_incomplete(self.serde, limit))

    # -- retention ---------------------------------------------------------------------------

    def storage_report(self, thread_id: str) -> StorageReport:
        return self._run(self.plans.storage_report(thread_id))

    def sweep(self, older_than: timedelta | None = None) -> builtins.list[str]:
        return self._run(self.plans.sweep(self._sweep_age(older_than)))


class AsyncPlanSaver(SyncFromAsyncSaver, Generic[S]):
    """``PlanSaver``'s async twin: its methods await ``_run``; the sync twins are for other
    threads (``SyncFromAsyncSaver``)."""

    plans: SaverPlans[S]

    def __init__(
        self, *, serde: SerializerProtocol | None = None, retention: Retention | None = None
    ) -> None:
        super().__init__(serde=serde, retention=retention)
        self.heads = ChainHeads()

    @abstractmethod
    async def _run(self, job: Job[T, S]) -> T:
        """Run ``job`` on the saver's connection and return the plan's result."""

    # -- reading -----------------------------------------------------------------------------

    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        return await self._run(self.plans.get_tuple(self.serde, config, self.heads))

    async def alist(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[CheckpointTuple]:
        pager = ListPager(config, filter, before, limit)
        async for found in pager.arun(
            lambda query: self._run(self.plans.list_page(self.serde, query, self.heads))
        ):
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
        if (job := self.plans.put_writes(self.serde, config, writes)) is not None:
            await self._run(job)

    async def aput_step(
        self,
        config: RunnableConfig,
        writes: Sequence[TaskWrites],
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        return await self._run(
            self.plans.put_step(
                self.serde, config, writes, checkpoint, metadata, new_versions, self.heads
            )
        )

    async def aput_steps(
        self,
        config: RunnableConfig,
        steps: Sequence[Step],
        *,
        lease: Lease | None = None,
        status: RunStatus = "done",
    ) -> RunnableConfig:
        if intercepted(self, AsyncPlanSaver, "aput_steps", ASTEPS):
            return await super().aput_steps(config, steps, lease=lease, status=status)
        release = None if lease is None else (lease, status)
        return await self._run(_chain(self.plans, self.serde, self.heads, config, steps, release))

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
        step = (config, writes, checkpoint, metadata, new_versions)
        if intercepted(self, AsyncPlanSaver, "aput_step_and_release", ASTEP_AND_RELEASE):
            return await super().aput_step_and_release(*step, lease, status)
        return await self._run(_last_step(self.plans, self.serde, self.heads, step, lease, status))

    # -- thread management -------------------------------------------------------------------

    async def adelete_thread(self, thread_id: str) -> None:
        await self._run(self.plans.delete_threads([thread_id]))
        self.heads.forget([thread_id])

    async def acopy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        await self._run(self.plans.copy_thread(source_thread_id, target_thread_id))
        self.heads.forget([target_thread_id])  # as copy_thread

    async def adelete_for_runs(self, run_ids: Sequence[str]) -> None:
        await self._run(self.plans.delete_for_runs(self.serde, run_ids))

    async def aprune(
        self,
        thread_ids: Sequence[str],
        *,
        strategy: PruneStrategy = "keep_latest",
        keep_last: int | None = None,
        older_than: timedelta | None = None,
    ) -> None:
        await self._run(self.plans.prune(self.serde, thread_ids, strategy, keep_last, older_than))

    # -- ownership and the run registry ------------------------------------------------------

    async def aacquire_lease(
        self,
        thread_id: str,
        owner: str,
        *,
        ttl: float,
        input: Any = None,
        expect_epoch: int | None = None,
    ) -> Lease:
        job = self.plans.acquire_lease(self.serde, thread_id, owner, ttl, input, expect_epoch)
        return await self._run(job)

    async def aacquire_lease_and_get_tuple(
        self,
        config: RunnableConfig,
        owner: str,
        *,
        ttl: float,
        input: Any = None,
        expect_epoch: int | None = None,
    ) -> tuple[Lease, CheckpointTuple | None]:
        if intercepted(self, AsyncPlanSaver, "aacquire_lease_and_get_tuple", ALEASE_AND_READ):
            options = {"ttl": ttl, "input": input, "expect_epoch": expect_epoch}
            return await super().aacquire_lease_and_get_tuple(config, owner, **options)
        taken: builtins.list[Lease] = []
        job = _start(self.plans, self.serde, self.heads, config, owner, ttl, input, expect_epoch)
        try:
            return await self._run(lease_then_read(*job, taken))
        except BaseException as error:
            if taken:
                with contextlib.suppress(Exception):
                    await self.arelease_lease(taken[-1], *failure_outcome(error))
            raise

    async def arenew_lease(self, lease: Lease, *, ttl: float) -> Lease:
        return await self._run(self.plans.renew_lease(lease, ttl))

    async def arelease_lease(
        self, lease: Lease, status: RunStatus, error: str | None = None
    ) -> None:
        await self._run(self.plans.release_lease(lease, status, error))

    async def aget_run(self, thread_id: str) -> RunInfo | None:
        return await self._run(self.plans.get_run(self.serde, thread_id))

    async def alist_incomplete(self, *, limit: int | None = None) -> builtins.list[RunInfo]:
        check_limit(limit)
        return await self._run(self.plans.list_incomplete(self.serde, limit))

    # -- retention ---------------------------------------------------------------------------

    async def astorage_report(self, thread_id: str) -> StorageReport:
        return await self._run(self.plans.storage_report(thread_id))

    async def asweep(self, older_than: timedelta | None = None) -> builtins.list[str]:
        return await self._run(self.plans.sweep(self._sweep_age(older_than)))
