"""``SqliteSaver``: checkpoints in a SQLite file (or ``:memory:``), through ``sqlite3``.

Several processes can share one file: the database runs in WAL mode and every write is one
``BEGIN IMMEDIATE`` transaction that waits up to ``busy_timeout`` for the write lock.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from stepgraph.checkpoint.base import Retention
from stepgraph.checkpoint.serde.base import SerializerProtocol
from stepgraph.checkpoint.sqlite import _plans
from stepgraph.checkpoint.sqlite._schema import Synchronous
from stepgraph.checkpoint.sqlite._wal import WalCheckpoints
from stepgraph.checkpoint.storage.plans import Job, Plan, PlanSaver, Statement, run_steps

__all__ = ["SqliteSaver", "Synchronous", "run_job", "run_plan", "setup_connection"]

T = TypeVar("T")


def run_plan(conn: sqlite3.Connection, plan: Plan[T]) -> T:
    """Execute ``plan`` on ``conn``; roll back what it began if anything fails.

    A plan opens and commits its own transaction. When the caller already has one open on
    ``conn``, the plan joins it instead, in a savepoint: its writes commit (or roll back) with
    the caller's transaction, a failing plan undoes only its own statements, and the caller's
    transaction stays open either way.
    """
    joined = conn.in_transaction
    opened = False

    def execute(statement: Statement) -> list[Any]:
        nonlocal opened
        if joined and statement.sql in _JOINED:
            statement = Statement(_JOINED[statement.sql])
        if statement.many:
            conn.executemany(statement.sql, statement.params)
            rows = []
        elif statement.retry_when_locked:
            rows = _retry_when_locked(conn, statement)
        else:
            rows = conn.execute(statement.sql, statement.params).fetchall()
        if statement.sql in _OPENS:
            opened = True
        elif statement.sql in _CLOSES:
            opened = False
        return rows

    try:
        return run_steps(plan, execute)
    except BaseException:
        if opened and joined:
            conn.execute(_ROLLBACK_SAVEPOINT)
            conn.execute(_JOINED[_plans.COMMIT.sql])
        elif opened and conn.in_transaction:
            conn.rollback()
        raise


# Inside the caller's transaction, a plan's BEGIN and COMMIT become a savepoint's.
_SAVEPOINT = "stepgraph_plan"
_JOINED = {
    _plans.BEGIN_READ.sql: f"SAVEPOINT {_SAVEPOINT}",
    _plans.BEGIN_WRITE.sql: f"SAVEPOINT {_SAVEPOINT}",
    _plans.COMMIT.sql: f"RELEASE {_SAVEPOINT}",
}
_OPENS = frozenset({_plans.BEGIN_READ.sql, _plans.BEGIN_WRITE.sql, _JOINED[_plans.BEGIN_READ.sql]})
_CLOSES = frozenset({_plans.COMMIT.sql, _JOINED[_plans.COMMIT.sql]})
_ROLLBACK_SAVEPOINT = f"ROLLBACK TO {_SAVEPOINT}"


def run_job(conn: sqlite3.Connection, plan: Plan[T], wal: WalCheckpoints | None) -> T:
    """``run_plan``, then the saver's WAL checkpointing (``_wal``), in ``conn``'s thread."""
    result = run_plan(conn, plan)
    if wal is not None:
        wal.after_job(conn)
    return result


def setup_connection(
    conn: sqlite3.Connection, synchronous: str, busy_timeout: float
) -> WalCheckpoints | None:
    """Set ``conn``'s pragmas, bring the schema up to date, and take over its checkpoints."""
    run_plan(conn, _plans.setup(synchronous, busy_timeout))
    return WalCheckpoints.take_over(conn, busy_timeout)


def _retry_when_locked(conn: sqlite3.Connection, statement: Statement) -> list[Any]:
    deadline = time.monotonic() + statement.retry_when_locked
    while True:
        try:
            return conn.execute(statement.sql, statement.params).fetchall()
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() >= deadline:
                raise
        time.sleep(0.005)


class SqliteSaver(PlanSaver[None]):
    """A checkpoint saver on a ``sqlite3.Connection``.

    The saver issues its own ``BEGIN``/``COMMIT`` (``isolation_level=None`` or the default;
    not Python 3.12's ``autocommit=False``). Called while the connection has a transaction of
    the caller's open, it joins that transaction in a savepoint instead: its writes commit
    with the caller's, and a failed call undoes only its own. One saver may be used from
    several threads: calls are serialized by a lock. The async methods (``aget_tuple``, ``aput``, ...) run the sync ones in
    a worker thread, which needs a connection opened with ``check_same_thread=False`` (as
    ``from_conn_string`` does); ``AsyncSqliteSaver`` is the native async saver.

    ``synchronous`` is SQLite's durability setting: ``"NORMAL"`` (default) loses no committed
    step if the process crashes, ``"FULL"`` also none on power loss, at the cost of an fsync per
    commit. ``busy_timeout`` (seconds) is how long a writer waits for another process's lock.
    """

    conn: sqlite3.Connection
    plans = _plans.PLANS

    # A commit is CPU work under the GIL plus a write to the page cache (and one fsync with
    # FULL): a background thread cannot overlap it with the run, and handing saves to one made
    # durability="async" about twice as slow as saving inline (docs/executor.md, "Durability modes").
    background_saves = False

    def __init__(
        self,
        conn: sqlite3.Connection,
        *,
        serde: SerializerProtocol | None = None,
        synchronous: Synchronous = "NORMAL",
        busy_timeout: float = 30.0,
        retention: Retention | None = None,
    ) -> None:
        super().__init__(serde=serde, retention=retention)
        self.conn = conn
        self.synchronous = synchronous
        self.busy_timeout = busy_timeout
        self.lock = threading.Lock()
        self.is_setup = False
        self.wal: WalCheckpoints | None = None

    @classmethod
    @contextmanager
    def from_conn_string(
        cls,
        conn_string: str | Path,
        *,
        serde: SerializerProtocol | None = None,
        synchronous: Synchronous = "NORMAL",
        busy_timeout: float = 30.0,
        retention: Retention | None = None,
    ) -> Iterator[SqliteSaver]:
        """A saver on a new connection to ``conn_string`` (a path or ``":memory:"``), closed
        on exit."""
        conn = sqlite3.connect(
            conn_string, check_same_thread=False, isolation_level=None, timeout=busy_timeout
        )
        try:
            yield cls(
                conn,
                serde=serde,
                synchronous=synchronous,
                busy_timeout=busy_timeout,
                retention=retention,
            )
        finally:
            conn.close()

    def setup(self) -> None:
        """Set pragmas and create or migrate the schema. Idempotent; runs on first use."""
        with self.lock:
            self._setup()

    def _setup(self) -> None:
        self.wal = setup_connection(self.conn, self.synchronous, self.busy_timeout)
        self.is_setup = True

    def _run(self, job: Job[T, None]) -> T:
        with self.lock:
            if not self.is_setup:
                self._setup()
            return run_job(self.conn, job.make(), self.wal)
