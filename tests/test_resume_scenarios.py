"""Resuming after the store was reopened: subgraphs, interrupts, ``Send`` and the functional API.

Each scenario runs on every saver, with the graph API the saver is for, in every durability mode.
Between attempts the scenario opens a fresh saver on the same SQLite file or Postgres schema (as a
new process would) and compiles its graph again; node and task runs are counted, so "finished
work is not redone" is observable.
"""

from __future__ import annotations

import operator
import uuid
from collections import Counter
from typing import TYPE_CHECKING, Annotated, Any, TypedDict

import pytest

from stepgraph.func import entrypoint, task
from stepgraph.graph import END, START, StateGraph
from stepgraph.types import Command, Send, interrupt

if TYPE_CHECKING:  # conftest is not importable under --import-mode=importlib
    from conftest import Backend, Harness


class Log(TypedDict, total=False):
    log: Annotated[list[str], operator.add]


class Fanout(TypedDict):
    items: list[int]
    results: Annotated[list[int], operator.add]


def new_thread() -> dict:
    return {"configurable": {"thread_id": f"thread-{uuid.uuid4()}"}}


def recorder(name: str, calls: Counter, failures: Counter | None = None) -> Any:
    """A node that counts its runs, raises while ``failures[name]`` is positive, and logs."""

    def node(state: Log) -> dict:
        calls[name] += 1
        if failures is not None and failures[name] > 0:
            failures[name] -= 1
            raise RuntimeError(f"{name} failed")
        return {"log": [name]}

    return node


def asker(name: str, calls: Counter) -> Any:
    def node(state: Log) -> dict:
        calls[name] += 1
        return {"log": [f"{name}={interrupt(f'{name}?')}"]}

    return node


def with_sibling(prefix: str, calls: Counter, inner: Any, failures: Counter) -> StateGraph:
    """``<p>_a`` -> (``inner`` as ``<p>_sub``, ``<p>_side``) -> ``<p>_b``: a graph whose middle
    step runs ``inner`` (a node or a compiled subgraph) next to a sibling."""
    builder = StateGraph(Log)
    builder.add_node(f"{prefix}_a", recorder(f"{prefix}_a", calls))
    builder.add_node(f"{prefix}_sub", inner)
    builder.add_node(f"{prefix}_side", recorder(f"{prefix}_side", calls))
    builder.add_node(f"{prefix}_b", recorder(f"{prefix}_b", calls, failures))
    builder.add_edge(START, f"{prefix}_a")
    builder.add_edge(f"{prefix}_a", f"{prefix}_sub")
    builder.add_edge(f"{prefix}_a", f"{prefix}_side")
    builder.add_edge([f"{prefix}_sub", f"{prefix}_side"], f"{prefix}_b")
    builder.add_edge(f"{prefix}_b", END)
    return builder


def three_levels(calls: Counter, inner: Any, failures: Counter | None = None) -> StateGraph:
    """outer (o_*) runs middle (m_*) as o_sub, which runs inner (i_*) as m_sub; ``inner`` is
    the innermost graph's middle node."""
    failures = failures if failures is not None else Counter()
    innermost = with_sibling("i", calls, inner, failures).compile()
    middle = with_sibling("m", calls, innermost, failures).compile()
    return with_sibling("o", calls, middle, failures)


SIDE_NODES = ("o_a", "o_side", "m_a", "m_side", "i_a", "i_side")
LOG_ORDER = ["o_a", "m_a", "i_a"]


# -- an interrupt two subgraphs down, answered after a restart -----------------------------------


async def nested_interrupt_survives_restart(h: Harness, durability: str) -> None:
    calls: Counter = Counter()
    config = new_thread()
    graph = h.compile(three_levels(calls, asker("ask", calls)))

    paused = await graph.invoke({"log": []}, config, durability=durability)
    [question] = paused["__interrupt__"]
    assert question.value == "ask?"
    assert calls == Counter({**dict.fromkeys(SIDE_NODES, 1), "ask": 1})
    state = await graph.get_state(config)
    assert state.next == ("o_sub",)
    assert state.interrupts == (question,)

    await h.reopen()
    graph = h.compile(three_levels(calls, asker("ask", calls)))
    assert (await graph.get_state(config)).interrupts == (question,)
    result = await graph.invoke(Command(resume="yes"), config, durability=durability)

    # Only the interrupted node and what follows it ran again, at every depth.
    assert calls == Counter(
        {**dict.fromkeys(SIDE_NODES, 1), "ask": 2, "i_b": 1, "m_b": 1, "o_b": 1}
    )
    # (A subgraph returns its whole state, so the parent's reducer repeats entries: LangGraph's
    # behaviour for a subgraph sharing its parent's reducer key.)
    log = result["log"]
    assert set(log) == {*SIDE_NODES, "ask=yes", "i_b", "m_b", "o_b"}
    assert log[-1] == "o_b" and log.index("ask=yes") < log.index("i_b") < log.index("m_b")
    assert (await graph.get_state(config)).next == ()
    latest = await h.get_tuple(config)
    assert latest.checkpoint["channel_values"]["log"] == log


def test_nested_interrupt_survives_restart(backend: Backend, durability: str) -> None:
    backend.run(nested_interrupt_survives_restart, durability=durability)


# -- a node inside a subgraph fails; the resume reruns only it -----------------------------------


async def subgraph_failure_reruns_only_failed_node(h: Harness, durability: str) -> None:
    calls: Counter = Counter()
    failures = Counter(i_b=1)
    config = new_thread()
    graph = h.compile(three_levels(calls, recorder("work", calls), failures))

    with pytest.raises(RuntimeError, match=r"^i_b failed$"):
        await graph.invoke({"log": []}, config, durability=durability)
    assert calls == Counter({**dict.fromkeys(SIDE_NODES, 1), "work": 1, "i_b": 1})
    saved = await h.get_tuple(config)
    assert saved.metadata["step"] == 1  # the outer graph's step running o_sub and o_side
    assert [c for _, c, _ in saved.pending_writes if c == "log"] == ["log"]  # o_side's

    await h.reopen()
    graph = h.compile(three_levels(calls, recorder("work", calls), failures))
    result = await graph.invoke(None, config, durability=durability)
    assert calls == Counter(
        {**dict.fromkeys(SIDE_NODES, 1), "work": 1, "i_b": 2, "m_b": 1, "o_b": 1}
    )
    assert set(result["log"]) == {*SIDE_NODES, "work", "i_b", "m_b", "o_b"}
    assert result["log"][-1] == "o_b"
    assert (await graph.get_state(config)).next == ()


def test_subgraph_failure_reruns_only_failed_node(backend: Backend, durability: str) -> None:
    backend.run(subgraph_failure_reruns_only_failed_node, durability=durability)


# -- two interrupt() calls in one node, answered across restarts ---------------------------------


def two_questions(calls: Counter) -> StateGraph:
    def ask(state: Log) -> dict:
        calls["ask"] += 1
        name = interrupt("name?")
        age = interrupt({"question": "age?", "name": name})
        return {"log": [f"{name}:{age}"]}

    builder = StateGraph(Log)
    builder.add_node("before", recorder("before", calls))
    builder.add_node("ask", ask)
    builder.add_edge(START, "before")
    builder.add_edge("before", "ask")
    builder.add_edge("ask", END)
    return builder


async def two_interrupts_answered_across_restarts(h: Harness, durability: str) -> None:
    calls: Counter = Counter()
    config = new_thread()
    graph = h.compile(two_questions(calls))
    [first] = (await graph.invoke({"log": []}, config, durability=durability))["__interrupt__"]
    assert first.value == "name?"

    await h.reopen()
    graph = h.compile(two_questions(calls))
    # The same question, with the same id, after a restart and when asked again.
    assert (await graph.get_state(config)).interrupts == (first,)
    assert (await graph.invoke(None, config, durability=durability))["__interrupt__"] == [first]
    [second] = (await graph.invoke(Command(resume="Ada"), config, durability=durability))[
        "__interrupt__"
    ]
    assert second.value == {"question": "age?", "name": "Ada"}
    assert second.id != first.id

    await h.reopen()
    graph = h.compile(two_questions(calls))
    assert (await graph.get_state(config)).interrupts == (second,)
    result = await graph.invoke(Command(resume=36), config, durability=durability)
    assert result == {"log": ["before", "Ada:36"]}
    assert calls == Counter(before=1, ask=4)
    assert (await graph.get_state(config)).next == ()


def test_two_interrupts_answered_across_restarts(backend: Backend, durability: str) -> None:
    backend.run(two_interrupts_answered_across_restarts, durability=durability)


def parallel_askers(calls: Counter) -> StateGraph:
    builder = StateGraph(Log)
    for name in ("p", "q"):
        builder.add_node(name, asker(name, calls))
        builder.add_edge(START, name)
    return builder


async def parallel_interrupts_resume_with_a_map(h: Harness, durability: str) -> None:
    calls: Counter = Counter()
    config = new_thread()
    graph = h.compile(parallel_askers(calls))
    pending = (await graph.invoke({"log": []}, config, durability=durability))["__interrupt__"]
    by_value = {i.value: i for i in pending}
    assert sorted(by_value) == ["p?", "q?"]
    assert len({i.id for i in pending}) == 2

    await h.reopen()
    graph = h.compile(parallel_askers(calls))
    assert set((await graph.get_state(config)).next) == {"p", "q"}
    with pytest.raises(RuntimeError, match="multiple pending interrupts"):
        await graph.invoke(Command(resume="same for all"), config, durability=durability)
    assert calls == Counter(p=1, q=1)
    answers = {by_value["p?"].id: 1, by_value["q?"].id: 2}
    result = await graph.invoke(Command(resume=answers), config, durability=durability)
    assert sorted(result["log"]) == ["p=1", "q=2"]
    assert calls == Counter(p=2, q=2)
    assert (await graph.get_state(config)).next == ()


def test_parallel_interrupts_resume_with_a_map(backend: Backend, durability: str) -> None:
    backend.run(parallel_interrupts_resume_with_a_map, durability=durability)


# -- a Send task fails; after a restart only it runs again ---------------------------------------


def fanout(calls: Counter, failures: Counter) -> StateGraph:
    def worker(arg: dict) -> dict:
        calls[arg["item"]] += 1
        if failures[arg["item"]] > 0:
            failures[arg["item"]] -= 1
            raise RuntimeError(f"worker {arg['item']} failed")
        return {"results": [arg["item"] * 10]}

    def fan_out(state: Fanout) -> list[Send]:
        return [Send("worker", {"item": item}) for item in state["items"]]

    builder = StateGraph(Fanout)
    builder.add_node("worker", worker)
    builder.add_conditional_edges(START, fan_out, ["worker"])
    builder.add_edge("worker", END)
    return builder


async def failed_send_resumes_after_restart(h: Harness, durability: str) -> None:
    calls: Counter = Counter()
    failures = Counter({3: 1})
    items = list(range(6))
    config = new_thread()
    graph = h.compile(fanout(calls, failures))
    with pytest.raises(RuntimeError, match=r"^worker 3 failed$"):
        await graph.invoke({"items": items, "results": []}, config, durability=durability)
    assert calls == Counter(items)

    await h.reopen()
    graph = h.compile(fanout(calls, failures))
    state = await graph.get_state(config)
    assert [t.error is not None for t in state.tasks].count(True) == 1
    result = await graph.invoke(None, config, durability=durability)
    assert sorted(result["results"]) == [i * 10 for i in items]
    assert calls == Counter({**Counter(items), 3: 2})
    assert (await graph.get_state(config)).next == ()


def test_failed_send_resumes_after_restart(backend: Backend, durability: str) -> None:
    backend.run(failed_send_resumes_after_restart, durability=durability)


# -- the functional API ---------------------------------------------------------------------------


def workflow(saver: Any, calls: Counter, failures: Counter) -> Any:
    """An entrypoint calling three tasks (two in parallel, then one), asking for approval between
    them; it returns the run count and saves the running total as the next run's ``previous``."""

    @task
    def double(x: int) -> int:
        calls[f"double({x})"] += 1
        if failures[f"double({x})"] > 0:
            failures[f"double({x})"] -= 1
            raise RuntimeError(f"double({x}) failed")
        return 2 * x

    @task
    def add(x: int, y: int) -> int:
        calls["add"] += 1
        return x + y

    @entrypoint(checkpointer=saver)
    def flow(x: int, *, previous: Any = None) -> Any:
        calls["flow"] += 1
        left, right = double(x), double(x + 1)
        total = add(left.result(), right.result()).result()
        approved = interrupt({"total": total})
        saved = (previous or 0) + total
        return entrypoint.final(value={"total": total, "approved": approved}, save=saved)

    return flow


async def functional_interrupt_survives_restart(h: Harness, durability: str) -> None:
    calls: Counter = Counter()
    config = new_thread()
    flow = h.graph(workflow(h.saver, calls, Counter()))
    paused = await flow.stream(1, config, durability=durability, stream_mode="updates")
    assert [i.value for c in paused if "__interrupt__" in c for i in c["__interrupt__"]] == [
        {"total": 6}
    ]
    assert calls == Counter({"flow": 1, "double(1)": 1, "double(2)": 1, "add": 1})

    saver = await h.reopen()
    flow = h.graph(workflow(saver, calls, Counter()))
    result = await flow.invoke(Command(resume="ok"), config, durability=durability)
    assert result == {"total": 6, "approved": "ok"}
    # The function ran again from its top; its finished tasks returned their saved results.
    assert calls == Counter({"flow": 2, "double(1)": 1, "double(2)": 1, "add": 1})

    # The next run on the thread sees what entrypoint.final saved, not what it returned.
    saver = await h.reopen()
    flow = h.graph(workflow(saver, calls, Counter()))
    await flow.invoke(2, config, durability=durability)
    result = await flow.invoke(Command(resume="again"), config, durability=durability)
    assert result == {"total": 10, "approved": "again"}
    latest = await h.get_tuple(config)
    assert latest.checkpoint["channel_values"]["__previous__"] == 16
    assert (await flow.get_state(config)).next == ()


def test_functional_interrupt_survives_restart(backend: Backend, durability: str) -> None:
    backend.run(functional_interrupt_survives_restart, durability=durability)


async def functional_task_failure_resumes(h: Harness, durability: str) -> None:
    calls: Counter = Counter()
    failures = Counter({"double(2)": 1})
    config = new_thread()
    flow = h.graph(workflow(h.saver, calls, failures))
    with pytest.raises(RuntimeError, match=r"^double\(2\) failed$"):
        await flow.invoke(1, config, durability=durability)
    assert calls == Counter({"flow": 1, "double(1)": 1, "double(2)": 1})

    saver = await h.reopen()
    flow = h.graph(workflow(saver, calls, failures))
    paused = await flow.stream(None, config, durability=durability, stream_mode="updates")
    assert [i.value for c in paused if "__interrupt__" in c for i in c["__interrupt__"]] == [
        {"total": 6}
    ]
    assert calls == Counter({"flow": 2, "double(1)": 1, "double(2)": 2, "add": 1})
    result = await flow.invoke(Command(resume="ok"), config, durability=durability)
    assert result == {"total": 6, "approved": "ok"}
    assert calls == Counter({"flow": 3, "double(1)": 1, "double(2)": 2, "add": 1})


def test_functional_task_failure_resumes(backend: Backend, durability: str) -> None:
    backend.run(functional_task_failure_resumes, durability=durability)
