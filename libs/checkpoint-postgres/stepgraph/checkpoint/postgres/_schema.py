"""The database schema, as an append-only list of migrations.

Never edit a released migration: add a new one. ``setup()`` applies the missing ones in order,
under a transaction-scoped advisory lock, so concurrent callers serialize and each migration runs
once (a transaction-scoped lock also works behind PgBouncer in transaction mode).

Identifiers (thread, namespace, checkpoint, task, channel, version, task path) are ``bytea``
holding the UTF-8 of the Python string, lone surrogates included ("surrogatepass"): Postgres
``text`` cannot hold NUL, and this encoding is exact and sorts bytewise like Python sorts
``str`` (by code point), so ``checkpoint_id`` ordering and ``before=`` stay index range scans
with no collation involved. Read them in psql with ``convert_from(thread_id, 'UTF8')``.

Tables carry a ``stepgraph_`` prefix: a database that also holds LangGraph's ``checkpoints``
tables (a port in progress) must not have them mistaken for ours.
"""

from __future__ import annotations

__all__ = ["CREATE_MIGRATIONS_TABLE", "MIGRATIONS", "SCHEMA_VERSION", "SETUP_LOCK"]

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        # One row per checkpoint, in ``storage.CheckpointRow`` column order. ``checkpoint`` and
        # ``metadata`` are serialized exactly; ``metadata_json`` is a JSON copy (strings that
        # JSON cannot hold are escaped) that only narrows ``list(filter=...)`` in SQL before
        # the exact check on ``metadata``.
        """
        CREATE TABLE stepgraph_checkpoints (
            thread_id bytea NOT NULL,
            checkpoint_ns bytea NOT NULL,
            checkpoint_id bytea NOT NULL,
            parent_checkpoint_id bytea,
            ts text NOT NULL,
            run_id bytea,
            checkpoint_type text NOT NULL,
            checkpoint bytea NOT NULL,
            metadata_type text NOT NULL,
            metadata bytea NOT NULL,
            metadata_json jsonb NOT NULL,
            PRIMARY KEY (thread_id, checkpoint_ns, checkpoint_id)
        )
        """,
        """
        CREATE INDEX stepgraph_checkpoints_by_run ON stepgraph_checkpoints (run_id)
        WHERE run_id IS NOT NULL
        """,
        # One row per (channel, version), in ``storage.ValueRow`` column order: a step writes
        # only the channels it changed. NULL type and value: the channel was empty. ``kind``
        # says how to read ``value`` (0: a whole value), as in the SQLite schema.
        """
        CREATE TABLE stepgraph_checkpoint_values (
            thread_id bytea NOT NULL,
            checkpoint_ns bytea NOT NULL,
            channel bytea NOT NULL,
            version bytea NOT NULL,
            type text,
            value bytea,
            kind smallint NOT NULL DEFAULT 0,
            PRIMARY KEY (thread_id, checkpoint_ns, channel, version)
        )
        """,
        # In ``storage.WriteRow`` column order.
        """
        CREATE TABLE stepgraph_checkpoint_writes (
            thread_id bytea NOT NULL,
            checkpoint_ns bytea NOT NULL,
            checkpoint_id bytea NOT NULL,
            task_id bytea NOT NULL,
            idx integer NOT NULL,
            channel bytea NOT NULL,
            type text NOT NULL,
            value bytea NOT NULL,
            task_path bytea NOT NULL,
            PRIMARY KEY (thread_id, checkpoint_ns, checkpoint_id, task_id, idx)
        )
        """,
    ),
    (
        # A value row of kind 1 (``storage.APPENDED_ITEMS``) holds the items appended to the
        # channel's value at ``base_version``. ``chain_start`` is the version of the whole value
        # its chain of base versions ends in, so reading the chain is one range of the primary
        # key (``version BETWEEN chain_start AND version``). Both are NULL for kind 0 rows.
        # Wrapped in DO: psycopg (3.3) answers an "ALTER" command status by scheduling
        # DEALLOCATE ALL, which it sends only after preparing the next statement, and then
        # fails on that statement. Postgres re-plans prepared statements after DDL by itself.
        """
        DO $$ BEGIN
            ALTER TABLE stepgraph_checkpoint_values
                ADD COLUMN base_version bytea, ADD COLUMN chain_start bytea;
        END $$
        """,
    ),
    (
        # The run registry: one row per thread a run ever leased (or that was deleted), in
        # ``storage.runs.RunRow`` column order. ``thread_id`` and ``owner`` (a run id) are
        # identifiers, so bytea like everywhere else: a write's fence check compares the row
        # with the write's own thread_id parameter. Times are unix seconds of the database's
        # clock, which every worker host shares. A deleted thread keeps its row as a tombstone
        # (status 'deleted', epoch bumped) so stale writers stay fenced out.
        """
        CREATE TABLE stepgraph_thread_runs (
            thread_id bytea PRIMARY KEY,
            epoch bigint NOT NULL,
            owner bytea,
            expires_at double precision,
            status text NOT NULL,
            attempts integer NOT NULL,
            updated_at double precision NOT NULL,
            error text,
            input_type text,
            input_blob bytea,
            head bytea
        )
        """,
        # list_incomplete: 'running' rows, oldest first (few: only runs in flight or dead).
        """
        CREATE INDEX stepgraph_thread_runs_running ON stepgraph_thread_runs (updated_at)
        WHERE status = 'running'
        """,
        # sweep(): whether a checkpoint's ``ts`` (ISO 8601 text) is before ``cutoff``. The form
        # ``put`` writes (UTC, "+00:00") is compared as text, bytewise: that orders it as time,
        # and no exception block (a subtransaction per call) is entered. Other forms are cast;
        # a naive time is UTC, and text that is no time is not old (the thread is kept, as
        # ``storage.checkpoints_to_keep`` keeps such checkpoints).
        r"""
        CREATE FUNCTION stepgraph_ts_before(ts text, cutoff timestamptz) RETURNS boolean
        LANGUAGE plpgsql STABLE PARALLEL SAFE AS $$
        BEGIN
            IF ts ~ '^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?\+00:00$' THEN
                RETURN ts COLLATE "C" < to_char(cutoff AT TIME ZONE 'UTC',
                    'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"') COLLATE "C";
            END IF;
            BEGIN
                IF ts ~ '([zZ]|[+-]\d\d(:?\d\d)?)$' THEN
                    RETURN ts::timestamptz < cutoff;
                END IF;
                RETURN (ts::timestamp AT TIME ZONE 'UTC') < cutoff;
            EXCEPTION WHEN others THEN
                RETURN false;
            END;
        END $$
        """,
    ),
    (
        # ``storage.CheckpointRow.chain_start``: NULL for a whole checkpoint blob. Otherwise the
        # row holds the changes since its parent's blob, and the rows that make up the whole
        # blob are its ancestors from ``chain_start`` on: one range of the primary key
        # (``checkpoint_id >= chain_start AND checkpoint_id < checkpoint_id``). Rows written
        # before this migration are all whole. In DO, as the migration above.
        """
        DO $$ BEGIN
            ALTER TABLE stepgraph_checkpoints ADD COLUMN chain_start bytea;
        END $$
        """,
        # ``storage.WriteRow.kind``: 0, as in every older row, is one write; 1
        # (``storage.TASK_WRITES``) holds a task's regular writes from ``idx`` on, in one row.
        # A constant default: no table rewrite.
        """
        DO $$ BEGIN
            ALTER TABLE stepgraph_checkpoint_writes ADD COLUMN kind smallint NOT NULL DEFAULT 0;
        END $$
        """,
    ),
)

SCHEMA_VERSION = len(MIGRATIONS)

CREATE_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS stepgraph_migrations (
    version integer PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""

# pg_advisory_xact_lock key taken by setup(): the bytes "stepgraf" as a signed 64-bit integer.
SETUP_LOCK = int.from_bytes(b"stepgraf", "big", signed=True)
