"""``PostgresSaver``: checkpoints in PostgreSQL, through psycopg 3 (and psycopg-pool).

A step with ``durability="sync"`` is one statement: one round trip, one commit. The SQL, the
rows and the transaction rules are shared with ``AsyncPostgresSaver`` (``_plans``); this module
only runs them on a ``psycopg.Connection`` or a ``psycopg_pool.ConnectionPool``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

from psycopg import Connection, Cursor
from psycopg.pq import TransactionStatus
from psycopg_pool import ConnectionPool

from stepgraph.checkpoint.base import Retention
from stepgraph.checkpoint.postgres import _plans
from stepgraph.checkpoint.postgres._plans import Scope
from stepgraph.checkpoint.serde.base import SerializerProtocol
from stepgraph.checkpoint.storage.plans import Job, Plan, PlanSaver, Statement, run_steps

__all__ = ["PostgresSaver", "run_plan"]

T = TypeVar("T")

_UNFINISHED = (TransactionStatus.INTRANS, TransactionStatus.INERROR)


def run_plan(conn: Connection[Any], plan: Plan[T], scope: Scope) -> T:
    """Execute ``plan`` on ``conn`` in the transaction ``scope`` asks for (see ``_plans.begin``).

    Statements go through the saver's own binary, tuple-row cursor, whatever the connection's
    row factory.
    """
    cursor: Cursor[Any] = _plans.cursor_of(conn)
    if conn.info.transaction_status != TransactionStatus.IDLE:
        with conn.transaction():  # a savepoint in the caller's transaction
            return _steps(cursor, plan)
    autocommit = conn.autocommit
    if not autocommit:  # setting it costs psycopg a lock and a wait, even to the same value
        conn.autocommit = True
    try:
        if (first := _plans.begin(scope)) is None:
            return _steps(cursor, plan)
        with conn.pipeline():
            cursor.execute(first.sql)
            result = _steps(cursor, plan)
            cursor.execute(_plans.COMMIT.sql)
        return result
    finally:
        if conn.info.transaction_status in _UNFINISHED:  # failed or interrupted
            conn.rollback()
        if not autocommit and conn.info.transaction_status == TransactionStatus.IDLE:
            conn.autocommit = autocommit


def _steps(cursor: Cursor[Any], plan: Plan[T]) -> T:
    pending: list[tuple[Statement, Cursor[Any]]] = []  # sent ahead, with their rows' cursors

    def execute(statement: Statement) -> list[Any]:
        if pending and pending[0][0] is statement:
            ahead_cursor = pending.pop(0)[1]
            return ahead_cursor.fetchall() if statement.fetch else []
        pending.clear()
        if statement.ahead is None:
            cursor.execute(statement.sql, statement.params)
        else:  # all in one round trip
            pending[:] = _plans.sent_ahead(cursor.connection, statement)
            with cursor.connection.pipeline():
                cursor.execute(statement.sql, statement.params)
                for ahead, ahead_cursor in pending:
                    ahead_cursor.execute(ahead.sql, ahead.params)
        return cursor.fetchall() if statement.fetch else []

    return run_steps(plan, execute)


class PostgresSaver(PlanSaver[Scope]):
    """A checkpoint saver on a ``psycopg.Connection`` or a ``psycopg_pool.ConnectionPool``.

    Any connection works: autocommit or not, any row factory, inside a transaction of the
    caller's or not (then the saver's statements join it, in a savepoint, and the caller
    commits). Calls on a lone connection are serialized by a lock; with a pool they run in
    parallel, and a plan that fails because its connection broke (server restart, terminated
    backend) runs again on a fresh one. ``prepare_threshold=None`` connections (PgBouncer in
    transaction mode) work: nothing depends on session state.

    The schema is created or migrated on first use; ``setup()`` does it explicitly. The async
    methods run the sync ones in a worker thread; ``AsyncPostgresSaver`` is the native twin.
    """

    conn: Connection[Any] | ConnectionPool[Any]
    plans = _plans.PLANS

    def __init__(
        self,
        conn: Connection[Any] | ConnectionPool[Any],
        *,
        serde: SerializerProtocol | None = None,
        retention: Retention | None = None,
    ) -> None:
        super().__init__(serde=serde, retention=retention)
        self.conn = conn
        self.lock = threading.Lock()
        self.is_setup = False

    @classmethod
    @contextmanager
    def from_conn_string(
        cls,
        conn_string: str,
        *,
        pool: Mapping[str, Any] | None = None,
        prepare_threshold: int | None = 0,
        serde: SerializerProtocol | None = None,
        retention: Retention | None = None,
    ) -> Iterator[PostgresSaver]:
        """A saver on a new ``ConnectionPool`` to ``conn_string``, closed on exit.

        ``pool`` overrides ``ConnectionPool`` arguments (``min_size``, ``max_size``,
        ``max_lifetime``, ``max_idle``, ``kwargs``, ...). Statements are prepared on first use;
        pass ``prepare_threshold=None`` behind PgBouncer in transaction mode.
        """
        connections: ConnectionPool[Any] = ConnectionPool(
            **_plans.pool_options(conn_string, pool, prepare_threshold)
        )
        try:
            connections.open(wait=True, timeout=connections.timeout)
            yield cls(connections, serde=serde, retention=retention)
        finally:
            connections.close()

    def setup(self) -> None:
        """Create or migrate the schema. Idempotent, and safe to call from many processes at
        once (they serialize on an advisory lock); runs on first use anyway."""
        self._execute(_plans.setup, Scope.TRANSACTION)
        self.is_setup = True

    def _execute(self, make_plan: Callable[[], Plan[T]], scope: Scope) -> T:
        attempt = 0
        while True:
            attempt += 1
            owned = broken = False
            try:
                if isinstance(self.conn, ConnectionPool):
                    with self.conn.connection() as conn:
                        owned = conn.info.transaction_status == TransactionStatus.IDLE
                        try:
                            return run_plan(conn, make_plan(), scope)
                        finally:
                            broken = conn.broken
                with self.lock:
                    owned = self.conn.info.transaction_status == TransactionStatus.IDLE
                    return run_plan(self.conn, make_plan(), scope)
            except Exception as error:
                if not _plans.should_retry(error, attempt, owned=owned, broken=broken):
                    raise
                if broken and isinstance(self.conn, ConnectionPool):
                    self.conn.check()  # the other idle connections are likely broken too

    def _run(self, job: Job[T, Scope]) -> T:
        if not self.is_setup:
            self.setup()
        return self._execute(job.make, job.scope)
