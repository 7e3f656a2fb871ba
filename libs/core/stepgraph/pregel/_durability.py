"""What reaches the checkpointer, and when, for each durability mode.

``Persistence`` decides (shared by sync and async runs); ``SyncWriter`` and ``AsyncWriter`` carry
the saves out.

* ``sync``: every save is made before the run moves on. A task that finishes while others of its
  step still run has its writes saved at once, as a group commit: tasks that finish while a save
  is in flight are saved together in the next call (``put_writes_batch``), and each returns once
  its own writes are saved. The writes of the step's last task go in the same ``put_step`` as
  the next checkpoint, so a one-task step costs one call (one transaction). A new input's
  checkpoint goes with the step after it (``put_steps``) when that step only hands the input
  on to the graph's channels (``PregelNode.plain``): no node runs before both are saved.
* ``async``: the same saves, made in order by a background worker while the next step runs
  (the input's checkpoint is saved apart: with ``START``'s step it would make the lag three
  steps where this mode may lose two). At
  most one checkpoint save is queued behind the running step: before handing over a checkpoint,
  the run waits for the previous one, so memory stays flat when the store is slower than the
  graph. Every save is finished before the call returns; a failed save fails the call. A saver
  whose saves are CPU work only (``background_saves = False``) gets them inline, as with ``sync``
  (the input's checkpoint included).
* ``exit``: nothing is saved while the run goes; when it ends, however it ends, the current
  checkpoint and the writes of the tasks of the step that was running are saved.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from stepgraph.checkpoint.base import Step, TaskWrites
from stepgraph.config import RunnableConfig
from stepgraph.pregel._algo import Task
from stepgraph.pregel._loop import RunLoop, StepSave
from stepgraph.types import Durability

__all__ = ["AsyncWriter", "Persistence", "SyncWriter"]


class Persistence:
    """Turns run events into the saves the durability mode calls for."""

    __slots__ = ("deferred", "held", "loop", "mode")

    def __init__(self, loop: RunLoop, mode: Durability | None) -> None:
        self.loop = loop
        self.mode = mode
        """None without a checkpointer: nothing is ever saved."""
        self.held: list[TaskWrites | Task] = []
        """Writes of finished tasks not saved yet; they go with the next checkpoint. With
        ``exit`` a finished task is held as itself: its writes are built only if the run ends
        before its step is applied (they are dropped with the step otherwise)."""
        self.deferred: StepSave | None = None
        """The input's checkpoint, held back to be saved with the next save (``on_start``)."""

    def on_start(self, made_checkpoint: bool) -> list[StepSave]:
        """The input was applied: save its checkpoint and the writes it recorded."""
        loop = self.loop
        if self.mode == "exit":
            self.held.extend(loop.start_writes)
            return []
        if self.mode is None:
            return []
        saves = [loop.save_checkpoint([])] if made_checkpoint else []
        if loop.start_writes:
            saves.append(StepSave(loop.save_target(), list(loop.start_writes)))
        elif saves and self._hands_input_on():
            self.deferred = saves.pop()
        return saves

    def _hands_input_on(self) -> bool:
        """Whether the input's checkpoint may wait for the next step's save: saves are made
        inline (``sync``, or ``async`` with a saver that saves inline: in the background the
        pair would be in flight while the first node runs and finishes, three finished steps
        where the mode may lose two), no stream tells of the checkpoint before that step
        (``checkpoints``, ``debug``: a consumer must be able to read what it is told of), and
        that step only hands the input on (planned early: ``plan`` hands the tasks out next)."""
        loop = self.loop
        inline = self.mode == "sync" or not getattr(loop.checkpointer, "background_saves", True)
        if not inline or not loop.stream_modes.isdisjoint(("checkpoints", "debug")):
            return False
        try:
            tasks = loop.planned = loop.plan()
        except Exception:  # the loop's own plan() raises it again
            return False
        return len(tasks) == 1 and tasks[0].node.plain

    def _with_deferred(self, save: StepSave) -> StepSave:
        """``save``, made after (or with) the input's checkpoint if that is held back."""
        if self.deferred is not None:
            save.before, self.deferred = self.deferred, None
        return save

    def on_task_done(self, task: Task, last: bool) -> StepSave | None:
        if self.mode is None:
            return None
        if self.mode == "exit":
            self.held.append(task)
            return None
        writes = self.loop.task_writes(task)
        if last and task.error is None and not task.paused:
            self.held.append(writes)
            return None
        return self._with_deferred(StepSave(self.loop.save_target(), [writes]))

    def on_call_done(self, writes: TaskWrites) -> StepSave | None:
        """A ``@task`` call finished: its outcome is saved at once (held with ``exit``)."""
        if self.mode is None:
            return None
        if self.mode == "exit":
            self.held.append(writes)
            return None
        return self._with_deferred(StepSave(self.loop.save_target(), [writes]))

    def on_step_done(self, tasks: Sequence[Task], holding: Any) -> StepSave | None:
        """The step of ``tasks`` was applied and its checkpoint is current. If the run ends
        right after it (``RunLoop.ends_after_step``), its save also lets go of the run's lease
        (``holding``)."""
        held, self.held = self.held, []
        if self.mode not in ("sync", "async"):
            return None
        save = self.loop.save_checkpoint(held)  # type: ignore[arg-type]  # no Task held
        if _may_release(holding) and (status := self.loop.ends_after_step(tasks)) is not None:
            save.release = (holding, status)
        return self._with_deferred(save)

    def _writes(self, held: list[TaskWrites | Task]) -> list[TaskWrites]:
        task_writes = self.loop.task_writes
        return [task_writes(h) if isinstance(h, Task) else h for h in held]

    def on_exit(self, holding: Any = None) -> list[StepSave]:
        """Saves still due when the run ends, successfully or not. ``holding``: the run's
        lease, when it ended without an error: if its last save is a checkpoint's (``exit``),
        that save also lets go of the lease."""
        if self.mode is None:
            return []
        saves = []
        loop = self.loop
        if self.deferred is not None:  # the run stopped before the input's step was saved
            saves.append(self.deferred)
            self.deferred = None
        # No channel has a version: the run stopped before its input was applied (a resume of
        # an empty thread, say), and there is no state to save.
        if self.mode == "exit" and not loop.checkpoint_is_saved and loop.channel_versions:
            saves.append(loop.save_checkpoint([]))
        if self.held:
            saves.append(StepSave(self.loop.save_target(), self._writes(self.held)))
            self.held = []
        if saves and saves[-1].checkpoint is not None and _may_release(holding):
            saves[-1].release = (holding, "interrupted" if loop.paused else "done")
        return saves


def _may_release(holding: Any) -> bool:
    """Whether the run's last save may let go of its lease (``put_step_and_release``): a
    run holds one, and the saver has no retention policy, which runs once the run ends, under
    the lease."""
    return holding is not None and holding.saver.retention is None


def _chained(save: StepSave) -> tuple[tuple[RunnableConfig, list[Step]], dict[str, Any]] | None:
    """``save`` and the save held back before it as the arguments of one ``put_steps``, if
    both save a checkpoint."""
    before = save.before
    if before is None or before.checkpoint is None or save.checkpoint is None:
        return None
    steps = [
        Step(before.writes, before.checkpoint, before.metadata, before.new_versions),  # type: ignore[arg-type]
        Step(save.writes, save.checkpoint, save.metadata, save.new_versions),  # type: ignore[arg-type]
    ]
    options = {}
    if save.release is not None:
        holding, status = save.release
        options = {"lease": holding.lease, "status": status}
    return (before.config, steps), options


def _save(saver: Any, save: StepSave) -> None:
    if save.before is not None:
        if (chain := _chained(save)) is not None:
            saver.put_steps(*chain[0], **chain[1])
            if save.release is not None:
                save.release[0].released = True
            return
        _save(saver, save.before)
    if save.release is not None:
        step = (save.config, save.writes, save.checkpoint, save.metadata, save.new_versions)
        holding, status = save.release
        saver.put_step_and_release(*step, holding.lease, status)
        holding.released = True
    elif save.checkpoint is None:
        if len(save.writes) == 1:
            task = save.writes[0]
            saver.put_writes(save.config, task.writes, task.task_id, task.task_path)
        else:
            saver.put_writes_batch(save.config, save.writes)
    elif save.writes:
        saver.put_step(save.config, save.writes, save.checkpoint, save.metadata, save.new_versions)
    else:
        saver.put(save.config, save.checkpoint, save.metadata, save.new_versions)


async def _asave(saver: Any, save: StepSave) -> None:
    if save.before is not None:
        if (chain := _chained(save)) is not None:
            await saver.aput_steps(*chain[0], **chain[1])
            if save.release is not None:
                save.release[0].released = True
            return
        await _asave(saver, save.before)
    if save.release is not None:
        step = (save.config, save.writes, save.checkpoint, save.metadata, save.new_versions)
        holding, status = save.release
        await saver.aput_step_and_release(*step, holding.lease, status)
        holding.released = True
    elif save.checkpoint is None:
        if len(save.writes) == 1:
            task = save.writes[0]
            await saver.aput_writes(save.config, task.writes, task.task_id, task.task_path)
        else:
            await saver.aput_writes_batch(save.config, save.writes)
    elif save.writes:
        await saver.aput_step(
            save.config, save.writes, save.checkpoint, save.metadata, save.new_versions
        )
    else:
        await saver.aput(save.config, save.checkpoint, save.metadata, save.new_versions)


class _Waiting:
    """A save of task writes waiting to be made with others (group commit)."""

    __slots__ = ("done", "error", "save")

    def __init__(self, save: StepSave) -> None:
        self.save = save
        self.done = False
        self.error: BaseException | None = None


def _merged(batch: list[_Waiting]) -> list[StepSave]:
    """The batch's saves as one save per checkpoint their writes belong to."""
    merged: dict[tuple[Any, ...], StepSave] = {}
    for waiting in batch:
        config = waiting.save.config
        configurable = config.get("configurable") or {}
        key = tuple(configurable.get(k) for k in ("thread_id", "checkpoint_ns", "checkpoint_id"))
        if (save := merged.get(key)) is None:
            merged[key] = StepSave(config, list(waiting.save.writes))
        else:
            save.writes.extend(waiting.save.writes)
    return list(merged.values())


def _save_batch(saver: Any, batch: list[_Waiting]) -> None:
    """Save ``batch`` together; if that fails, save each on its own, so each task gets its own
    outcome (saving writes again is harmless: ``put_writes`` is idempotent)."""
    try:
        try:
            for save in _merged(batch):
                _save(saver, save)
        except Exception as error:
            if len(batch) == 1:
                batch[0].error = error
                return
            for waiting in batch:
                try:
                    _save(saver, waiting.save)
                except Exception as own:
                    waiting.error = own
    except BaseException as error:
        for waiting in batch:
            waiting.error = error
        raise


async def _asave_batch(saver: Any, batch: list[_Waiting]) -> None:
    """``_save_batch``, awaited."""
    try:
        try:
            for save in _merged(batch):
                await _asave(saver, save)
        except Exception as error:
            if len(batch) == 1:
                batch[0].error = error
                return
            for waiting in batch:
                try:
                    await _asave(saver, waiting.save)
                except Exception as own:
                    waiting.error = own
    except BaseException as error:
        for waiting in batch:
            waiting.error = error
        raise


class _GroupCommit:
    """Saves of task writes made inline, from the threads that ran the tasks: one save is in
    flight at a time, and the writes of tasks that finish meanwhile go together in the next
    one (one transaction for a database saver). Each caller returns once its own writes are
    saved, and raises if saving them failed."""

    def __init__(self, saver: Any) -> None:
        self.saver = saver
        self._changed = threading.Condition(threading.Lock())
        self._waiting: list[_Waiting] = []
        self._busy = False

    def __call__(self, save: StepSave) -> None:
        mine = _Waiting(save)
        batch = None
        with self._changed:
            self._waiting.append(mine)
            while self._busy and not mine.done:
                self._changed.wait()
            if not mine.done:
                batch, self._waiting = self._waiting, []
                self._busy = True
        if batch is not None:
            try:
                _save_batch(self.saver, batch)
            finally:
                with self._changed:
                    for waiting in batch:
                        waiting.done = True
                    self._busy = False
                    self._changed.notify_all()
        if mine.error is not None:
            raise mine.error


class _AsyncGroupCommit:
    """``_GroupCommit`` for the async API: the saves of concurrent asyncio tasks."""

    def __init__(self, saver: Any) -> None:
        self.saver = saver
        self._waiting: list[_Waiting] = []
        self._busy: asyncio.Future[None] | None = None

    async def __call__(self, save: StepSave) -> None:
        mine = _Waiting(save)
        self._waiting.append(mine)
        while self._busy is not None and not mine.done:
            await asyncio.shield(self._busy)
        if not mine.done:
            batch, self._waiting = self._waiting, []
            busy = self._busy = asyncio.get_running_loop().create_future()
            try:
                await _asave_batch(self.saver, batch)
            finally:
                for waiting in batch:
                    waiting.done = True
                self._busy = None
                busy.set_result(None)
        if mine.error is not None:
            raise mine.error


def _in_background(saver: Any, background: bool) -> bool:
    """Background saves only pay off when the saver waits on I/O (``background_saves``)."""
    return background and getattr(saver, "background_saves", True)


_background_pool: ThreadPoolExecutor | None = None
_background_lock = threading.Lock()


def _background() -> ThreadPoolExecutor:
    """Threads for background saves: separate from the task pool, so saves never queue behind
    tasks that wait on them."""
    global _background_pool
    if _background_pool is None:
        with _background_lock:
            if _background_pool is None:
                _background_pool = ThreadPoolExecutor(8, thread_name_prefix="stepgraph-save")
    return _background_pool


class SyncWriter:
    """Carries out saves for the sync API: inline, or (``background``) in order, off the run's
    thread.

    Background saves run on a worker thread, but when the run has to wait for one (the bound on
    checkpoints in flight, or the final flush) it runs the queued saves itself instead of
    waiting for a thread to wake up: with a CPU-bound saver that removes most hand-offs.
    """

    def __init__(self, saver: Any, background: bool) -> None:
        self.saver = saver
        self.background = _in_background(saver, background)
        self.error: BaseException | None = None
        self._queue: deque[tuple[StepSave, Future[None]]] = deque()
        self._lock = threading.Lock()
        self._draining = False
        """Some thread is running queued saves."""
        self._scheduled = False
        """A worker was asked to drain the queue and has not started yet."""
        self._idle = threading.Event()
        self._idle.set()
        self._last_checkpoint: Future[None] | None = None
        self._group = _GroupCommit(saver)

    def __call__(self, save: StepSave | None) -> None:
        if save is None:
            return
        if not self.background:
            if save.checkpoint is None and save.before is None:
                self._group(save)
            else:
                _save(self.saver, save)
            return
        self.raise_error()
        previous = self._last_checkpoint
        if save.checkpoint is not None and previous is not None and not previous.done():
            self._drain(until=previous)  # bound the queue: one checkpoint in flight
            previous.exception()  # waits, if another thread is saving it
            self.raise_error()
        future: Future[None] = Future()
        if save.checkpoint is not None:
            self._last_checkpoint = future
        with self._lock:
            self._queue.append((save, future))
            self._idle.clear()
            if not self._draining and not self._scheduled:
                self._scheduled = True
                _background().submit(self._drain_in_background)

    def _drain_in_background(self) -> None:
        with self._lock:
            self._scheduled = False
        self._drain()

    def _drain(self, until: Future[None] | None = None) -> None:
        """Run queued saves in order (until ``until`` is done), unless another thread is."""
        with self._lock:
            if self._draining:
                return
            self._draining = True
        try:
            while until is None or not until.done():
                with self._lock:
                    if not self._queue:
                        break
                    save, future = self._queue.popleft()
                if self.error is None:
                    try:
                        _save(self.saver, save)
                    except BaseException as error:
                        self.error = error
                future.set_result(None)
        finally:
            with self._lock:
                self._draining = False
                if not self._queue:
                    self._idle.set()
                elif not self._scheduled:
                    self._scheduled = True
                    _background().submit(self._drain_in_background)

    def raise_error(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def flush(self) -> None:
        """Finish every queued save; raise the first failure."""
        if self.background:
            self._drain()
            self._idle.wait()
        self.raise_error()


class AsyncWriter:
    """Carries out saves for the async API: awaited, or (``background``) as a chain of asyncio
    tasks that run in order."""

    def __init__(self, saver: Any, background: bool) -> None:
        self.saver = saver
        self.background = _in_background(saver, background)
        self.error: BaseException | None = None
        self._tail: asyncio.Future[None] | None = None
        self._last_checkpoint: asyncio.Future[None] | None = None
        self._group = _AsyncGroupCommit(saver)

    async def __call__(self, save: StepSave | None) -> None:
        if save is None:
            return
        if not self.background:
            if save.checkpoint is None and save.before is None:
                await self._group(save)
            else:
                await _asave(self.saver, save)
            return
        self.raise_error()
        previous = self._last_checkpoint
        if save.checkpoint is not None and previous is not None and not previous.done():
            # Shielded: cancelling the run must not cancel a save already handed over.
            await asyncio.shield(previous)
            self.raise_error()
        job = asyncio.ensure_future(self._run_after(self._tail, save))
        self._tail = job
        if save.checkpoint is not None:
            self._last_checkpoint = job

    async def _run_after(self, previous: asyncio.Future[None] | None, save: StepSave) -> None:
        if previous is not None and not previous.done():
            await previous  # never raises: jobs record their failure in self.error
        if self.error is None:
            try:
                await _asave(self.saver, save)
            except BaseException as error:
                self.error = error

    def raise_error(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    async def flush(self) -> None:
        if self._tail is not None:
            # Shielded: a cancelled run still finishes what it already handed over.
            await asyncio.shield(asyncio.wait([self._tail]))
        self.raise_error()
