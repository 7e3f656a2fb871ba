"""Durable-execution scenarios, run on every saver and in every durability mode.

Each scenario checks what the saver stored (checkpoints, their metadata and pending writes), not
only what the graph returned. Node side effects are counted, so "ran exactly once" is observable.
"""

from __future__ import annotations

import contextlib
import itertools
import operator
import threading
import uuid
from collections import Counter
from typing import TYPE_CHECKING, Annotated, Any, TypedDict

import pytest

from stepgraph.errors import EmptyInputError
from stepgraph.graph import END, START, StateGraph
from stepgraph.types import Command, Send, interrupt

if TYPE_CHECKING:  # conftest is not importable under --import-mode=importlib
    from conftest import Backend, Harness

CHAIN = ("a", "b", "c", "d", "e")


class Log(TypedDict):
    log: Annotated[list[str], operator.add]


class Fanout(TypedDict):
    items: list[int]
    results: Annotated[list[int], operator.add]


class Siblings:
    """Lets a failing node wait until its parallel siblings have returned.

    In LangGraph a failure cancels siblings still running (always so under the async API):
    waiting makes "the siblings finished first" certain, so the test can check that their saved
    writes are honoured on resume. (LangGraph can still drop the writes of a sibling whose result
    it had not taken in when the error came; stepgraph collects every task of the step first.)
    """

    def __init__(self, count: int) -> None:
        self.count = count
        self.returned = 0
        self.changed = threading.Condition()

    def add(self) -> None:
        with self.changed:
            self.returned += 1
            self.changed.notify_all()

    def wait(self) -> None:
        # The timeout only guards against a hang; the test's assertions then fail.
        with self.changed:
            self.changed.wait_for(lambda: self.returned >= self.count, timeout=30)


def new_thread() -> dict:
    return {"configurable": {"thread_id": f"thread-{uuid.uuid4()}"}}


def logging_node(
    name: str, calls: Counter, failures: Counter, siblings: Siblings | None = None
) -> Any:
    """A node that counts its runs and raises while ``failures[name]`` is positive (once its
    ``siblings`` have returned)."""

    def node(state: Log) -> dict:
        calls[name] += 1
        if failures[name] > 0:
            failures[name] -= 1
            if siblings is not None:
                siblings.wait()
            raise RuntimeError(f"{name} failed")
        if siblings is not None:
            siblings.add()
        return {"log": [name]}

    return node


def chain(calls: Counter, failures: Counter | None = None) -> StateGraph:
    """START -> a -> b -> c -> d -> e -> END."""
    failures = failures if failures is not None else Counter()
    builder = StateGraph(Log)
    for name in CHAIN:
        builder.add_node(name, logging_node(name, calls, failures))
    builder.add_edge(START, CHAIN[0])
    for before, after in itertools.pairwise(CHAIN):
        builder.add_edge(before, after)
    builder.add_edge(CHAIN[-1], END)
    return builder


def diamond(calls: Counter, failures: Counter, siblings: Siblings) -> StateGraph:
    """START -> start -> (left, right in parallel, at step 1) -> join -> END."""
    builder = StateGraph(Log)
    builder.add_node("start", logging_node("start", calls, failures))
    builder.add_node("left", logging_node("left", calls, failures, siblings))
    builder.add_node("right", logging_node("right", calls, failures, siblings))
    builder.add_node("join", logging_node("join", calls, failures))
    builder.add_edge(START, "start")
    builder.add_edge("start", "left")
    builder.add_edge("start", "right")
    builder.add_edge(["left", "right"], "join")
    builder.add_edge("join", END)
    return builder


def fanout(calls: Counter, failing_item: int, siblings: Siblings) -> StateGraph:
    """START sends each item to a worker (at step 0); ``failing_item``'s worker fails once."""
    failures = Counter({failing_item: 1})

    def worker(arg: dict) -> dict:
        calls[arg["item"]] += 1
        if failures[arg["item"]] > 0:
            failures[arg["item"]] -= 1
            siblings.wait()
            raise RuntimeError(f"worker {arg['item']} failed")
        siblings.add()
        return {"results": [arg["item"] * 10]}

    def fan_out(state: Fanout) -> list[Send]:
        return [Send("worker", {"item": item}) for item in state["items"]]

    builder = StateGraph(Fanout)
    builder.add_node("worker", worker)
    builder.add_conditional_edges(START, fan_out, ["worker"])
    builder.add_edge("worker", END)
    return builder


def steps(history: list[Any]) -> list[tuple[str, int, tuple[str, ...]]]:
    """(source, step, next) of each snapshot, oldest first."""
    return [(s.metadata["source"], s.metadata["step"], s.next) for s in reversed(history)]


def full_chain_steps() -> list[tuple[str, int, tuple[str, ...]]]:
    loop = [("loop", i, (name,)) for i, name in enumerate(CHAIN)]
    return [("input", -1, ("__start__",)), *loop, ("loop", len(CHAIN), ())]


async def assert_linked(h: Harness, config: dict, *, linear: bool = True) -> list[Any]:
    """The saver's checkpoints of the thread, newest first. They form one tree (one root, every
    parent stored); with ``linear``, a chain where each is the parent of the one before."""
    stored = await h.list(config)
    ids = [t.checkpoint["id"] for t in stored]
    assert ids == sorted(ids, reverse=True)
    parents = [t.parent_config and t.parent_config["configurable"]["checkpoint_id"] for t in stored]
    assert parents.count(None) == 1
    assert set(parents) - {None} <= set(ids)
    if linear:
        assert parents == [*ids[1:], None]
    return stored


# -- a 5-node chain ----------------------------------------------------------------------------


async def chain_runs_to_completion(h: Harness, durability: str) -> None:
    calls: Counter = Counter()
    graph = h.compile(chain(calls))
    config = new_thread()

    assert await graph.invoke({"log": []}, config, durability=durability) == {"log": list(CHAIN)}
    assert calls == Counter(CHAIN)

    history = await graph.history(config)
    if durability == "exit":
        # Only the run's last checkpoint reaches the saver.
        assert steps(history) == [("loop", len(CHAIN), ())]
    else:
        assert steps(history) == full_chain_steps()
    assert (await graph.get_state(config)).next == ()

    stored = await assert_linked(h, config)
    assert len(stored) == len(history)
    latest = await h.get_tuple(config)
    assert latest.checkpoint["id"] == stored[0].checkpoint["id"]
    assert latest.checkpoint["channel_values"]["log"] == list(CHAIN)
    assert latest.metadata["source"] == "loop"
    assert latest.metadata["step"] == len(CHAIN)
    assert not latest.pending_writes
    for snapshot, saved in zip(history, stored, strict=True):
        assert snapshot.config["configurable"]["checkpoint_id"] == saved.checkpoint["id"]
        assert snapshot.values.get("log", []) == saved.checkpoint["channel_values"].get("log", [])


def test_chain_runs_to_completion(backend: Backend, durability: str) -> None:
    backend.run(chain_runs_to_completion, durability=durability)


async def streamed_chain_matches_store(h: Harness, durability: str) -> None:
    calls: Counter = Counter()
    graph = h.compile(chain(calls))
    config = new_thread()

    chunks = await graph.stream({"log": []}, config, durability=durability, stream_mode="values")
    assert chunks == [{"log": list(CHAIN[:i])} for i in range(len(CHAIN) + 1)]
    updates = await graph.stream(
        {"log": []}, new_thread(), durability=durability, stream_mode="updates"
    )
    assert updates == [{name: {"log": [name]}} for name in CHAIN]
    assert calls == Counter(CHAIN * 2)

    stored = await h.list(config)
    if durability == "exit":
        assert [t.checkpoint["channel_values"]["log"] for t in stored] == [list(CHAIN)]
    else:
        # Each values chunk is the state of one saved loop checkpoint (the input one has none).
        saved_logs = [t.checkpoint["channel_values"].get("log") for t in reversed(stored)]
        assert saved_logs[1:] == [chunk["log"] for chunk in chunks]


def test_streamed_chain_matches_store(backend: Backend, durability: str) -> None:
    backend.run(streamed_chain_matches_store, durability=durability)


# -- a node raises, then the run resumes --------------------------------------------------------


async def failed_node_resumes(h: Harness, durability: str) -> None:
    calls: Counter = Counter()
    graph = h.compile(chain(calls, Counter(c=1)))
    config = new_thread()

    with pytest.raises(RuntimeError, match=r"^c failed$"):
        await graph.invoke({"log": []}, config, durability=durability)

    # LangGraph saves the checkpoint the failing step started from even with durability="exit"
    # (the run exits, with an error): resuming never redoes a and b in any mode.
    state = await graph.get_state(config)
    assert state.next == ("c",)
    assert state.values == {"log": ["a", "b"]}
    assert [(t.name, t.error is not None) for t in state.tasks] == [("c", True)]
    saved = await h.get_tuple(config)
    assert saved.checkpoint["channel_values"]["log"] == ["a", "b"]
    assert saved.metadata["step"] == 2
    assert [w[1] for w in saved.pending_writes] == ["__error__"]
    if durability == "exit":
        assert steps(await graph.history(config)) == [("loop", 2, ("c",))]
    else:
        assert steps(await graph.history(config)) == full_chain_steps()[:4]

    assert await graph.invoke(None, config, durability=durability) == {"log": list(CHAIN)}
    assert calls == Counter(a=1, b=1, c=2, d=1, e=1)
    assert (await graph.get_state(config)).next == ()
    latest = await h.get_tuple(config)
    assert latest.checkpoint["channel_values"]["log"] == list(CHAIN)
    assert not latest.pending_writes
    history = await graph.history(config)
    if durability == "exit":
        assert steps(history) == [("loop", 2, ("c",)), ("loop", 5, ())]
    else:
        assert steps(history) == full_chain_steps()
    await assert_linked(h, config)


def test_failed_node_resumes(backend: Backend, durability: str) -> None:
    backend.run(failed_node_resumes, durability=durability)


# -- one of two parallel nodes fails -------------------------------------------------------------


def saved_log_writes(saved: Any) -> list[Any]:
    return [value for _, channel, value in saved.pending_writes if channel == "log"]


async def parallel_sibling_not_rerun(h: Harness, durability: str) -> None:
    calls: Counter = Counter()
    config = new_thread()
    graph = h.compile(diamond(calls, Counter(right=1), Siblings(1)))

    with pytest.raises(RuntimeError, match=r"^right failed$"):
        await graph.invoke({"log": []}, config, durability=durability)

    # left's writes were saved against the step's checkpoint, next to right's error.
    saved = await h.get_tuple(config)
    assert saved.metadata["step"] == 1
    assert saved.checkpoint["channel_values"]["log"] == ["start"]
    assert [channel for _, channel, _ in saved.pending_writes].count("__error__") == 1
    assert saved_log_writes(saved) == [["left"]]

    result = await graph.invoke(None, config, durability=durability)
    assert result == {"log": ["start", "left", "right", "join"]}
    assert calls == Counter(start=1, left=1, right=2, join=1)
    latest = await h.get_tuple(config)
    assert latest.checkpoint["channel_values"]["log"] == ["start", "left", "right", "join"]
    assert (await graph.get_state(config)).next == ()


def test_parallel_sibling_not_rerun(backend: Backend, durability: str) -> None:
    backend.run(parallel_sibling_not_rerun, durability=durability)


async def snapshot_after_partial_failure(h: Harness, durability: str) -> None:
    """LangGraph's ``get_state`` applies the saved writes of the tasks that finished in the failed
    step, and ``next`` names only the tasks still to run."""
    config = new_thread()
    graph = h.compile(diamond(Counter(), Counter(right=1), Siblings(1)))
    with contextlib.suppress(RuntimeError):
        await graph.invoke({"log": []}, config, durability=durability)
    state = await graph.get_state(config)
    assert state.next == ("right",)
    assert state.values == {"log": ["start", "left"]}
    assert [(t.name, t.error is not None) for t in state.tasks] == [
        ("left", False),
        ("right", True),
    ]

    config = new_thread()
    graph = h.compile(fanout(Counter(), 7, Siblings(9)))
    with contextlib.suppress(RuntimeError):
        await graph.invoke({"items": list(range(10)), "results": []}, config, durability=durability)
    state = await graph.get_state(config)
    assert state.next == ("worker",)
    assert sorted(state.values["results"]) == [i * 10 for i in range(10) if i != 7]
    assert len(state.tasks) == 10


def test_snapshot_after_partial_failure(backend: Backend, durability: str) -> None:
    backend.run(snapshot_after_partial_failure, durability=durability)


# -- Send fan-out of 10, one worker fails once ----------------------------------------------------


def saved_fanout_results(saved: Any) -> list[int]:
    results = [value for _, channel, value in saved.pending_writes if channel == "results"]
    return sorted(item for written in results for item in written)


async def fanout_reruns_only_failed_worker(h: Harness, durability: str) -> None:
    calls: Counter = Counter()
    config = new_thread()
    graph = h.compile(fanout(calls, 7, Siblings(9)))
    items = list(range(10))

    with pytest.raises(RuntimeError, match=r"^worker 7 failed$"):
        await graph.invoke({"items": items, "results": []}, config, durability=durability)
    assert calls == Counter(items)

    # The 9 finished workers' writes were saved next to worker 7's error.
    saved = await h.get_tuple(config)
    assert [channel for _, channel, _ in saved.pending_writes].count("__error__") == 1
    assert saved_fanout_results(saved) == [i * 10 for i in items if i != 7]
    assert len((await graph.get_state(config)).tasks) == 10

    result = await graph.invoke(None, config, durability=durability)
    assert sorted(result["results"]) == [i * 10 for i in items]
    assert calls == Counter({**Counter(items), 7: 2})
    latest = await h.get_tuple(config)
    assert sorted(latest.checkpoint["channel_values"]["results"]) == [i * 10 for i in items]
    assert (await graph.get_state(config)).next == ()


def test_fanout_reruns_only_failed_worker(backend: Backend, durability: str) -> None:
    backend.run(fanout_reruns_only_failed_worker, durability=durability)


# -- update_state, then resume --------------------------------------------------------------------


async def update_state_then_resume(h: Harness, durability: str) -> None:
    calls: Counter = Counter()
    graph = h.compile(chain(calls, Counter(c=1)))
    config = new_thread()
    with contextlib.suppress(RuntimeError):
        await graph.invoke({"log": []}, config, durability=durability)
    before = await graph.get_state(config)

    # An update between attempts: as if the failed node's predecessor had written it.
    updated = await graph.update_state(config, {"log": ["fixed"]}, as_node="b")
    assert (
        updated["configurable"]["checkpoint_id"] != before.config["configurable"]["checkpoint_id"]
    )
    saved = await h.get_tuple(config)
    assert saved.checkpoint["id"] == updated["configurable"]["checkpoint_id"]
    assert saved.metadata["source"] == "update"
    assert saved.metadata["step"] == before.metadata["step"] + 1
    assert (
        saved.parent_config["configurable"]["checkpoint_id"]
        == before.config["configurable"]["checkpoint_id"]
    )
    assert saved.checkpoint["channel_values"]["log"] == ["a", "b", "fixed"]
    state = await graph.get_state(config)
    assert state.next == ("c",)
    assert state.values == {"log": ["a", "b", "fixed"]}

    result = await graph.invoke(None, config, durability=durability)
    assert result == {"log": ["a", "b", "fixed", "c", "d", "e"]}
    assert calls == Counter(a=1, b=1, c=2, d=1, e=1)
    latest = await h.get_tuple(config)
    assert latest.checkpoint["channel_values"]["log"] == ["a", "b", "fixed", "c", "d", "e"]


def test_update_state_then_resume(backend: Backend, durability: str) -> None:
    backend.run(update_state_then_resume, durability=durability)


# -- time travel: replaying from an earlier checkpoint forks the thread ---------------------------


async def time_travel_forks(h: Harness, durability: str) -> None:
    calls: Counter = Counter()
    graph = h.compile(chain(calls))
    config = new_thread()
    # Every checkpoint must be saved to travel back to one; "exit" keeps only the last.
    await graph.invoke({"log": []}, config, durability="sync")
    original = await graph.history(config)
    original_ids = [s.config["configurable"]["checkpoint_id"] for s in original]
    before_c = next(s for s in original if s.next == ("c",))
    calls.clear()

    result = await graph.invoke(None, before_c.config, durability=durability)
    assert result == {"log": list(CHAIN)}
    assert calls == Counter(c=1, d=1, e=1)

    # LangGraph first copies the target as a "fork" checkpoint (step + 1), child of the target;
    # the new branch continues from it and the old branch stays as it was.
    history = await graph.history(config)
    new = history[: len(history) - len(original)]
    assert [s.config["configurable"]["checkpoint_id"] for s in history[len(new) :]] == original_ids
    target_step = before_c.metadata["step"]
    fork_step = ("fork", target_step + 1, ("c",))
    if durability == "exit":
        assert steps(new) == [("loop", len(CHAIN) + 1, ())]
    else:
        assert steps(new) == [
            fork_step,
            ("loop", target_step + 2, ("d",)),
            ("loop", target_step + 3, ("e",)),
            ("loop", target_step + 4, ()),
        ]
        fork = new[-1]
        assert (
            fork.parent_config["configurable"]["checkpoint_id"]
            == before_c.config["configurable"]["checkpoint_id"]
        )
        assert fork.values == before_c.values
    for snapshot in original:
        stored = await h.get_tuple(snapshot.config)
        assert stored is not None
        assert stored.metadata == snapshot.metadata
        assert stored.checkpoint["channel_values"].get("log", []) == snapshot.values.get("log", [])
    await assert_linked(h, config, linear=False)


def test_time_travel_forks(backend: Backend, durability: str) -> None:
    backend.run(time_travel_forks, durability=durability)


# -- human in the loop: interrupt_before and interrupt() -----------------------------------------


async def interrupt_before_pauses_and_resumes(h: Harness, durability: str) -> None:
    calls: Counter = Counter()
    graph = h.compile(chain(calls), interrupt_before=["c"])
    config = new_thread()

    assert await graph.invoke({"log": []}, config, durability=durability) == {"log": ["a", "b"]}
    assert calls == Counter(a=1, b=1)
    state = await graph.get_state(config)
    assert state.next == ("c",)
    saved = await h.get_tuple(config)
    assert saved.metadata["step"] == 2
    assert saved.checkpoint["channel_values"]["log"] == ["a", "b"]
    assert not saved.pending_writes

    assert await graph.invoke(None, config, durability=durability) == {"log": list(CHAIN)}
    assert calls == Counter(CHAIN)
    latest = await h.get_tuple(config)
    assert latest.checkpoint["channel_values"]["log"] == list(CHAIN)
    assert (await graph.get_state(config)).next == ()


def test_interrupt_before_pauses_and_resumes(backend: Backend, durability: str) -> None:
    backend.run(interrupt_before_pauses_and_resumes, durability=durability)


async def interrupt_resumes_with_command(h: Harness, durability: str) -> None:
    calls: Counter = Counter()

    def approve(state: Log) -> dict:
        calls["approve"] += 1
        answer = interrupt({"question": "ship it?", "log": state["log"]})
        return {"log": [f"approved:{answer}"]}

    builder = StateGraph(Log)
    builder.add_node("draft", logging_node("draft", calls, Counter()))
    builder.add_node("approve", approve)
    builder.add_node("ship", logging_node("ship", calls, Counter()))
    builder.add_edge(START, "draft")
    builder.add_edge("draft", "approve")
    builder.add_edge("approve", "ship")
    builder.add_edge("ship", END)
    graph = h.compile(builder)
    config = new_thread()

    paused = await graph.invoke({"log": []}, config, durability=durability)
    assert paused["log"] == ["draft"]
    assert [i.value for i in paused["__interrupt__"]] == [
        {"question": "ship it?", "log": ["draft"]}
    ]
    state = await graph.get_state(config)
    assert state.next == ("approve",)
    assert [i.value["question"] for t in state.tasks for i in t.interrupts] == ["ship it?"]
    saved = await h.get_tuple(config)
    assert [channel for _, channel, _ in saved.pending_writes] == ["__interrupt__"]

    # The interrupted node starts over on resume; interrupt() then returns the resume value.
    result = await graph.invoke(Command(resume="yes"), config, durability=durability)
    assert result == {"log": ["draft", "approved:yes", "ship"]}
    assert calls == Counter(draft=1, approve=2, ship=1)
    latest = await h.get_tuple(config)
    assert latest.checkpoint["channel_values"]["log"] == ["draft", "approved:yes", "ship"]
    assert (await graph.get_state(config)).next == ()


def test_interrupt_resumes_with_command(backend: Backend, durability: str) -> None:
    backend.run(interrupt_resumes_with_command, durability=durability)


async def answer_waits_for_next_interrupt(h: Harness, durability: str) -> None:
    """An answer given when no interrupt is pending on the thread's checkpoint (the state was
    updated after the interrupt) is saved to wait for the next interrupt() call; a node that
    then asks again keeps it (saved with its pause), so its rerun does not ask twice."""
    calls: Counter = Counter()

    def review(state: Log) -> dict:
        calls["review"] += 1
        first = interrupt("first?")
        second = interrupt("second?")
        return {"log": [f"review:{first}:{second}"]}

    builder = StateGraph(Log)
    builder.add_node("draft", logging_node("draft", calls, Counter()))
    builder.add_node("review", review)
    builder.add_edge(START, "draft")
    builder.add_edge("draft", "review")
    graph = h.compile(builder)
    config = new_thread()
    await graph.invoke({"log": []}, config, durability=durability)
    await graph.update_state(config, {"log": ["edited"]})
    asked = await graph.invoke(Command(resume="A"), config, durability=durability)
    assert [i.value for i in asked["__interrupt__"]] == ["second?"]
    saved = await h.get_tuple(config)
    assert saved.metadata["source"] == "update"
    assert sorted(channel for _, channel, _ in saved.pending_writes) == [
        "__interrupt__",
        "__resume__",
        "__resume__",
    ]
    done = await graph.invoke(Command(resume="B"), config, durability=durability)
    assert done == {"log": ["draft", "edited", "review:A:B"]}
    assert calls == Counter(draft=1, review=3)


def test_answer_waits_for_next_interrupt(backend: Backend, durability: str) -> None:
    backend.run(answer_waits_for_next_interrupt, durability=durability)


# -- resuming a thread that has nothing saved ------------------------------------------------------


async def resume_of_empty_thread_saves_nothing(h: Harness, durability: str) -> None:
    calls: Counter = Counter()
    graph = h.compile(chain(calls))
    config = new_thread()
    with pytest.raises(EmptyInputError):
        await graph.invoke(None, config, durability=durability)
    assert not calls
    assert await h.get_tuple(config) is None
    assert await h.list(config) == []


def test_resume_of_empty_thread_saves_nothing(backend: Backend, durability: str) -> None:
    backend.run(resume_of_empty_thread_saves_nothing, durability=durability)
