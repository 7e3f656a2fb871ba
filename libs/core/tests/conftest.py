"""Fixtures shared by the executor's test folders."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from stepgraph.checkpoint.memory import InMemorySaver
from stepgraph.checkpoint.sqlite import SqliteSaver


@pytest.fixture(params=["memory", "sqlite"])
def reopen_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Any]]:
    """Opens the store again, as a restarted process would: a new ``SqliteSaver`` on the same
    file each call (for ``memory``, the same ``InMemorySaver``)."""
    if request.param == "memory":
        saver = InMemorySaver()
        yield lambda: saver
        return
    path = tmp_path / "store.sqlite"
    opened: list[Any] = []

    def reopen() -> Any:
        manager = SqliteSaver.from_conn_string(path)
        opened.append(manager)
        return manager.__enter__()

    yield reopen
    for manager in opened:
        manager.__exit__(None, None, None)
