"""The database schema, as an append-only list of migrations.

Never edit a released migration: add a new one. Every row written by an older version stays
readable by newer ones (``tests/fixtures/schema_v1.sqlite`` to ``schema_v5.sqlite`` are
databases in the first five formats).
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "Synchronous"]

Synchronous = Literal["OFF", "NORMAL", "FULL", "EXTRA"]
SYNCHRONOUS_LEVELS: tuple[str, ...] = get_args(Synchronous)

# Tables are WITHOUT ROWID so each row lives in one b-tree ordered by its primary key: one
# b-tree insert per row, and a key range is read with no second lookup. Except, since migration
# 4, ``checkpoints`` and ``checkpoint_values``: in such an (index) b-tree a row over about a
# quarter of a page (1,002 bytes of 4 KiB) spills to an overflow page of its own, and their rows
# are often 1-4 kB (a checkpoint blob, a message list). Rowid tables keep rows that size whole
# on their leaf pages, the key in a UNIQUE index.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        # One row per checkpoint, in ``storage.CheckpointRow`` column order. ``checkpoint`` and
        # ``metadata`` are serialized exactly; ``metadata_json`` is a lossy JSON copy that only
        # narrows ``list(filter=...)`` in SQL before the exact check.
        """
        CREATE TABLE checkpoints (
            thread_id TEXT NOT NULL,
            checkpoint_ns TEXT NOT NULL,
            checkpoint_id TEXT NOT NULL,
            parent_checkpoint_id TEXT,
            ts TEXT NOT NULL,
            run_id TEXT,
            checkpoint_type TEXT NOT NULL,
            checkpoint BLOB NOT NULL,
            metadata_type TEXT NOT NULL,
            metadata BLOB NOT NULL,
            metadata_json TEXT NOT NULL,
            PRIMARY KEY (thread_id, checkpoint_ns, checkpoint_id)
        ) WITHOUT ROWID
        """,
        "CREATE INDEX checkpoints_by_run ON checkpoints (run_id) WHERE run_id IS NOT NULL",
        # One row per (channel, version), in ``storage.ValueRow`` column order: a step writes
        # only the channels it changed. NULL type and value: the channel was empty. ``kind`` says
        # how to read ``value``: 0 is a whole value; later kinds (e.g. appended deltas for list
        # reducers) arrive with later migrations (and older code refuses newer schema versions).
        """
        CREATE TABLE checkpoint_values (
            thread_id TEXT NOT NULL,
            checkpoint_ns TEXT NOT NULL,
            channel TEXT NOT NULL,
            version TEXT NOT NULL,
            type TEXT,
            value BLOB,
            kind INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (thread_id, checkpoint_ns, channel, version)
        ) WITHOUT ROWID
        """,
        # In ``storage.WriteRow`` column order.
        """
        CREATE TABLE checkpoint_writes (
            thread_id TEXT NOT NULL,
            checkpoint_ns TEXT NOT NULL,
            checkpoint_id TEXT NOT NULL,
            task_id TEXT NOT NULL,
            idx INTEGER NOT NULL,
            channel TEXT NOT NULL,
            type TEXT NOT NULL,
            value BLOB,
            task_path TEXT NOT NULL,
            PRIMARY KEY (thread_id, checkpoint_ns, checkpoint_id, task_id, idx)
        ) WITHOUT ROWID
        """,
    ),
    (
        # A value row of kind 1 (``storage.APPENDED_ITEMS``) holds the items appended to the
        # channel's value at ``base_version``. ``chain_start`` is the version of the whole value
        # its chain of base versions ends in, so reading the chain is one range of the primary
        # key (``version BETWEEN chain_start AND version``). Both are NULL for kind 0 rows.
        "ALTER TABLE checkpoint_values ADD COLUMN base_version TEXT",
        "ALTER TABLE checkpoint_values ADD COLUMN chain_start TEXT",
    ),
    (
        # The run registry: one row per thread a run ever leased, in ``storage.runs.RunRow``
        # column order (``stepgraph.checkpoint.base.runs``). Times are unix seconds. A deleted
        # thread keeps its row as a tombstone (status 'deleted') so its epoch never goes back.
        """
        CREATE TABLE thread_runs (
            thread_id TEXT PRIMARY KEY,
            epoch INTEGER NOT NULL,
            owner TEXT,
            expires_at REAL,
            status TEXT NOT NULL,
            attempts INTEGER NOT NULL,
            updated_at REAL NOT NULL,
            error TEXT,
            input_type TEXT,
            input_blob BLOB,
            head TEXT
        ) WITHOUT ROWID
        """,
        # list_incomplete: the 'running' rows whose lease ran out, a range of this index.
        "CREATE INDEX thread_runs_by_status ON thread_runs (status, expires_at)",
    ),
    (
        # ``checkpoints`` and ``checkpoint_values`` as rowid tables (see above): same columns in
        # the same order, the former primary key a UNIQUE constraint (the same key for INSERT OR
        # REPLACE / OR IGNORE and the same range reads). SQLite's rebuild: new table, copy,
        # drop, rename. setup() runs every pending migration in its one BEGIN IMMEDIATE
        # transaction, so a crash leaves the old tables and a concurrent setup() waits, then
        # finds version 4 and does nothing.
        """
        CREATE TABLE new_checkpoints (
            thread_id TEXT NOT NULL,
            checkpoint_ns TEXT NOT NULL,
            checkpoint_id TEXT NOT NULL,
            parent_checkpoint_id TEXT,
            ts TEXT NOT NULL,
            run_id TEXT,
            checkpoint_type TEXT NOT NULL,
            checkpoint BLOB NOT NULL,
            metadata_type TEXT NOT NULL,
            metadata BLOB NOT NULL,
            metadata_json TEXT NOT NULL,
            UNIQUE (thread_id, checkpoint_ns, checkpoint_id)
        )
        """,
        # In key order, so rowids follow the key and the unique index is built by appending.
        """
        INSERT INTO new_checkpoints (thread_id, checkpoint_ns, checkpoint_id,
            parent_checkpoint_id, ts, run_id, checkpoint_type, checkpoint, metadata_type,
            metadata, metadata_json)
        SELECT thread_id, checkpoint_ns, checkpoint_id, parent_checkpoint_id, ts, run_id,
            checkpoint_type, checkpoint, metadata_type, metadata, metadata_json
        FROM checkpoints
        ORDER BY thread_id, checkpoint_ns, checkpoint_id
        """,
        "DROP TABLE checkpoints",  # and its index checkpoints_by_run
        # Legacy mode renames without first checking every view and trigger: one of the
        # user's that names ``checkpoints`` would fail the check (the table is gone for now),
        # and names it again once the rename is done.
        "PRAGMA legacy_alter_table = ON",
        "ALTER TABLE new_checkpoints RENAME TO checkpoints",
        "PRAGMA legacy_alter_table = OFF",
        "CREATE INDEX checkpoints_by_run ON checkpoints (run_id) WHERE run_id IS NOT NULL",
        """
        CREATE TABLE new_checkpoint_values (
            thread_id TEXT NOT NULL,
            checkpoint_ns TEXT NOT NULL,
            channel TEXT NOT NULL,
            version TEXT NOT NULL,
            type TEXT,
            value BLOB,
            kind INTEGER NOT NULL DEFAULT 0,
            base_version TEXT,
            chain_start TEXT,
            UNIQUE (thread_id, checkpoint_ns, channel, version)
        )
        """,
        """
        INSERT INTO new_checkpoint_values (thread_id, checkpoint_ns, channel, version, type,
            value, kind, base_version, chain_start)
        SELECT thread_id, checkpoint_ns, channel, version, type, value, kind, base_version,
            chain_start
        FROM checkpoint_values
        ORDER BY thread_id, checkpoint_ns, channel, version
        """,
        "DROP TABLE checkpoint_values",
        "PRAGMA legacy_alter_table = ON",
        "ALTER TABLE new_checkpoint_values RENAME TO checkpoint_values",
        "PRAGMA legacy_alter_table = OFF",
    ),
    (
        # A checkpoint blob may hold only the changes since its parent's
        # (``storage.CheckpointRow.chain_start``); NULL, as in every older row, is a whole blob.
        "ALTER TABLE checkpoints ADD COLUMN chain_start TEXT",
        # ``storage.WriteRow.kind``: 0, as in every older row, is one write; 1
        # (``storage.TASK_WRITES``) holds a task's regular writes from ``idx`` on, in one row.
        "ALTER TABLE checkpoint_writes ADD COLUMN kind INTEGER NOT NULL DEFAULT 0",
        # Also new in this version, with no change to the tables: metadata that JSON holds
        # exactly is stored once, in metadata_json (``metadata_type`` '', ``metadata`` empty).
    ),
)

SCHEMA_VERSION = len(MIGRATIONS)

CREATE_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS checkpoint_migrations (
    version INTEGER PRIMARY KEY,
    applied_at TEXT NOT NULL
)
"""
