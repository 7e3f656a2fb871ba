"""Thread ownership and the run registry: what a saver keeps about the run on each thread.

One run writes to a thread at a time. Before it reads the thread's latest checkpoint a run
takes the thread's *lease*; each later write carries the lease's *epoch* (a fencing token,
``LEASE_EPOCH_KEY`` in the write's ``configurable``), and the saver checks it inside the write's
transaction. Taking a lease over (after it expired) or deleting the thread bumps the epoch, so
a writer that lost its lease (paused past it, say) has every later write refused with
``LeaseLostError`` instead of forking the history.

The same row records the run's status: a run still ``"running"`` whose lease expired died
without finishing (a crash), which is what ``list_incomplete`` finds.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal, NamedTuple

from stepgraph.config import RunnableConfig

__all__ = [
    "FINISHED",
    "LEASE_EPOCH_KEY",
    "RECOVER_EPOCH_KEY",
    "Lease",
    "Retention",
    "RunInfo",
    "RunStatus",
    "StorageReport",
    "check_finished_status",
    "failure_outcome",
    "fence_of",
    "with_fence",
]

RunStatus = Literal["running", "done", "interrupted", "error", "cancelled", "abandoned", "deleted"]
"""``running``: a run holds (or held, if it crashed) the lease. ``done`` / ``interrupted`` /
``error``: the last run ended that way. ``cancelled``: its caller stopped it (closed the
stream, cancelled the task, Ctrl-C); ``invoke(None, config)`` continues it. ``abandoned``:
recovery gave up after too many crashes. ``deleted``: the thread was deleted (the row stays as
a tombstone that fences stale writers)."""

FINISHED: frozenset[str] = frozenset({"done", "interrupted", "error", "cancelled", "abandoned"})

LEASE_EPOCH_KEY = "__lease_epoch__"
"""Key of a write's ``configurable`` holding the writer's lease epoch. Writes without it are
not fenced (direct use of the saver API)."""


class Lease(NamedTuple):
    """A run's hold on a thread."""

    thread_id: str
    owner: str
    """A name the run took the lease under (new for every run)."""
    epoch: int
    """Bumped by every take-over and by ``delete_thread``; writes carry it as a fencing token."""
    expires_at: float
    """Unix time (the database's clock, for Postgres) after which another run may take over."""
    attempts: int
    """How many runs have started on this thread since one last finished: 1 for a fresh run,
    +1 each time a run takes over from one that died while running."""


@dataclass(frozen=True, slots=True)
class RunInfo:
    """What the saver knows of the last run on a thread."""

    thread_id: str
    epoch: int
    """The lease's epoch: recovery takes the thread over only at this epoch (``expect_epoch``)."""
    head: str | None
    """The thread's latest root checkpoint id when the run started (None: it had none)."""
    run_id: str | None
    status: RunStatus
    attempts: int
    expires_at: float | None
    """When the holder's lease runs out (unix time); None when no run holds it."""
    updated_at: float
    """Unix time of the last change to this record."""
    error: str | None = None
    input: Any = None
    """What the run was started with, kept until it ends. For graph runs, what recovery
    repeats: ``{"input": ..., "durability": ..., "interrupt_before": [...],
    "interrupt_after": [...]}`` (keys only where the call set them)."""


@dataclass(frozen=True, slots=True)
class StorageReport:
    """What one thread occupies in a saver."""

    thread_id: str
    checkpoints: int
    writes: int
    """Rows of pending writes: one per special write (error, interrupt, ...) and one for the
    regular writes of each ``put_writes`` of a task (``storage.TASK_WRITES``)."""
    values: int
    """Channel-value rows stored apart from checkpoints (0 for savers that keep none)."""
    bytes: int
    """Bytes of serialized checkpoints, metadata, writes and values (not index overhead)."""


@dataclass(frozen=True, slots=True)
class Retention:
    """A saver's retention policy, applied when a run finishes and by ``saver.sweep()``.

    ``delete_on_completion``: a thread whose run finished ``done`` is deleted. ``keep_last``: a
    finished run's thread is pruned to its newest ``keep_last`` checkpoints per namespace.
    ``ttl``: ``sweep()`` deletes threads with no checkpoint newer than this (threads a live run
    holds are kept).
    """

    keep_last: int | None = None
    ttl: timedelta | None = None
    delete_on_completion: bool = False

    def __post_init__(self) -> None:
        if self.keep_last is not None and self.keep_last < 1:
            raise ValueError(f"Retention.keep_last must be at least 1, not {self.keep_last}")
        if self.ttl is not None and self.ttl <= timedelta(0):
            raise ValueError(f"Retention.ttl must be positive, not {self.ttl}")


RECOVER_EPOCH_KEY = "__recover_epoch__"
"""Key of a run's ``configurable`` set by recovery: the epoch of the dead run it takes over
(``acquire_lease(expect_epoch=...)``), so two workers never both recover one run."""


def fence_of(config: RunnableConfig) -> int | None:
    """The lease epoch a write carries, if any."""
    epoch = (config.get("configurable") or {}).get(LEASE_EPOCH_KEY)
    return None if epoch is None else int(epoch)


def with_fence(config: RunnableConfig, epoch: int | None) -> RunnableConfig:
    """``config`` with ``epoch`` as its fencing token (``config`` itself when ``epoch`` is None)."""
    if epoch is None:
        return config
    return {
        **config,
        "configurable": {**(config.get("configurable") or {}), LEASE_EPOCH_KEY: epoch},
    }


def failure_outcome(error: BaseException) -> tuple[RunStatus, str]:
    """How a run that raised ``error`` is recorded: ``"error"`` and the error, or, for what
    is not an ``Exception`` (a closed stream, ``KeyboardInterrupt``, a cancelled task: its
    caller stopped it on purpose), ``"cancelled"`` and the exception's name."""
    if isinstance(error, Exception):
        return "error", f"{type(error).__name__}: {error}"[:2000]
    return "cancelled", type(error).__name__


def check_finished_status(status: str) -> None:
    """The status a run's last save (``put_step_and_release``) lets go of its lease with."""
    if status not in FINISHED:
        raise ValueError(
            f"A run's last save lets go of its lease with one of {sorted(FINISHED)}, not {status!r}"
        )
