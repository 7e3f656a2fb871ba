"""A failed run's stream yields what its last step made (sync and async), then raises."""

from __future__ import annotations

import asyncio
import operator
import threading
from typing import Annotated, Any, TypedDict

import pytest

from stepgraph.config import get_stream_writer
from stepgraph.func import entrypoint, task
from stepgraph.graph import END, START, StateGraph

GUARD_SECONDS = 10.0


class State(TypedDict):
    log: Annotated[list[Any], operator.add]


def siblings(*nodes: tuple[str, Any]) -> Any:
    builder = StateGraph(State)
    for name, node in nodes:
        builder.add_node(name, node)
        builder.add_edge(START, name)
        builder.add_edge(name, END)
    return builder.compile()


# -- a failed run still streams what its last step made ----------------------------------------


def failing_siblings() -> Any:
    release = threading.Event()

    def bad(state: State) -> dict[str, Any]:
        get_stream_writer()("before-fail")
        release.wait(GUARD_SECONDS)  # fails only once the sibling has finished
        raise ValueError("bad")

    def ok(state: State) -> dict[str, Any]:
        release.set()
        return {"log": ["ok"]}

    return siblings(("ok", ok), ("bad", bad))


@pytest.mark.parametrize("modes", [["updates", "custom"], ["updates", "tasks"]])
def test_failed_step_chunks_come_before_the_error(modes: list[str]) -> None:
    chunks = []
    with pytest.raises(ValueError, match="bad"):
        for mode, chunk in failing_siblings().stream({"log": []}, stream_mode=modes):
            chunks.append((mode, chunk["name"] if mode == "tasks" else chunk))
    assert ("updates", {"ok": {"log": ["ok"]}}) in chunks
    if "custom" in modes:
        assert ("custom", "before-fail") in chunks
    else:
        assert chunks.count(("tasks", "bad")) == 2  # its start and its (failed) result


def test_failed_step_chunks_come_before_the_error_async() -> None:
    async def consume() -> list[Any]:
        chunks = []
        with pytest.raises(ValueError, match="bad"):
            async for chunk in failing_siblings().astream({"log": []}, stream_mode="updates"):
                chunks.append(chunk)
        return chunks

    assert asyncio.run(consume()) == [{"ok": {"log": ["ok"]}}]


def failing_workflow() -> Any:
    @task
    def add_one(x: int) -> int:
        return x + 1

    @task
    def explode(x: int) -> int:
        raise ValueError("explode failed")

    @entrypoint()
    def fails(x: int) -> int:
        return explode(add_one(x).result()).result()

    return fails


EXPECTED_FAILED_RUN = [
    ("tasks", "fails"),
    ("tasks", "add_one"),
    ("updates", {"add_one": 2}),
    ("tasks", "add_one"),
    ("tasks", "explode"),
    ("tasks", "explode"),
    ("tasks", "fails"),
]


def test_failed_entrypoint_streams_its_calls_before_the_error() -> None:
    chunks = []
    with pytest.raises(ValueError, match="explode failed"):
        for mode, chunk in failing_workflow().stream(1, stream_mode=["updates", "tasks"]):
            chunks.append((mode, chunk["name"] if mode == "tasks" else chunk))
    assert chunks == EXPECTED_FAILED_RUN


def test_failed_entrypoint_streams_its_calls_before_the_error_async() -> None:
    async def consume() -> list[Any]:
        chunks = []
        with pytest.raises(ValueError, match="explode failed"):
            async for mode, chunk in failing_workflow().astream(
                1, stream_mode=["updates", "tasks"]
            ):
                chunks.append((mode, chunk["name"] if mode == "tasks" else chunk))
        return chunks

    assert asyncio.run(consume()) == EXPECTED_FAILED_RUN
