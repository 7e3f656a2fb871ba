"""Cross-backend fixtures: every saver, driven through the graph API it is meant for.

A scenario is written once, as a coroutine against a ``Harness``. Sync backends run it with the
sync graph API (``invoke``, ``stream``, ``get_state``...) and no event loop; async backends run it
inside ``asyncio.run`` with the async API (``ainvoke``, ``astream``, ``aget_state``...).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# A real server and a fresh schema per test (see postgres_test_server's docstring).
from postgres_test_server import postgres_server, postgres_uri  # noqa: F401

from stepgraph._twins import drive

DURABILITIES = ("sync", "async", "exit")

Scenario = Callable[..., Coroutine[Any, Any, Any]]


@dataclass(frozen=True)
class SaverSpec:
    module: str
    cls: str
    is_async: bool
    store: str  # "memory", "sqlite" or "postgres": what the saver is opened on


SAVERS: dict[str, SaverSpec] = {
    "memory": SaverSpec("stepgraph.checkpoint.memory", "InMemorySaver", False, "memory"),
    "sqlite": SaverSpec("stepgraph.checkpoint.sqlite", "SqliteSaver", False, "sqlite"),
    "postgres": SaverSpec("stepgraph.checkpoint.postgres", "PostgresSaver", False, "postgres"),
    "memory-aio": SaverSpec("stepgraph.checkpoint.memory", "InMemorySaver", True, "memory"),
    "sqlite-aio": SaverSpec("stepgraph.checkpoint.sqlite.aio", "AsyncSqliteSaver", True, "sqlite"),
    "postgres-aio": SaverSpec(
        "stepgraph.checkpoint.postgres.aio", "AsyncPostgresSaver", True, "postgres"
    ),
}


def load_saver_class(name: str) -> type:
    """The saver class of backend ``name``; fails the test (never skips) when it is missing."""
    spec = SAVERS[name]
    try:
        return getattr(importlib.import_module(spec.module), spec.cls)
    except (ImportError, AttributeError) as exc:
        pytest.fail(
            f"backend {name!r}: cannot import {spec.module}.{spec.cls}: {exc!r}",
            pytrace=False,
        )


class Graph:
    """A compiled graph with one async-shaped method per graph API call used by the scenarios."""

    def __init__(self, compiled: Any, is_async: bool) -> None:
        self.compiled = compiled
        self.is_async = is_async

    async def invoke(self, input: Any, config: dict, **kwargs: Any) -> Any:
        if self.is_async:
            return await self.compiled.ainvoke(input, config, **kwargs)
        return self.compiled.invoke(input, config, **kwargs)

    async def stream(self, input: Any, config: dict, **kwargs: Any) -> list[Any]:
        if self.is_async:
            return [chunk async for chunk in self.compiled.astream(input, config, **kwargs)]
        return list(self.compiled.stream(input, config, **kwargs))

    async def get_state(self, config: dict) -> Any:
        if self.is_async:
            return await self.compiled.aget_state(config)
        return self.compiled.get_state(config)

    async def history(self, config: dict) -> list[Any]:
        """Snapshots newest first, as ``get_state_history`` yields them."""
        if self.is_async:
            return [s async for s in self.compiled.aget_state_history(config)]
        return list(self.compiled.get_state_history(config))

    async def update_state(self, config: dict, values: Any, as_node: str | None = None) -> dict:
        if self.is_async:
            return await self.compiled.aupdate_state(config, values, as_node=as_node)
        return self.compiled.update_state(config, values, as_node=as_node)


class Harness:
    """What a scenario sees: a saver, a way to compile graphs on it, and the store's contents."""

    def __init__(self, backend: Backend, stack: Any) -> None:
        self.backend = backend
        self.is_async = backend.is_async
        self._stack = stack  # an ExitStack (sync) or AsyncExitStack (async) owning the savers
        self.saver: Any = None

    async def open(self) -> Any:
        if self.is_async:
            self.saver = await self._stack.enter_async_context(self.backend.open_saver())
        else:
            self.saver = self._stack.enter_context(self.backend.open_saver())
        return self.saver

    async def reopen(self) -> Any:
        """A fresh saver on the same store, as a new process would open (for memory, the same
        saver: its store is the object). Graphs must be compiled again on it."""
        if self.backend.name.startswith("memory"):
            return self.saver
        return await self.open()

    def compile(self, builder: Any, **kwargs: Any) -> Graph:
        return Graph(builder.compile(checkpointer=self.saver, **kwargs), self.is_async)

    def graph(self, compiled: Any) -> Graph:
        """A graph built elsewhere (an ``@entrypoint``), already bound to this saver."""
        return Graph(compiled, self.is_async)

    async def get_tuple(self, config: dict) -> Any:
        """The stored checkpoint tuple, read from the saver (not from the graph)."""
        if self.is_async:
            return await self.saver.aget_tuple(config)
        return self.saver.get_tuple(config)

    async def list(self, config: dict) -> list[Any]:
        if self.is_async:
            return [t async for t in self.saver.alist(config)]
        return list(self.saver.list(config))


@dataclass
class Backend:
    """One saver implementation, opened on a store of this test's own."""

    name: str
    is_async: bool
    open_saver: Callable[[], Any]  # a context manager (sync) or async context manager

    def run(self, scenario: Scenario, **kwargs: Any) -> Any:
        if self.is_async:

            async def main() -> Any:
                async with contextlib.AsyncExitStack() as stack:
                    harness = Harness(self, stack)
                    await harness.open()
                    return await scenario(harness, **kwargs)

            return asyncio.run(main())
        with contextlib.ExitStack() as stack:
            harness = Harness(self, stack)
            drive(harness.open())
            return drive(scenario(harness, **kwargs))


def _make_backend(name: str, request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    spec = SAVERS[name]
    saver_class = load_saver_class(name)
    if spec.store == "memory":
        if spec.is_async:

            @contextlib.asynccontextmanager
            async def open_memory_async() -> AsyncIterator[Any]:
                yield saver_class()

            return Backend(name, True, open_memory_async)

        @contextlib.contextmanager
        def open_memory() -> Iterator[Any]:
            yield saver_class()

        return Backend(name, False, open_memory)
    if spec.store == "sqlite":
        target: Any = tmp_path / "checkpoints.sqlite"
    else:
        target = request.getfixturevalue("postgres_uri")
    return Backend(name, spec.is_async, lambda: saver_class.from_conn_string(target))


@pytest.fixture(params=list(SAVERS))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """Every saver: sync savers run the sync graph API, async ones the async API."""
    return _make_backend(request.param, request, tmp_path)


@pytest.fixture(params=DURABILITIES)
def durability(request: pytest.FixtureRequest) -> str:
    return request.param
