"""SQL and row handling shared by ``SqliteSaver`` and ``AsyncSqliteSaver``.

Every operation is written once, as a *plan*: a generator that yields ``Statement``s and is sent
back each statement's rows. The sync and async savers differ only in the few lines that execute
statements (``run_plan`` / ``arun_plan``). Plans open and commit their own transactions, so
whatever a plan writes is committed atomically or not at all. Which rows to write and how rows
become checkpoints is backend-neutral and lives in ``stepgraph.checkpoint.storage``.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
from collections.abc import Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple, TypeVar

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
from stepgraph.checkpoint.serde.base import SerializerProtocol
from stepgraph.checkpoint.sqlite._schema import (
    CREATE_MIGRATIONS_TABLE,
    MIGRATIONS,
    SCHEMA_VERSION,
    SYNCHRONOUS_LEVELS,
)
from stepgraph.checkpoint.storage import (
    APPENDED_ITEMS,
    CheckpointRow,
    CheckpointRows,
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
    stored_versions,
    write_rows,
)
from stepgraph.config import RunnableConfig

__all__ = ["ListPager", "Plan", "Statement"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Statement:
    sql: str
    params: Any = ()
    """Parameters of one execution, or an iterable of them when ``many`` is true."""
    many: bool = False
    retry_when_locked: float = 0.0
    """Seconds to keep retrying while the statement fails with "database is locked" for
    statements SQLite does not wait on by itself (its busy handler is skipped for them)."""


Plan = Generator[Statement, list[Any], T]

# One snapshot for a read that takes several statements (rows deleted between them by a
# concurrent prune would otherwise look like corruption).
BEGIN_READ = Statement("BEGIN")
# IMMEDIATE takes the write lock up front, waiting up to busy_timeout for it. A deferred
# transaction that later writes fails at once with "database is locked" in WAL mode.
BEGIN_WRITE = Statement("BEGIN IMMEDIATE")
COMMIT = Statement("COMMIT")


# -- setup --------------------------------------------------------------------------------------


def setup(synchronous: str, busy_timeout: float) -> Plan[None]:
    """Set the connection's pragmas and bring the schema to ``SCHEMA_VERSION``."""
    if synchronous not in SYNCHRONOUS_LEVELS:
        raise ValueError(f"synchronous must be one of {SYNCHRONOUS_LEVELS}, not {synchronous!r}")
    # PRAGMAs take no bound parameters: both values are checked above / numeric.
    yield Statement(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
    # A :memory: database stays "memory". Switching a new file to WAL takes an exclusive lock
    # without waiting for it: processes that open a new file together retry.
    yield Statement("PRAGMA journal_mode = WAL", retry_when_locked=busy_timeout)
    yield Statement(f"PRAGMA synchronous = {synchronous}")
    yield BEGIN_WRITE
    yield Statement(CREATE_MIGRATIONS_TABLE)
    rows = yield Statement("SELECT coalesce(max(version), 0) FROM checkpoint_migrations")
    current: int = rows[0][0]
    if current > SCHEMA_VERSION:
        raise RuntimeError(
            f"This database has checkpoint schema version {current}, newer than version "
            f"{SCHEMA_VERSION} known to this stepgraph-checkpoint-sqlite: upgrade the package."
        )
    for version in range(current + 1, SCHEMA_VERSION + 1):
        for sql in MIGRATIONS[version - 1]:
            yield Statement(sql)
        yield Statement(
            "INSERT INTO checkpoint_migrations (version, applied_at) VALUES (?, ?)",
            (version, datetime.now(UTC).isoformat()),
        )
    yield COMMIT


# -- writing ------------------------------------------------------------------------------------

_INSERT_CHECKPOINT = """
INSERT OR REPLACE INTO checkpoints (thread_id, checkpoint_ns, checkpoint_id,
    parent_checkpoint_id, ts, run_id, checkpoint_type, checkpoint, metadata_type, metadata,
    metadata_json)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
# Versions are unique within a namespace, so an existing row already holds this very value.
# An appended-items row inherits the chain start of its base (or starts the chain at it); for a
# whole value (NULL base_version) the lookup finds nothing and chain_start stays NULL.
_INSERT_VALUE = """
INSERT OR IGNORE INTO checkpoint_values (thread_id, checkpoint_ns, channel, version, type, value,
    kind, base_version, chain_start)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, (
    SELECT coalesce(b.chain_start, b.version) FROM checkpoint_values AS b
    WHERE b.thread_id = ?1 AND b.checkpoint_ns = ?2 AND b.channel = ?3 AND b.version = ?8))
"""
# One statement for both kinds of write: regular writes are kept once per (task_id, idx) and
# special channels (negative idx) replace the earlier write.
_UPSERT_WRITE = """
INSERT INTO checkpoint_writes (thread_id, checkpoint_ns, checkpoint_id, task_id, idx, channel,
    type, value, task_path)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (thread_id, checkpoint_ns, checkpoint_id, task_id, idx) DO UPDATE
SET channel = excluded.channel, type = excluded.type, value = excluded.value,
    task_path = excluded.task_path
WHERE excluded.idx < 0
"""


def _json_safe(value: Any) -> Any:
    """``value`` reduced to what JSON (and SQLite's JSON functions) can hold."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"$float": repr(value)}
    if isinstance(value, dict):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return {"$type": type(value).__qualname__}


def _to_json(value: Any) -> str:
    # ASCII escapes keep lone surrogates storable; SQLite decodes both sides of a comparison
    # the same way. The walk in _json_safe only runs for metadata plain JSON cannot hold.
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError):
        return json.dumps(_json_safe(value), separators=(",", ":"))


def _store(rows: CheckpointRows, metadata_json: str) -> Plan[RunnableConfig]:
    row = rows.checkpoint
    yield BEGIN_WRITE
    if rows.writes:
        yield Statement(_UPSERT_WRITE, rows.writes, many=True)
    if rows.values:
        yield Statement(_INSERT_VALUE, rows.values, many=True)
    yield Statement(_INSERT_CHECKPOINT, (*row, metadata_json))
    yield COMMIT
    return checkpoint_config(row.thread_id, row.checkpoint_ns, row.checkpoint_id)


def put_step(
    serde: SerializerProtocol,
    config: RunnableConfig,
    writes: Sequence[TaskWrites],
    checkpoint: Checkpoint,
    metadata: CheckpointMetadata,
    new_versions: ChannelVersions,
) -> Plan[RunnableConfig]:
    """``put_step`` and (with no writes) ``put``: one transaction, one commit."""
    # Everything is serialized before the write lock is taken, so other writers wait only for
    # the inserts.
    rows = checkpoint_rows(
        serde, config, checkpoint, metadata, new_versions, writes, deltas=True, inline=True
    )
    metadata_json = _to_json(get_checkpoint_metadata(config, metadata))
    return (yield from _store(rows, metadata_json))


def put_writes(
    serde: SerializerProtocol,
    config: RunnableConfig,
    writes: Sequence[tuple[str, Any]],
    task_id: str,
    task_path: str,
) -> Plan[None]:
    rows = write_rows(serde, config, writes, task_id, task_path)
    if rows:
        yield BEGIN_WRITE
        yield Statement(_UPSERT_WRITE, rows, many=True)
        yield COMMIT


# -- reading ------------------------------------------------------------------------------------

_CHECKPOINT_COLUMNS = (
    "thread_id, checkpoint_ns, checkpoint_id, parent_checkpoint_id, ts, run_id,"
    " checkpoint_type, checkpoint, metadata_type, metadata"
)
_SELECT_CHECKPOINTS = f"""
SELECT {_CHECKPOINT_COLUMNS} FROM checkpoints
WHERE {{where}}
ORDER BY checkpoint_id DESC, thread_id DESC, checkpoint_ns DESC
LIMIT ?
"""
# A thread's namespaces, one primary-key seek each (a "skip scan"), at most one more than
# _SPLIT_NAMESPACES so the caller can tell "too many".
_SELECT_NAMESPACES = """
WITH RECURSIVE ns(name) AS (
    SELECT (SELECT min(checkpoint_ns) FROM checkpoints WHERE thread_id = ?1)
    UNION ALL
    SELECT (SELECT min(checkpoint_ns) FROM checkpoints WHERE thread_id = ?1 AND checkpoint_ns > name)
    FROM ns WHERE name IS NOT NULL LIMIT ?2
)
SELECT name FROM ns WHERE name IS NOT NULL
"""
# Listing a thread across namespaces merges each namespace's newest rows (a primary-key range
# read each), instead of sorting all of the thread's rows: reading the newest page of a long
# thread costs the same as of a short one. Above this many namespaces one sort is cheaper.
_SPLIT_NAMESPACES = 16


@functools.lru_cache(maxsize=_SPLIT_NAMESPACES)
def _select_split_sql(where: str, namespaces: int) -> str:
    one = (
        f"SELECT * FROM (SELECT {_CHECKPOINT_COLUMNS} FROM checkpoints"
        f" WHERE {where} AND checkpoint_ns = ? ORDER BY checkpoint_id DESC LIMIT ?)"
    )
    return (
        f"SELECT * FROM ({' UNION ALL '.join([one] * namespaces)})"
        " ORDER BY checkpoint_id DESC, thread_id DESC, checkpoint_ns DESC LIMIT ?"
    )


# Keys per VALUES list. Lists are padded to a power of two with NULL keys (which match nothing),
# so the few distinct statements stay in sqlite3's statement cache; 4 * 512 * 2 parameters
# stay far below SQLite's limit. (JSON cannot carry the keys: SQLite cuts JSON strings at NUL.)
_KEYS_PER_STATEMENT = 512


@functools.lru_cache(maxsize=64)
def _select_related_sql(value_keys: int, checkpoint_keys: int) -> str:
    """The value rows and pending writes named by lists of keys, in one statement.

    Each key list is the outer loop of a CROSS JOIN, so every key is one primary-key seek.
    A value key names a span of versions of its channel: the version alone for a whole value,
    ``chain_start`` up to it for appended items, so the rows that make up a value come in the
    same statement, as one primary-key range (spans of several keys that start alike are
    merged). A span may hold rows of forked branches too: ``storage.load_tuple`` follows base
    versions and ignores them. The first column tells value rows (0) from write rows (1).
    """
    parts = []
    prefix = ""
    if value_keys:
        keys = ", ".join(["(?, ?, ?, ?)"] * value_keys)
        prefix = (
            f"WITH k(thread_id, checkpoint_ns, channel, version) AS (VALUES {keys}),"
            " s AS (SELECT v.thread_id AS t, v.checkpoint_ns AS n, v.channel AS c,"
            " coalesce(v.chain_start, v.version) AS lo, max(v.version) AS hi"
            " FROM k CROSS JOIN checkpoint_values AS v"
            " WHERE v.thread_id = k.thread_id AND v.checkpoint_ns = k.checkpoint_ns"
            " AND v.channel = k.channel AND v.version = k.version GROUP BY 1, 2, 3, 4) "
        )
        parts.append(
            "SELECT 0, v.thread_id, v.checkpoint_ns, v.channel, v.version, v.type, v.value,"
            " v.kind, v.base_version, NULL FROM s CROSS JOIN checkpoint_values AS v"
            " WHERE v.thread_id = s.t AND v.checkpoint_ns = s.n AND v.channel = s.c"
            " AND v.version BETWEEN s.lo AND s.hi"
        )
    if checkpoint_keys:
        keys = ", ".join(["(?, ?, ?)"] * checkpoint_keys)
        parts.append(
            "SELECT 1, w.thread_id, w.checkpoint_ns, w.checkpoint_id, w.task_id, w.idx,"
            " w.channel, w.type, w.value, w.task_path"
            f" FROM (VALUES {keys}) AS k CROSS JOIN checkpoint_writes AS w"
            " WHERE w.thread_id = k.column1 AND w.checkpoint_ns = k.column2"
            " AND w.checkpoint_id = k.column3"
        )
    return prefix + " UNION ALL ".join(parts)


def _bucket(count: int) -> int:
    return count and 1 << (count - 1).bit_length()


def _padded(keys: Sequence[tuple[Any, ...]], width: int) -> list[Any]:
    padding = [None] * (width * (_bucket(len(keys)) - len(keys)))
    return [*itertools.chain.from_iterable(keys), *padding]


def _select_related(
    value_keys: Sequence[tuple[str, str, str, str]],
    checkpoint_keys: Sequence[tuple[str, str, str]],
) -> Iterator[Statement]:
    """Statements reading the given value rows and the writes of the given checkpoints."""
    for start in range(0, max(len(value_keys), len(checkpoint_keys)), _KEYS_PER_STATEMENT):
        values = value_keys[start : start + _KEYS_PER_STATEMENT]
        checkpoints = checkpoint_keys[start : start + _KEYS_PER_STATEMENT]
        params = _padded(values, 4) + _padded(checkpoints, 3)
        sql = _select_related_sql(_bucket(len(values)), _bucket(len(checkpoints)))
        yield Statement(sql, params)


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
    thread_id: str | None = None,
) -> Plan[tuple[list[CheckpointTuple], CheckpointRow | None]]:
    """Up to ``limit`` checkpoints matching ``where`` (then ``filter``), newest first.

    ``thread_id``: ``where`` selects that one thread, in every namespace. Also returns the row
    the next page starts after, or None if SQL found no more rows.
    """
    yield BEGIN_READ
    select = Statement(_SELECT_CHECKPOINTS.format(where=where), (*params, limit))
    if thread_id is not None:
        namespaces = yield Statement(_SELECT_NAMESPACES, (thread_id, _SPLIT_NAMESPACES + 1))
        if 0 < len(namespaces) <= _SPLIT_NAMESPACES:
            split = [value for (name,) in namespaces for value in (*params, name, limit)]
            select = Statement(_select_split_sql(where, len(namespaces)), (*split, limit))
    rows = yield select
    after = CheckpointRow(*rows[-1]) if len(rows) == limit else None
    candidates = []
    for fields in rows:
        row = CheckpointRow(*fields)
        metadata = None
        if filter:  # SQL narrowed the rows; the exact semantics are the storage module's
            metadata = load_metadata(serde, row)
            if not metadata_matches(metadata, filter):
                continue
        candidates.append(_Candidate(row, load_checkpoint(serde, row), metadata))
    if not candidates:
        yield COMMIT
        return [], after

    value_keys = list(
        {
            (found.row.thread_id, found.row.checkpoint_ns, channel, version): None
            for found in candidates
            for channel, version in stored_versions(found.checkpoint).items()
        }
    )
    checkpoint_keys = [
        (row.thread_id, row.checkpoint_ns, row.checkpoint_id) for row, *_ in candidates
    ]
    related: list[Any] = []
    for statement in _select_related(value_keys, checkpoint_keys):
        related += yield statement
    yield COMMIT

    # Per thread and namespace: value rows by (channel, version).
    values: dict[tuple[str, str], dict[tuple[str, str], ValueRow]] = {}
    writes: dict[tuple[str, str, str], list[WriteRow]] = {}
    for part, *fields in related:
        if part == 0:
            value = ValueRow(*fields[:8])
            values.setdefault(value[:2], {})[value.channel, value.version] = value
        else:
            write = WriteRow(*fields)
            writes.setdefault(write[:3], []).append(write)
    tuples = []
    for found in candidates:
        # load_tuple picks the rows (and chains) the checkpoint's channel_versions name.
        named = values.get(found.row[:2], {})
        row_writes = writes.get(found.row[:3], [])
        tuples.append(
            load_tuple(serde, found.row, found.checkpoint, named, row_writes, found.metadata)
        )
    return tuples, after


def get_tuple(serde: SerializerProtocol, config: RunnableConfig) -> Plan[CheckpointTuple | None]:
    where = "thread_id = ? AND checkpoint_ns = ?"
    params: list[Any] = [get_thread_id(config), get_checkpoint_ns(config)]
    if checkpoint_id := get_checkpoint_id(config):
        where += " AND checkpoint_id = ?"
        params.append(checkpoint_id)
    found, _ = yield from _load_page(serde, where, params, 1)
    return found[0] if found else None


# -- list filter --------------------------------------------------------------------------------


def _json_types(value: Any) -> tuple[str, ...]:
    """The ``json_each.type``s a stored value may have to match ``value`` (JSON true is not 1)."""
    if isinstance(value, bool):
        return ("true",) if value else ("false",)
    if isinstance(value, (int, float)):
        return ("integer", "real")
    if isinstance(value, str):
        return ("text",)
    if isinstance(value, (list, tuple)):
        return ("array",)
    return ("object",)


# Keys and values arrive as JSON text parameters that SQLite decodes, so they cannot change the
# statement and any key works (no JSON path is built from them).
_HAS_KEY = (
    "EXISTS (SELECT 1 FROM json_each(metadata_json) AS m"
    " WHERE m.key = json_extract(?, '$') AND m.type IN (?, ?)"
)
_EQUALS_VALUE = " AND m.value = json_extract(?, '$')"


def _metadata_conditions(filter: dict[str, Any]) -> tuple[list[str], list[Any]]:
    """SQL conditions that keep every row ``storage.metadata_matches`` would keep.

    Scalars compare exactly; for dicts and lists (containment) only the key and type are
    checked here, and the exact check runs on the decoded metadata.
    """
    conditions: list[str] = []
    params: list[Any] = []
    for key, value in filter.items():
        # Compare what the stored JSON copy holds: e.g. an infinite float became an object.
        safe = _json_safe(value)
        types = ("null",) if safe is None else _json_types(safe)
        params.extend((_to_json(str(key)), types[0], types[-1]))
        if isinstance(safe, (str, int, float)) and not isinstance(safe, bool):
            conditions.append(_HAS_KEY + _EQUALS_VALUE + ")")
            params.append(_to_json(safe))
        else:  # None and booleans: the type says it all; containers: checked exactly later
            conditions.append(_HAS_KEY + ")")
    return conditions, params


# -- list ---------------------------------------------------------------------------------------

_FIRST_PAGE = 16
_LARGEST_PAGE = 1024


class ListPager:
    """The state of one ``list`` call, read page by page (keyset pagination).

    Each page is a separate plan, so no statement or transaction stays open while the caller
    consumes results.
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
            conditions.append("thread_id = ?")
            params.append(get_thread_id(config))
        checkpoint_ns = configurable.get("checkpoint_ns")
        if checkpoint_ns is not None:
            conditions.append("checkpoint_ns = ?")
            params.append(str(checkpoint_ns))
        if checkpoint_id := configurable.get("checkpoint_id"):
            conditions.append("checkpoint_id = ?")
            params.append(checkpoint_id)
        if before is not None and (before_id := get_checkpoint_id(before)):
            conditions.append("checkpoint_id < ?")
            params.append(before_id)
        if filter:
            metadata_conditions, metadata_params = _metadata_conditions(filter)
            conditions.extend(metadata_conditions)
            params.extend(metadata_params)
        self._where = " AND ".join(conditions) or "1"
        self._params = params
        self._filter = filter
        self._remaining = limit
        # With thread and namespace fixed, checkpoint_id alone orders the rows and the next
        # page is a primary-key range; otherwise ties (copied threads share checkpoint ids)
        # need the whole sort key.
        self._one_namespace = config is not None and checkpoint_ns is not None
        self._thread_id = (
            get_thread_id(config) if config is not None and not self._one_namespace else None
        )
        self._after: CheckpointRow | None = None
        self._page_size = _FIRST_PAGE
        self._done = limit is not None and limit <= 0

    def next_page(self, serde: SerializerProtocol) -> Plan[list[CheckpointTuple]] | None:
        """The plan reading the next page, or None when the listing is complete."""
        return None if self._done else self._page(serde)

    def _page(self, serde: SerializerProtocol) -> Plan[list[CheckpointTuple]]:
        size = self._page_size
        if self._remaining is not None and not self._filter:
            size = min(size, self._remaining)
        where, params = self._where, list(self._params)
        if (after := self._after) is not None:
            if self._one_namespace:
                where += " AND checkpoint_id < ?"
                params.append(after.checkpoint_id)
            else:
                where += (
                    " AND checkpoint_id <= ?"
                    " AND (checkpoint_id, thread_id, checkpoint_ns) < (?, ?, ?)"
                )
                params.extend(
                    (after.checkpoint_id, after.checkpoint_id, after.thread_id, after.checkpoint_ns)
                )
        page, after = yield from _load_page(
            serde, where, params, size, self._filter, self._thread_id
        )
        if self._remaining is not None:
            page = page[: self._remaining]
            self._remaining -= len(page)
        self._after = after
        self._done = after is None or self._remaining == 0
        self._page_size = min(self._page_size * 2, _LARGEST_PAGE)
        return page


# -- thread management --------------------------------------------------------------------------

_TABLES = ("checkpoints", "checkpoint_values", "checkpoint_writes")
_COPIED_COLUMNS = {
    "checkpoints": _CHECKPOINT_COLUMNS.removeprefix("thread_id, ") + ", metadata_json",
    "checkpoint_values": "checkpoint_ns, channel, version, type, value, kind, base_version,"
    " chain_start",
    "checkpoint_writes": "checkpoint_ns, checkpoint_id, task_id, idx, channel, type, value,"
    " task_path",
}


def delete_threads(thread_ids: Iterable[str]) -> Plan[None]:
    keys = [(str(thread_id),) for thread_id in thread_ids]
    yield BEGIN_WRITE
    for table in _TABLES:
        yield Statement(f"DELETE FROM {table} WHERE thread_id = ?", keys, many=True)
    yield COMMIT


def copy_thread(source_thread_id: str, target_thread_id: str) -> Plan[None]:
    # Nothing in the stored bytes names the thread, so copying is re-keying rows in SQL.
    yield BEGIN_WRITE
    for table in _TABLES:
        columns = _COPIED_COLUMNS[table]
        yield Statement(
            f"INSERT OR REPLACE INTO {table} (thread_id, {columns})"
            f" SELECT ?, {columns} FROM {table} WHERE thread_id = ?",
            (str(target_thread_id), str(source_thread_id)),
        )
    yield COMMIT


def _delete_checkpoints(
    serde: SerializerProtocol, keys: Sequence[tuple[str, str, str]]
) -> Plan[None]:
    """Delete checkpoints, their writes, and the values no remaining checkpoint needs.

    Runs inside the caller's write transaction: if a remaining checkpoint cannot be decoded,
    the error rolls everything back and nothing is deleted.
    """
    if not keys:
        return
    where = "thread_id = ? AND checkpoint_ns = ? AND checkpoint_id = ?"
    yield Statement(f"DELETE FROM checkpoints WHERE {where}", keys, many=True)
    yield Statement(f"DELETE FROM checkpoint_writes WHERE {where}", keys, many=True)
    for thread_id in sorted({key[0] for key in keys}):
        remaining = yield Statement(
            f"SELECT {_CHECKPOINT_COLUMNS} FROM checkpoints WHERE thread_id = ?", (thread_id,)
        )
        stored = yield Statement(
            "SELECT checkpoint_ns, channel, version, base_version FROM checkpoint_values"
            f" WHERE thread_id = ? AND kind = {APPENDED_ITEMS}",
            (thread_id,),
        )
        bases = {(ns, channel, version): base for ns, channel, version, base in stored}
        checkpoints = (CheckpointRow(*fields) for fields in remaining)
        needed = referenced_values(serde, checkpoints, bases)
        stored = yield Statement(
            "SELECT checkpoint_ns, channel, version FROM checkpoint_values WHERE thread_id = ?",
            (thread_id,),
        )
        garbage = [(thread_id, *key) for key in map(tuple, stored) if key not in needed]
        if garbage:
            yield Statement(
                "DELETE FROM checkpoint_values"
                " WHERE thread_id = ? AND checkpoint_ns = ? AND channel = ? AND version = ?",
                garbage,
                many=True,
            )


def delete_for_runs(serde: SerializerProtocol, run_ids: Iterable[str]) -> Plan[None]:
    ids = [(str(run_id),) for run_id in dict.fromkeys(run_ids)]
    yield BEGIN_WRITE
    keys: list[tuple[str, str, str]] = []
    for start in range(0, len(ids), _KEYS_PER_STATEMENT):
        chunk = ids[start : start + _KEYS_PER_STATEMENT]
        found = yield Statement(_select_by_runs_sql(_bucket(len(chunk))), _padded(chunk, 1))
        keys.extend(tuple(key) for key in found)
    yield from _delete_checkpoints(serde, keys)
    yield COMMIT


@functools.lru_cache(maxsize=16)
def _select_by_runs_sql(run_ids: int) -> str:
    return (
        "SELECT thread_id, checkpoint_ns, checkpoint_id FROM checkpoints"
        f" WHERE run_id IN ({', '.join(['?'] * run_ids)})"
    )


class _PruneKey(NamedTuple):
    """What ``storage.checkpoints_to_keep`` reads of a checkpoint."""

    checkpoint_ns: str
    checkpoint_id: str
    ts: str


def prune(
    serde: SerializerProtocol,
    thread_ids: Sequence[str],
    strategy: PruneStrategy,
    keep_last: int | None,
    older_than: timedelta | None,
) -> Plan[None]:
    if strategy == "delete":
        return (yield from delete_threads(thread_ids))
    if strategy != "keep_latest":
        raise ValueError(f"Unknown prune strategy {strategy!r}: use 'keep_latest' or 'delete'.")
    now = datetime.now(UTC)
    yield BEGIN_WRITE
    doomed: list[tuple[str, str, str]] = []
    for thread_id in dict.fromkeys(map(str, thread_ids)):
        rows = yield Statement(
            "SELECT checkpoint_ns, checkpoint_id, ts FROM checkpoints WHERE thread_id = ?",
            (thread_id,),
        )
        candidates = [_PruneKey(*fields) for fields in rows]
        keep = checkpoints_to_keep(candidates, keep_last=keep_last, older_than=older_than, now=now)
        doomed.extend(
            (thread_id, key.checkpoint_ns, key.checkpoint_id)
            for key in candidates
            if (key.checkpoint_ns, key.checkpoint_id) not in keep
        )
    yield from _delete_checkpoints(serde, doomed)
    yield COMMIT
