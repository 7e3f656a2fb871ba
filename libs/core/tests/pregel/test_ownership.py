"""One writer per thread, the run registry, recovery and retention, through the graph API.

These use ``InMemorySaver``; tests/test_ownership.py runs the cross-process cases (SIGSTOP,
SIGKILL) against SQLite and Postgres.
"""

from __future__ import annotations

import asyncio
import operator
import threading
import time
from typing import Annotated, Any, TypedDict

import pytest

from stepgraph.checkpoint.base import Retention
from stepgraph.checkpoint.memory import InMemorySaver
from stepgraph.errors import LeaseLostError, RunIncompleteError, ThreadBusyError
from stepgraph.graph import END, START, StateGraph
from stepgraph.types import Command, interrupt


class State(TypedDict):
    log: Annotated[list[str], operator.add]


def chain(saver: InMemorySaver, hook: Any = None, names: tuple[str, ...] = ("a", "b", "c")) -> Any:
    builder = StateGraph(State)
    previous = START
    for name in names:

        def node(state: State, name: str = name) -> dict[str, Any]:
            if hook is not None:
                hook(name)
            return {"log": [name]}

        builder.add_node(name, node)
        builder.add_edge(previous, name)
        previous = name
    builder.add_edge(previous, END)
    return builder.compile(checkpointer=saver)


def thread(thread_id: str, **extra: Any) -> dict[str, Any]:
    return {"configurable": {"thread_id": thread_id, **extra}}


def test_a_second_run_on_a_busy_thread_is_rejected_or_waits() -> None:
    saver = InMemorySaver()
    started, go = threading.Event(), threading.Event()

    def hold(name: str) -> None:
        if name == "a" and not started.is_set():
            started.set()
            go.wait(5)

    graph = chain(saver, hold)
    first = threading.Thread(target=graph.invoke, args=({"log": []}, thread("busy")))
    first.start()
    assert started.wait(5)
    with pytest.raises(ThreadBusyError, match="busy") as busy:
        graph.invoke({"log": ["second"]}, thread("busy"))
    assert busy.value.thread_id == "busy"
    assert saver.get_run("busy").status == "running"

    # "enqueue" waits for the lease, then runs on the first run's result.
    waiting: list[Any] = []
    second = threading.Thread(
        target=lambda: waiting.append(
            graph.invoke({"log": ["queued"]}, thread("busy", multitask_strategy="enqueue"))
        )
    )
    second.start()
    time.sleep(0.1)
    assert not waiting
    go.set()
    first.join(5)
    second.join(5)
    assert waiting[0]["log"] == ["a", "b", "c", "queued", "a", "b", "c"]
    assert saver.get_run("busy").status == "done"


def test_enqueue_gives_up_after_its_timeout() -> None:
    saver = InMemorySaver()
    saver.acquire_lease("held", "someone-else", ttl=30)
    graph = chain(saver)
    start = time.monotonic()
    with pytest.raises(ThreadBusyError):
        graph.invoke({"log": []}, thread("held", multitask_strategy="enqueue", enqueue_timeout=0.3))
    assert 0.25 < time.monotonic() - start < 3
    with pytest.raises(ValueError, match="multitask_strategy"):
        graph.invoke({"log": []}, thread("held", multitask_strategy="interrupt"))


def test_the_run_registry_records_how_runs_end() -> None:
    saver = InMemorySaver()
    graph = chain(saver)
    graph.invoke({"log": []}, thread("done"))
    assert saver.get_run("done").status == "done"

    def fail(name: str) -> None:
        if name == "b":
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        chain(saver, fail).invoke({"log": []}, thread("failed"))
    run = saver.get_run("failed")
    assert (run.status, run.error) == ("error", "RuntimeError: boom")

    def ask(state: State) -> dict[str, Any]:
        return {"log": [interrupt("ok?")]}

    builder = StateGraph(State)
    builder.add_node("ask", ask)
    builder.add_edge(START, "ask")
    paused = builder.compile(checkpointer=saver)
    paused.invoke({"log": []}, thread("paused"))
    assert saver.get_run("paused").status == "interrupted"
    paused.invoke(Command(resume="yes"), thread("paused"))
    assert saver.get_run("paused").status == "done"
    paused.update_state(thread("paused"), {"log": ["note"]})
    assert saver.get_run("paused").status == "done"  # an update keeps the record it found

    for _ in graph.stream({"log": []}, thread("closed")):
        break  # the caller stops reading: the run is cancelled, and the thread is free
    assert saver.get_run("closed").status == "cancelled"
    assert graph.invoke(None, thread("closed"))["log"] == ["a", "b", "c"]
    assert saver.list_incomplete() == []


def test_a_run_that_lost_its_thread_stops_and_writes_nothing() -> None:
    saver = InMemorySaver()

    def delete_meanwhile(name: str) -> None:
        if name == "b":
            saver.delete_thread("gone")

    with pytest.raises(LeaseLostError, match="deleted"):
        chain(saver, delete_meanwhile).invoke({"log": []}, thread("gone"))
    assert saver.get_tuple(thread("gone")) is None  # not resurrected
    assert saver.get_run("gone").status == "deleted"


def test_update_state_waits_for_no_one() -> None:
    saver = InMemorySaver()
    graph = chain(saver)
    graph.invoke({"log": []}, thread("t"))
    saver.acquire_lease("t", "a-live-run", ttl=30)
    with pytest.raises(ThreadBusyError):
        graph.update_state(thread("t"), {"log": ["x"]})


def _crash(saver: InMemorySaver, thread_id: str, graph: Any, input: Any) -> None:
    """Run until node ``b`` and stop as a killed process would: the lease is never let go."""

    class Killed(BaseException):
        pass

    real = saver.release_lease
    saver.release_lease = lambda *args, **kwargs: None  # type: ignore[method-assign]
    try:
        with pytest.raises(Killed):
            graph.invoke(input, thread(thread_id))
    finally:
        saver.release_lease = real  # type: ignore[method-assign]


def test_recover_runs_on_the_runs_that_died() -> None:
    saver = InMemorySaver()
    saver.lease_ttl = 0.2
    ran: list[str] = []
    crash_at: set[str] = {"b"}

    def hook(name: str) -> None:
        if name in crash_at:
            crash_at.discard(name)
            raise KeyboardInterrupt  # stands in for the process dying inside b
        ran.append(name)

    graph = chain(saver, hook)
    real = saver.release_lease
    saver.release_lease = lambda *args, **kwargs: None  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        graph.invoke({"log": []}, thread("died"), durability="sync")
    saver.release_lease = real  # type: ignore[method-assign]
    # A run that died before its first save: recovery starts it again with its input.
    saver.acquire_lease("died-early", "dead-run", ttl=0.1, input={"input": {"log": ["early"]}})

    assert graph.recover().resumed == []  # leases still live: maybe still running elsewhere
    time.sleep(0.3)
    incomplete = {run.thread_id: run for run in saver.list_incomplete()}
    assert set(incomplete) == {"died", "died-early"}
    report = graph.recover()
    assert sorted(report.resumed) == ["died", "died-early"] and not report.failed
    assert graph.get_state(thread("died")).values["log"] == ["a", "b", "c"]
    assert ran == ["a", "b", "c", "a", "b", "c"]  # a ran once for "died", b and c once each
    assert graph.get_state(thread("died-early")).values["log"] == ["early", "a", "b", "c"]
    assert saver.get_run("died").status == "done"
    assert saver.list_incomplete() == []


def test_recover_gives_up_after_max_attempts() -> None:
    saver = InMemorySaver()
    for attempt in range(3):
        lease = saver.acquire_lease("doomed", f"run-{attempt}", ttl=0.05)
        assert lease.attempts == attempt + 1
        time.sleep(0.1)
    graph = chain(saver)
    report = graph.recover(max_attempts=3)
    assert report.abandoned == ["doomed"] and "1 abandoned" in str(report)
    run = saver.get_run("doomed")
    assert run.status == "abandoned" and "3 attempt" in (run.error or "")
    assert saver.list_incomplete() == []
    with pytest.raises(ValueError, match="max_attempts"):
        graph.recover(max_attempts=0)


def test_retention_on_completion() -> None:
    deleting = InMemorySaver(retention=Retention(delete_on_completion=True))
    chain(deleting).invoke({"log": []}, thread("t"))
    assert deleting.get_tuple(thread("t")) is None

    keeping = InMemorySaver(retention=Retention(keep_last=2))
    chain(keeping).invoke({"log": []}, thread("t"))
    assert len(list(keeping.list(thread("t")))) == 2
    assert keeping.storage_report("t").checkpoints == 2
    with pytest.raises(ValueError, match="keep_last"):
        Retention(keep_last=0)


async def test_async_runs_hold_renew_and_release() -> None:
    saver = InMemorySaver()
    saver.lease_ttl = 0.3

    async def slow(state: State) -> dict[str, Any]:
        await asyncio.sleep(0.5)  # longer than the ttl: the heartbeat keeps the lease
        return {"log": ["slow"]}

    builder = StateGraph(State)
    builder.add_node("slow", slow)
    builder.add_edge(START, "slow")
    graph = builder.compile(checkpointer=saver)
    running = asyncio.ensure_future(graph.ainvoke({"log": []}, thread("async")))
    await asyncio.sleep(0.4)
    with pytest.raises(ThreadBusyError):
        await graph.ainvoke({"log": []}, thread("async"))
    assert (await running)["log"] == ["slow"]
    assert (await saver.aget_run("async")).status == "done"
    assert await graph.arecover() is not None


def test_sync_runs_renew_their_lease_while_a_node_is_slow() -> None:
    saver = InMemorySaver()
    saver.lease_ttl = 0.3
    graph = chain(saver, lambda name: time.sleep(0.5) if name == "a" else None)
    worker = threading.Thread(target=graph.invoke, args=({"log": []}, thread("slow")))
    worker.start()
    time.sleep(0.45)
    with pytest.raises(ThreadBusyError):
        saver.acquire_lease("slow", "intruder", ttl=1)
    worker.join(5)
    assert saver.get_run("slow").status == "done"


def test_two_runs_given_one_run_id_still_exclude_each_other() -> None:
    saver = InMemorySaver()
    started, go = threading.Event(), threading.Event()

    def hold(name: str) -> None:
        if name == "a" and not started.is_set():
            started.set()
            go.wait(5)

    graph = chain(saver, hold)
    config = {"configurable": {"thread_id": "same"}, "run_id": "caller-run"}
    first = threading.Thread(target=graph.invoke, args=({"log": []}, config))
    first.start()
    assert started.wait(5)
    with pytest.raises(ThreadBusyError):
        graph.invoke({"log": []}, config)
    go.set()
    first.join(5)
    assert len(list(saver.list(thread("same")))) == 5  # one chain: input + 3 steps + start


def test_subgraph_writes_carry_the_root_runs_fence() -> None:
    saver = InMemorySaver()
    inner = StateGraph(State)

    def steal(state: State) -> dict[str, Any]:
        # Another run takes the thread over while the subgraph runs (as after a long pause).
        run = saver.get_run("sub")
        assert run is not None
        saver._runs["sub"] = saver._runs["sub"]._replace(expires_at=0.0)
        saver.acquire_lease("sub", "intruder", ttl=30)
        return {"log": ["stolen"]}

    inner.add_node("steal", steal)
    inner.add_node("after", lambda state: {"log": ["after"]})
    inner.add_edge(START, "steal")
    inner.add_edge("steal", "after")
    outer = StateGraph(State)
    outer.add_node("sub", inner.compile())
    outer.add_edge(START, "sub")
    graph = outer.compile(checkpointer=saver)
    with pytest.raises(LeaseLostError):
        graph.invoke({"log": []}, thread("sub"), durability="sync")
    namespaces = {t.config["configurable"]["checkpoint_ns"] for t in saver.list(thread("sub"))}
    written = [t for t in saver.list(thread("sub")) if t.config["configurable"]["checkpoint_ns"]]
    assert all(t.metadata["step"] < 1 for t in written), namespaces  # nothing after the steal


def test_recovery_restarts_a_run_that_saved_nothing_on_a_thread_with_history() -> None:
    saver = InMemorySaver()
    graph = chain(saver)
    graph.invoke({"log": ["turn1"]}, thread("chat"))
    # The second turn dies before its first save (durability="exit" saves only at the end).
    saver.acquire_lease("chat", "dead-run", ttl=0.05, input={"input": {"log": ["turn2"]}})
    time.sleep(0.1)
    assert graph.recover().resumed == ["chat"]
    log = graph.get_state(thread("chat")).values["log"]
    assert log == ["turn1", "a", "b", "c", "turn2", "a", "b", "c"]


def test_a_run_recovered_elsewhere_meanwhile_is_not_run_again() -> None:
    saver = InMemorySaver()
    ran: list[str] = []
    graph = chain(saver, ran.append)
    saver.acquire_lease("dead", "dead-run", ttl=0.05, input={"input": {"log": []}})
    time.sleep(0.1)
    listed = saver.list_incomplete()
    assert [run.thread_id for run in listed] == ["dead"]
    graph.recover()  # another worker recovers it first
    assert ran == ["a", "b", "c"]
    saver.list_incomplete = lambda **kwargs: listed  # type: ignore[method-assign]
    report = graph.recover()  # a worker still holding the stale list
    assert report.busy == ["dead"] and ran == ["a", "b", "c"]


def test_update_state_on_a_dead_run_is_refused_and_leaves_it_for_recovery() -> None:
    saver = InMemorySaver()
    graph = chain(saver)
    graph.invoke({"log": []}, thread("t"))
    saver.acquire_lease("t", "dead-run", ttl=0.05, input={"interrupt_before": ["c"]})
    time.sleep(0.1)
    with pytest.raises(RunIncompleteError, match="recover"):
        graph.update_state(thread("t"), {"log": ["fixed by hand"]})
    run = saver.get_run("t")
    assert (run.status, run.attempts, run.input) == ("running", 1, {"interrupt_before": ["c"]})
    assert [r.thread_id for r in saver.list_incomplete()] == ["t"]
    # Even asked to wait, an update never waits for (nor takes over) a run.
    saver.acquire_lease("u", "live-run", ttl=30)
    with pytest.raises(ThreadBusyError):
        graph.update_state(thread("u", multitask_strategy="enqueue"), {"log": ["x"]})


async def test_aupdate_state_cancelled_while_taking_the_lease_keeps_the_record() -> None:
    saver = InMemorySaver()
    graph = chain(saver)
    await graph.ainvoke({"log": []}, thread("p"))
    real = saver.acquire_lease

    def slow_acquire(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.2)
        return real(*args, **kwargs)

    saver.acquire_lease = slow_acquire  # type: ignore[method-assign]
    saver.async_inline = False
    task = asyncio.ensure_future(graph.aupdate_state(thread("p"), {"log": ["x"]}))
    await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.sleep(0.01)
    task.cancel()  # a second cancellation must not leak the lease either
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.4)
    run = saver.get_run("p")
    assert run is not None and (run.status, run.expires_at) == ("done", None)


async def test_a_run_cancelled_while_taking_its_lease_leaves_none() -> None:
    saver = InMemorySaver()
    real = saver.acquire_lease

    def slow_acquire(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.2)
        return real(*args, **kwargs)

    saver.acquire_lease = slow_acquire  # type: ignore[method-assign]
    saver.async_inline = False  # the async twin runs it in a thread, as a database saver does
    graph = chain(saver)
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(graph.ainvoke({"log": []}, thread("c")), timeout=0.05)
    await asyncio.sleep(0.3)
    run = saver.get_run("c")
    assert run is not None and run.status == "cancelled" and run.expires_at is None
    assert saver.list_incomplete() == []


def test_recovery_repeats_the_calls_breakpoints_and_durability() -> None:
    saver = InMemorySaver()
    saver.lease_ttl = 0.1
    ran: list[str] = []

    def hook(name: str) -> None:
        if name == "a" and "a" not in ran:
            ran.append(name)
            raise KeyboardInterrupt  # dies inside a, before a's first save in "exit" mode
        ran.append(name)

    graph = chain(saver, hook)
    real = saver.release_lease
    saver.release_lease = lambda *args, **kwargs: None  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        graph.invoke({"log": []}, thread("gate"), durability="exit", interrupt_before=["c"])
    saver.release_lease = real  # type: ignore[method-assign]
    request = saver.get_run("gate").input
    assert request == {"input": {"log": []}, "durability": "exit", "interrupt_before": ["c"]}
    time.sleep(0.2)
    assert graph.recover().resumed == ["gate"]
    state = graph.get_state(thread("gate"))
    assert state.next == ("c",) and ran == ["a", "a", "b"]  # stopped for the human again
    assert saver.get_run("gate").status == "interrupted"
