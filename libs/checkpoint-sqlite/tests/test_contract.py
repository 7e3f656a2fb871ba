"""The shared saver contract, over a SQLite file on disk and over ``:memory:``."""

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from stepgraph.checkpoint.sqlite import SqliteSaver
from stepgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
from stepgraph.checkpoint.testing import AsyncSaverContract, SaverContract


class TestSqliteSaver(SaverContract):
    @pytest.fixture
    def saver(self, tmp_path: Path) -> Iterator[SqliteSaver]:
        with SqliteSaver.from_conn_string(tmp_path / "checkpoints.sqlite") as saver:
            yield saver


class TestSqliteSaverAsyncApi(AsyncSaverContract):
    """SqliteSaver's async methods (the sync ones in a worker thread)."""

    @pytest.fixture
    def saver(self, tmp_path: Path) -> Iterator[SqliteSaver]:
        with SqliteSaver.from_conn_string(tmp_path / "checkpoints.sqlite") as saver:
            yield saver


class TestSqliteSaverInMemory(SaverContract):
    @pytest.fixture
    def saver(self) -> Iterator[SqliteSaver]:
        with SqliteSaver.from_conn_string(":memory:") as saver:
            yield saver


class TestAsyncSqliteSaver(AsyncSaverContract):
    @pytest.fixture
    async def saver(self, tmp_path: Path) -> AsyncIterator[AsyncSqliteSaver]:
        async with AsyncSqliteSaver.from_conn_string(tmp_path / "checkpoints.sqlite") as saver:
            yield saver


class TestAsyncSqliteSaverInMemory(AsyncSaverContract):
    @pytest.fixture
    async def saver(self) -> AsyncIterator[AsyncSqliteSaver]:
        async with AsyncSqliteSaver.from_conn_string(":memory:") as saver:
            yield saver
