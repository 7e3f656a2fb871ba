"""Small builders shared by the Postgres tests (and the worker processes they start)."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
from postgres_test_server import import_pgserver
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.pq import Trace

from stepgraph.checkpoint.base import (
    BaseCheckpointSaver,
    ChannelVersions,
    Checkpoint,
    TaskWrites,
    empty_checkpoint,
)
from stepgraph.checkpoint.postgres import _schema
from stepgraph.config import RunnableConfig


def migrate_to(conn: psycopg.Connection[Any], version: int) -> None:
    """Set up the schema as a release of schema ``version`` left it (``conn`` autocommits)."""
    conn.execute(_schema.CREATE_MIGRATIONS_TABLE)
    for number, migration in enumerate(_schema.MIGRATIONS[:version], start=1):
        for sql in migration:
            conn.execute(sql)
        conn.execute("INSERT INTO stepgraph_migrations (version) VALUES (%s)", (number,))


def thread(thread_id: str, checkpoint_ns: str = "") -> RunnableConfig:
    return {"configurable": {"thread_id": thread_id, "checkpoint_ns": checkpoint_ns}}


def next_checkpoint(
    saver: BaseCheckpointSaver, previous: Checkpoint | None, changes: dict[str, Any]
) -> tuple[Checkpoint, ChannelVersions]:
    """The checkpoint after ``previous`` with ``changes`` applied, and the versions that changed."""
    checkpoint = empty_checkpoint()
    if previous is not None:
        checkpoint["channel_values"] = dict(previous["channel_values"])
        checkpoint["channel_versions"] = dict(previous["channel_versions"])
    new_versions = {
        channel: saver.get_next_version(checkpoint["channel_versions"].get(channel))
        for channel in changes
    }
    checkpoint["channel_values"].update(changes)
    checkpoint["channel_versions"].update(new_versions)
    return checkpoint, new_versions


def run_steps(
    saver: BaseCheckpointSaver,
    config: RunnableConfig,
    steps: int,
    after_step: Callable[[int], None] | None = None,
    **metadata: Any,
) -> RunnableConfig:
    """An input checkpoint, then ``steps`` supersteps of one task each, saved with put_step."""
    checkpoint, versions = next_checkpoint(saver, None, {"count": 0, "log": []})
    config = saver.put(config, checkpoint, {"source": "input", "step": -1, **metadata}, versions)
    for step in range(steps):
        task_id = f"task-{step}-{random.getrandbits(32):08x}"
        changes = {"count": step + 1, "log": [*checkpoint["channel_values"]["log"], step]}
        checkpoint, versions = next_checkpoint(saver, checkpoint, changes)
        config = saver.put_step(
            config,
            [TaskWrites(task_id, list(changes.items()))],
            checkpoint,
            {"source": "loop", "step": step, **metadata},
            versions,
        )
        if after_step is not None:
            after_step(step)
    return config


@contextlib.contextmanager
def traced(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> Iterator[list[str]]:
    """A list that gets the libpq protocol messages sent and received on ``conn`` in the block."""
    messages: list[str] = []
    with tempfile.TemporaryFile("w+") as trace:
        conn.pgconn.trace(trace.fileno())
        conn.pgconn.set_trace_flags(Trace.SUPPRESS_TIMESTAMPS | Trace.REGRESS_MODE)
        try:
            yield messages
        finally:
            conn.pgconn.untrace()
        trace.seek(0)
        fields = [line.split("\t") for line in trace.read().splitlines()]
    messages += [f"{f[0]}:{f[2].split(' ')[0]}" for f in fields if len(f) > 2 and f[0] in "FB"]


def protocol_messages(conn: psycopg.Connection[Any], action: Any) -> list[str]:
    """The libpq protocol messages ``action`` sends and receives on ``conn``."""
    with traced(conn) as messages:
        action()
    return messages


class RestartingProxy:
    """A TCP proxy in front of the test server that can imitate a server restart.

    ``restart(down_for)`` cuts every open connection (as a restarting server does) and turns
    new ones away for ``down_for`` seconds (as a server still starting up does).
    """

    def __init__(self, conninfo: str) -> None:
        params = conninfo_to_dict(conninfo)
        host = str(params.get("host") or "127.0.0.1")
        port = int(params.get("port") or 5432)
        if host.startswith("/"):  # a Unix socket directory (the embedded server)
            self._upstream: tuple[int, Any] = (socket.AF_UNIX, f"{host}/.s.PGSQL.{port}")
        else:
            self._upstream = (socket.AF_INET, (host, port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.conninfo = make_conninfo(conninfo, host="127.0.0.1", port=self.port)
        self._links: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._up = threading.Event()
        self._up.set()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    def restart(self, down_for: float) -> int:
        """Cut every connection, refuse new ones for a while; return how many were cut."""
        self._up.clear()
        with self._lock:
            cut = len(self._links) // 2
            for link in self._links:
                _close(link)
            self._links.clear()
        threading.Timer(down_for, self._up.set).start()
        return cut

    def close(self) -> None:
        self.restart(0)
        _close(self._listener)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            if not self._up.is_set():
                _close(client)
                continue
            upstream = socket.socket(self._upstream[0], socket.SOCK_STREAM)
            upstream.connect(self._upstream[1])
            with self._lock:
                self._links.update((client, upstream))
            for source, target in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(source, target), daemon=True).start()


def _pump(source: socket.socket, target: socket.socket) -> None:
    try:
        while data := source.recv(1 << 16):
            target.sendall(data)
    except OSError:
        pass
    finally:
        _close(source)
        _close(target)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


class PrivateServer:
    """A PostgreSQL server of one test's own (``initdb`` and ``pg_ctl`` on a temporary data
    directory, a Unix socket only), so the test may restart it for real.

    Needs the server binaries (``pg_ctl`` on PATH or in ``pg_config --bindir``); as root it
    runs them as the ``postgres`` user (the server refuses to run as root).
    """

    def __init__(self) -> None:
        bindir = _server_bindir()
        if bindir is None:
            raise FileNotFoundError("no PostgreSQL server binaries (pg_ctl, initdb) found")
        self._bindir = bindir
        self._as_user: list[str] = []
        self._dir = tempfile.TemporaryDirectory(prefix="stepgraph-pg-")
        root = self._dir.name
        if os.geteuid() == 0:
            self._as_user = ["runuser", "-u", "postgres", "--"]
            shutil.chown(root, "postgres")
        self.data = os.path.join(root, "data")
        with socket.socket() as probe:  # a free port number names the socket file
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self._run("initdb", "-D", self.data, "-A", "trust", "-U", "postgres", "--no-sync")
        self._options = f"-p {self.port} -k {root} -c listen_addresses=''"
        self.conninfo = make_conninfo(host=root, port=self.port, user="postgres", dbname="postgres")
        self.start()

    def start(self) -> None:
        log = os.path.join(self.data, "log")
        self._run("pg_ctl", "start", "-w", "-D", self.data, "-o", self._options, "-l", log)

    def stop(self) -> None:
        """An immediate shutdown: as a crash (no shutdown checkpoint; WAL replay on start)."""
        self._run("pg_ctl", "stop", "-w", "-m", "immediate", "-D", self.data)

    def close(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self._run("pg_ctl", "stop", "-w", "-m", "immediate", "-D", self.data)
        self._dir.cleanup()

    def _run(self, program: str, *args: str) -> None:
        command = [*self._as_user, os.path.join(self._bindir, program), *args]
        subprocess.run(command, check=True, capture_output=True, timeout=60)


def _server_bindir() -> str | None:
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return os.path.dirname(os.path.realpath(found))
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        bindir = subprocess.run(
            ["pg_config", "--bindir"], check=True, capture_output=True, text=True
        ).stdout.strip()
        if os.path.exists(os.path.join(bindir, "pg_ctl")):
            return bindir
    # As the test server fixture's last resort: the binaries shipped on PyPI by pgserver.
    bundled = os.path.join(os.path.dirname(import_pgserver().__file__), "pginstall", "bin")
    return bundled if os.path.exists(os.path.join(bundled, "pg_ctl")) else None
