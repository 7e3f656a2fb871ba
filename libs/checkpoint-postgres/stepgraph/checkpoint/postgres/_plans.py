"""SQL, parameters and row mapping shared by ``PostgresSaver`` and ``AsyncPostgresSaver``.

Every operation is written once, as a *plan* (``stepgraph.checkpoint.storage.plans``): a
generator that yields ``Statement``s and is sent back the rows of those marked ``fetch``. The sync and async savers differ only in the few lines
that execute statements. Unlike SQLite's plans, these do not open transactions themselves: what
a transaction costs depends on the connection (autocommit or not, inside the caller's
transaction or not), so each plan is run with a ``Scope`` and the driver picks the cheapest way
to honour it. Which rows to write and how rows become checkpoints is backend-neutral and lives
in ``stepgraph.checkpoint.storage``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Any, TypeVar

import psycopg
from psycopg import errors
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import tuple_row
from psycopg.types.json import Jsonb

from stepgraph.checkpoint.base import (
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
    PruneStrategy,
    TaskWrites,
    get_checkpoint_id,
    get_checkpoint_metadata,
    get_checkpoint_ns,
    get_thread_id,
)
from stepgraph.checkpoint.postgres._schema import (
    CREATE_MIGRATIONS_TABLE,
    MIGRATIONS,
    SCHEMA_VERSION,
    SETUP_LOCK,
)
from stepgraph.checkpoint.serde.base import SerializerProtocol
from stepgraph.checkpoint.storage import (
    APPENDED_ITEMS,
    CheckpointRow,
    CheckpointRows,
    CorruptCheckpointError,
    PageQuery,
    ValueKey,
    ValueRow,
    WriteRow,
    assemble_page,
    check_key,
    check_prune_strategy,
    check_schema_version,
    checkpoint_config,
    checkpoint_rows,
    deleted_values,
    id_list,
    metadata_filter_json,
    metadata_json,
    page_candidates,
    prune_doomed,
    related_keys,
    task_write_rows,
)
from stepgraph.checkpoint.storage.plans import Job, Plan, Statement
from stepgraph.config import RunnableConfig

__all__ = ["ATTEMPTS", "PLANS", "Plan", "Scope", "Statement"]

T = TypeVar("T")


class Scope(Enum):
    """What a plan needs around its statements."""

    STATEMENT = "statement"
    """Nothing: one statement (atomic by itself), or reads that tolerate separate snapshots."""
    TRANSACTION = "transaction"
    """Several statements, atomically (READ COMMITTED: each statement sees fresh commits)."""


# -- identifiers ------------------------------------------------------------------------------


def encode(text: str) -> bytes:
    """An identifier as stored: exact UTF-8, lone surrogates included (see ``_schema``)."""
    return text.encode("utf-8", "surrogatepass")


def decode(data: bytes) -> str:
    return bytes(data).decode("utf-8", "surrogatepass")


def _decode_optional(data: bytes | None) -> str | None:
    return None if data is None else decode(data)


# -- setup ------------------------------------------------------------------------------------


def setup() -> Plan[None]:
    """Bring the schema to ``SCHEMA_VERSION``; run with ``Scope.TRANSACTION``.

    An up-to-date schema is recognised without any lock or DDL (so an application role without
    CREATE rights can call it). Otherwise the lock comes first: concurrent callers wait, then
    (READ COMMITTED) see what the first one committed and find nothing left to do.
    """
    rows = yield Statement("SELECT to_regclass('stepgraph_migrations') IS NOT NULL", fetch=True)
    if rows[0][0]:
        current = yield from _schema_version()
        if current >= SCHEMA_VERSION:
            return
    yield Statement("SELECT pg_advisory_xact_lock(%b)", (SETUP_LOCK,))
    yield Statement(CREATE_MIGRATIONS_TABLE)
    current = yield from _schema_version()
    for version in range(current + 1, SCHEMA_VERSION + 1):
        for sql in MIGRATIONS[version - 1]:
            yield Statement(sql)
        yield Statement("INSERT INTO stepgraph_migrations (version) VALUES (%b)", (version,))


def _schema_version() -> Plan[int]:
    rows = yield Statement("SELECT coalesce(max(version), 0) FROM stepgraph_migrations", fetch=True)
    current: int = rows[0][0]
    check_schema_version(current, SCHEMA_VERSION, "stepgraph-checkpoint-postgres")
    return current


# -- writing ----------------------------------------------------------------------------------

# Placeholders are %b: every parameter travels in binary, chosen once rather than per call.
# Rows travel as one array per column and unnest() turns them back into rows, so a statement's
# text never depends on how many rows it writes (one prepared statement serves every step).
_UPSERT_WRITES_WHERE = """
INSERT INTO stepgraph_checkpoint_writes (thread_id, checkpoint_ns, checkpoint_id, task_id, idx,
    channel, type, value, task_path)
SELECT %(thread_id)b::bytea, %(checkpoint_ns)b::bytea, %(writes_checkpoint_id)b::bytea, *
FROM unnest(%(write_task_ids)b::bytea[], %(write_idxs)b::integer[], %(write_channels)b::bytea[],
    %(write_types)b::text[], %(write_values)b::bytea[], %(write_task_paths)b::bytea[])
WHERE {condition}
ON CONFLICT (thread_id, checkpoint_ns, checkpoint_id, task_id, idx) DO UPDATE
SET channel = excluded.channel, type = excluded.type, value = excluded.value,
    task_path = excluded.task_path
WHERE excluded.idx < 0
"""
_UPSERT_WRITES = _UPSERT_WRITES_WHERE.format(condition="TRUE")
# Regular writes are kept once per (task_id, idx); special channels (negative idx) replace the
# earlier write (the WHERE above). Versions are unique within a namespace, so an existing value
# row already holds this very value. An appended-items row inherits the chain start of its base
# (or starts the chain at it); for a whole value (NULL base_version) the lookup finds nothing
# and chain_start stays NULL. One statement is one implicit transaction in autocommit:
# a step costs one round trip and one commit.
# The parent checkpoint is locked (FOR KEY SHARE) while the step is saved, so a concurrent
# prune cannot delete it (and value rows only it names) until the step is committed. When the
# parent is already gone, nothing is written and the statement returns false: the plan then
# saves the checkpoint with every channel's value (``storage.checkpoint_rows(self_contained)``).
_PUT_STEP = f"""
WITH parent AS (
    SELECT FROM stepgraph_checkpoints
    WHERE thread_id = %(thread_id)b::bytea AND checkpoint_ns = %(checkpoint_ns)b::bytea
        AND checkpoint_id = %(parent_checkpoint_id)b::bytea
    FOR KEY SHARE
), saving AS (
    SELECT NOT %(require_parent)b::boolean OR %(parent_checkpoint_id)b::bytea IS NULL
        OR EXISTS (SELECT FROM parent) AS ok
), checkpoint AS (
    INSERT INTO stepgraph_checkpoints (thread_id, checkpoint_ns, checkpoint_id,
        parent_checkpoint_id, ts, run_id, checkpoint_type, checkpoint, metadata_type, metadata,
        metadata_json)
    SELECT %(thread_id)b::bytea, %(checkpoint_ns)b::bytea, %(checkpoint_id)b::bytea,
        %(parent_checkpoint_id)b::bytea, %(ts)b::text, %(run_id)b::bytea,
        %(checkpoint_type)b::text, %(checkpoint)b::bytea, %(metadata_type)b::text,
        %(metadata)b::bytea, %(metadata_json)b::jsonb
    FROM saving WHERE ok
    ON CONFLICT (thread_id, checkpoint_ns, checkpoint_id) DO UPDATE
    SET parent_checkpoint_id = excluded.parent_checkpoint_id, ts = excluded.ts,
        run_id = excluded.run_id, checkpoint_type = excluded.checkpoint_type,
        checkpoint = excluded.checkpoint, metadata_type = excluded.metadata_type,
        metadata = excluded.metadata, metadata_json = excluded.metadata_json
), channel_values AS (
    INSERT INTO stepgraph_checkpoint_values (thread_id, checkpoint_ns, channel, version, type,
        value, kind, base_version, chain_start)
    SELECT %(thread_id)b::bytea, %(checkpoint_ns)b::bytea, k.*, (
        SELECT coalesce(b.chain_start, b.version) FROM stepgraph_checkpoint_values AS b
        WHERE b.thread_id = %(thread_id)b::bytea AND b.checkpoint_ns = %(checkpoint_ns)b::bytea
            AND b.channel = k.channel AND b.version = k.base_version)
    FROM unnest(%(value_channels)b::bytea[], %(value_versions)b::bytea[],
        %(value_types)b::text[], %(value_values)b::bytea[], %(value_kinds)b::smallint[],
        %(value_bases)b::bytea[]) AS k (channel, version, type, value, kind, base_version)
    WHERE (SELECT ok FROM saving)
    ON CONFLICT DO NOTHING
), writes AS ({_UPSERT_WRITES_WHERE.format(condition="(SELECT ok FROM saving)")})
SELECT ok FROM saving
"""


def _writes_params(
    thread_id: str, checkpoint_ns: str, checkpoint_id: str | None, writes: Sequence[WriteRow]
) -> dict[str, Any]:
    # One INSERT ... ON CONFLICT DO UPDATE may not touch a row twice: keep the first of repeated
    # regular writes (as a second put_writes would) and the last of repeated special ones.
    unique: dict[tuple[str, int], WriteRow] = {}
    for write in writes:
        key = (write.task_id, write.idx)
        if write.replaces_existing or key not in unique:
            unique[key] = write
    rows = list(unique.values())
    return {
        "thread_id": encode(thread_id),
        "checkpoint_ns": encode(checkpoint_ns),
        "writes_checkpoint_id": None if checkpoint_id is None else encode(checkpoint_id),
        "write_task_ids": [encode(row.task_id) for row in rows],
        "write_idxs": [row.idx for row in rows],
        "write_channels": [encode(row.channel) for row in rows],
        "write_types": [row.type for row in rows],
        "write_values": [row.value for row in rows],
        "write_task_paths": [encode(row.task_path) for row in rows],
    }


def put_step(
    serde: SerializerProtocol,
    config: RunnableConfig,
    writes: Sequence[TaskWrites],
    checkpoint: Checkpoint,
    metadata: CheckpointMetadata,
    new_versions: ChannelVersions,
) -> Callable[[], Plan[RunnableConfig]]:
    """The plan of ``put_step`` (and, with no writes, ``put``), returning the config of the
    saved checkpoint. Run with ``Scope.STATEMENT``: one statement, unless the parent checkpoint
    is gone (then a second one saves a self-contained checkpoint). Everything is serialized
    here, before any connection is taken."""

    def rows(self_contained: bool) -> CheckpointRows:
        return checkpoint_rows(
            serde,
            config,
            checkpoint,
            metadata,
            new_versions,
            writes,
            deltas=True,
            inline=True,
            self_contained=self_contained,
        )

    shadow = Jsonb(metadata_json(get_checkpoint_metadata(config, metadata)))
    first = rows(False)
    statement = _put_statement(first, shadow, require_parent=True)
    row = first.checkpoint
    config_of_saved = checkpoint_config(row.thread_id, row.checkpoint_ns, row.checkpoint_id)

    def plan() -> Plan[RunnableConfig]:
        saved = yield statement
        if not saved[0][0]:  # the parent is gone: its unchanged channels' rows may be too
            yield _put_statement(rows(True), shadow, require_parent=False)
        return config_of_saved

    return plan


def _put_statement(rows: CheckpointRows, shadow: Jsonb, *, require_parent: bool) -> Statement:
    row = rows.checkpoint
    params = _writes_params(row.thread_id, row.checkpoint_ns, row.parent_checkpoint_id, rows.writes)
    params.update(
        require_parent=require_parent,
        checkpoint_id=encode(row.checkpoint_id),
        parent_checkpoint_id=_encode_optional(row.parent_checkpoint_id),
        ts=row.ts,
        run_id=_encode_optional(row.run_id),
        checkpoint_type=row.checkpoint_type,
        checkpoint=row.checkpoint,
        metadata_type=row.metadata_type,
        metadata=row.metadata,
        metadata_json=shadow,
        value_channels=[encode(value.channel) for value in rows.values],
        value_versions=[encode(value.version) for value in rows.values],
        value_types=[value.type for value in rows.values],
        value_values=[value.value for value in rows.values],
        value_kinds=[value.kind for value in rows.values],
        value_bases=[_encode_optional(value.base_version) for value in rows.values],
    )
    return Statement(_PUT_STEP, params, fetch=True)


def put_writes(
    serde: SerializerProtocol, config: RunnableConfig, tasks: Sequence[TaskWrites]
) -> Statement | None:
    """The one statement of ``put_writes`` (one task) or ``put_writes_batch`` (several),
    serialized; None if there is nothing to write."""
    rows = task_write_rows(serde, config, tasks)
    if not rows:
        return None
    params = _writes_params(
        get_thread_id(config), get_checkpoint_ns(config), get_checkpoint_id(config), rows
    )
    return Statement(_UPSERT_WRITES, params)


def execute(statement: Statement) -> Plan[None]:
    """A plan of one prepared statement; run with ``Scope.STATEMENT``."""
    yield statement


def _encode_optional(text: str | None) -> bytes | None:
    return None if text is None else encode(text)


# -- reading ----------------------------------------------------------------------------------

_CHECKPOINT_COLUMNS = (
    "thread_id, checkpoint_ns, checkpoint_id, parent_checkpoint_id, ts, run_id,"
    " checkpoint_type, checkpoint, metadata_type, metadata"
)
_SELECT_CHECKPOINTS = f"""
SELECT {_CHECKPOINT_COLUMNS} FROM stepgraph_checkpoints
WHERE {{where}}
ORDER BY checkpoint_id DESC, thread_id DESC, checkpoint_ns DESC
LIMIT %b
"""
# The value rows and pending writes of a page of checkpoints, in one statement: each key list
# arrives as arrays, and every key is one primary-key probe. A value key names a span of
# versions of its channel: the version alone for a whole value, ``chain_start`` up to it for
# appended items, so the rows that make up a value come in the same round trip, as one
# primary-key range (spans that start alike are merged). A span may hold rows of forked
# branches too: ``storage.load_tuple`` follows base versions and ignores them. The first
# column tells the two kinds of row apart; columns line up by type.
_SELECT_VALUES_AND_WRITES = """
WITH spans AS (
    SELECT v.thread_id, v.checkpoint_ns, v.channel,
        coalesce(v.chain_start, v.version) AS low,
        (array_agg(v.version ORDER BY v.version DESC))[1] AS high  -- no max() for bytea
    FROM unnest(%b::bytea[], %b::bytea[], %b::bytea[], %b::bytea[])
        AS k (thread_id, checkpoint_ns, channel, version)
    JOIN stepgraph_checkpoint_values AS v USING (thread_id, checkpoint_ns, channel, version)
    GROUP BY 1, 2, 3, 4
)
SELECT 0, v.thread_id, v.checkpoint_ns, v.channel, v.version, v.type, v.value,
    v.kind::integer, v.base_version, NULL::bytea
FROM spans AS s
JOIN stepgraph_checkpoint_values AS v ON v.thread_id = s.thread_id
    AND v.checkpoint_ns = s.checkpoint_ns AND v.channel = s.channel
    AND v.version BETWEEN s.low AND s.high
UNION ALL
SELECT 1, w.thread_id, w.checkpoint_ns, w.checkpoint_id, w.task_id, w.type, w.value, w.idx,
    w.channel, w.task_path
FROM unnest(%b::bytea[], %b::bytea[], %b::bytea[]) AS k (thread_id, checkpoint_ns, checkpoint_id)
JOIN stepgraph_checkpoint_writes AS w USING (thread_id, checkpoint_ns, checkpoint_id)
"""


def _checkpoint_row(fields: Sequence[Any]) -> CheckpointRow:
    thread_id, ns, checkpoint_id, parent_id, ts, run_id, ctype, blob, mtype, meta = fields
    return CheckpointRow(
        decode(thread_id),
        decode(ns),
        decode(checkpoint_id),
        _decode_optional(parent_id),
        ts,
        _decode_optional(run_id),
        ctype,
        bytes(blob),
        mtype,
        bytes(meta),
    )


def _load_page(
    serde: SerializerProtocol,
    where: str,
    params: Sequence[Any],
    limit: int,
    filter: dict[str, Any] | None = None,
) -> Plan[tuple[list[CheckpointRow], list[CheckpointTuple]]]:
    """Up to ``limit`` checkpoints matching ``where`` (then ``filter``), newest first: the
    rows SQL found and the tuples of those that match.

    Two round trips: the checkpoint rows, then their value rows and writes (which rows to fetch
    is only known once the checkpoints are decoded).
    """
    found = yield Statement(_SELECT_CHECKPOINTS.format(where=where), (*params, limit), fetch=True)
    rows = [_checkpoint_row(fields) for fields in found]
    candidates = page_candidates(serde, rows, filter)
    if not candidates:
        return rows, []
    value_keys, checkpoint_keys = related_keys(candidates)
    related = yield Statement(
        _SELECT_VALUES_AND_WRITES,
        (*_columns(value_keys, 4), *_columns(checkpoint_keys, 3)),
        fetch=True,
    )
    values: list[ValueRow] = []
    writes: list[WriteRow] = []
    for part, thread_id, ns, c3, c4, type_, value, number, c8, c9 in related:
        if part == 0:
            key = (decode(thread_id), decode(ns), decode(c3), decode(c4))
            data = None if value is None else bytes(value)
            values.append(ValueRow(*key, type_, data, number, _decode_optional(c8)))
        else:
            writes.append(
                WriteRow(
                    decode(thread_id),
                    decode(ns),
                    decode(c3),
                    decode(c4),
                    number,
                    decode(c8),
                    type_,
                    bytes(value),
                    decode(c9),
                )
            )
    return rows, list(assemble_page(serde, candidates, values, writes))


def _columns(keys: Iterable[Sequence[str]], width: int) -> list[list[bytes]]:
    """Keys (tuples of strings) as one array of encoded identifiers per column."""
    columns: list[list[bytes]] = [[] for _ in range(width)]
    for key in keys:
        for column, part in zip(columns, key, strict=True):
            column.append(encode(part))
    return columns


def get_tuple(serde: SerializerProtocol, config: RunnableConfig) -> Plan[CheckpointTuple | None]:
    """Run with ``Scope.STATEMENT``."""
    where = "thread_id = %b AND checkpoint_ns = %b"
    params: list[Any] = [encode(get_thread_id(config)), encode(get_checkpoint_ns(config))]
    if checkpoint_id := get_checkpoint_id(config):
        where += " AND checkpoint_id = %b"
        params.append(encode(checkpoint_id))
    _, found = yield from _load_page(serde, where, params, 1)
    return found[0] if found else None


# -- list -------------------------------------------------------------------------------------


def list_page(
    serde: SerializerProtocol, query: PageQuery
) -> Plan[tuple[list[CheckpointRow], list[CheckpointTuple]]]:
    """One page of a ``list`` (``storage.ListPager``); run with ``Scope.STATEMENT``."""
    conditions: list[str] = []
    params: list[Any] = []
    for column, value in (
        ("thread_id = %b", query.thread_id),
        ("checkpoint_ns = %b", query.checkpoint_ns),
        ("checkpoint_id = %b", query.checkpoint_id),
        ("checkpoint_id < %b", query.before_id),
    ):
        if value is not None:
            conditions.append(column)
            params.append(encode(value))
    if query.filter:
        # A parameter, never SQL text: keys and values cannot change the statement.
        conditions.append("metadata_json @> %b::jsonb")
        params.append(Jsonb(metadata_filter_json(query.filter)))
    if (after := query.after) is not None:
        if query.one_namespace:
            conditions.append("checkpoint_id < %b")
            params.append(encode(after.checkpoint_id))
        else:
            conditions.append(
                "checkpoint_id <= %b AND (checkpoint_id, thread_id, checkpoint_ns) < (%b, %b, %b)"
            )
            params.extend(
                encode(part)
                for part in (
                    after.checkpoint_id,
                    after.checkpoint_id,
                    after.thread_id,
                    after.checkpoint_ns,
                )
            )
    where = " AND ".join(conditions) or "TRUE"
    return (yield from _load_page(serde, where, params, query.size, query.filter))


# -- thread management ------------------------------------------------------------------------

_DELETE_THREADS = """
WITH checkpoints AS (
    DELETE FROM stepgraph_checkpoints WHERE thread_id = ANY(%(thread_ids)b::bytea[])
), checkpoint_values AS (
    DELETE FROM stepgraph_checkpoint_values WHERE thread_id = ANY(%(thread_ids)b::bytea[])
)
DELETE FROM stepgraph_checkpoint_writes WHERE thread_id = ANY(%(thread_ids)b::bytea[])
"""


def delete_threads(thread_ids: Iterable[str]) -> Plan[None]:
    """One statement; run with ``Scope.STATEMENT``."""
    threads = [encode(thread_id) for thread_id in id_list(thread_ids, "thread_ids")]
    yield Statement(_DELETE_THREADS, {"thread_ids": threads})


# Nothing in the stored bytes names the thread, so copying is re-keying rows in SQL. One
# statement: atomic, and all three tables read at one snapshot. Existing rows of the target
# are replaced, as SQLite's INSERT OR REPLACE does.
_COPY_THREAD = """
WITH checkpoints AS (
    INSERT INTO stepgraph_checkpoints (thread_id, checkpoint_ns, checkpoint_id,
        parent_checkpoint_id, ts, run_id, checkpoint_type, checkpoint, metadata_type, metadata,
        metadata_json)
    SELECT %(target)b::bytea, checkpoint_ns, checkpoint_id, parent_checkpoint_id, ts, run_id,
        checkpoint_type, checkpoint, metadata_type, metadata, metadata_json
    FROM stepgraph_checkpoints WHERE thread_id = %(source)b::bytea
    ON CONFLICT (thread_id, checkpoint_ns, checkpoint_id) DO UPDATE
    SET parent_checkpoint_id = excluded.parent_checkpoint_id, ts = excluded.ts,
        run_id = excluded.run_id, checkpoint_type = excluded.checkpoint_type,
        checkpoint = excluded.checkpoint, metadata_type = excluded.metadata_type,
        metadata = excluded.metadata, metadata_json = excluded.metadata_json
), checkpoint_values AS (
    INSERT INTO stepgraph_checkpoint_values (thread_id, checkpoint_ns, channel, version, type,
        value, kind, base_version, chain_start)
    SELECT %(target)b::bytea, checkpoint_ns, channel, version, type, value, kind, base_version,
        chain_start
    FROM stepgraph_checkpoint_values WHERE thread_id = %(source)b::bytea
    ON CONFLICT (thread_id, checkpoint_ns, channel, version) DO UPDATE
    SET type = excluded.type, value = excluded.value, kind = excluded.kind,
        base_version = excluded.base_version, chain_start = excluded.chain_start
)
INSERT INTO stepgraph_checkpoint_writes (thread_id, checkpoint_ns, checkpoint_id, task_id, idx,
    channel, type, value, task_path)
SELECT %(target)b::bytea, checkpoint_ns, checkpoint_id, task_id, idx, channel, type, value,
    task_path
FROM stepgraph_checkpoint_writes WHERE thread_id = %(source)b::bytea
ON CONFLICT (thread_id, checkpoint_ns, checkpoint_id, task_id, idx) DO UPDATE
SET channel = excluded.channel, type = excluded.type, value = excluded.value,
    task_path = excluded.task_path
"""


def copy_thread(source_thread_id: str, target_thread_id: str) -> Plan[None]:
    """One statement; run with ``Scope.STATEMENT``."""
    check_key("thread_id", str(target_thread_id))
    if str(source_thread_id) == str(target_thread_id):
        return
    params = {"source": encode(str(source_thread_id)), "target": encode(str(target_thread_id))}
    yield Statement(_COPY_THREAD, params)


_DELETE_CHECKPOINTS = """
WITH keys AS (
    SELECT * FROM unnest(%(thread_ids)b::bytea[], %(checkpoint_nss)b::bytea[],
        %(checkpoint_ids)b::bytea[]) AS k (thread_id, checkpoint_ns, checkpoint_id)
), checkpoints AS (
    DELETE FROM stepgraph_checkpoints AS c USING keys AS k
    WHERE (c.thread_id, c.checkpoint_ns, c.checkpoint_id)
        = (k.thread_id, k.checkpoint_ns, k.checkpoint_id)
)
DELETE FROM stepgraph_checkpoint_writes AS w USING keys AS k
WHERE (w.thread_id, w.checkpoint_ns, w.checkpoint_id)
    = (k.thread_id, k.checkpoint_ns, k.checkpoint_id)
"""
_DELETE_VALUES = """
DELETE FROM stepgraph_checkpoint_values AS v
USING unnest(%b::bytea[], %b::bytea[], %b::bytea[], %b::bytea[])
    AS k (thread_id, checkpoint_ns, channel, version)
WHERE (v.thread_id, v.checkpoint_ns, v.channel, v.version)
    = (k.thread_id, k.checkpoint_ns, k.channel, k.version)
"""
_SELECT_THREADS = f"""
SELECT {_CHECKPOINT_COLUMNS} FROM stepgraph_checkpoints WHERE thread_id = ANY(%b::bytea[])
"""


_SELECT_BASES = f"""
SELECT thread_id, checkpoint_ns, channel, version, base_version FROM stepgraph_checkpoint_values
WHERE thread_id = ANY(%b::bytea[]) AND kind = {APPENDED_ITEMS}
"""


def _delete_checkpoints(
    serde: SerializerProtocol,
    thread_ids: Sequence[str],
    doomed: Callable[[list[CheckpointRow]], set[tuple[str, str]]],
) -> Plan[None]:
    """Delete the checkpoints ``doomed`` picks of each thread's, their writes, and the value
    rows only they needed (``storage.deleted_values``).

    Run with ``Scope.TRANSACTION`` (or inside the caller's transaction). Only value rows that
    the deleted checkpoints name are candidates, so rows a concurrent ``put`` commits
    meanwhile never are. A ``put_step`` forking from a checkpoint being deleted holds its
    parent FOR KEY SHARE: if it got there first, the DELETE waits for it, and the remaining
    checkpoints, read after the DELETE, include it (at READ COMMITTED); if the DELETE got
    there first, the put waits, finds its parent gone and saves every value. If a checkpoint
    cannot be decoded, the error rolls everything back and nothing is deleted.
    """
    if not thread_ids:
        return
    threads = [encode(thread_id) for thread_id in thread_ids]
    found = yield Statement(_SELECT_THREADS, (threads,), fetch=True)
    by_thread: dict[str, list[CheckpointRow]] = {}
    for fields in found:
        row = _checkpoint_row(fields)
        by_thread.setdefault(row.thread_id, []).append(row)
    deleted: dict[str, list[CheckpointRow]] = {}
    for thread_id, rows in by_thread.items():
        chosen = doomed(rows)
        if chosen:
            deleted[thread_id] = [
                row for row in rows if (row.checkpoint_ns, row.checkpoint_id) in chosen
            ]
    if not deleted:
        return
    keys = [row[:3] for rows in deleted.values() for row in rows]
    thread_keys, nss, checkpoint_ids = _columns(keys, 3)
    yield Statement(
        _DELETE_CHECKPOINTS,
        {"thread_ids": thread_keys, "checkpoint_nss": nss, "checkpoint_ids": checkpoint_ids},
    )
    threads = [encode(thread_id) for thread_id in deleted]
    remaining = yield Statement(_SELECT_THREADS, (threads,), fetch=True)
    kept: dict[str, list[CheckpointRow]] = {}
    for fields in remaining:
        row = _checkpoint_row(fields)
        kept.setdefault(row.thread_id, []).append(row)
    appended = yield Statement(_SELECT_BASES, (threads,), fetch=True)
    bases: dict[str, dict[ValueKey, str]] = {}
    for thread_id, ns, channel, version, base in appended:
        key = (decode(ns), decode(channel), decode(version))
        bases.setdefault(decode(thread_id), {})[key] = decode(base)
    garbage = [
        (thread_id, *key)
        for thread_id, rows in deleted.items()
        for key in sorted(
            deleted_values(serde, rows, kept.get(thread_id, ()), bases.get(thread_id))
        )
    ]
    if garbage:
        yield Statement(_DELETE_VALUES, _columns(garbage, 4))


def delete_for_runs(serde: SerializerProtocol, run_ids: Iterable[str]) -> Plan[None]:
    """Run with ``Scope.TRANSACTION``."""
    runs = id_list(run_ids, "run_ids")
    if not runs:
        return
    rows = yield Statement(
        "SELECT DISTINCT thread_id FROM stepgraph_checkpoints WHERE run_id = ANY(%b::bytea[])",
        ([encode(run_id) for run_id in runs],),
        fetch=True,
    )
    wanted = set(runs)

    def doomed(rows: list[CheckpointRow]) -> set[tuple[str, str]]:
        return {(row.checkpoint_ns, row.checkpoint_id) for row in rows if row.run_id in wanted}

    yield from _delete_checkpoints(
        serde, sorted(decode(thread_id) for (thread_id,) in rows), doomed
    )


def prune_scope(strategy: PruneStrategy) -> Scope:
    return Scope.STATEMENT if strategy == "delete" else Scope.TRANSACTION


def prune(
    serde: SerializerProtocol,
    thread_ids: Sequence[str],
    strategy: PruneStrategy,
    keep_last: int | None,
    older_than: timedelta | None,
) -> Plan[None]:
    """Run with ``Scope`` ``prune_scope(strategy)``."""
    check_prune_strategy(strategy)
    if strategy == "delete":
        return (yield from delete_threads(thread_ids))
    now = datetime.now(UTC)

    def doomed(rows: list[CheckpointRow]) -> set[tuple[str, str]]:
        return prune_doomed(rows, keep_last=keep_last, older_than=older_than, now=now)

    yield from _delete_checkpoints(serde, id_list(thread_ids, "thread_ids"), doomed)


# -- running plans ----------------------------------------------------------------------------
# The drivers' decisions, made here once for both of them.

_BEGIN = {
    Scope.TRANSACTION: Statement("BEGIN"),
}
COMMIT = Statement("COMMIT")


def begin(scope: Scope) -> Statement | None:
    """The statement opening the transaction a plan needs, if any.

    The drivers run a plan on a connection with no transaction open in autocommit mode
    (switching the connection's flag for the duration, which costs no round trip): a
    one-statement plan is then its own transaction, and a transaction's BEGIN and COMMIT travel
    in the same pipeline as its statements, instead of psycopg's implicit BEGIN waiting for
    its own round trip. Inside the caller's transaction the drivers use a savepoint instead,
    and the caller's isolation level applies.
    """
    return _BEGIN.get(scope)


_CURSOR = "_stepgraph_cursor"


def cursor_of(conn: Any) -> Any:
    """The saver's cursor on ``conn`` (sync or async): binary, tuple rows, made once.

    Kept on the connection itself, so it lives and dies with it: a cursor caches how each
    parameter type is adapted, and rebuilding that for every call costs more than the plan's
    own Python work.
    """
    cursor = conn.__dict__.get(_CURSOR)
    if cursor is None or cursor.closed:
        cursor = conn.__dict__[_CURSOR] = conn.cursor(binary=True, row_factory=tuple_row)
    return cursor


ATTEMPTS = 3


def should_retry(error: BaseException, attempt: int, *, owned: bool, broken: bool) -> bool:
    """Whether a failed plan may run again (every plan is idempotent).

    Only when the plan owned its transaction (no caller's transaction was lost with it):
    after a serialization failure or deadlock; after a pool's connection broke (``broken``; the
    pool then gives a fresh one, while a lone connection's failure is the caller's to see); and
    once after a missing value row, which a concurrent prune or delete causes between a read's
    two statements.
    """
    if attempt >= ATTEMPTS or not owned:
        return False
    if isinstance(error, (errors.SerializationFailure, errors.DeadlockDetected)):
        return True
    if isinstance(error, CorruptCheckpointError):
        return attempt == 1
    return broken and isinstance(error, psycopg.OperationalError)


GENERIC_PLANS = "-c plan_cache_mode=force_generic_plan"
"""Server option of the connections ``from_conn_string`` opens when statements are prepared."""


def pool_options(
    conn_string: str, pool: Mapping[str, Any] | None, prepare_threshold: int | None
) -> dict[str, Any]:
    """Keyword arguments of the pool that ``from_conn_string`` creates (and opens itself).

    Connections are autocommit, so a step is one statement and one round trip. No ``check``
    per checkout (it would cost a round trip per call): a connection found broken is replaced
    and the plan retried. Lifetimes keep connections from outliving server-side limits.

    When statements are prepared, the connections also start with ``GENERIC_PLANS``, ahead of
    any ``options`` of their own (a later ``-c plan_cache_mode`` wins): a prepared statement
    is then planned once, not at every execution. The step statement's arrays make every
    custom plan look cheaper than the generic one, so ``auto`` re-plans it every time, and
    planning it costs more than running it. Without prepared statements (PgBouncer in
    transaction mode, ``prepare_threshold=None``) nothing is added.
    """
    options: dict[str, Any] = {
        "min_size": 1,
        "max_size": 10,
        "max_lifetime": 30 * 60.0,
        "max_idle": 5 * 60.0,
        **(pool or {}),
    }
    kwargs = options["kwargs"] = {
        "autocommit": True,
        "prepare_threshold": prepare_threshold,
        **options.get("kwargs", {}),
    }
    if kwargs["prepare_threshold"] is not None:
        own = kwargs.get("options", conninfo_to_dict(conn_string).get("options"))
        kwargs["options"] = f"{GENERIC_PLANS} {own}" if own else GENERIC_PLANS
    return {**options, "conninfo": conn_string, "open": False}


# -- the saver's operations -------------------------------------------------------------------


class PostgresPlans:
    """The savers' operations as jobs (``storage.plans.SaverPlans``), each with the ``Scope``
    its plan needs."""

    def get_tuple(
        self, serde: SerializerProtocol, config: RunnableConfig
    ) -> Job[CheckpointTuple | None, Scope]:
        return Job(functools.partial(get_tuple, serde, config), Scope.STATEMENT)

    def list_page(
        self, serde: SerializerProtocol, query: PageQuery
    ) -> Job[tuple[list[CheckpointRow], list[CheckpointTuple]], Scope]:
        return Job(functools.partial(list_page, serde, query), Scope.STATEMENT)

    def put_step(
        self,
        serde: SerializerProtocol,
        config: RunnableConfig,
        writes: Sequence[TaskWrites],
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> Job[RunnableConfig, Scope]:
        plan = put_step(serde, config, writes, checkpoint, metadata, new_versions)
        return Job(plan, Scope.STATEMENT)

    def put_writes(
        self, serde: SerializerProtocol, config: RunnableConfig, writes: Sequence[TaskWrites]
    ) -> Job[None, Scope] | None:
        statement = put_writes(serde, config, writes)
        if statement is None:
            return None
        return Job(functools.partial(execute, statement), Scope.STATEMENT)

    def delete_threads(self, thread_ids: Sequence[str]) -> Job[None, Scope]:
        return Job(functools.partial(delete_threads, thread_ids), Scope.STATEMENT)

    def copy_thread(self, source_thread_id: str, target_thread_id: str) -> Job[None, Scope]:
        plan = functools.partial(copy_thread, source_thread_id, target_thread_id)
        return Job(plan, Scope.STATEMENT)

    def delete_for_runs(
        self, serde: SerializerProtocol, run_ids: Sequence[str]
    ) -> Job[None, Scope]:
        return Job(functools.partial(delete_for_runs, serde, run_ids), Scope.TRANSACTION)

    def prune(
        self,
        serde: SerializerProtocol,
        thread_ids: Sequence[str],
        strategy: PruneStrategy,
        keep_last: int | None,
        older_than: timedelta | None,
    ) -> Job[None, Scope]:
        plan = functools.partial(prune, serde, thread_ids, strategy, keep_last, older_than)
        return Job(plan, prune_scope(strategy))


PLANS = PostgresPlans()
