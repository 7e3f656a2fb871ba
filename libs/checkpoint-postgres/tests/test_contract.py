"""The shared saver contract, over every way of handing the saver its connections."""

from collections.abc import AsyncIterator, Iterator

import psycopg
import pytest
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from stepgraph.checkpoint.postgres import PostgresSaver
from stepgraph.checkpoint.postgres.aio import AsyncPostgresSaver
from stepgraph.checkpoint.testing import AsyncSaverContract, SaverContract


class TestPostgresSaver(SaverContract):
    """From ``from_conn_string``: an autocommit pool with prepared statements."""

    @pytest.fixture
    def saver(self, postgres_uri: str) -> Iterator[PostgresSaver]:
        with PostgresSaver.from_conn_string(postgres_uri) as saver:
            saver.setup()
            yield saver


class TestPostgresSaverAsyncApi(AsyncSaverContract):
    """PostgresSaver's async methods (the sync ones in a worker thread)."""

    @pytest.fixture
    def saver(self, postgres_uri: str) -> Iterator[PostgresSaver]:
        with PostgresSaver.from_conn_string(postgres_uri) as saver:
            yield saver


class TestPostgresSaverOnPlainConnection(SaverContract):
    """A lone connection as psycopg opens it by default: not autocommit (the saver manages
    its transactions), dict rows, and no prepared statements (as behind PgBouncer)."""

    @pytest.fixture
    def saver(self, postgres_uri: str) -> Iterator[PostgresSaver]:
        with psycopg.connect(postgres_uri, row_factory=dict_row, prepare_threshold=None) as conn:
            yield PostgresSaver(conn)


class TestPostgresSaverOnCallerPool(SaverContract):
    """A pool the caller made, with psycopg's defaults (not autocommit)."""

    @pytest.fixture
    def saver(self, postgres_uri: str) -> Iterator[PostgresSaver]:
        with ConnectionPool(postgres_uri, min_size=1, max_size=4) as pool:
            yield PostgresSaver(pool)


class TestAsyncPostgresSaver(AsyncSaverContract):
    @pytest.fixture
    async def saver(self, postgres_uri: str) -> AsyncIterator[AsyncPostgresSaver]:
        async with AsyncPostgresSaver.from_conn_string(postgres_uri) as saver:
            await saver.setup()
            yield saver


class TestAsyncPostgresSaverOnPlainConnection(AsyncSaverContract):
    @pytest.fixture
    async def saver(self, postgres_uri: str) -> AsyncIterator[AsyncPostgresSaver]:
        conn = await psycopg.AsyncConnection.connect(
            postgres_uri, row_factory=dict_row, prepare_threshold=None
        )
        async with conn:
            yield AsyncPostgresSaver(conn)


class TestAsyncPostgresSaverOnCallerPool(AsyncSaverContract):
    @pytest.fixture
    async def saver(self, postgres_uri: str) -> AsyncIterator[AsyncPostgresSaver]:
        async with AsyncConnectionPool(postgres_uri, min_size=1, max_size=4) as pool:
            yield AsyncPostgresSaver(pool)
