"""Sync nodes under the async API run on the event loop's executor threads, as in LangGraph."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid
from typing import Any, TypedDict

from stepgraph.checkpoint.memory import InMemorySaver
from stepgraph.func import entrypoint, task
from stepgraph.graph import START, StateGraph


class State(TypedDict):
    x: int


def test_many_runs_whose_sync_nodes_run_graphs_of_their_own_do_not_starve() -> None:
    """Each outer node starts an event loop of its own for an inner graph: with the process's
    shared pool the outer nodes took every thread the inner ones needed."""
    inner_builder = StateGraph(State)
    inner_builder.add_node("inner", lambda state: {"x": state["x"] + 1})
    inner_builder.add_edge(START, "inner")
    inner = inner_builder.compile()

    def outer_node(state: State) -> dict[str, Any]:
        result: dict[str, Any] = asyncio.run(inner.ainvoke(state))
        return result

    builder = StateGraph(State)
    builder.add_node("outer", outer_node)
    builder.add_edge(START, "outer")
    outer = builder.compile()

    async def run() -> list[Any]:
        runs = [outer.ainvoke({"x": i}) for i in range(40)]
        return await asyncio.wait_for(asyncio.gather(*runs), 60)

    assert asyncio.run(run()) == [{"x": i + 1} for i in range(40)]


def test_a_cancelled_runs_sync_node_makes_no_more_task_calls() -> None:
    """The node keeps running on its thread after ainvoke is cancelled; a @task it calls then
    does not run (its side effect would happen twice: the resumed run makes it again)."""
    made: list[int] = []
    release = threading.Event()

    @task
    def charge(x: int) -> int:
        made.append(x)
        return x

    @entrypoint(checkpointer=InMemorySaver())
    def workflow(x: int) -> int:
        release.wait(10)
        return charge(x).result()

    config = {"configurable": {"thread_id": str(uuid.uuid4())}}

    async def run() -> int:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(workflow.ainvoke(1, config), 0.1)
        release.set()
        result: int = await workflow.ainvoke(None, config)
        await asyncio.sleep(0.2)  # the cancelled node's thread has ended by now
        return result

    assert asyncio.run(run()) == 1
    assert made == [1]
