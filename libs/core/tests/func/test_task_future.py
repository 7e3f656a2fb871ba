"""A sync ``@task`` call's future is a real ``concurrent.futures.Future``, as in LangGraph."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import threading
import uuid
from typing import Any

import pytest

from stepgraph.checkpoint.memory import InMemorySaver
from stepgraph.func import TaskFuture, entrypoint, task
from stepgraph.types import Command, interrupt


def thread() -> dict[str, Any]:
    return {"configurable": {"thread_id": str(uuid.uuid4())}}


def test_as_completed_and_wait_work_on_task_futures() -> None:
    @task
    def square(x: int) -> int:
        return x * x

    @entrypoint()
    def workflow(n: int) -> dict[str, Any]:
        futures = [square(i) for i in range(n)]
        done, not_done = cf.wait(futures)
        return {
            "futures": all(isinstance(f, cf.Future) for f in futures),
            "completed": sorted(f.result() for f in cf.as_completed(futures)),
            "waited": (len(done), len(not_done)),
        }

    assert workflow.invoke(4) == {"futures": True, "completed": [0, 1, 4, 9], "waited": (4, 0)}


def test_future_methods_report_the_call() -> None:
    @task
    def ok(x: int) -> int:
        return x + 1

    @task
    def fails(x: int) -> int:
        raise ValueError(f"bad {x}")

    @entrypoint()
    def workflow(x: int) -> dict[str, Any]:
        good, bad = ok(x), fails(x)
        called: list[int] = []
        good.add_done_callback(lambda f: called.append(f.result()))
        error = bad.exception()  # waits (runs it here if no worker has)
        good.result()
        return {
            "error": repr(error),
            "callback": called,
            "states": (good.done(), good.running(), good.cancelled()),
            "cancel_finished": good.cancel(),
        }

    assert workflow.invoke(1) == {
        "error": "ValueError('bad 1')",
        "callback": [2],
        "states": (True, False, False),
        "cancel_finished": False,
    }


def test_a_call_cancelled_before_it_starts_never_runs() -> None:
    """cancel() wins only while no one has started the call; it then never runs, and
    wait()/as_completed() count it done."""
    gate = threading.Event()
    ran: list[int] = []

    @task
    def blocker(_: int) -> None:
        gate.wait(5)

    @task
    def record(x: int) -> int:
        ran.append(x)
        return x

    @entrypoint()
    def workflow(n: int) -> dict[str, Any]:
        # Keep every pool worker busy, so the next call stays queued.
        blockers = [blocker(i) for i in range(64)]
        queued = record(n)
        cancelled = queued.cancel()
        gate.set()
        cf.wait(blockers)
        done, _ = cf.wait([queued], timeout=5)
        with pytest.raises(cf.CancelledError):
            queued.result()
        return {"cancelled": cancelled, "done": len(done), "state": queued.cancelled()}

    assert workflow.invoke(7) == {"cancelled": True, "done": 1, "state": True}
    assert ran == []


def test_a_replayed_call_is_a_finished_future() -> None:
    runs: list[int] = []

    @task
    def once(x: int) -> int:
        runs.append(x)
        return x * 3

    @entrypoint(checkpointer=InMemorySaver())
    def workflow(x: int) -> list[Any]:
        future = once(x)
        answer = interrupt("go?")
        return [isinstance(future, TaskFuture) and future.done(), future.result(), answer]

    config = thread()
    workflow.invoke(2, config)
    assert workflow.invoke(Command(resume="yes"), config) == [True, 6, "yes"]
    assert runs == [2]


def test_an_async_task_called_in_a_sync_run_is_a_clear_error() -> None:
    @task
    async def fetch(x: int) -> int:
        return x

    @entrypoint()
    def workflow(x: int) -> int:
        return fetch(x).result()

    with pytest.raises(RuntimeError, match="In an sync context async tasks cannot be called"):
        workflow.invoke(1)


def test_sync_code_of_an_async_run_calls_an_async_task_on_the_runs_loop() -> None:
    """Under ainvoke a sync entrypoint runs on a thread; an async task it calls runs on the
    run's event loop, and its future's result() waits for it there (as in LangGraph)."""
    calls: list[int] = []

    @task
    async def fetch(x: int) -> int:
        calls.append(x)
        await asyncio.sleep(0)
        return x * 10

    @entrypoint(checkpointer=InMemorySaver())
    def workflow(x: int) -> list[int]:
        first = fetch(x)
        assert isinstance(first, cf.Future)
        return [first.result(), fetch(x + 1).result()]

    config = thread()
    assert asyncio.run(workflow.ainvoke(2, config)) == [20, 30]
    assert calls == [2, 3]
    # Their results were saved as the calls finished: a replay of the step reads them back.
    assert workflow.get_state(config).values == [20, 30]
