"""SQL, parameters and row mapping shared by ``PostgresSaver`` and ``AsyncPostgresSaver``.

Every operation is written once, as a *plan*: a generator that yields ``Statement``s and is sent
back the rows of those marked ``fetch``. The sync and async savers differ only in the few lines
that execute statements. Unlike SQLite's plans, these do not open transactions themselves: what
a transaction costs depends on the connection (autocommit or not, inside the caller's
transaction or not), so each plan is run with a ``Scope`` and the driver picks the cheapest way
to honour it. Which rows to write and how rows become checkpoints is backend-neutral and lives
in ``stepgraph.checkpoint.storage``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Any, NamedTuple, TypeVar

import psycopg
from psycopg import errors
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
    CheckpointRow,
    CheckpointRows,
    CorruptCheckpointError,
    ValueRow,
    WriteRow,
    checkpoint_config,
    checkpoint_rows,
    checkpoints_to_keep,
    load_checkpoint,
    load_metadata,
    load_tuple,
    metadata_matches,
    referenced_values,
    write_rows,
)
from stepgraph.config import RunnableConfig

__all__ = ["ATTEMPTS", "ListPager", "Plan", "Scope", "Statement"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Statement:
    sql: str
    params: Sequence[Any] | Mapping[str, Any] = ()
    fetch: bool = False
    """Whether the plan reads the statement's rows (the driver sends them back)."""


Plan = Generator[Statement, list[tuple[Any, ...]], T]


class Scope(Enum):
    """What a plan needs around its statements."""

    STATEMENT = "statement"
    """Nothing: one statement (atomic by itself), or reads that tolerate separate snapshots."""
    TRANSACTION = "transaction"
    """Several statements, atomically (READ COMMITTED: each statement sees fresh commits)."""
    SNAPSHOT = "snapshot"
    """Several statements, atomically, all seeing one snapshot (REPEATABLE READ), so deletions
    decided on what was read never touch rows committed meanwhile."""


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
    if current > SCHEMA_VERSION:
        raise RuntimeError(
            f"This database has checkpoint schema version {current}, newer than version "
            f"{SCHEMA_VERSION} known to this stepgraph-checkpoint-postgres: upgrade the package."
        )
    return current


# -- writing ----------------------------------------------------------------------------------

# Placeholders are %b: every parameter travels in binary, chosen once rather than per call.
# Rows travel as one array per column and unnest() turns them back into rows, so a statement's
# text never depends on how many rows it writes (one prepared statement serves every step).
_UPSERT_WRITES = """
INSERT INTO stepgraph_checkpoint_writes (thread_id, checkpoint_ns, checkpoint_id, task_id, idx,
    channel, type, value, task_path)
SELECT %(thread_id)b::bytea, %(checkpoint_ns)b::bytea, %(writes_checkpoint_id)b::bytea, *
FROM unnest(%(write_task_ids)b::bytea[], %(write_idxs)b::integer[], %(write_channels)b::bytea[],
    %(write_types)b::text[], %(write_values)b::bytea[], %(write_task_paths)b::bytea[])
ON CONFLICT (thread_id, checkpoint_ns, checkpoint_id, task_id, idx) DO UPDATE
SET channel = excluded.channel, type = excluded.type, value = excluded.value,
    task_path = excluded.task_path
WHERE excluded.idx < 0
"""
# Regular writes are kept once per (task_id, idx); special channels (negative idx) replace the
# earlier write (the WHERE above). Versions are unique within a namespace, so an existing value
# row already holds this very value. One statement is one implicit transaction in autocommit:
# a step costs one round trip and one commit.
_PUT_STEP = f"""
WITH checkpoint AS (
    INSERT INTO stepgraph_checkpoints (thread_id, checkpoint_ns, checkpoint_id,
        parent_checkpoint_id, ts, run_id, checkpoint_type, checkpoint, metadata_type, metadata,
        metadata_json)
    VALUES (%(thread_id)b::bytea, %(checkpoint_ns)b::bytea, %(checkpoint_id)b::bytea,
        %(parent_checkpoint_id)b::bytea, %(ts)b::text, %(run_id)b::bytea,
        %(checkpoint_type)b::text, %(checkpoint)b::bytea, %(metadata_type)b::text,
        %(metadata)b::bytea, %(metadata_json)b::jsonb)
    ON CONFLICT (thread_id, checkpoint_ns, checkpoint_id) DO UPDATE
    SET parent_checkpoint_id = excluded.parent_checkpoint_id, ts = excluded.ts,
        run_id = excluded.run_id, checkpoint_type = excluded.checkpoint_type,
        checkpoint = excluded.checkpoint, metadata_type = excluded.metadata_type,
        metadata = excluded.metadata, metadata_json = excluded.metadata_json
), channel_values AS (
    INSERT INTO stepgraph_checkpoint_values (thread_id, checkpoint_ns, channel, version, type,
        value)
    SELECT %(thread_id)b::bytea, %(checkpoint_ns)b::bytea, *
    FROM unnest(%(value_channels)b::bytea[], %(value_versions)b::bytea[],
        %(value_types)b::text[], %(value_values)b::bytea[])
    ON CONFLICT DO NOTHING
)
{_UPSERT_WRITES}
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
) -> tuple[Statement, RunnableConfig]:
    """The one statement of ``put_step`` (and, with no writes, ``put``), and the config of the
    saved checkpoint. Everything is serialized here, before any connection is taken."""
    rows: CheckpointRows = checkpoint_rows(
        serde, config, checkpoint, metadata, new_versions, writes
    )
    row = rows.checkpoint
    params = _writes_params(
        row.thread_id, row.checkpoint_ns, get_checkpoint_id(config), rows.writes
    )
    params.update(
        checkpoint_id=encode(row.checkpoint_id),
        parent_checkpoint_id=_encode_optional(row.parent_checkpoint_id),
        ts=row.ts,
        run_id=_encode_optional(row.run_id),
        checkpoint_type=row.checkpoint_type,
        checkpoint=row.checkpoint,
        metadata_type=row.metadata_type,
        metadata=row.metadata,
        metadata_json=Jsonb(json_safe(get_checkpoint_metadata(config, metadata))),
        value_channels=[encode(value.channel) for value in rows.values],
        value_versions=[encode(value.version) for value in rows.values],
        value_types=[value.type for value in rows.values],
        value_values=[value.value for value in rows.values],
    )
    saved = checkpoint_config(row.thread_id, row.checkpoint_ns, row.checkpoint_id)
    return Statement(_PUT_STEP, params), saved


def put_writes(
    serde: SerializerProtocol,
    config: RunnableConfig,
    writes: Sequence[tuple[str, Any]],
    task_id: str,
    task_path: str,
) -> Statement | None:
    """The one statement of ``put_writes``, serialized; None if there is nothing to write."""
    rows = write_rows(serde, config, writes, task_id, task_path)
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


# -- metadata as JSON -------------------------------------------------------------------------

# Strings JSON (or jsonb) cannot hold, and strings that start with this mark, are stored as the
# mark plus the hex of their UTF-8: distinct strings stay distinct, so equality in SQL is exact.
_MARK = "\uffff"


def _json_str(text: str) -> str:
    if "\x00" in text or text.startswith(_MARK) or not _is_utf8(text):
        return _MARK + encode(text).hex()
    return text


def _is_utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:  # a lone surrogate
        return False
    return True


def json_safe(value: Any) -> Any:
    """``value`` as JSON that ``@>`` matches like ``storage.metadata_matches`` does.

    Strings, integers, booleans, None, dicts and lists map exactly; other real numbers become
    floats, which jsonb compares by value as Python does. Anything else (and NaN, infinities)
    maps to null: equal values still meet in SQL, and the exact check on the stored metadata
    then settles the wider match.
    """
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, str):
        return _json_str(value)
    if isinstance(value, numbers.Real):
        number = float(value)
        return number if math.isfinite(number) else None
    if isinstance(value, Mapping):
        return {
            _json_str(key) if isinstance(key, str) else f"{_MARK}?{key!r}": json_safe(item)
            for key, item in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return None


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
# arrives as arrays, and every key is one primary-key probe. The first column tells the two
# kinds of row apart; columns line up by type.
_SELECT_VALUES_AND_WRITES = """
SELECT 0, v.thread_id, v.checkpoint_ns, v.channel, v.version, v.type, v.value,
    v.kind::integer, NULL::bytea, NULL::bytea
FROM unnest(%b::bytea[], %b::bytea[], %b::bytea[], %b::bytea[])
    AS k (thread_id, checkpoint_ns, channel, version)
JOIN stepgraph_checkpoint_values AS v USING (thread_id, checkpoint_ns, channel, version)
UNION ALL
SELECT 1, w.thread_id, w.checkpoint_ns, w.checkpoint_id, w.task_id, w.type, w.value, w.idx,
    w.channel, w.task_path
FROM unnest(%b::bytea[], %b::bytea[], %b::bytea[]) AS k (thread_id, checkpoint_ns, checkpoint_id)
JOIN stepgraph_checkpoint_writes AS w USING (thread_id, checkpoint_ns, checkpoint_id)
"""
_WHOLE_VALUE = 0  # stepgraph_checkpoint_values.kind


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


class _Candidate(NamedTuple):
    row: CheckpointRow
    checkpoint: Checkpoint
    metadata: CheckpointMetadata | None


def _load_page(
    serde: SerializerProtocol,
    where: str,
    params: Sequence[Any],
    limit: int,
    filter: dict[str, Any] | None = None,
) -> Plan[tuple[list[CheckpointTuple], CheckpointRow | None]]:
    """Up to ``limit`` checkpoints matching ``where`` (then ``filter``), newest first.

    Two round trips: the checkpoint rows, then their value rows and writes (which rows to fetch
    is only known once the checkpoints are decoded). Also returns the last row SQL produced,
    where the next page starts.
    """
    rows = yield Statement(_SELECT_CHECKPOINTS.format(where=where), (*params, limit), fetch=True)
    checkpoint_rows_ = [_checkpoint_row(fields) for fields in rows]
    last = checkpoint_rows_[-1] if checkpoint_rows_ else None
    candidates = []
    for row in checkpoint_rows_:
        metadata = None
        if filter:  # SQL narrowed the rows; the exact semantics are the storage module's
            metadata = load_metadata(serde, row)
            if not metadata_matches(metadata, filter):
                continue
        candidates.append(_Candidate(row, load_checkpoint(serde, row), metadata))
    if not candidates:
        return [], last

    value_keys = {
        (found.row.thread_id, found.row.checkpoint_ns, channel, version)
        for found in candidates
        for channel, version in found.checkpoint["channel_versions"].items()
    }
    checkpoint_keys = [found.row[:3] for found in candidates]
    related = yield Statement(
        _SELECT_VALUES_AND_WRITES,
        (*_columns(value_keys, 4), *_columns(checkpoint_keys, 3)),
        fetch=True,
    )

    values: dict[tuple[str, str, str, str], ValueRow] = {}
    writes: dict[tuple[str, str, str], list[WriteRow]] = {}
    for part, thread_id, ns, c3, c4, type_, value, number, c8, c9 in related:
        if part == 0:
            if number != _WHOLE_VALUE:
                continue  # not readable by this version; load_tuple reports the channel
            key = (decode(thread_id), decode(ns), decode(c3), decode(c4))
            values[key] = ValueRow(*key, type_, None if value is None else bytes(value))
        else:
            write = WriteRow(
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
            writes.setdefault(write[:3], []).append(write)
    tuples = []
    for found in candidates:
        thread_id, ns = found.row.thread_id, found.row.checkpoint_ns
        versions = found.checkpoint["channel_versions"].items()
        own_values = [
            value
            for channel, version in versions
            if (value := values.get((thread_id, ns, channel, version))) is not None
        ]
        tuples.append(
            load_tuple(
                serde,
                found.row,
                found.checkpoint,
                own_values,
                writes.get(found.row[:3], ()),
                found.metadata,
            )
        )
    return tuples, last


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
    found, _ = yield from _load_page(serde, where, params, 1)
    return found[0] if found else None


# -- list -------------------------------------------------------------------------------------

_FIRST_PAGE = 16
_LARGEST_PAGE = 1024


class ListPager:
    """The state of one ``list`` call, read page by page (keyset pagination).

    Each page is a separate plan (run with ``Scope.STATEMENT``), so no statement, transaction
    or pooled connection stays held while the caller consumes results.
    """

    def __init__(
        self,
        config: RunnableConfig | None,
        filter: dict[str, Any] | None,
        before: RunnableConfig | None,
        limit: int | None,
    ) -> None:
        conditions: list[str] = []
        params: list[Any] = []
        configurable = (config or {}).get("configurable") or {}
        if config is not None:
            conditions.append("thread_id = %b")
            params.append(encode(get_thread_id(config)))
        checkpoint_ns = configurable.get("checkpoint_ns")
        if checkpoint_ns is not None:
            conditions.append("checkpoint_ns = %b")
            params.append(encode(str(checkpoint_ns)))
        if checkpoint_id := configurable.get("checkpoint_id"):
            conditions.append("checkpoint_id = %b")
            params.append(encode(checkpoint_id))
        if before is not None and (before_id := get_checkpoint_id(before)):
            conditions.append("checkpoint_id < %b")
            params.append(encode(before_id))
        if filter:
            # A parameter, never SQL text: keys and values cannot change the statement.
            conditions.append("metadata_json @> %b::jsonb")
            params.append(Jsonb(json_safe(filter)))
        self._where = " AND ".join(conditions) or "TRUE"
        self._params = params
        self._filter = filter
        self._remaining = limit
        # With thread and namespace fixed, checkpoint_id alone orders the rows and the next
        # page is a primary-key range; otherwise ties (copied threads share checkpoint ids)
        # need the whole sort key.
        self._one_namespace = config is not None and checkpoint_ns is not None
        self._after: CheckpointRow | None = None
        self._page_size = _FIRST_PAGE
        self.done = limit is not None and limit <= 0

    def next_page(self, serde: SerializerProtocol) -> Plan[list[CheckpointTuple]]:
        """The plan reading the next page. Its state advances only when the plan completes."""
        size = self._page_size
        if self._remaining is not None:
            # Only the exact filter check rejects rows (rarely: SQL matches almost exactly), so
            # ask for what is still wanted.
            wanted = max(size, self._remaining) if self._filter else self._remaining
            size = min(wanted, _LARGEST_PAGE)
        where, params = self._where, list(self._params)
        if (after := self._after) is not None:
            if self._one_namespace:
                where += " AND checkpoint_id < %b"
                params.append(encode(after.checkpoint_id))
            else:
                where += (
                    " AND checkpoint_id <= %b"
                    " AND (checkpoint_id, thread_id, checkpoint_ns) < (%b, %b, %b)"
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
        page, last = yield from _load_page(serde, where, params, size, self._filter)
        if self._remaining is not None:
            page = page[: self._remaining]
            self._remaining -= len(page)
        self._after = last
        self.done = last is None or self._remaining == 0
        self._page_size = min(self._page_size * 2, _LARGEST_PAGE)
        return page


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
    yield Statement(_DELETE_THREADS, {"thread_ids": [encode(str(t)) for t in thread_ids]})


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
        value, kind)
    SELECT %(target)b::bytea, checkpoint_ns, channel, version, type, value, kind
    FROM stepgraph_checkpoint_values WHERE thread_id = %(source)b::bytea
    ON CONFLICT (thread_id, checkpoint_ns, channel, version) DO UPDATE
    SET type = excluded.type, value = excluded.value, kind = excluded.kind
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
# NOT EXISTS plans as an anti-join (hashed, and able to spill), however many keys are kept.
_DELETE_UNREFERENCED_VALUES = """
DELETE FROM stepgraph_checkpoint_values AS v
WHERE v.thread_id = ANY(%b::bytea[])
    AND NOT EXISTS (
        SELECT FROM unnest(%b::bytea[], %b::bytea[], %b::bytea[], %b::bytea[])
            AS k (thread_id, checkpoint_ns, channel, version)
        WHERE (k.thread_id, k.checkpoint_ns, k.channel, k.version)
            = (v.thread_id, v.checkpoint_ns, v.channel, v.version))
"""


def _delete_checkpoints(
    serde: SerializerProtocol, keys: Sequence[tuple[str, str, str]]
) -> Plan[None]:
    """Delete checkpoints, their writes, and the values no remaining checkpoint needs.

    Run with ``Scope.SNAPSHOT``: value rows that a concurrent ``put`` commits meanwhile are
    not in the snapshot, so they are never taken for garbage. If a remaining checkpoint cannot
    be decoded, the error rolls everything back and nothing is deleted.
    """
    if not keys:
        return
    thread_ids, nss, checkpoint_ids = _columns(keys, 3)
    yield Statement(
        _DELETE_CHECKPOINTS,
        {"thread_ids": thread_ids, "checkpoint_nss": nss, "checkpoint_ids": checkpoint_ids},
    )
    threads = sorted(set(thread_ids))
    remaining = yield Statement(
        f"SELECT {_CHECKPOINT_COLUMNS} FROM stepgraph_checkpoints"
        " WHERE thread_id = ANY(%b::bytea[])",
        (threads,),
        fetch=True,
    )
    by_thread: dict[str, list[CheckpointRow]] = {}
    for fields in remaining:
        row = _checkpoint_row(fields)
        by_thread.setdefault(row.thread_id, []).append(row)
    needed = [
        (thread_id, *key)
        for thread_id, rows in by_thread.items()
        for key in referenced_values(serde, rows)
    ]
    yield Statement(_DELETE_UNREFERENCED_VALUES, (threads, *_columns(needed, 4)))


def delete_for_runs(serde: SerializerProtocol, run_ids: Iterable[str]) -> Plan[None]:
    """Run with ``Scope.SNAPSHOT``."""
    encoded = [encode(str(run_id)) for run_id in run_ids]
    if not encoded:
        return
    rows = yield Statement(
        "SELECT thread_id, checkpoint_ns, checkpoint_id FROM stepgraph_checkpoints"
        " WHERE run_id = ANY(%b::bytea[])",
        (encoded,),
        fetch=True,
    )
    keys = [(decode(thread_id), decode(ns), decode(cid)) for thread_id, ns, cid in rows]
    yield from _delete_checkpoints(serde, keys)


class _PruneKey(NamedTuple):
    """What ``storage.checkpoints_to_keep`` reads of a checkpoint."""

    checkpoint_ns: str
    checkpoint_id: str
    ts: str


def prune_scope(strategy: PruneStrategy) -> Scope:
    return Scope.STATEMENT if strategy == "delete" else Scope.SNAPSHOT


def prune(
    serde: SerializerProtocol,
    thread_ids: Sequence[str],
    strategy: PruneStrategy,
    keep_last: int | None,
    older_than: timedelta | None,
) -> Plan[None]:
    """Run with ``Scope`` ``prune_scope(strategy)``."""
    if strategy == "delete":
        return (yield from delete_threads(thread_ids))
    if strategy != "keep_latest":
        raise ValueError(f"Unknown prune strategy {strategy!r}: use 'keep_latest' or 'delete'.")
    threads = list(dict.fromkeys(str(thread_id) for thread_id in thread_ids))
    if not threads:
        return
    now = datetime.now(UTC)
    rows = yield Statement(
        "SELECT thread_id, checkpoint_ns, checkpoint_id, ts FROM stepgraph_checkpoints"
        " WHERE thread_id = ANY(%b::bytea[])",
        ([encode(thread_id) for thread_id in threads],),
        fetch=True,
    )
    by_thread: dict[str, list[_PruneKey]] = {}
    for thread_id, ns, checkpoint_id, ts in rows:
        by_thread.setdefault(decode(thread_id), []).append(
            _PruneKey(decode(ns), decode(checkpoint_id), ts)
        )
    doomed: list[tuple[str, str, str]] = []
    for thread_id, candidates in by_thread.items():
        keep = checkpoints_to_keep(candidates, keep_last=keep_last, older_than=older_than, now=now)
        doomed.extend(
            (thread_id, key.checkpoint_ns, key.checkpoint_id)
            for key in candidates
            if (key.checkpoint_ns, key.checkpoint_id) not in keep
        )
    yield from _delete_checkpoints(serde, doomed)


# -- running plans ----------------------------------------------------------------------------
# The drivers' decisions, made here once for both of them.

_BEGIN = {
    Scope.TRANSACTION: Statement("BEGIN"),
    Scope.SNAPSHOT: Statement("BEGIN ISOLATION LEVEL REPEATABLE READ"),
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


def pool_options(
    conn_string: str, pool: Mapping[str, Any] | None, prepare_threshold: int | None
) -> dict[str, Any]:
    """Keyword arguments of the pool that ``from_conn_string`` creates (and opens itself).

    Connections are autocommit, so a step is one statement and one round trip. No ``check``
    per checkout (it would cost a round trip per call): a connection found broken is replaced
    and the plan retried. Lifetimes keep connections from outliving server-side limits.
    """
    options: dict[str, Any] = {
        "min_size": 1,
        "max_size": 10,
        "max_lifetime": 30 * 60.0,
        "max_idle": 5 * 60.0,
        **(pool or {}),
    }
    options["kwargs"] = {
        "autocommit": True,
        "prepare_threshold": prepare_threshold,
        **options.get("kwargs", {}),
    }
    return {**options, "conninfo": conn_string, "open": False}
