"""Which functions ``@entrypoint`` accepts, and what their parameters get (as in LangGraph)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from stepgraph.checkpoint.memory import InMemorySaver
from stepgraph.config import RunnableConfig
from stepgraph.func import entrypoint
from stepgraph.runtime import Runtime
from stepgraph.types import StreamWriter


class BaseStore:
    """Stands for LangGraph's store class: stepgraph has no store, so such a parameter gets None."""


def thread() -> dict[str, Any]:
    return {"configurable": {"thread_id": str(uuid.uuid4())}}


def test_generators_are_refused() -> None:
    def numbers(x: int) -> Iterator[int]:
        yield x

    async def anumbers(x: int) -> AsyncIterator[int]:
        yield x

    for func in (numbers, anumbers):
        with pytest.raises(NotImplementedError, match="Generators are not supported"):
            entrypoint()(func)


def test_a_function_without_parameters_is_refused() -> None:
    with pytest.raises(ValueError, match="must have at least one parameter"):
        entrypoint()(lambda: 1)


def test_extra_parameters_keep_their_defaults() -> None:
    @entrypoint()
    def workflow(x: int, limit: int = 3, *, label: str = "n") -> list[Any]:
        return [x, limit, label]

    assert workflow.invoke(1) == [1, 3, "n"]


def test_an_extra_parameter_without_default_fails_when_run() -> None:
    @entrypoint()
    def workflow(x: int, y: int) -> int:  # accepted, as LangGraph does
        return x + y

    with pytest.raises(TypeError, match="missing 1 required positional argument: 'y'"):
        workflow.invoke(1)


def test_injected_parameters_positional_or_keyword_only() -> None:
    @entrypoint(checkpointer=InMemorySaver())
    def positional(  # type: ignore[no-untyped-def]
        x: int,
        config: RunnableConfig,
        writer: StreamWriter,
        store,  # unannotated: injected all the same
        previous,
    ):
        writer({"x": x})
        return {"thread": config["configurable"]["thread_id"], "store": store, "prev": previous}

    @entrypoint(checkpointer=InMemorySaver())
    def keyword(x: int, *, runtime: Runtime, store: BaseStore, previous: Any) -> Any:
        return {"prev": previous, "runtime_prev": runtime.previous, "store": store}

    config = thread()
    first = list(positional.stream(1, config, stream_mode=["custom", "values"]))
    assert first == [
        ("custom", {"x": 1}),
        ("values", {"thread": config["configurable"]["thread_id"], "store": None, "prev": None}),
    ]
    assert positional.invoke(2, config)["prev"]["thread"] == config["configurable"]["thread_id"]

    config = thread()
    assert keyword.invoke(1, config) == {"prev": None, "runtime_prev": None, "store": None}
    assert keyword.invoke(2, config) == {
        "prev": {"prev": None, "runtime_prev": None, "store": None},
        "runtime_prev": {"prev": None, "runtime_prev": None, "store": None},
        "store": None,
    }


def test_injection_follows_the_annotation() -> None:
    """Like LangGraph, a ``config``/``writer``/``store`` parameter typed as something else is
    not injected: it keeps its default (and a mistyped ``config`` warns)."""

    with pytest.warns(UserWarning, match="'config' parameter should be typed"):

        @entrypoint()
        def workflow(x: int, config: dict | None = None, writer: str = "w", store: int = 0) -> Any:
            return [x, config, writer, store]

    assert workflow.invoke(1) == [1, None, "w", 0]
