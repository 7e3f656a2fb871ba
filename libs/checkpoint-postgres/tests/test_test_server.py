"""The order in which the tests look for a server, and the failure when there is none."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import postgres_test_server as server
import psycopg
import pytest

DEAD = "postgresql://postgres@127.0.0.1:1/postgres"


def _unavailable() -> Iterator[str]:
    raise RuntimeError("not on this machine")


@pytest.fixture
def nothing_found(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv(server.URI_VARIABLE, raising=False)
    monkeypatch.setattr(server, "LOCAL_URI", DEAD)
    monkeypatch.setattr(server, "_container", _unavailable)
    monkeypatch.setattr(server, "_embedded", _unavailable)
    return monkeypatch


def test_no_server_fails_the_tests_and_says_what_was_tried(
    nothing_found: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(pytest.fail.Exception) as failure, server.find_server():
        pass
    message = str(failure.value)
    assert "No PostgreSQL server" in message
    assert "127.0.0.1:1" in message
    assert "testcontainers: RuntimeError: not on this machine" in message
    assert "embedded pgserver: RuntimeError" in message


def test_a_broken_uri_variable_fails_instead_of_falling_back(
    nothing_found: pytest.MonkeyPatch, postgres_server: server.PostgresTestServer
) -> None:
    nothing_found.setattr(server, "LOCAL_URI", postgres_server.admin_uri)  # would work
    nothing_found.setenv(server.URI_VARIABLE, DEAD)
    failed = pytest.raises(pytest.fail.Exception, match="is set but does not connect")
    with failed, server.find_server():
        pass


def test_each_source_is_tried_in_order(
    nothing_found: pytest.MonkeyPatch, postgres_server: server.PostgresTestServer
) -> None:
    real = postgres_server.admin_uri

    @contextmanager
    def started() -> Iterator[str]:
        yield real

    nothing_found.setattr(server, "_embedded", started)
    with server.find_server() as (uri, found_by):
        assert (uri, found_by) == (real, "embedded pgserver")

    nothing_found.setattr(server, "_container", started)
    with server.find_server() as (uri, found_by):
        assert (uri, found_by) == (real, "testcontainers")

    nothing_found.setattr(server, "LOCAL_URI", real)
    with server.find_server() as (uri, found_by):
        assert (uri, found_by) == (real, "127.0.0.1:5432")

    nothing_found.setenv(server.URI_VARIABLE, real)
    with server.find_server() as (uri, found_by):
        assert (uri, found_by) == (real, f"${server.URI_VARIABLE}")


def test_every_test_gets_an_empty_schema_of_its_own(
    postgres_server: server.PostgresTestServer, postgres_uri: str
) -> None:
    other = postgres_server.new_schema_uri()
    with psycopg.connect(postgres_uri) as mine, psycopg.connect(other) as theirs:
        mine_schema = mine.execute("SELECT current_schema()").fetchone()
        their_schema = theirs.execute("SELECT current_schema()").fetchone()
        assert mine_schema != their_schema
        assert (
            mine.execute("SELECT current_database()").fetchone()
            == theirs.execute("SELECT current_database()").fetchone()
        )
        tables = "SELECT count(*) FROM pg_tables WHERE schemaname = current_schema()"
        assert mine.execute(tables).fetchone() == (0,)
