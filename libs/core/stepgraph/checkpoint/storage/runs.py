"""The run registry's row model and decisions, shared by every saver.

A saver keeps one ``RunRow`` per thread that a run ever leased. The decisions about that row
(may this run take the lease, is this write still fenced in, what does the row say of the run)
are made here, so the memory, SQLite and Postgres savers agree on them; each saver only reads
and writes the row inside its own transaction.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from stepgraph.checkpoint.base.runs import FINISHED, Lease, RunInfo, RunStatus
from stepgraph.checkpoint.serde.base import SerializerProtocol
from stepgraph.checkpoint.storage import check_key
from stepgraph.errors import LeaseLostError, ThreadBusyError

__all__ = [
    "RELEASE_STATUSES",
    "RunRow",
    "check_fence",
    "check_limit",
    "check_release_status",
    "check_ttl",
    "decode_input",
    "deleted",
    "encode_input",
    "is_incomplete",
    "lease_of",
    "released",
    "renewed",
    "run_info",
    "take_lease",
]

RELEASE_STATUSES = FINISHED | {"running"}
"""Statuses a lease may be let go with (``release_lease``): how the run ended, or
``"running"``: handed back unfinished (``update_state`` on a thread whose run died)."""


class RunRow(NamedTuple):
    """The stored record of a thread's run (columns in this order in every backend)."""

    thread_id: str
    epoch: int
    owner: str | None
    """The run that took the lease last (kept after it lets go)."""
    expires_at: float | None
    """None when no run holds the lease."""
    status: str
    attempts: int
    updated_at: float
    error: str | None = None
    input_type: str | None = None
    input_blob: bytes | None = None
    head: str | None = None
    """The thread's latest root-namespace checkpoint id when the run took the lease: recovery
    tells a run that saved nothing (the head is unchanged) from one that saved some steps."""


def check_ttl(ttl: float) -> float:
    if not ttl > 0:
        raise ValueError(f"A lease's ttl must be a positive number of seconds, not {ttl!r}")
    return float(ttl)


def check_limit(limit: int | None) -> None:
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be None or at least 0, not {limit}")


def check_release_status(status: str) -> None:
    if status not in RELEASE_STATUSES:
        raise ValueError(
            f"A lease is let go with one of {sorted(RELEASE_STATUSES)}, not {status!r}"
        )


def encode_input(serde: SerializerProtocol, value: Any) -> tuple[str | None, bytes | None]:
    if value is None:
        return None, None
    return serde.dumps_typed(value)


def decode_input(serde: SerializerProtocol, row: RunRow) -> Any:
    if row.input_type is None or row.input_blob is None:
        return None
    return serde.loads_typed((row.input_type, bytes(row.input_blob)))


def take_lease(
    row: RunRow | None,
    thread_id: str,
    owner: str,
    ttl: float,
    now: float,
    input: tuple[str | None, bytes | None] = (None, None),
    head: str | None = None,
    expect_epoch: int | None = None,
) -> RunRow:
    """The row after run ``owner`` takes the thread at ``now``, or ``ThreadBusyError``.

    ``head`` is the thread's latest root checkpoint id now. With ``expect_epoch`` (recovery)
    the thread is taken only from the dead run recovery listed: still ``running``, lease run
    out, at that epoch; otherwise someone else got to it first (``ThreadBusyError``)."""
    check_key("thread_id", thread_id)
    check_ttl(ttl)
    live = row is not None and row.expires_at is not None and row.expires_at > now
    if live and row is not None and row.owner == owner:
        # Taken already: a call retried after its connection dropped. Same epoch.
        return row._replace(expires_at=now + ttl, updated_at=now)
    if expect_epoch is not None:
        if row is None or row.epoch != expect_epoch or not is_incomplete(row, now):
            raise ThreadBusyError(thread_id, row.owner if row else None, None)
    elif live and row is not None and row.expires_at is not None:
        raise ThreadBusyError(thread_id, row.owner, row.expires_at - now)
    died = row is not None and row.status == "running"
    return RunRow(
        thread_id,
        (row.epoch if row is not None else 0) + 1,
        owner,
        now + ttl,
        "running",
        row.attempts + 1 if died and row is not None else 1,
        now,
        None,
        *input,
        head,
    )


def lease_of(row: RunRow) -> Lease:
    assert row.owner is not None and row.expires_at is not None
    return Lease(row.thread_id, row.owner, row.epoch, row.expires_at, row.attempts)


def check_fence(thread_id: str, epoch: int | None, row: RunRow | tuple[int, str] | None) -> None:
    """Refuse a write carrying lease ``epoch`` unless the thread's row still has that epoch.

    ``row`` may be the whole row or just ``(epoch, status)``. Writes without an epoch are not
    fenced.
    """
    if epoch is None:
        return
    if row is None:
        raise LeaseLostError(thread_id, f"the thread has no lease record (lease epoch {epoch})")
    found, status = (row.epoch, row.status) if isinstance(row, RunRow) else row
    if status == "deleted":
        raise LeaseLostError(thread_id, "the thread was deleted while this run was writing to it")
    if found != epoch:
        raise LeaseLostError(
            thread_id,
            f"this run's lease (epoch {epoch}) expired and another run took the thread over "
            f"(epoch {found})",
        )


def renewed(row: RunRow | None, lease: Lease, ttl: float, now: float) -> RunRow:
    """The row with ``lease`` extended to ``now + ttl``, or ``LeaseLostError``."""
    check_ttl(ttl)
    check_fence(lease.thread_id, lease.epoch, row)
    assert row is not None
    if row.owner != lease.owner or row.expires_at is None:
        raise LeaseLostError(lease.thread_id, "the run already let go of the thread's lease")
    return row._replace(expires_at=now + ttl, updated_at=now)


def released(
    row: RunRow | None, lease: Lease, status: RunStatus, error: str | None, now: float
) -> RunRow | None:
    """The row after ``lease`` is let go with ``status``; None if the lease was lost."""
    check_release_status(status)
    if row is None or row.epoch != lease.epoch or row.owner != lease.owner:
        return None
    if status == "running":  # handed back unfinished: incomplete again, this take not counted
        return row._replace(expires_at=None, attempts=max(row.attempts - 1, 1), updated_at=now)
    return row._replace(
        expires_at=None,
        status=status,
        updated_at=now,
        error=error,
        input_type=None,
        input_blob=None,
    )


def deleted(row: RunRow | None, thread_id: str, now: float) -> RunRow:
    """The tombstone ``delete_thread`` leaves: a new epoch, so a run still writing to the
    thread is refused. Kept for every deleted thread (one small row each): dropping it would
    let a new run restart the epoch at one, which a stale writer could hold."""
    return RunRow(thread_id, (row.epoch if row else 0) + 1, None, None, "deleted", 0, now)


def run_info(serde: SerializerProtocol, row: RunRow) -> RunInfo:
    return RunInfo(
        thread_id=row.thread_id,
        epoch=row.epoch,
        head=row.head,
        run_id=row.owner,
        status=row.status,  # type: ignore[arg-type]
        attempts=row.attempts,
        expires_at=row.expires_at,
        updated_at=row.updated_at,
        error=row.error,
        input=decode_input(serde, row),
    )


def is_incomplete(row: RunRow, now: float) -> bool:
    """The run started and its holder died: still ``running`` with its lease run out."""
    return row.status == "running" and (row.expires_at is None or row.expires_at <= now)
