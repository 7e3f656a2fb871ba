"""Running the tasks of one superstep: with retries, on threads (sync) or asyncio tasks (async).

A step with one task runs it inline, on the calling thread or in the calling coroutine: no
thread hand-off, which is most of the per-step cost otherwise. Steps with several tasks use one
process-wide thread pool; the caller runs the first task itself and takes back any task no worker
has started yet, so nested graphs waiting on the pool can never deadlock it.

A live sync ``stream`` (``LiveSteps``) runs the steps whose chunks it hands out mid-step on a
thread of its own instead, so that the consumer's thread is free to yield them.

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
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import replace
from hashlib import blake2b
from queue import SimpleQueue
from typing import Any

from stepgraph.errors import GraphInterrupt, InvalidUpdateError, ParentCommand
from stepgraph.pregel._algo import Task
from stepgraph.runtime import CURRENT_TASK
from stepgraph.types import Interrupt, RetryPolicy

__all__ = ["LiveSteps", "arun_step", "run_step", "shared_pool"]

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
    """Run a task with its retry policy; leaves ``task.writes`` or ``task.error`` set. The
    task ends only once the ``@task`` calls it made have (``_settle_calls``)."""
    token = CURRENT_TASK.set(task)
    try:
        try:
            _attempts(task)
        except ParentCommand:  # the node ended with a command for its parent graph
            _settle_calls(task, cancel=False)
            raise
        except BaseException:
            _settle_calls(task, cancel=True)
            raise
        _settle_calls(task, cancel=task.error is not None)
    finally:
        CURRENT_TASK.reset(token)


def _attempts(task: Task) -> None:
    attempt = 0
    task.first_attempt_time = time.time()
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
            task.retry()
            time.sleep(policy.interval(attempt))


def _settle_calls(task: Task, cancel: bool) -> None:
    """Wait for the calls ``task`` made, awaited or not, as LangGraph's step does, so none
    saves after its step; their errors are their own. A task that failed (or was
    interrupted) first drops the calls that have not started."""
    spawned = task.spawned or ()
    if cancel:  # all at once: while one is waited for, the pool would start the others
        for call in spawned:
            call.cancel()
    for call in spawned:
        if isinstance(call, asyncio.Future):  # an async call made on the event loop by a sync
            continue  # task run there: waiting would block the loop it needs
        join = getattr(call, "_join", None)
        if join is not None:
            join()
        else:  # an async call sync code sent to its run's event loop: it runs there
            wait([call])


async def arun_task(task: Task) -> None:
    token = CURRENT_TASK.set(task)
    try:
        try:
            await _aattempts(task)
        except ParentCommand:
            await _asettle_calls(task, cancel=False)
            raise
        except BaseException:  # cancelled, say: so are its calls, and they unwind first
            task.cancelled = True  # a sync node still running on its thread starts no more
            await _asettle_calls(task, cancel=True)
            raise
        await _asettle_calls(task, cancel=task.error is not None)
    finally:
        CURRENT_TASK.reset(token)


async def _aattempts(task: Task) -> None:
    attempt = 0
    task.first_attempt_time = time.time()
    node = task.node
    while True:
        attempt += 1
        try:
            if node.arun is not None:
                task.writes = await node.arun(task, task.input)
            else:
                # A synchronous node runs on a thread, as in LangGraph: blocking there must not
                # stall the event loop (the stream's consumer, other requests of the app). The
                # loop's own executor, as LangGraph's: a node that starts a loop of its own
                # (asyncio.run of a graph) gets fresh threads there, never waiting for its own.
                task.writes = await asyncio.get_running_loop().run_in_executor(
                    None, contextvars.copy_context().run, node.run, task, task.input
                )
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
            task.retry()
            await asyncio.sleep(policy.interval(attempt))


async def _asettle_calls(task: Task, cancel: bool) -> None:
    """``_settle_calls`` for async runs: async calls are asyncio tasks (cancelled outright
    when the caller failed), sync ones ``TaskFuture``s on the pool."""
    if not task.spawned:
        return
    if cancel:
        for call in task.spawned:
            call.cancel()
    # A sync call is waited for on a thread: one nobody has started runs there (the pool may
    # be busy with the very tasks waiting on it).
    await asyncio.wait([_awaitable_call(call) for call in task.spawned])


def _awaitable_call(call: Any) -> Any:
    if isinstance(call, asyncio.Future):
        return call
    if hasattr(call, "_join"):  # a TaskFuture: waited for on a thread
        return asyncio.create_task(_waited(call))
    return asyncio.wrap_future(call)  # an async call sent to this loop from a thread


async def _waited(call: Any) -> None:
    await asyncio.to_thread(call._join)


def run_step(
    tasks: Sequence[Task],
    on_done: OnDone,
    max_concurrency: int | None = None,
    halt: threading.Event | None = None,
) -> None:
    """Run the tasks that have not finished yet; ``on_done`` sees each the moment it finishes,
    on the thread that ran it.

    Every task of the step finishes (and is reported) before the first error escaping a task or
    ``on_done`` is raised, in plan order. On a ``BaseException`` (``KeyboardInterrupt``...) in
    the calling thread, or once ``halt`` is set (a live stream's consumer went away), tasks no
    worker has started are dropped; those running are waited for.
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
            if halt is not None and halt.is_set():
                for future in submitted:
                    future.cancel()
                break
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


_STEP_ENDED = object()
"""Put on a live stream's wake-up queue when its running step has ended."""


class LiveSteps:
    """Runs the steps of a live sync ``stream`` on a thread of the run's own, so that the
    consumer's thread hands out chunks while a step runs (as LangGraph's sync stream does).
    Not a thread of the shared pool: streams run inside nodes, each holding a pool thread while
    it waits, could otherwise leave none to run their steps."""

    __slots__ = ("_jobs", "_min_tasks", "output", "running", "wake")

    def __init__(self, min_tasks: int) -> None:
        self._min_tasks = min_tasks
        self.wake: SimpleQueue[object] = SimpleQueue()
        """Gets a token when a chunk is added while a step runs, and when the step ends."""
        self.running = False
        self.output = _WakingQueue(self)
        """The run's output (``RunLoop.output``): adding a chunk wakes the consumer."""
        self._jobs: SimpleQueue[Callable[[], None] | None] | None = None

    def takes(self, tasks: Sequence[Task]) -> bool:
        """Whether the step runs live: it has at least ``min_tasks`` tasks left to run."""
        left = 0
        for task in tasks:
            if not task.done:
                left += 1
                if left >= self._min_tasks:
                    return True
        return False

    def run(
        self, tasks: Sequence[Task], on_done: OnDone, max_concurrency: int | None
    ) -> Iterator[tuple[str, Any]]:
        """Run a step as ``run_step`` would, yielding the chunks added to ``output`` meanwhile;
        raises the step's error once they are all yielded."""
        jobs = self._jobs
        if jobs is None:
            self._jobs = jobs = SimpleQueue()
            threading.Thread(
                target=_serve, args=(jobs,), name="stepgraph-stream", daemon=True
            ).start()
        wake, output = self.wake, self.output
        halt = threading.Event()
        errors: list[BaseException] = []
        context = contextvars.copy_context()

        def step() -> None:
            try:
                context.run(run_step, tasks, on_done, max_concurrency, halt)
            except BaseException as error:
                errors.append(error)
            finally:
                self.running = False
                wake.put(_STEP_ENDED)

        self.running = True
        jobs.put(step)
        try:
            while output:  # made before the step started: its tasks' start events
                yield output.popleft()
            while wake.get() is not _STEP_ENDED:
                while output:
                    yield output.popleft()
        except BaseException:
            # The consumer went away (the generator was closed) or was interrupted: start no
            # more of the step's tasks, and let those running finish, so the run ends cleanly.
            halt.set()
            while wake.get() is not _STEP_ENDED:
                pass
            raise
        while output:
            yield output.popleft()
        if errors:
            raise errors[0]

    def close(self) -> None:
        if self._jobs is not None:
            self._jobs.put(None)  # the thread ends


def _serve(jobs: SimpleQueue[Callable[[], None] | None]) -> None:
    while (job := jobs.get()) is not None:
        job()


class _WakingQueue(deque[Any]):
    """A live stream's output: adding a chunk while a step runs, from whichever thread (a
    node's writer, a task that finished, a ``@task`` call, a subgraph), wakes the consumer."""

    def __init__(self, live: LiveSteps) -> None:
        super().__init__()
        self._live = live

    def append(self, chunk: Any) -> None:
        super().append(chunk)
        if self._live.running:
            self._live.wake.put(None)


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
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    remaining = len(todo)

    async def run(task: Task) -> None:
        if task.node.arun is None:
            # Synchronous nodes of a multi-task step run on threads, in parallel.
            await loop.run_in_executor(None, contextvars.copy_context().run, run_task, task)
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
        if not all(future.done() for future in futures):
            await asyncio.wait(futures)  # they unwind (cancelling their calls) before the step ends
    failed = [f for f in futures if f.cancelled() or f.exception() is not None]
    if failed:
        failed[0].result()  # raises its error
