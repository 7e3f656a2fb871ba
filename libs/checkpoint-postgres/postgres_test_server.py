"""A real PostgreSQL server for the test suites, and a fresh schema for every test.

A pytest plugin for development checkouts (it is not part of the wheel; the editable install puts
this folder on ``sys.path``). Use it from any conftest by importing its fixtures::

    from postgres_test_server import postgres_server, postgres_uri  # noqa: F401

``postgres_uri`` is a psycopg conninfo string whose ``search_path`` is a schema created for that
test alone, inside a database created for the test session (dropped at the end; conftests that
import the fixtures share it). The server is found in this order, and the tests fail (never
skip) when none is:

1. the URI in ``STEPGRAPH_POSTGRES_URI`` (if set, it must work);
2. a server on ``127.0.0.1:5432``, user ``postgres``;
3. a ``postgres:16`` container through ``testcontainers``, when a Docker engine answers;
4. an embedded server from the ``pgserver`` package, installed from PyPI when first reached.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

__all__ = ["PostgresTestServer", "find_server", "postgres_server", "postgres_uri"]

URI_VARIABLE = "STEPGRAPH_POSTGRES_URI"
LOCAL_URI = "postgresql://postgres@127.0.0.1:5432/postgres"
# Session databases are named after the host and process, so a later session on this host can
# recognise (and drop) the ones left behind by a process that died, without touching others'.
_HOST_TAG = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
_DATABASE_PREFIX = f"stepgraph_test_{_HOST_TAG}_"


@dataclass
class PostgresTestServer:
    """A server found for this session and the database the session's tests live in."""

    admin_uri: str
    """The URI the server was found with (its maintenance database, usually)."""
    database_uri: str
    """The database of this session: every test gets a schema in it."""
    found_by: str
    _schemas: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def new_schema_uri(self) -> str:
        """Create an empty schema; return a conninfo whose ``search_path`` is that schema."""
        name = f"test_{next(self._schemas)}_{os.urandom(3).hex()}"
        with psycopg.connect(self.database_uri, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
        options = conninfo_to_dict(self.database_uri).get("options") or ""
        return make_conninfo(self.database_uri, options=f"{options} -c search_path={name}".strip())


def _connects(uri: str) -> str | None:
    """None if ``uri`` connects, else why not."""
    try:
        with psycopg.connect(uri, connect_timeout=3, autocommit=True) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        return str(exc).strip() or type(exc).__name__
    return None


@contextlib.contextmanager
def _container() -> Iterator[str]:
    import docker  # a dependency of testcontainers
    from testcontainers.postgres import PostgresContainer

    docker.from_env().ping()
    with PostgresContainer("postgres:16", driver=None) as container:
        yield container.get_connection_url()


def import_pgserver() -> Any:
    """The ``pgserver`` package (PostgreSQL binaries on PyPI), installed when first needed."""
    try:
        import pgserver
    except ImportError:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "pgserver"],
            check=True,
            capture_output=True,
        )
        import pgserver
    return pgserver


@contextlib.contextmanager
def _embedded() -> Iterator[str]:
    pgserver = import_pgserver()
    with tempfile.TemporaryDirectory(prefix="stepgraph-pg-") as data_dir:
        server = pgserver.get_server(data_dir, cleanup_mode="stop")
        try:
            yield server.get_uri()
        finally:
            server.cleanup()


@contextlib.contextmanager
def find_server() -> Iterator[tuple[str, str]]:
    """Yield ``(admin_uri, found_by)`` for the first server found; fail the tests if none is."""
    tried: list[str] = []
    uri = os.environ.get(URI_VARIABLE)
    if uri:
        problem = _connects(uri)
        if problem is None:
            yield uri, f"${URI_VARIABLE}"
            return
        pytest.fail(f"{URI_VARIABLE} is set but does not connect: {problem}", pytrace=False)

    problem = _connects(LOCAL_URI)
    if problem is None:
        yield LOCAL_URI, "127.0.0.1:5432"
        return
    tried.append(f"{LOCAL_URI}: {problem}")

    for name, start in (("testcontainers", _container), ("embedded pgserver", _embedded)):
        try:
            server = start()
            uri = server.__enter__()
        except Exception as exc:
            tried.append(f"{name}: {type(exc).__name__}: {exc}")
            continue
        try:
            yield uri, name
        finally:
            server.__exit__(None, None, None)
        return

    pytest.fail(
        "No PostgreSQL server for the Postgres tests. Tried:\n  - "
        + "\n  - ".join(tried)
        + f"\nStart one (e.g. `docker compose up -d`, then export {URI_VARIABLE} as "
        "docker-compose.yml says) or set it to any server you can create databases on.",
        pytrace=False,
    )


def _drop_orphaned_databases(admin: psycopg.Connection) -> None:
    """Drop session databases of this host whose process is gone (a killed test run)."""
    rows = admin.execute(
        "SELECT datname FROM pg_database WHERE starts_with(datname, %s)", [_DATABASE_PREFIX]
    ).fetchall()
    for (name,) in rows:
        pid = name.removeprefix(_DATABASE_PREFIX).split("_")[0]
        if not pid.isdigit() or _process_alive(int(pid)):
            continue
        with contextlib.suppress(psycopg.Error):
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _session_server() -> Iterator[PostgresTestServer]:
    """Find a server and create this session's database in it (dropped on exit)."""
    with find_server() as (admin_uri, found_by):
        name = f"{_DATABASE_PREFIX}{os.getpid()}_{os.urandom(3).hex()}"
        with psycopg.connect(admin_uri, autocommit=True) as admin:
            can_create = admin.execute(
                "SELECT rolcreatedb OR rolsuper FROM pg_roles WHERE rolname = current_user"
            ).fetchone()
            if not (can_create and can_create[0]):
                # No right to create databases: the schemas per test still isolate the tests.
                yield PostgresTestServer(admin_uri, admin_uri, found_by)
                return
            _drop_orphaned_databases(admin)
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            try:
                yield PostgresTestServer(admin_uri, make_conninfo(admin_uri, dbname=name), found_by)
            finally:
                admin.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )


# Several conftests may import the fixture (each import is a fixture of its own to pytest): they
# share one server and one database, closed when the last of them is torn down.
_shared: list[PostgresTestServer] = []
_users = 0
_stack = contextlib.ExitStack()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresTestServer]:
    """The server of this test session, with a database created for the session."""
    global _users
    if not _shared:
        _shared.append(_stack.enter_context(_session_server()))
    _users += 1
    try:
        yield _shared[0]
    finally:
        _users -= 1
        if _users == 0:
            _shared.clear()
            _stack.close()


@pytest.fixture
def postgres_uri(postgres_server: PostgresTestServer) -> str:
    """A conninfo string for an empty schema of this test's own."""
    return postgres_server.new_schema_uri()
