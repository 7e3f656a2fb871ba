"""Running the tasks of one superstep: with retries, on threads (sync) or asyncio tasks (async).

A step with one task runs it inline, on the calling thread or in the calling coroutine: no
thread hand-off, which is most of the per-step cost otherwise. Steps with several tasks use one
process-wide thread pool; the caller runs the first task itself and takes back any task no worker
has started yet, so nested graphs waiting on the pool can never deadlock it.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed

from stepgraph.errors import GraphInterrupt, InvalidUpdateError, ParentCommand
from stepgraph.pregel._algo import Task
from stepgraph.runtime import CURRENT_TASK
from stepgraph.types import RetryPolicy

__all__ = ["arun_step", "run_step", "shared_pool"]

OnDone = Callable[[Task, bool], None]
"""Called on the caller's thread when a task finished; the flag says no other task still runs."""
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


def _retry_policy(task: Task, error: Exception, attempt: int) -> RetryPolicy | None:
    """The policy under which ``error`` after ``attempt`` attempts is retried, if any."""
    for policy in task.node.retry_policy:
        if policy.should_retry(error):
            return policy if attempt < policy.max_attempts else None
    return None


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
                task.interrupts = tuple(paused.interrupts)
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
                task.interrupts = tuple(paused.interrupts)
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
        CURRENT_TASK.reset(token)


def run_step(tasks: Sequence[Task], on_done: OnDone, max_concurrency: int | None = None) -> None:
    """Run the tasks that have not finished yet; ``on_done`` sees each as it completes."""
    todo = [task for task in tasks if not task.done]
    if not todo:
        return
    if len(todo) == 1:
        run_task(todo[0])
        on_done(todo[0], True)
        return
    run: Callable[[Task], None] = run_task
    if max_concurrency:
        slots = threading.BoundedSemaphore(max_concurrency)

        def run(task: Task) -> None:
            with slots:
                run_task(task)

    pool = shared_pool()
    submitted: list[tuple[Future[None], Task]] = [
        (pool.submit(contextvars.copy_context().run, run, task), task) for task in todo[1:]
    ]
    remaining = len(todo)
    run(todo[0])
    remaining -= 1
    on_done(todo[0], remaining == 0)
    running: dict[Future[None], Task] = {}
    for future, task in submitted:
        if future.cancel():  # no worker took it yet: run it here
            run(task)
            remaining -= 1
            on_done(task, remaining == 0)
        else:
            running[future] = task
    for future in as_completed(running):
        future.result()  # only BaseExceptions escape run_task
        remaining -= 1
        on_done(running[future], remaining == 0)


async def arun_step(
    tasks: Sequence[Task], on_done: AsyncOnDone, max_concurrency: int | None = None
) -> None:
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

    async def run(task: Task) -> None:
        if task.node.arun is None:
            # Synchronous nodes of a multi-task step run on threads, in parallel.
            await loop.run_in_executor(pool, contextvars.copy_context().run, run_task, task)
        else:
            await arun_task(task)

    async def run_limited(task: Task) -> None:
        assert slots is not None
        async with slots:
            await run(task)

    order: dict[asyncio.Future[None], int] = {}
    for index, task in enumerate(todo):
        order[asyncio.ensure_future(run_limited(task) if slots else run(task))] = index
    pending = set(order)
    remaining = len(todo)
    try:
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for future in sorted(done, key=order.__getitem__):
                future.result()
                remaining -= 1
                await on_done(todo[order[future]], remaining == 0)
    finally:
        for future in pending:
            future.cancel()
