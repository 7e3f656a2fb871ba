"""Running the tasks of one superstep: with retries, on threads (sync) or asyncio tasks (async).

A step with one task runs it inline, on the calling thread or in the calling coroutine: no
thread hand-off, which is most of the per-step cost otherwise. Steps with several tasks use one
process-wide thread pool; the caller runs the first task itself and takes back any task no worker
has started yet, so nested graphs waiting on the pool can never deadlock it.

A finished task is reported (``on_done``: its writes are saved) at once, by the thread or
asyncio task that ran it, not when the caller gets to it: a sibling that finishes while the
caller still runs its own task is saved even if the process dies before that task returns.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import replace
from hashlib import blake2b

from stepgraph.errors import GraphInterrupt, InvalidUpdateError, ParentCommand
from stepgraph.pregel._algo import Task
from stepgraph.runtime import CURRENT_TASK
from stepgraph.types import Interrupt, RetryPolicy

__all__ = ["arun_step", "run_step", "shared_pool"]

OnDone = Callable[[Task, bool], None]
"""Called when a task finished, on the thread that ran it (so a pool thread in a multi-task
step: it must be thread-safe); the flag says no other task of the step still runs."""
AsyncOnDone = Callable[[Task, bool], Awaitable[None]]

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def shared_pool() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        with _pool_lock:
            if _pool is None:
                workers = min(64, (os.cpu_count() or 1) + 16)
                _pool = ThreadPoolExecutor(workers, thread_name_prefix="stepgraph")
    return _pool


class _Countdown:
    """The tasks of a step still running; tells each one that finishes whether it was the last."""

    __slots__ = ("_left", "_lock")

    def __init__(self, count: int) -> None:
        self._left = count
        self._lock = threading.Lock()

    def finished(self) -> bool:
        with self._lock:
            self._left -= 1
            return self._left == 0


def _retry_policy(task: Task, error: Exception, attempt: int) -> RetryPolicy | None:
    """The policy under which ``error`` after ``attempt`` attempts is retried, if any."""
    for policy in task.node.retry_policy:
        if policy.should_retry(error):
            return policy if attempt < policy.max_attempts else None
    return None


def _with_ids(task: Task, interrupts: Sequence[Interrupt]) -> tuple[Interrupt, ...]:
    """The interrupts a task paused on, each with an id (a ``NodeInterrupt`` comes without
    one): the same on every rerun of the task, and never one an ``interrupt()`` call uses."""
    return tuple(
        found
        if found.id
        else replace(
            found, id=blake2b(f"{task.id}:raised:{n}".encode(), digest_size=16).hexdigest()
        )
        for n, found in enumerate(interrupts)
    )


def _no_parent(command: ParentCommand) -> InvalidUpdateError:
    return InvalidUpdateError(
        "A node returned Command(graph=Command.PARENT), but this graph has no parent graph"
    )


def run_task(task: Task) -> None:
    """Run a task with its retry policy; leaves ``task.writes`` or ``task.error`` set."""
    token = CURRENT_TASK.set(task)
    try:
        attempt = 0
        while True:
            attempt += 1
            try:
                task.writes = task.node.run(task, task.input)
                return
            except GraphInterrupt as paused:
                task.interrupts = _with_ids(task, paused.interrupts)
                task.paused = True
                task.writes = []
                return
            except ParentCommand as command:
                if task.loop.parent_task is not None:
                    raise  # the parent graph's node applies it
                task.error = _no_parent(command)
                return
            except Exception as error:
                policy = _retry_policy(task, error, attempt)
                if policy is None:
                    task.error = error
                    return
                task.update = None
                task.resume_used = task.calls = task.subgraph_calls = 0
                time.sleep(policy.interval(attempt))
    finally:
        if task.spawned:
            for call in task.spawned:
                call.wait()  # a call nobody awaited still ends within its caller's step
        CURRENT_TASK.reset(token)


async def arun_task(task: Task) -> None:
    token = CURRENT_TASK.set(task)
    try:
        attempt = 0
        node = task.node
        while True:
            attempt += 1
            try:
                if node.arun is not None:
                    task.writes = await node.arun(task, task.input)
                else:
                    task.writes = node.run(task, task.input)
                return
            except GraphInterrupt as paused:
                task.interrupts = _with_ids(task, paused.interrupts)
                task.paused = True
                task.writes = []
                return
            except ParentCommand as command:
                if task.loop.parent_task is not None:
                    raise  # the parent graph's node applies it
                task.error = _no_parent(command)
                return
            except Exception as error:
                policy = _retry_policy(task, error, attempt)
                if policy is None:
                    task.error = error
                    return
                task.update = None
                task.resume_used = task.calls = task.subgraph_calls = 0
                await asyncio.sleep(policy.interval(attempt))
    finally:
        if task.spawned:  # as run_task; an unawaited call's error is its own, saved with it
            await asyncio.gather(*task.spawned, return_exceptions=True)
        CURRENT_TASK.reset(token)


def run_step(tasks: Sequence[Task], on_done: OnDone, max_concurrency: int | None = None) -> None:
    """Run the tasks that have not finished yet; ``on_done`` sees each the moment it finishes,
    on the thread that ran it.

    Every task of the step finishes (and is reported) before the first error escaping a task or
    ``on_done`` is raised, in plan order. On a ``BaseException`` (``KeyboardInterrupt``...) in
    the calling thread, tasks no worker has started are dropped; those running are waited for.
    """
    todo = [task for task in tasks if not task.done]
    if not todo:
        return
    if len(todo) == 1:
        run_task(todo[0])
        on_done(todo[0], True)
        return
    countdown = _Countdown(len(todo))
    slots = threading.BoundedSemaphore(max_concurrency) if max_concurrency else None

    def finish(task: Task) -> None:
        if slots is None:
            run_task(task)
        else:
            with slots:
                run_task(task)
        on_done(task, countdown.finished())

    pool = shared_pool()
    submitted = [pool.submit(contextvars.copy_context().run, finish, task) for task in todo[1:]]
    errors: dict[int, BaseException] = {}
    try:
        for index, task in enumerate(todo):
            # The caller runs the first task, then takes back any that no worker started yet.
            if index == 0 or submitted[index - 1].cancel():
                try:
                    finish(task)
                except Exception as error:
                    errors[index] = error
    except BaseException:
        for future in submitted:
            future.cancel()
        wait(submitted)
        raise
    for index, future in enumerate(submitted, 1):
        if not future.cancelled() and (failure := future.exception()) is not None:
            errors[index] = failure
    if errors:
        raise errors[min(errors)]


async def arun_step(
    tasks: Sequence[Task], on_done: AsyncOnDone, max_concurrency: int | None = None
) -> None:
    """Run the tasks that have not finished yet, as asyncio tasks (synchronous nodes on the
    pool); ``on_done`` sees each the moment it finishes, concurrently with the others.

    Every task of the step finishes (and is reported) before the first error escaping a task or
    ``on_done`` is raised, in plan order; if the caller is cancelled, so are the tasks.
    """
    todo = [task for task in tasks if not task.done]
    if not todo:
        return
    if len(todo) == 1:
        await arun_task(todo[0])
        await on_done(todo[0], True)
        return
    loop = asyncio.get_running_loop()
    pool = shared_pool()
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    remaining = len(todo)

    async def run(task: Task) -> None:
        if task.node.arun is None:
            # Synchronous nodes of a multi-task step run on threads, in parallel.
            await loop.run_in_executor(pool, contextvars.copy_context().run, run_task, task)
        else:
            await arun_task(task)

    async def finish(task: Task) -> None:
        nonlocal remaining
        if slots is None:
            await run(task)
        else:
            async with slots:
                await run(task)
        remaining -= 1
        await on_done(task, remaining == 0)

    futures = [asyncio.ensure_future(finish(task)) for task in todo]
    try:
        await asyncio.wait(futures)
    finally:
        for future in futures:
            future.cancel()  # a no-op unless the caller itself was cancelled
    failed = [f for f in futures if f.cancelled() or f.exception() is not None]
    if failed:
        failed[0].result()  # raises its error
