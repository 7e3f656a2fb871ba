"""SQL and row handling shared by ``SqliteSaver`` and ``AsyncSqliteSaver``.

Every operation is written once, as a *plan* (``stepgraph.checkpoint.storage.plans``): a
generator that yields ``Statement``s and is sent back each statement's rows (sqlite3 fetches
every statement's rows, so plans here leave ``fetch`` unset). The sync and async savers differ
only in the few lines that execute statements (``run_plan`` / ``arun_plan``). Plans open and commit their own transactions, so
whatever a plan writes is committed atomically or not at all. Which rows to write and how rows
become checkpoints is backend-neutral and lives in ``stepgraph.checkpoint.storage``.
"""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar, cast

from stepgraph.checkpoint.base import (
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
    Lease,
    PruneStrategy,
    RunInfo,
    RunStatus,
    Step,
    StorageReport,
    TaskWrites,
    get_checkpoint_id,
    get_checkpoint_ns,
    get_thread_id,
)
from stepgraph.checkpoint.base.runs import fence_of
from stepgraph.checkpoint.serde.base import SerializerProtocol
from stepgraph.checkpoint.sqlite._schema import (
    CREATE_MIGRATIONS_TABLE,
    MIGRATIONS,
    SCHEMA_VERSION,
    SYNCHRONOUS_LEVELS,
)
from stepgraph.checkpoint.storage import (
    APPENDED_ITEMS,
    METADATA_IN_JSON,
    ChainHeads,
    CheckpointRow,
    CheckpointRows,
    PageQuery,
    ValueRow,
    WriteRow,
    assemble_page,
    chain_rows,
    chain_spans,
    check_key,
    check_prune_strategy,
    check_schema_version,
    checkpoint_config,
    checkpoint_rows,
    deleted_values,
    id_list,
    json_text,
    load_guessed,
    metadata_filter_json,
    page_candidates,
    prune_doomed,
    related_keys,
    task_write_rows,
    unchained,
)
from stepgraph.checkpoint.storage.plans import Job, Plan, Statement
from stepgraph.checkpoint.storage.runs import (
    RunRow,
    check_fence,
    deleted,
    encode_input,
    is_incomplete,
    lease_of,
    released,
    renewed,
    run_info,
    take_lease,
)
from stepgraph.config import RunnableConfig

__all__ = ["PLANS", "Plan", "Statement"]

T = TypeVar("T")


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
    check_schema_version(current, SCHEMA_VERSION, "stepgraph-checkpoint-sqlite")
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
    chain_start, metadata_json)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
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
    type, value, task_path, kind)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (thread_id, checkpoint_ns, checkpoint_id, task_id, idx) DO UPDATE
SET channel = excluded.channel, type = excluded.type, value = excluded.value,
    task_path = excluded.task_path, kind = excluded.kind
WHERE excluded.idx < 0
"""


# SQLite decodes both sides of a comparison the same way, escapes included.
_to_json = json_text


_HAS_CHECKPOINT = (
    "SELECT EXISTS (SELECT 1 FROM checkpoints"
    " WHERE thread_id = ? AND checkpoint_ns = ? AND checkpoint_id = ?)"
)


_SELECT_FENCE = "SELECT epoch, status FROM thread_runs WHERE thread_id = ?"
# _HAS_CHECKPOINT's answer, then the run registry row's epoch and status (NULLs: no row).
_FENCE_AND_PARENT = f"""
SELECT ({_HAS_CHECKPOINT.removeprefix("SELECT ")}), r.epoch, r.status
FROM (SELECT 1) LEFT JOIN thread_runs AS r ON r.thread_id = ?
"""


def _check_fence(thread_id: str, fence: int) -> Plan[None]:
    """Refuse (raise, so the runner rolls back) a write whose lease epoch is no longer the
    thread's. Runs right after BEGIN IMMEDIATE: no other writer can move the epoch until the
    write commits. Callers skip it for unfenced writes (the hot path gets no extra work)."""
    found = yield Statement(_SELECT_FENCE, (thread_id,))
    check_fence(thread_id, fence, found[0] if found else None)


def _store(
    serde: SerializerProtocol,
    chain: list[CheckpointRows],
    self_contained: Callable[[], list[CheckpointRows]],
    fence: int | None,
    heads: ChainHeads,
    release: tuple[Lease, RunStatus] | None,
) -> Plan[RunnableConfig]:
    """Store ``chain`` (a step's rows, or a chain of steps' rows, each step's parent the one
    before) in one transaction."""
    first = chain[0].checkpoint
    # The metadata's JSON text now: the rows hold the caller's own metadata, which it may
    # change once the call returns (a self-contained chain has the same metadata).
    shadows = [_to_json(rows.metadata_json) for rows in chain]
    yield BEGIN_WRITE
    if first.parent_checkpoint_id is None:
        if fence is not None:
            yield from _check_fence(first.thread_id, fence)
    else:
        parent = (first.thread_id, first.checkpoint_ns, first.parent_checkpoint_id)
        if fence is None:
            found = yield Statement(_HAS_CHECKPOINT, parent)
        else:  # one statement for both checks: this runs at every step of a leased run
            found = yield Statement(_FENCE_AND_PARENT, (*parent, first.thread_id))
            epoch, status = found[0][1:]
            check_fence(first.thread_id, fence, None if epoch is None else (epoch, status))
        if not found[0][0]:  # pruned meanwhile: unchanged channels' rows may be gone with it
            chain = self_contained()
    if len(chain) == 1:
        rows = chain[0]
        if rows.writes:
            yield Statement(_UPSERT_WRITE, rows.writes, many=True)
        if rows.values:
            yield Statement(_INSERT_VALUE, rows.values, many=True)
        yield Statement(_INSERT_CHECKPOINT, (*rows.checkpoint, shadows[0]))
    else:  # in chain order: a value row's base may be stored by the step before
        if writes := [write for rows in chain for write in rows.writes]:
            yield Statement(_UPSERT_WRITE, writes, many=True)
        if values := [value for rows in chain for value in rows.values]:
            yield Statement(_INSERT_VALUE, values, many=True)
        pairs = zip(chain, shadows, strict=True)
        checkpoints = [(*rows.checkpoint, shadow) for rows, shadow in pairs]
        yield Statement(_INSERT_CHECKPOINT, checkpoints, many=True)
    if release is not None:
        yield from _let_go(*release, None)
    yield COMMIT
    for rows in chain:
        heads.saved(rows, serde)
    last = chain[-1].checkpoint
    return checkpoint_config(last.thread_id, last.checkpoint_ns, last.checkpoint_id)


# ``checkpoint_rows`` as this backend stores them.
_rows = functools.partial(checkpoint_rows, deltas=True, inline=True, json_metadata=True)


def put_step(
    serde: SerializerProtocol,
    config: RunnableConfig,
    writes: Sequence[TaskWrites],
    checkpoint: Checkpoint,
    metadata: CheckpointMetadata,
    new_versions: ChannelVersions,
    heads: ChainHeads,
    release: tuple[Lease, RunStatus] | None = None,
) -> Plan[RunnableConfig]:
    """``put_step`` and (with no writes) ``put``: one transaction, one commit; with
    ``release``, the lease is let go in it too."""
    # Everything is serialized before the write lock is taken, so other writers wait only for
    # the inserts.
    rows = functools.partial(
        _rows, serde, config, checkpoint, metadata, new_versions, writes, heads=heads
    )
    first = [rows()]

    def self_contained() -> list[CheckpointRows]:
        return [rows(self_contained=True)]

    fence = fence_of(config)
    return (yield from _store(serde, first, self_contained, fence, heads, release))


def put_steps(
    serde: SerializerProtocol,
    config: RunnableConfig,
    steps: Sequence[Step],
    heads: ChainHeads,
    release: tuple[Lease, RunStatus] | None = None,
) -> Plan[RunnableConfig]:
    """``put_steps``: the whole chain in one transaction, one commit."""
    rows = functools.partial(_rows, serde, heads=heads)
    first = chain_rows(rows, config, steps)
    self_contained = functools.partial(chain_rows, rows, config, steps, self_contained=True)
    return (yield from _store(serde, first, self_contained, fence_of(config), heads, release))


def put_writes(
    serde: SerializerProtocol, config: RunnableConfig, tasks: Sequence[TaskWrites]
) -> Plan[None]:
    """``put_writes`` of one task, or ``put_writes_batch`` of several: one transaction."""
    rows = task_write_rows(serde, config, tasks)
    if rows:
        fence = fence_of(config)
        yield BEGIN_WRITE
        if fence is not None:
            yield from _check_fence(rows[0].thread_id, fence)
        yield Statement(_UPSERT_WRITE, rows, many=True)
        yield COMMIT


# -- reading ------------------------------------------------------------------------------------

_CHECKPOINT_COLUMNS = (
    "thread_id, checkpoint_ns, checkpoint_id, parent_checkpoint_id, ts, run_id,"
    " checkpoint_type, checkpoint, metadata_type, metadata, chain_start"
)
# A CheckpointRow as read: metadata that JSON holds exactly is stored once, as metadata_json
# (``storage.METADATA_IN_JSON``); the text of _to_json reads back key for key.
_CHECKPOINT_ROW = _CHECKPOINT_COLUMNS.replace(
    " metadata,",
    f" iif(metadata_type = '{METADATA_IN_JSON}', metadata_json, metadata) AS metadata,",
)
_SELECT_CHECKPOINTS = f"""
SELECT {_CHECKPOINT_ROW} FROM checkpoints
WHERE {{where}}
ORDER BY checkpoint_id DESC, thread_id DESC, checkpoint_ns DESC
LIMIT ?
"""
# A thread's namespaces, one seek of the checkpoints' key each (a "skip scan"), at most one
# more than _SPLIT_NAMESPACES so the caller can tell "too many".
_SELECT_NAMESPACES = """
WITH RECURSIVE ns(name) AS (
    SELECT (SELECT min(checkpoint_ns) FROM checkpoints WHERE thread_id = ?1)
    UNION ALL
    SELECT (SELECT min(checkpoint_ns) FROM checkpoints WHERE thread_id = ?1 AND checkpoint_ns > name)
    FROM ns WHERE name IS NOT NULL LIMIT ?2
)
SELECT name FROM ns WHERE name IS NOT NULL
"""
# Listing a thread across namespaces merges each namespace's newest rows (a range of the key
# read each), instead of sorting all of the thread's rows: reading the newest page of a long
# thread costs the same as of a short one. Above this many namespaces one sort is cheaper.
_SPLIT_NAMESPACES = 16


@functools.lru_cache(maxsize=_SPLIT_NAMESPACES)
def _select_split_sql(where: str, namespaces: int) -> str:
    one = (
        f"SELECT * FROM (SELECT {_CHECKPOINT_ROW} FROM checkpoints"
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
def _select_related_sql(value_keys: int, checkpoint_keys: int, page_where: str = "") -> str:
    """The value rows and pending writes named by lists of keys, in one statement.

    Each key list is the outer loop of a CROSS JOIN, so every key is one seek of the table's key.
    A value key names a span of versions of its channel: the version alone for a whole value,
    ``chain_start`` up to it for appended items, so the rows that make up a value come in the
    same statement, as one range of the key (spans of several keys that start alike are
    merged). A span may hold rows of forked branches too: ``storage.load_tuple`` follows base
    versions and ignores them. The first column tells value rows (0) from write rows (1).

    ``page_where``: also the newest checkpoint row matching it (2, then the row's columns;
    parameters after the keys' and the LIMIT's), for a read in one statement.
    """
    pad = ", NULL" if page_where else ""
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
            f" v.kind, v.base_version, NULL, NULL{pad} FROM s CROSS JOIN checkpoint_values AS v"
            " WHERE v.thread_id = s.t AND v.checkpoint_ns = s.n AND v.channel = s.c"
            " AND v.version BETWEEN s.lo AND s.hi"
        )
    if checkpoint_keys:
        keys = ", ".join(["(?, ?, ?)"] * checkpoint_keys)
        parts.append(
            "SELECT 1, w.thread_id, w.checkpoint_ns, w.checkpoint_id, w.task_id, w.idx,"
            f" w.channel, w.type, w.value, w.task_path, w.kind{pad}"
            f" FROM (VALUES {keys}) AS k CROSS JOIN checkpoint_writes AS w"
            " WHERE w.thread_id = k.column1 AND w.checkpoint_ns = k.column2"
            " AND w.checkpoint_id = k.column3"
        )
    if page_where:
        parts.append(f"SELECT 2, * FROM ({_SELECT_CHECKPOINTS.format(where=page_where)})")
    return prefix + " UNION ALL ".join(parts)


@functools.lru_cache(maxsize=16)
def _select_chains_sql(spans: int) -> str:
    """The checkpoint rows in spans ``(thread_id, checkpoint_ns, low, high)`` of the key
    (``storage.chain_spans``): what rows of changes are read through, one range each."""
    keys = ", ".join(["(?, ?, ?, ?)"] * spans)
    return (
        f"SELECT c.{_CHECKPOINT_COLUMNS.replace(', ', ', c.')}"
        f" FROM (VALUES {keys}) AS k CROSS JOIN checkpoints AS c"
        " WHERE c.thread_id = k.column1 AND c.checkpoint_ns = k.column2"
        " AND c.checkpoint_id >= k.column3 AND c.checkpoint_id < k.column4"
    )


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


def _load_page(
    serde: SerializerProtocol,
    heads: ChainHeads | None,
    where: str,
    params: Sequence[Any],
    limit: int,
    filter: dict[str, Any] | None = None,
    thread_id: str | None = None,
    newest: bool = False,
) -> Plan[tuple[list[CheckpointRow], list[CheckpointTuple]]]:
    """Up to ``limit`` checkpoints matching ``where`` (then ``filter``), newest first: the
    rows SQL found and the tuples of those that match (``heads``: the saver's kept blobs).

    ``thread_id``: ``where`` selects that one thread, in every namespace. ``newest``: the one
    row found is its namespace's newest (``heads`` learns what it names).
    """
    yield BEGIN_READ
    select = Statement(_SELECT_CHECKPOINTS.format(where=where), (*params, limit))
    if thread_id is not None:
        namespaces = yield Statement(_SELECT_NAMESPACES, (thread_id, _SPLIT_NAMESPACES + 1))
        if 0 < len(namespaces) <= _SPLIT_NAMESPACES:
            split = [value for (name,) in namespaces for value in (*params, name, limit)]
            select = Statement(_select_split_sql(where, len(namespaces)), (*split, limit))
    rows = [CheckpointRow(*fields) for fields in (yield select)]
    chains: list[CheckpointRow] = []
    # Rows whose blobs the saver keeps need no chain: one statement less to read a head.
    kept = heads.kept(rows) if heads is not None else {}
    if spans := chain_spans(row for row in rows if row[:3] not in kept):
        for start in range(0, len(spans), _KEYS_PER_STATEMENT):
            chunk = spans[start : start + _KEYS_PER_STATEMENT]
            sql = _select_chains_sql(_bucket(len(chunk)))
            chains += [
                CheckpointRow(*fields) for fields in (yield Statement(sql, _padded(chunk, 4)))
            ]
    candidates = page_candidates(serde, rows, filter, chains, heads, kept)
    related: list[Any] = []
    if candidates:
        keys = related_keys(candidates)
        if heads is not None and newest:
            heads.seen_newest(*rows[0][:3], [(c, v) for _, _, c, v in keys[0]])
        for statement in _select_related(*keys):
            related += yield statement
    yield COMMIT
    values = [ValueRow(*fields[:8]) for part, *fields in related if part == 0]
    writes = [WriteRow(*fields) for part, *fields in related if part == 1]
    return rows, list(assemble_page(serde, candidates, values, writes))


_GUESSED_WRONG: Any = object()


def get_tuple(
    serde: SerializerProtocol, config: RunnableConfig, heads: ChainHeads | None = None
) -> Plan[CheckpointTuple | None]:
    """A checkpoint, read in one snapshot. When ``heads`` knows which checkpoint the read
    will likely find and the value rows it names (``ChainHeads.guess``), one statement reads
    its row, value rows and writes together (a statement is its own snapshot: no transaction
    to open and close); otherwise, or if the guess was wrong, a transaction of two or three."""
    thread_id, checkpoint_ns = get_thread_id(config), get_checkpoint_ns(config)
    where = "thread_id = ? AND checkpoint_ns = ?"
    params: list[Any] = [thread_id, checkpoint_ns]
    if checkpoint_id := get_checkpoint_id(config):
        where += " AND checkpoint_id = ?"
        params.append(checkpoint_id)
    found: Any = _GUESSED_WRONG
    if heads is not None and (guess := heads.guess(thread_id, checkpoint_ns, checkpoint_id)):
        found = yield from _guessed_read(serde, heads, where, params, *guess)
    if found is _GUESSED_WRONG:
        _, page = yield from _load_page(serde, heads, where, params, 1, newest=not checkpoint_id)
        found = page[0] if page else None
    return cast("CheckpointTuple | None", found)


def _guessed_read(
    serde: SerializerProtocol,
    heads: ChainHeads,
    where: str,
    params: list[Any],
    guessed_id: str,
    stored: list[tuple[str, str]],
) -> Plan[Any]:
    """The tuple of the newest checkpoint matching ``where`` (None if there is none) in one
    statement, with the value rows (``stored``) and writes of checkpoint ``guessed_id``;
    ``_GUESSED_WRONG`` if the checkpoint found is another, names other rows, or is a row of
    changes whose chain would take another statement."""
    thread_id, checkpoint_ns = params[:2]
    value_keys = [(thread_id, checkpoint_ns, channel, version) for channel, version in stored]
    if len(value_keys) > _KEYS_PER_STATEMENT:
        return _GUESSED_WRONG
    sql = _select_related_sql(_bucket(len(value_keys)), 1, where)
    keys = [*_padded(value_keys, 4), thread_id, checkpoint_ns, guessed_id]
    found = yield Statement(sql, [*keys, *params, 1])
    rows = [CheckpointRow(*fields) for part, *fields in found if part == 2]
    if not rows:
        return None
    if rows[0].checkpoint_id != guessed_id:
        return _GUESSED_WRONG
    values = [ValueRow(*fields[:8]) for part, *fields in found if part == 0]
    writes = [WriteRow(*fields[:10]) for part, *fields in found if part == 1]
    loaded = load_guessed(serde, heads, rows[0], stored, values, writes)
    return _GUESSED_WRONG if loaded is None else loaded


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

    On the JSON copies (``storage.metadata_filter_json``): scalars compare exactly; for dicts
    and lists (containment) only the key and type are checked here, and the exact check runs
    on the decoded metadata.
    """
    conditions: list[str] = []
    params: list[Any] = []
    for key, value in metadata_filter_json(filter).items():
        types = ("null",) if value is None else _json_types(value)
        params.extend((_to_json(key), types[0], types[-1]))
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            conditions.append(_HAS_KEY + _EQUALS_VALUE + ")")
            params.append(_to_json(value))
        else:  # None and booleans: the type says it all; containers: checked exactly later
            conditions.append(_HAS_KEY + ")")
    return conditions, params


# -- list ---------------------------------------------------------------------------------------


def list_page(
    serde: SerializerProtocol, query: PageQuery, heads: ChainHeads | None = None
) -> Plan[tuple[list[CheckpointRow], list[CheckpointTuple]]]:
    """One page of a ``list`` (``storage.ListPager``), in one read transaction."""
    conditions: list[str] = []
    params: list[Any] = []
    for column, value in (
        ("thread_id = ?", query.thread_id),
        ("checkpoint_ns = ?", query.checkpoint_ns),
        ("checkpoint_id = ?", query.checkpoint_id),
        ("checkpoint_id < ?", query.before_id),
    ):
        if value is not None:
            conditions.append(column)
            params.append(value)
    if query.filter:
        metadata_conditions, metadata_params = _metadata_conditions(query.filter)
        conditions.extend(metadata_conditions)
        params.extend(metadata_params)
    if (after := query.after) is not None:
        if query.one_namespace:
            conditions.append("checkpoint_id < ?")
            params.append(after.checkpoint_id)
        else:
            conditions.append(
                "checkpoint_id <= ? AND (checkpoint_id, thread_id, checkpoint_ns) < (?, ?, ?)"
            )
            params.extend(
                (after.checkpoint_id, after.checkpoint_id, after.thread_id, after.checkpoint_ns)
            )
    where = " AND ".join(conditions) or "1"
    thread_id = None if query.one_namespace else query.thread_id
    page = _load_page(serde, heads, where, params, query.size, query.filter, thread_id)
    return (yield from page)


# -- thread management --------------------------------------------------------------------------

_TABLES = ("checkpoints", "checkpoint_values", "checkpoint_writes")
_COPIED_COLUMNS = {
    "checkpoints": _CHECKPOINT_COLUMNS.removeprefix("thread_id, ") + ", metadata_json",
    "checkpoint_values": "checkpoint_ns, channel, version, type, value, kind, base_version,"
    " chain_start",
    "checkpoint_writes": "checkpoint_ns, checkpoint_id, task_id, idx, channel, type, value,"
    " task_path, kind",
}


def delete_threads(thread_ids: Iterable[str]) -> Plan[None]:
    threads = id_list(thread_ids, "thread_ids")
    yield BEGIN_WRITE
    yield from _drop_threads(threads, time.time())
    yield COMMIT


def _drop_threads(thread_ids: Sequence[str], now: float) -> Plan[None]:
    """Delete the threads' rows and leave each a tombstone in ``thread_runs`` (a new epoch, so
    a run still writing to one is refused instead of resurrecting it). Runs inside the
    caller's write transaction."""
    keys = [(thread_id,) for thread_id in thread_ids]
    for table in _TABLES:
        yield Statement(f"DELETE FROM {table} WHERE thread_id = ?", keys, many=True)
    tombstones = []
    for thread_id in thread_ids:
        row = yield from _select_run(thread_id)
        tombstones.append(deleted(row, thread_id, now))
    if tombstones:
        yield Statement(_UPSERT_RUN, tombstones, many=True)


def copy_thread(source_thread_id: str, target_thread_id: str) -> Plan[None]:
    check_key("thread_id", str(target_thread_id))
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


_CHECKPOINT_KEY = "thread_id = ? AND checkpoint_ns = ? AND checkpoint_id = ?"


def _delete_checkpoints(
    serde: SerializerProtocol,
    thread_ids: Iterable[str],
    doomed: Callable[[list[CheckpointRow]], set[tuple[str, str]]],
) -> Plan[None]:
    """Delete the checkpoints ``doomed`` picks of each thread's, their writes, and the value
    rows only they needed (``storage.deleted_values``).

    Runs inside the caller's write transaction: if a checkpoint cannot be decoded, the error
    rolls everything back and nothing is deleted.
    """
    for thread_id in thread_ids:
        fields = yield Statement(
            f"SELECT {_CHECKPOINT_ROW} FROM checkpoints WHERE thread_id = ?", (thread_id,)
        )
        rows = [CheckpointRow(*one) for one in fields]
        chosen = doomed(rows)
        if not chosen:
            continue
        appended = yield Statement(
            "SELECT checkpoint_ns, channel, version, base_version FROM checkpoint_values"
            f" WHERE thread_id = ? AND kind = {APPENDED_ITEMS}",
            (thread_id,),
        )
        bases = {(ns, channel, version): base for ns, channel, version, base in appended}
        deleted = [row for row in rows if (row.checkpoint_ns, row.checkpoint_id) in chosen]
        kept = [row for row in rows if (row.checkpoint_ns, row.checkpoint_id) not in chosen]
        garbage = deleted_values(serde, deleted, kept, bases)
        if rewritten := unchained(serde, kept, deleted):  # cut chains start whole again
            yield Statement(
                "UPDATE checkpoints SET checkpoint_type = ?, checkpoint = ?, chain_start = NULL"
                f" WHERE {_CHECKPOINT_KEY}",
                [(row.checkpoint_type, row.checkpoint, *row[:3]) for row in rewritten],
                many=True,
            )
        keys = [(thread_id, ns, checkpoint_id) for ns, checkpoint_id in sorted(chosen)]
        yield Statement(f"DELETE FROM checkpoints WHERE {_CHECKPOINT_KEY}", keys, many=True)
        yield Statement(f"DELETE FROM checkpoint_writes WHERE {_CHECKPOINT_KEY}", keys, many=True)
        if garbage:
            yield Statement(
                "DELETE FROM checkpoint_values"
                " WHERE thread_id = ? AND checkpoint_ns = ? AND channel = ? AND version = ?",
                [(thread_id, *key) for key in sorted(garbage)],
                many=True,
            )


def delete_for_runs(serde: SerializerProtocol, run_ids: Iterable[str]) -> Plan[None]:
    ids = [(run_id,) for run_id in id_list(run_ids, "run_ids")]
    runs = {run_id for (run_id,) in ids}
    yield BEGIN_WRITE
    threads: dict[str, None] = {}
    for start in range(0, len(ids), _KEYS_PER_STATEMENT):
        chunk = ids[start : start + _KEYS_PER_STATEMENT]
        found = yield Statement(_select_by_runs_sql(_bucket(len(chunk))), _padded(chunk, 1))
        threads.update(dict.fromkeys(thread_id for (thread_id,) in found))

    def doomed(rows: list[CheckpointRow]) -> set[tuple[str, str]]:
        return {(row.checkpoint_ns, row.checkpoint_id) for row in rows if row.run_id in runs}

    yield from _delete_checkpoints(serde, threads, doomed)
    yield COMMIT


@functools.lru_cache(maxsize=16)
def _select_by_runs_sql(run_ids: int) -> str:
    return (
        f"SELECT DISTINCT thread_id FROM checkpoints WHERE run_id IN ({', '.join(['?'] * run_ids)})"
    )


def prune(
    serde: SerializerProtocol,
    thread_ids: Sequence[str],
    strategy: PruneStrategy,
    keep_last: int | None,
    older_than: timedelta | None,
) -> Plan[None]:
    check_prune_strategy(strategy)
    if strategy == "delete":
        return (yield from delete_threads(thread_ids))
    threads = id_list(thread_ids, "thread_ids")
    now = datetime.now(UTC)

    def doomed(rows: list[CheckpointRow]) -> set[tuple[str, str]]:
        return prune_doomed(rows, keep_last=keep_last, older_than=older_than, now=now)

    yield BEGIN_WRITE
    yield from _delete_checkpoints(serde, threads, doomed)
    yield COMMIT


# -- ownership and the run registry -------------------------------------------------------------

_RUN_COLUMNS = ", ".join(RunRow._fields)
_UPSERT_RUN = (
    f"INSERT OR REPLACE INTO thread_runs ({_RUN_COLUMNS})"
    f" VALUES ({', '.join(['?'] * len(RunRow._fields))})"
)
_SELECT_RUN = f"SELECT {_RUN_COLUMNS} FROM thread_runs WHERE thread_id = ?"
# The index's range of expired 'running' rows (``is_incomplete`` still decides).
_SELECT_INCOMPLETE = (
    f"SELECT {_RUN_COLUMNS} FROM thread_runs"
    " WHERE status = 'running' AND (expires_at IS NULL OR expires_at <= ?)"
    " ORDER BY updated_at, thread_id LIMIT ?"
)


def _select_run(thread_id: str) -> Plan[RunRow | None]:
    found = yield Statement(_SELECT_RUN, (thread_id,))
    return RunRow(*found[0]) if found else None


# Each operation reads the row and writes its successor in one BEGIN IMMEDIATE transaction, so
# two processes racing for a thread are serialized by SQLite's write lock. The clock is read
# after the lock is taken: waiting for the lock must not shorten a lease.


_SELECT_HEAD = (
    "SELECT max(checkpoint_id) FROM checkpoints WHERE thread_id = ? AND checkpoint_ns = ''"
)


def acquire_lease(
    serde: SerializerProtocol,
    thread_id: str,
    owner: str,
    ttl: float,
    input: Any,
    expect_epoch: int | None,
) -> Plan[Lease]:
    thread_id = str(thread_id)
    stored = encode_input(serde, input)  # serialized before the write lock is taken
    yield BEGIN_WRITE
    row = yield from _select_run(thread_id)
    head = yield Statement(_SELECT_HEAD, (thread_id,))
    taken = take_lease(  # or ThreadBusyError
        row, thread_id, owner, ttl, time.time(), stored, head[0][0], expect_epoch
    )
    yield Statement(_UPSERT_RUN, taken)
    yield COMMIT
    return lease_of(taken)


def renew_lease(lease: Lease, ttl: float) -> Plan[Lease]:
    yield BEGIN_WRITE
    row = yield from _select_run(lease.thread_id)
    extended = renewed(row, lease, ttl, time.time())  # or LeaseLostError
    yield Statement(_UPSERT_RUN, extended)
    yield COMMIT
    return lease_of(extended)


def release_lease(lease: Lease, status: RunStatus, error: str | None) -> Plan[None]:
    yield BEGIN_WRITE
    yield from _let_go(lease, status, error)
    yield COMMIT


def _let_go(lease: Lease, status: RunStatus, error: str | None) -> Plan[None]:
    """Release ``lease`` inside the caller's write transaction."""
    row = yield from _select_run(lease.thread_id)
    after = released(row, lease, status, error, time.time())
    if after is not None:  # None: the lease was lost, the row is another run's now
        yield Statement(_UPSERT_RUN, after)


def get_run(serde: SerializerProtocol, thread_id: str) -> Plan[RunInfo | None]:
    row = yield from _select_run(str(thread_id))
    return None if row is None else run_info(serde, row)


def list_incomplete(serde: SerializerProtocol, limit: int | None) -> Plan[list[RunInfo]]:
    now = time.time()
    found = yield Statement(_SELECT_INCOMPLETE, (now, -1 if limit is None else limit))
    rows = [RunRow(*fields) for fields in found]
    return [run_info(serde, row) for row in rows if is_incomplete(row, now)]


# -- retention ----------------------------------------------------------------------------------

# One statement, so one snapshot. length() of a BLOB is its size in bytes (and SQLite reads no
# overflow pages for it).
_STORAGE_REPORT = """
SELECT
    (SELECT count(*) FROM checkpoints WHERE thread_id = ?1),
    (SELECT count(*) FROM checkpoint_writes WHERE thread_id = ?1),
    (SELECT count(*) FROM checkpoint_values WHERE thread_id = ?1),
    (SELECT coalesce(sum(length(checkpoint) + length(metadata)
        + iif(metadata_type = '', length(metadata_json), 0)), 0)
        FROM checkpoints WHERE thread_id = ?1)
    + (SELECT coalesce(sum(length(value)), 0) FROM checkpoint_values WHERE thread_id = ?1)
    + (SELECT coalesce(sum(length(value)), 0) FROM checkpoint_writes WHERE thread_id = ?1)
"""


def storage_report(thread_id: str) -> Plan[StorageReport]:
    thread_id = str(thread_id)
    found = yield Statement(_STORAGE_REPORT, (thread_id,))
    checkpoints, writes, values, size = found[0]
    return StorageReport(thread_id, checkpoints, writes, values, size)


# Threads whose newest checkpoint is older than the cutoff (?1, unix time) and whose lease no
# live run holds (expires after ?2, now). ``ts`` is compared as a time (julianday reads the
# ISO-8601 offsets), not as text; a ts it cannot read counts as new, as in ``prune``.
_SELECT_STALE_THREADS = """
SELECT c.thread_id FROM checkpoints AS c
WHERE NOT EXISTS (
    SELECT 1 FROM thread_runs AS r WHERE r.thread_id = c.thread_id AND r.expires_at > ?2)
GROUP BY c.thread_id
HAVING max(coalesce(julianday(c.ts), 1e300)) < julianday(?1, 'unixepoch')
ORDER BY c.thread_id
"""


def sweep(older_than: timedelta) -> Plan[list[str]]:
    yield BEGIN_WRITE
    now = time.time()
    found = yield Statement(_SELECT_STALE_THREADS, (now - older_than.total_seconds(), now))
    threads = [thread_id for (thread_id,) in found]
    yield from _drop_threads(threads, now)
    yield COMMIT
    return threads


# -- the saver's operations -------------------------------------------------------------------


class SqlitePlans:
    """The savers' operations as jobs (``storage.plans.SaverPlans``). The plans open their own
    transactions, so no job has a scope."""

    def get_tuple(
        self, serde: SerializerProtocol, config: RunnableConfig, heads: ChainHeads | None = None
    ) -> Job[CheckpointTuple | None, None]:
        return Job(functools.partial(get_tuple, serde, config, heads), None)

    def list_page(
        self, serde: SerializerProtocol, query: PageQuery, heads: ChainHeads | None = None
    ) -> Job[tuple[list[CheckpointRow], list[CheckpointTuple]], None]:
        return Job(functools.partial(list_page, serde, query, heads), None)

    def put_step(
        self,
        serde: SerializerProtocol,
        config: RunnableConfig,
        writes: Sequence[TaskWrites],
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
        heads: ChainHeads,
        release: tuple[Lease, RunStatus] | None = None,
    ) -> Job[RunnableConfig, None]:
        step = (config, writes, checkpoint, metadata, new_versions, heads, release)
        return Job(functools.partial(put_step, serde, *step), None)

    def put_steps(
        self,
        serde: SerializerProtocol,
        config: RunnableConfig,
        steps: Sequence[Step],
        heads: ChainHeads,
        release: tuple[Lease, RunStatus] | None = None,
    ) -> Job[RunnableConfig, None]:
        return Job(functools.partial(put_steps, serde, config, steps, heads, release), None)

    def put_writes(
        self, serde: SerializerProtocol, config: RunnableConfig, writes: Sequence[TaskWrites]
    ) -> Job[None, None]:
        return Job(functools.partial(put_writes, serde, config, writes), None)

    def delete_threads(self, thread_ids: Sequence[str]) -> Job[None, None]:
        return Job(functools.partial(delete_threads, thread_ids), None)

    def copy_thread(self, source_thread_id: str, target_thread_id: str) -> Job[None, None]:
        return Job(functools.partial(copy_thread, source_thread_id, target_thread_id), None)

    def delete_for_runs(self, serde: SerializerProtocol, run_ids: Sequence[str]) -> Job[None, None]:
        return Job(functools.partial(delete_for_runs, serde, run_ids), None)

    def prune(
        self,
        serde: SerializerProtocol,
        thread_ids: Sequence[str],
        strategy: PruneStrategy,
        keep_last: int | None,
        older_than: timedelta | None,
    ) -> Job[None, None]:
        plan = functools.partial(prune, serde, thread_ids, strategy, keep_last, older_than)
        return Job(plan, None)

    def acquire_lease(
        self,
        serde: SerializerProtocol,
        thread_id: str,
        owner: str,
        ttl: float,
        input: Any,
        expect_epoch: int | None,
    ) -> Job[Lease, None]:
        plan = functools.partial(acquire_lease, serde, thread_id, owner, ttl, input, expect_epoch)
        return Job(plan, None)

    def renew_lease(self, lease: Lease, ttl: float) -> Job[Lease, None]:
        return Job(functools.partial(renew_lease, lease, ttl), None)

    def release_lease(self, lease: Lease, status: RunStatus, error: str | None) -> Job[None, None]:
        return Job(functools.partial(release_lease, lease, status, error), None)

    def get_run(self, serde: SerializerProtocol, thread_id: str) -> Job[RunInfo | None, None]:
        return Job(functools.partial(get_run, serde, thread_id), None)

    def list_incomplete(
        self, serde: SerializerProtocol, limit: int | None
    ) -> Job[list[RunInfo], None]:
        return Job(functools.partial(list_incomplete, serde, limit), None)

    def storage_report(self, thread_id: str) -> Job[StorageReport, None]:
        return Job(functools.partial(storage_report, thread_id), None)

    def sweep(self, older_than: timedelta) -> Job[list[str], None]:
        return Job(functools.partial(sweep, older_than), None)


PLANS = SqlitePlans()
