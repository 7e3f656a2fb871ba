"""``batch_as_completed`` / ``abatch_as_completed`` and ``aget_subgraphs``, as LangGraph's."""

from __future__ import annotations

import asyncio
import threading
from typing import Any, TypedDict

import pytest

from stepgraph.graph import START, StateGraph


class State(TypedDict):
    x: int


def graph(release: threading.Event | None = None) -> Any:
    def node(state: State) -> dict[str, Any]:
        if state["x"] == 2:
            raise ValueError("two")
        if state["x"] == 0 and release is not None:
            assert release.wait(10)  # finishes only once input 1 has been handed out
        return {"x": state["x"] * 10}

    builder = StateGraph(State)
    builder.add_node("node", node)
    builder.add_edge(START, "node")
    return builder.compile()


def test_batch_as_completed_hands_out_each_output_as_its_run_ends() -> None:
    release = threading.Event()
    seen = []
    for index, output in graph(release).batch_as_completed(
        [{"x": 0}, {"x": 1}, {"x": 2}], return_exceptions=True
    ):
        seen.append(index)
        if index == 1:
            release.set()
        if index == 2:
            assert isinstance(output, ValueError)
        else:
            assert output == {"x": index * 10}
    assert seen.index(1) < seen.index(0) and sorted(seen) == [0, 1, 2]
    with pytest.raises(ValueError, match="two"):
        list(graph().batch_as_completed([{"x": 1}, {"x": 2}]))


def test_abatch_as_completed_and_aget_subgraphs() -> None:
    async def run() -> list[tuple[int, Any]]:
        inner = graph()
        builder = StateGraph(State)
        builder.add_node("inner", inner)
        builder.add_edge(START, "inner")
        assert [name async for name, _ in builder.compile().aget_subgraphs()] == ["inner"]
        return [
            pair
            async for pair in inner.abatch_as_completed(
                [{"x": 0}, {"x": 1}, {"x": 2}], return_exceptions=True
            )
        ]

    results = dict(asyncio.run(run()))
    assert results[0] == {"x": 0} and results[1] == {"x": 10}
    assert isinstance(results[2], ValueError)
