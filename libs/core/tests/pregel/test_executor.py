"""A finished task's writes are saved the moment it finishes, while its siblings still run.

The waiting node of a two-task step blocks until its sibling's writes are in the store (a guard
deadline keeps a regression from hanging), so it observes the save from inside the step: the
executor must report the sibling from the thread or asyncio task that ran it, not once the
caller's own task returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import operator
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Annotated, Any, TypedDict

import pytest

from stepgraph.checkpoint.memory import InMemorySaver
from stepgraph.checkpoint.sqlite import SqliteSaver
from stepgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
from stepgraph.graph import END, START, StateGraph

GUARD_SECONDS = 10.0


class State(TypedDict):
    log: Annotated[list[str], operator.add]


def thread() -> dict[str, Any]:
    return {"configurable": {"thread_id": str(uuid.uuid4())}}


def sibling_saved(saved: Any, sibling: str) -> bool:
    writes = saved.pending_writes if saved is not None else []
    return ("log", [sibling]) in [(channel, value) for _, channel, value in writes]


def two_siblings(left: Any, right: Any) -> StateGraph:
    builder = StateGraph(State)
    builder.add_node("left", left)
    builder.add_node("right", right)
    builder.add_edge(START, "left")
    builder.add_edge(START, "right")
    builder.add_edge("left", END)
    builder.add_edge("right", END)
    return builder


@contextlib.contextmanager
def open_saver(kind: str, tmp_path: Path) -> Iterator[Any]:
    if kind == "memory":
        yield InMemorySaver()
    else:
        with SqliteSaver.from_conn_string(tmp_path / "saves.sqlite") as saver:
            yield saver


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
@pytest.mark.parametrize("durability", ["sync", "async"])
@pytest.mark.parametrize("waiting", ["left", "right"])
def test_sync_sibling_saved_while_the_other_task_runs(
    tmp_path: Path, kind: str, durability: str, waiting: str
) -> None:
    """Whichever of the two runs on the calling thread (the first in plan order) waits."""
    config = thread()
    seen: list[bool] = []
    with open_saver(kind, tmp_path) as saver:
        sibling = "right" if waiting == "left" else "left"

        def wait_for_sibling(state: State) -> dict:
            deadline = time.monotonic() + GUARD_SECONDS
            while not sibling_saved(saver.get_tuple(config), sibling):
                if time.monotonic() > deadline:
                    seen.append(False)
                    return {"log": [waiting]}
                time.sleep(0.005)
            seen.append(True)
            return {"log": [waiting]}

        def finish(state: State) -> dict:
            return {"log": [sibling]}

        nodes = {waiting: wait_for_sibling, sibling: finish}
        graph = two_siblings(nodes["left"], nodes["right"]).compile(checkpointer=saver)
        result = graph.invoke({"log": []}, config, durability=durability)
        assert sorted(result["log"]) == ["left", "right"]
        assert seen == [True]
        assert saver.get_tuple(config).metadata["step"] == 1


@contextlib.asynccontextmanager
async def open_async_saver(kind: str, tmp_path: Path) -> AsyncIterator[Any]:
    if kind == "memory":
        yield InMemorySaver()
    else:
        async with AsyncSqliteSaver.from_conn_string(str(tmp_path / "saves.sqlite")) as saver:
            yield saver


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
@pytest.mark.parametrize("durability", ["sync", "async"])
@pytest.mark.parametrize("waiting", ["left", "right"])
def test_async_sibling_saved_while_the_other_task_runs(
    tmp_path: Path, kind: str, durability: str, waiting: str
) -> None:
    async def main() -> None:
        config = thread()
        seen: list[bool] = []
        async with open_async_saver(kind, tmp_path) as saver:
            sibling = "right" if waiting == "left" else "left"

            async def wait_for_sibling(state: State) -> dict:
                deadline = time.monotonic() + GUARD_SECONDS
                while not sibling_saved(await saver.aget_tuple(config), sibling):
                    if time.monotonic() > deadline:
                        seen.append(False)
                        return {"log": [waiting]}
                    await asyncio.sleep(0.005)
                seen.append(True)
                return {"log": [waiting]}

            async def finish(state: State) -> dict:
                return {"log": [sibling]}

            nodes = {waiting: wait_for_sibling, sibling: finish}
            graph = two_siblings(nodes["left"], nodes["right"]).compile(checkpointer=saver)
            result = await graph.ainvoke({"log": []}, config, durability=durability)
            assert sorted(result["log"]) == ["left", "right"]
            assert seen == [True]
            assert (await saver.aget_tuple(config)).metadata["step"] == 1

    asyncio.run(main())


def test_every_task_finishes_before_an_error_is_raised() -> None:
    """A failure on a pool thread does not cut the step short: the caller's own task finishes
    and is saved, and the first error in plan order is raised."""
    saver = InMemorySaver()
    config = thread()

    def slow(state: State) -> dict:
        time.sleep(0.05)
        return {"log": ["left"]}

    def fails(state: State) -> dict:
        raise ValueError("right failed")

    graph = two_siblings(slow, fails).compile(checkpointer=saver)
    with pytest.raises(ValueError, match="right failed"):
        graph.invoke({"log": []}, config, durability="sync")
    writes = saver.get_tuple(config).pending_writes
    assert sorted(channel for _, channel, _ in writes) == ["__error__", "log"]


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_async_entrypoint_saves_a_sync_task_result_before_the_next_task(
    tmp_path: Path, kind: str
) -> None:
    """A sync ``@task`` called from an async entrypoint finishes on a pool thread; its result is
    saved then, not when the entrypoint's step ends."""
    from stepgraph.func import entrypoint, task

    async def main() -> None:
        config = thread()
        seen: list[bool] = []
        async with open_async_saver(kind, tmp_path) as saver:
            loop = asyncio.get_running_loop()

            @task
            def first(x: int) -> int:
                return x + 1

            @task
            def second(x: int) -> int:
                # On a pool thread: read the store through the event loop.
                deadline = time.monotonic() + GUARD_SECONDS
                while time.monotonic() < deadline:
                    saved = asyncio.run_coroutine_threadsafe(saver.aget_tuple(config), loop)
                    writes = saved.result().pending_writes
                    if ("__return__", x) in [(c, v) for _, c, v in writes]:
                        seen.append(True)
                        return x * 10
                    time.sleep(0.005)
                seen.append(False)
                return x * 10

            @entrypoint(checkpointer=saver)
            async def flow(x: int) -> int:
                return await second(await first(x))

            assert await flow.ainvoke(1, config, durability="sync") == 20
            assert seen == [True]

    asyncio.run(main())
