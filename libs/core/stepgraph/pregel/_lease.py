"""A run's hold on its thread: take the lease, keep it alive, let go with the run's outcome.

A top-level run with a checkpointer takes its thread's lease before reading the thread, so two
runs never write one thread at once (``docs/ownership.md``). The caller chooses what a second
run does when the thread is busy, with ``config["configurable"]["multitask_strategy"]``:
``"reject"`` (default) raises ``ThreadBusyError`` at once, ``"enqueue"`` waits for the lease up
to ``config["configurable"]["enqueue_timeout"]`` seconds (default 300).

While the run goes, the lease is renewed every third of its ``ttl`` (``saver.lease_ttl``): by
one shared thread for sync runs, by an asyncio task for async runs. If the process dies the
renewals stop and the lease runs out, so another worker may take the thread over.

A lease's owner also names the process that holds it (``owner_name``): a run refused because
its thread is busy checks whether that holder died on this machine (``died_here``) and, if so,
makes the dead run's lease run out at once instead of waiting for its ttl, then takes the thread
as from any run whose lease ran out. Fencing keeps that safe even if the judgement were wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from stepgraph._twins import call, drive
from stepgraph.checkpoint.base import (
    BaseCheckpointSaver,
    CheckpointTuple,
    Lease,
    RunInfo,
    RunStatus,
)
from stepgraph.checkpoint.base.runs import RECOVER_EPOCH_KEY, failure_outcome
from stepgraph.config import RunnableConfig
from stepgraph.errors import LeaseLostError, SerializationError, ThreadBusyError

__all__ = [
    "Holding",
    "aacquire",
    "acquire",
    "aexpire_if_died_here",
    "died_here",
    "expire_if_died_here",
    "outcome",
    "owner_name",
    "policy",
]

STRATEGIES = ("reject", "enqueue")
DEFAULT_ENQUEUE_TIMEOUT = 300.0
_POLL_FIRST, _POLL_MAX = 0.01, 0.5


def policy(config: RunnableConfig) -> tuple[str, float]:
    """The run's ``(multitask_strategy, enqueue_timeout)``, checked."""
    configurable = config.get("configurable") or {}
    strategy = configurable.get("multitask_strategy", "reject")
    if strategy not in STRATEGIES:
        raise ValueError(f"multitask_strategy must be one of {STRATEGIES}, not {strategy!r}")
    timeout = float(configurable.get("enqueue_timeout", DEFAULT_ENQUEUE_TIMEOUT))
    if timeout < 0:
        raise ValueError(f"enqueue_timeout must be at least 0 seconds, not {timeout}")
    return strategy, timeout


# -- who holds a lease, and whether that process still runs ---------------------------------

_EXPIRE_NOW = 1e-6
"""The ttl a dead holder's lease is renewed with on its behalf: it runs out at once, and the
thread is then taken as from any run whose lease ran out (epoch bumped, attempt counted)."""
_MAX_EXPIRIES = 5
"""Take-overs from dead holders one acquire tries before it follows its policy: bounds a loop
on a clock stepped back between the expiry and the take."""

_SELF: tuple[int, str | None, str | None] | None = None
"""(pid, host token, ``token/pid/start``) of this process; a forked child computes its own."""


def _host_token() -> str | None:
    """This boot and PID namespace, within which a process id names one process (Linux); None
    elsewhere: owners then carry no location and are never judged dead."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None
    if not boot or any(c in boot for c in "/@"):
        return None
    return f"{boot}.{namespace}"


def _proc_stat(pid: int) -> tuple[str, str]:
    """(state, start time in clock ticks since boot) of process ``pid``, read from ``/proc``."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    # The command name (field 2) may hold spaces and ")": count the fields after its last ")".
    fields = stat[stat.rindex(b")") + 2 :].split()
    return fields[0].decode(), fields[19].decode()  # fields 3 and 22 of proc(5)


def _proc_is_ours(pid: int) -> bool:
    """Whether the mounted ``/proc`` shows this process's PID namespace (``unshare --pid``
    without a new ``/proc`` shows the parent's: a pid read there would name another process)."""
    try:
        with open("/proc/self/stat", "rb") as f:
            return int(f.read().split(b" ", 1)[0]) == pid
    except (OSError, ValueError):
        return False


def _other_threads_run(pid: int) -> bool:
    """Whether process ``pid``, whose first thread is a zombie, still has other threads (its
    main thread ended, the process did not)."""
    try:
        return len(os.listdir(f"/proc/{pid}/task")) > 1
    except OSError:
        return False


def _here() -> tuple[str | None, str | None]:
    """(host token, ``token/pid/start``) of this process, None where they cannot be told."""
    global _SELF
    pid = os.getpid()
    if _SELF is None or _SELF[0] != pid:
        token = _host_token()
        where = None
        if token is not None and not _proc_is_ours(pid):
            token = None  # /proc belongs to another PID namespace: pids there are not ours
        if token is not None:
            try:
                where = f"{token}/{pid}/{_proc_stat(pid)[1]}"
            except (OSError, ValueError, IndexError):
                token = None
        _SELF = (pid, token, where)
    return _SELF[1], _SELF[2]


def owner_name() -> str:
    """A new name for a run's lease: a uuid, so that every run is a holder of its own (two
    invocations given the same ``run_id`` still exclude each other), then where its process
    lives when that can be told: ``<uuid>@<boot id>.<pid namespace inode>/<pid>/<start>``."""
    name = str(uuid.uuid4())
    where = _here()[1]
    return name if where is None else f"{name}@{where}"


def died_here(owner: str | None) -> bool:
    """Whether lease owner ``owner`` names a process of this boot and PID namespace that no
    longer runs: gone, a zombie, or its PID reused (the process there started at another
    time). A holder alive, elsewhere, without a location or that cannot be read is not."""
    token = _here()[0]
    if owner is None or token is None or "@" not in owner:
        return False
    try:
        where, pid_text, start = owner.rpartition("@")[2].split("/")
        pid = int(pid_text)
    except ValueError:
        return False
    if where != token or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
        ours = True
    except ProcessLookupError:
        return True
    except PermissionError:
        ours = False  # it exists, and runs as another user
    except (OSError, OverflowError):
        return False
    try:
        state, started = _proc_stat(pid)
    except (FileNotFoundError, ProcessLookupError):
        # Exited since the signal check; for another user's process, maybe only hidden from
        # us (/proc mounted with hidepid): not judged.
        return ours
    except (OSError, ValueError, IndexError):
        return False
    if started != start:
        return True  # the pid was reused: the holder is gone
    return state in ("Z", "X") and not _other_threads_run(pid)


async def _expire_dead(saver: BaseCheckpointSaver, run: RunInfo | None, use_async: bool) -> bool:
    """If ``run`` holds its thread's lease and died on this machine, make that lease run out
    now (renewed on its behalf, fenced by its owner and epoch, with a ttl of ~0); whether it
    was so judged. A take-over meanwhile makes the renewal a no-op (``LeaseLostError``)."""
    if run is None or run.run_id is None or run.expires_at is None:
        return False
    if not died_here(run.run_id):
        return False
    lease = Lease(run.thread_id, run.run_id, run.epoch, run.expires_at, run.attempts)
    with contextlib.suppress(LeaseLostError):
        await call(saver, "renew_lease", use_async, lease, ttl=_EXPIRE_NOW)
    return True


def expire_if_died_here(saver: BaseCheckpointSaver, run: RunInfo | None) -> bool:
    """``run`` (from ``get_run``) holds a live lease but its process died on this machine: let
    its lease run out now, so the run is incomplete (``list_incomplete``) at once."""
    return drive(_expire_dead(saver, run, False))


async def aexpire_if_died_here(saver: BaseCheckpointSaver, run: RunInfo | None) -> bool:
    return await _expire_dead(saver, run, True)


async def _retry_at_once(
    saver: BaseCheckpointSaver, config: RunnableConfig, busy: ThreadBusyError, use_async: bool
) -> bool:
    """The thread is busy: whether to try again at once, since its holder died on this
    machine and its lease was made to run out (or the thread changed hands meanwhile)."""
    if config["configurable"].get(RECOVER_EPOCH_KEY) is not None:
        return False  # recovery takes over only the dead run it listed
    if not died_here(busy.holder):  # no query for a holder alive or elsewhere
        return False
    run = await call(saver, "get_run", use_async, busy.thread_id)
    if run is None or run.run_id != busy.holder or run.expires_at is None:
        return True  # let go or taken since the refusal: ask again
    return await _expire_dead(saver, run, use_async)


class Holding:
    """A lease a run holds, and whether its renewals found it lost."""

    __slots__ = ("due", "lease", "lost", "released", "saver", "ttl")

    def __init__(self, saver: BaseCheckpointSaver, lease: Lease, ttl: float) -> None:
        self.saver = saver
        self.lease = lease
        self.ttl = ttl
        self.lost: LeaseLostError | None = None
        self.released = False
        """The run's last save let go of the lease (``put_step_and_release``)."""
        self.due = time.monotonic() + ttl / 3

    @property
    def epoch(self) -> int:
        return self.lease.epoch

    def renew(self) -> None:
        try:
            self.lease = self.saver.renew_lease(self.lease, ttl=self.ttl)
        except LeaseLostError as lost:
            self.lost = lost  # the run's next write is refused (fenced) and reports it
        except Exception:
            pass
        self.due = time.monotonic() + self.ttl / 3

    async def arenew(self) -> None:
        try:
            self.lease = await self.saver.arenew_lease(self.lease, ttl=self.ttl)
        except LeaseLostError as lost:
            self.lost = lost
        except Exception:
            pass


async def _take(
    saver: BaseCheckpointSaver,
    config: RunnableConfig,
    owner: str,
    input: Any,
    use_async: bool,
    read: bool,
) -> tuple[Lease, CheckpointTuple | None]:
    """The lease and, with ``read``, the checkpoint ``config`` names, read under it in the
    same saver call (``acquire_lease_and_get_tuple``)."""
    configurable = config["configurable"]
    options = {"ttl": saver.lease_ttl, "expect_epoch": configurable.get(RECOVER_EPOCH_KEY)}

    async def take(**kept: Any) -> tuple[Lease, CheckpointTuple | None]:
        if read:
            name = "acquire_lease_and_get_tuple"
            return await call(saver, name, use_async, config, owner, **options, **kept)
        thread_id = str(configurable["thread_id"])
        return await call(
            saver, "acquire_lease", use_async, thread_id, owner, **options, **kept
        ), None

    try:
        return await take(input=input)
    except SerializationError:
        # The input is kept only so recovery can restart a run that saved nothing: an input
        # the serializer refuses is not a reason to refuse the run. (A read that fails on
        # stored bytes raises a SerializationError too: that one is the run's error.)
        if input is None or _serializes(saver, input):
            raise
        return await take()


def _serializes(saver: BaseCheckpointSaver, value: Any) -> bool:
    try:
        saver.serde.dumps_typed(value)
    except SerializationError:
        return False
    return True


class _Waiting:
    """The run's policy when its thread is busy: how long to wait before trying again, or
    the ``ThreadBusyError`` to raise."""

    def __init__(self, config: RunnableConfig) -> None:
        self.strategy, timeout = policy(config)
        self.deadline = time.monotonic() + timeout
        self.delay = _POLL_FIRST

    def after(self, busy: ThreadBusyError) -> float:
        left = self.deadline - time.monotonic()
        if self.strategy == "reject" or left <= 0:
            raise busy
        wait = min(self.delay, left)
        if busy.expires_in is not None:  # no point polling long before the lease runs out
            wait = min(wait, max(busy.expires_in, _POLL_FIRST))
        self.delay = min(self.delay * 2, _POLL_MAX)
        return wait


def acquire(
    saver: BaseCheckpointSaver, config: RunnableConfig, owner: str, input: Any, read: bool = True
) -> tuple[Holding, CheckpointTuple | None]:
    """Take the lease of ``config``'s thread for run ``owner``, as the run's policy says; with
    ``read``, also the checkpoint ``config`` names (``get_tuple``), read under the lease (if
    that read fails, the saver lets go of the lease with status ``error``)."""
    waiting = _Waiting(config)
    expiries = 0
    while True:
        try:
            lease, found = drive(_take(saver, config, owner, input, False, read))
            break
        except ThreadBusyError as busy:
            if expiries < _MAX_EXPIRIES and drive(_retry_at_once(saver, config, busy, False)):
                expiries += 1
                continue
            time.sleep(waiting.after(busy))
    holding = Holding(saver, lease, saver.lease_ttl)
    _KEEPER.add(holding)
    return holding, found


async def aacquire(
    saver: BaseCheckpointSaver,
    config: RunnableConfig,
    owner: str,
    input: Any,
    on_cancel: tuple[RunStatus, str | None] = ("cancelled", "CancelledError"),
    read: bool = True,
) -> tuple[Holding, asyncio.Task[None], CheckpointTuple | None]:
    """``acquire`` for async runs: also returns the task that renews the lease. Cancelled
    while the lease is being taken, the lease is let go with ``on_cancel`` once taken."""
    waiting = _Waiting(config)
    expiries = 0
    while True:
        taking = asyncio.ensure_future(_take(saver, config, owner, input, True, read))
        try:
            # Shielded: a caller cancelled meanwhile must not leave a lease taken in its name
            # (it would look like a run that died, and recovery would run it).
            lease, found = await asyncio.shield(taking)
            break
        except ThreadBusyError as busy:
            if expiries < _MAX_EXPIRIES and await _retry_at_once(saver, config, busy, True):
                expiries += 1
                continue
            await asyncio.sleep(waiting.after(busy))
        except asyncio.CancelledError:
            # Let go from a callback, not here: a second cancellation must not stop it.
            taking.add_done_callback(lambda done: _let_go_when_taken(saver, done, on_cancel))
            raise
    holding = Holding(saver, lease, saver.lease_ttl)
    return holding, asyncio.ensure_future(_heartbeat(holding)), found


_LETTING_GO: set[asyncio.Future[None]] = set()  # keeps those release tasks alive until done


def _let_go_when_taken(
    saver: BaseCheckpointSaver,
    taking: asyncio.Future[tuple[Lease, CheckpointTuple | None]],
    outcome: tuple[RunStatus, Any],
) -> None:
    if taking.cancelled() or taking.exception() is not None:
        return  # nothing was taken
    letting_go = asyncio.ensure_future(saver.arelease_lease(taking.result()[0], *outcome))
    _LETTING_GO.add(letting_go)
    letting_go.add_done_callback(_LETTING_GO.discard)


async def _heartbeat(holding: Holding) -> None:
    while holding.lost is None:
        await asyncio.sleep(holding.ttl / 3)
        await holding.arenew()


def release(holding: Holding, status: RunStatus, error: str | None) -> None:
    _KEEPER.discard(holding)
    if holding.released:  # by the run's last save, with status "done"
        return
    with contextlib.suppress(Exception):  # unreleased, the lease simply runs out
        holding.saver.release_lease(holding.lease, status, error)


async def arelease(
    holding: Holding, beat: asyncio.Task[None], status: RunStatus, error: str | None
) -> None:
    beat.cancel()
    if holding.released:
        return
    with contextlib.suppress(Exception):
        await holding.saver.arelease_lease(holding.lease, status, error)


def outcome(error: BaseException | None, paused: bool) -> tuple[RunStatus, str | None]:
    """How a run ended, as recorded in the run registry."""
    if error is None:
        return ("interrupted" if paused else "done"), None
    return failure_outcome(error)


class _Keeper:
    """One daemon thread that schedules the renewals of every sync run's lease in the process.

    The renewals themselves run on a few pool threads: one stuck on a busy database (SQLite's
    busy timeout, an exhausted pool) must not hold back the others past their expiry.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._heap: list[tuple[float, int, Holding]] = []
        self._held: set[int] = set()
        self._order = itertools.count()
        self._thread: threading.Thread | None = None
        self._renewers = ThreadPoolExecutor(4, thread_name_prefix="stepgraph-lease-renew")

    def add(self, holding: Holding) -> None:
        with self._changed:
            self._held.add(id(holding))
            heapq.heappush(self._heap, (holding.due, next(self._order), holding))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="stepgraph-lease-keeper", daemon=True
                )
                self._thread.start()
            self._changed.notify()

    def discard(self, holding: Holding) -> None:
        with self._changed:
            self._held.discard(id(holding))

    def _run(self) -> None:
        while True:
            with self._changed:
                while True:
                    while self._heap and id(self._heap[0][2]) not in self._held:
                        heapq.heappop(self._heap)
                    wait = self._heap[0][0] - time.monotonic() if self._heap else None
                    if wait is not None and wait <= 0:
                        holding = heapq.heappop(self._heap)[2]
                        break
                    self._changed.wait(wait)
            try:
                self._renewers.submit(self._renew, holding)
            except RuntimeError:  # the interpreter is shutting down: no new pool threads
                self._renew(holding)

    def _renew(self, holding: Holding) -> None:
        holding.renew()
        with self._changed:  # due again only once this renewal is done: never two at once
            if id(holding) in self._held and holding.lost is None:
                heapq.heappush(self._heap, (holding.due, next(self._order), holding))
                self._changed.notify()

    def forget_all(self) -> None:
        """In a forked child: the parent's leases are not the child's to renew, and the
        parent's keeper and pool threads do not exist here."""
        self.__init__()  # type: ignore[misc]


_KEEPER = _Keeper()
os.register_at_fork(after_in_child=_KEEPER.forget_all)
