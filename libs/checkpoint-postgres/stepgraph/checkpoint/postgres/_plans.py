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
from dataclasses import replace
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
    Lease,
    PruneStrategy,
    RunInfo,
    RunStatus,
    Step,
    StorageReport,
    TaskWrites,
    child_config,
    get_checkpoint_id,
    get_checkpoint_ns,
    get_thread_id,
)
from stepgraph.checkpoint.base.runs import fence_of
from stepgraph.checkpoint.postgres import _arrays
from stepgraph.checkpoint.postgres._arrays import ByteaArray, Int2Array, Int4Array, TextArray
from stepgraph.checkpoint.postgres._schema import (
    CREATE_MIGRATIONS_TABLE,
    MIGRATIONS,
    SCHEMA_VERSION,
    SETUP_LOCK,
)
from stepgraph.checkpoint.serde.base import SerializerProtocol
from stepgraph.checkpoint.storage import (
    APPENDED_ITEMS,
    ChainHeads,
    CheckpointRow,
    CheckpointRows,
    CorruptCheckpointError,
    PageQuery,
    ValueKey,
    ValueRow,
    WriteRow,
    assemble_page,
    chain_rows,
    check_key,
    check_prune_strategy,
    check_schema_version,
    checkpoint_config,
    checkpoint_rows,
    deleted_values,
    id_list,
    metadata_filter_json,
    metadata_json_text,
    page_candidates,
    prune_doomed,
    related_keys,
    runs,
    task_write_rows,
    unchained,
)
from stepgraph.checkpoint.storage.plans import Job, Plan, Statement
from stepgraph.checkpoint.storage.runs import RunRow
from stepgraph.config import RunnableConfig
from stepgraph.errors import LeaseLostError, ThreadBusyError

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
# Each array is wrapped in a scalar subquery, which hides its length from the planner: seeing
# it, the planner estimated every execution differently, judged a custom plan cheaper than the
# generic one and so planned the step statement afresh on every step (~0.15 ms of server time
# each; pg_prepared_statements showed 0 generic plans). Hidden, the generic plan is chosen after
# the fifth execution and planning stops.
_UPSERT_WRITES_WHERE = """
INSERT INTO stepgraph_checkpoint_writes (thread_id, checkpoint_ns, checkpoint_id, task_id, idx,
    channel, type, value, task_path, kind)
SELECT %(thread_id)b::bytea, %(checkpoint_ns)b::bytea, %(writes_checkpoint_id)b::bytea, *
FROM unnest((SELECT %(write_task_ids)b::bytea[]), (SELECT %(write_idxs)b::integer[]),
    (SELECT %(write_channels)b::bytea[]), (SELECT %(write_types)b::text[]),
    (SELECT %(write_values)b::bytea[]), (SELECT %(write_task_paths)b::bytea[]),
    (SELECT %(write_kinds)b::smallint[]))
WHERE {condition}
ON CONFLICT (thread_id, checkpoint_ns, checkpoint_id, task_id, idx) DO UPDATE
SET channel = excluded.channel, type = excluded.type, value = excluded.value,
    task_path = excluded.task_path, kind = excluded.kind
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
# The same lock keeps a checkpoint blob stored as changes to its parent's (``chain_start`` set)
# readable: prune deletes the parent only after the step committed, and then rewrites the
# step's row whole (``storage.unchained``).
_PUT_STEP_TEMPLATE = """
WITH {fence}parent AS (
    SELECT FROM stepgraph_checkpoints
    WHERE thread_id = %(thread_id)b::bytea AND checkpoint_ns = %(checkpoint_ns)b::bytea
        AND checkpoint_id = %(parent_checkpoint_id)b::bytea
    FOR KEY SHARE
), saving AS (
    SELECT {fence_if}(NOT %(require_parent)b::boolean OR %(parent_checkpoint_id)b::bytea IS NULL
        OR EXISTS (SELECT FROM parent)){fence_end} AS ok
), checkpoint AS (
    INSERT INTO stepgraph_checkpoints (thread_id, checkpoint_ns, checkpoint_id,
        parent_checkpoint_id, ts, run_id, checkpoint_type, checkpoint, metadata_type, metadata,
        metadata_json, chain_start)
    SELECT %(thread_id)b::bytea, %(checkpoint_ns)b::bytea, %(checkpoint_id)b::bytea,
        %(parent_checkpoint_id)b::bytea, %(ts)b::text, %(run_id)b::bytea,
        %(checkpoint_type)b::text, %(checkpoint)b::bytea, %(metadata_type)b::text,
        %(metadata)b::bytea, %(metadata_json)b::jsonb, %(chain_start)b::bytea
    FROM saving WHERE ok
    ON CONFLICT (thread_id, checkpoint_ns, checkpoint_id) DO UPDATE
    SET parent_checkpoint_id = excluded.parent_checkpoint_id, ts = excluded.ts,
        run_id = excluded.run_id, checkpoint_type = excluded.checkpoint_type,
        checkpoint = excluded.checkpoint, metadata_type = excluded.metadata_type,
        metadata = excluded.metadata, metadata_json = excluded.metadata_json,
        chain_start = excluded.chain_start
), channel_values AS (
    INSERT INTO stepgraph_checkpoint_values (thread_id, checkpoint_ns, channel, version, type,
        value, kind, base_version, chain_start)
    SELECT %(thread_id)b::bytea, %(checkpoint_ns)b::bytea, k.*, (
        SELECT coalesce(b.chain_start, b.version) FROM stepgraph_checkpoint_values AS b
        WHERE b.thread_id = %(thread_id)b::bytea AND b.checkpoint_ns = %(checkpoint_ns)b::bytea
            AND b.channel = k.channel AND b.version = k.base_version)
    FROM unnest((SELECT %(value_channels)b::bytea[]), (SELECT %(value_versions)b::bytea[]),
        (SELECT %(value_types)b::text[]), (SELECT %(value_values)b::bytea[]),
        (SELECT %(value_kinds)b::smallint[]), (SELECT %(value_bases)b::bytea[]))
        AS k (channel, version, type, value, kind, base_version)
    WHERE (SELECT ok FROM saving)
    ON CONFLICT DO NOTHING
), writes AS ({writes}){release}
SELECT saving.ok{fence_columns} FROM saving{fence_from}
"""
_STEP_WRITES = _UPSERT_WRITES_WHERE.format(condition="(SELECT ok FROM saving)")
_FENCE_PARTS = ("fence", "fence_if", "fence_end", "fence_columns", "fence_from")
_PUT_STEP_PARTS = {**dict.fromkeys(_FENCE_PARTS, ""), "writes": _STEP_WRITES}
_PUT_STEP = _PUT_STEP_TEMPLATE.format(**_PUT_STEP_PARTS, release="")

# Lease times are the database's clock (unix seconds): workers on many hosts share one server,
# and their own clocks may disagree.
_NOW = "extract(epoch FROM clock_timestamp())::double precision"

# A write carrying a lease epoch (``base.runs.fence_of``) is fenced inside its own statement:
# ``fence`` locks the thread's run-registry row FOR SHARE, which a take-over or a delete (they
# UPDATE the row) must wait for until the write commits, so the new holder then reads it; and a
# write that comes second reads the row's newest version (READ COMMITTED re-reads a locked row
# that changed) and is refused. The check comes before anything else is locked or written
# (a CASE, and the writes depend on it), and the statement returns the row's epoch and status
# for ``storage.runs.check_fence`` to word the refusal. Unfenced writes use statements without
# any of this.
_FENCE = """
fence AS MATERIALIZED (
    SELECT epoch, status FROM stepgraph_thread_runs WHERE thread_id = %(thread_id)b::bytea
    FOR SHARE
), fenced AS (
    SELECT coalesce(f.epoch = %(fence)b::bigint AND f.status <> 'deleted', false) AS ok,
        f.epoch, f.status
    FROM (SELECT) AS one LEFT JOIN fence AS f ON TRUE
), """
_FENCED_PUT_STEP_PARTS = {
    "fence": _FENCE,
    # CASE: the parent is looked at (and locked) only once the fence let the write through.
    "fence_if": "CASE WHEN (SELECT ok FROM fenced) THEN ",
    "fence_end": " ELSE false END",
    # ``landed``: refused, yet this very checkpoint row is stored, byte for byte: an earlier
    # attempt of this statement stored it (with its writes and release: one statement), its
    # reply was lost with the connection, the pool ran it again, and meanwhile another run
    # took the thread (at once, if that attempt let go of the lease). The save happened; the
    # retry must not report it lost. (A caller saving a stored checkpoint again, the same
    # bytes but other writes, under a lost lease would be let through as well: the executor
    # never does, its checkpoint ids are new.)
    "fence_columns": """, CASE WHEN (SELECT ok FROM fenced) THEN false ELSE EXISTS (
        SELECT FROM stepgraph_checkpoints
        WHERE thread_id = %(thread_id)b::bytea AND checkpoint_ns = %(checkpoint_ns)b::bytea
            AND checkpoint_id = %(checkpoint_id)b::bytea
            AND checkpoint = %(checkpoint)b::bytea AND metadata = %(metadata)b::bytea
            AND metadata_json = %(metadata_json)b::jsonb
            AND parent_checkpoint_id IS NOT DISTINCT FROM %(parent_checkpoint_id)b::bytea
            AND ts = %(ts)b::text) END AS landed,
        fenced.ok, fenced.epoch, fenced.status""",
    "fence_from": ", fenced",
    "writes": _STEP_WRITES,
}
_FENCED_PUT_STEP = _PUT_STEP_TEMPLATE.format(**_FENCED_PUT_STEP_PARTS, release="")
# The run's last step lets go of its lease in the same statement (``put_step_and_release``),
# as ``_RELEASE`` below does, and only if the step was saved.
_RELEASE_IF_SAVED = f"""
, released AS (
    UPDATE stepgraph_thread_runs
    SET expires_at = NULL, status = %(release_status)b::text, updated_at = {_NOW},
        error = NULL, input_type = NULL, input_blob = NULL
    WHERE thread_id = %(thread_id)b::bytea AND epoch = %(release_epoch)b::bigint
        AND owner = %(release_owner)b::bytea AND (SELECT ok FROM saving)
)"""
_PUT_STEP_AND_RELEASE = _PUT_STEP_TEMPLATE.format(**_PUT_STEP_PARTS, release=_RELEASE_IF_SAVED)
_FENCED_PUT_STEP_AND_RELEASE = _PUT_STEP_TEMPLATE.format(
    **_FENCED_PUT_STEP_PARTS, release=_RELEASE_IF_SAVED
)
_FENCED_UPSERT_WRITES = f"""
WITH {_FENCE}writes AS ({_UPSERT_WRITES_WHERE.format(condition="(SELECT ok FROM fenced)")})
SELECT ok, epoch, status FROM fenced
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
        "write_task_ids": ByteaArray([encode(row.task_id) for row in rows]),
        "write_idxs": Int4Array([row.idx for row in rows]),
        "write_channels": ByteaArray([encode(row.channel) for row in rows]),
        "write_types": TextArray([row.type for row in rows]),
        "write_values": ByteaArray([row.value for row in rows]),
        "write_task_paths": ByteaArray([encode(row.task_path) for row in rows]),
        "write_kinds": Int2Array([row.kind for row in rows]),
    }


# ``checkpoint_rows`` as this backend stores them.
_rows = functools.partial(checkpoint_rows, deltas=True, inline=True)


def put_step(
    serde: SerializerProtocol,
    config: RunnableConfig,
    writes: Sequence[TaskWrites],
    checkpoint: Checkpoint,
    metadata: CheckpointMetadata,
    new_versions: ChannelVersions,
    heads: ChainHeads,
    release: tuple[Lease, RunStatus] | None = None,
) -> Callable[[], Plan[RunnableConfig]]:
    """The plan of ``put_step`` (and, with no writes, ``put``), returning the config of the
    saved checkpoint. Run with ``Scope.STATEMENT``: one statement, unless the parent checkpoint
    is gone (then a second one saves a self-contained checkpoint). Everything is serialized
    here, before any connection is taken. A fenced write (``fence_of(config)``) raises
    ``LeaseLostError`` and writes nothing when its lease was lost. ``heads`` learns of the
    checkpoint once its statement succeeded. With ``release``, the statement that saves the
    step also lets go of the lease."""
    step = Step(writes, checkpoint, metadata, new_versions)
    return _put_chain(serde, config, [step], heads, release)


def put_steps(
    serde: SerializerProtocol,
    config: RunnableConfig,
    steps: Sequence[Step],
    heads: ChainHeads,
    release: tuple[Lease, RunStatus] | None = None,
) -> Callable[[], Plan[RunnableConfig]]:
    """The plan of ``put_steps``: ``put_step``'s statement for each step, each sent ahead of
    the one before in one pipeline, so the chain costs one round trip and is one (implicit)
    transaction: the server commits at the pipeline's one Sync. Run with ``Scope.STATEMENT``.
    With ``release``, the last statement lets go of the lease, as ``put_step``'s does."""
    return _put_chain(serde, config, steps, heads, release)


def _put_chain(
    serde: SerializerProtocol,
    config: RunnableConfig,
    steps: Sequence[Step],
    heads: ChainHeads,
    release: tuple[Lease, RunStatus] | None,
) -> Callable[[], Plan[RunnableConfig]]:
    rows = functools.partial(_rows, serde, heads=heads)
    chain = chain_rows(rows, config, steps)
    # Text now: the statements may run later, and the caller may change its metadata.
    shadows = [metadata_json_text(made.metadata) for made in chain]
    fence = fence_of(config)
    last = len(chain) - 1

    def statements(made: list[CheckpointRows], first: int, whole: bool) -> list[Statement]:
        """The statements of steps ``first`` on (their rows ``made``), each sent ahead of the
        one before; with ``whole``, the first stored whatever its parent's state."""
        built = [
            _put_statement(
                rows_of,
                shadows[first + index],
                fence,
                release if first + index == last else None,
                require_parent=index > 0 or not whole,
            )
            for index, rows_of in enumerate(made)
        ]
        for index in range(len(built) - 2, -1, -1):
            built[index] = replace(built[index], ahead=built[index + 1])
        return built

    row = chain[-1].checkpoint
    config_of_saved = checkpoint_config(row.thread_id, row.checkpoint_ns, row.checkpoint_id)
    first_statements = statements(chain, 0, False)

    # Inside a caller's transaction, heads learns of a row before the caller commits: harmless,
    # since a row of changes is only stored while its parent's row exists (require_parent), so
    # a step after a rollback finds its parent gone and is stored whole.
    def plan() -> Plan[RunnableConfig]:
        made, sent, done = chain, first_statements, 0
        while True:
            for index, statement in enumerate(sent):
                saved = yield statement
                if fence is not None and saved[0][1]:  # landed (see _FENCED_PUT_STEP_PARTS)
                    continue  # its rows may be another attempt's: heads does not learn them
                _check_fence(row.thread_id, fence, saved[0])
                if not saved[0][0]:
                    break
                heads.saved(made[index], serde)
            else:
                return config_of_saved
            if index == 0 and made is not chain:
                raise AssertionError("a step stored whole was refused")
            # Step ``done + index`` found its parent gone (pruned meanwhile: its unchanged
            # channels' rows may be too): it and the steps after it again, it stored whole. (In
            # one transaction only the first step can: the later ones' parents are in it.)
            done += index
            parent = config if done == 0 else child_config(config, steps[done - 1].checkpoint["id"])
            made = chain_rows(rows, parent, steps[done:], self_contained=True)
            sent = statements(made, done, True)

    return plan


def _check_fence(thread_id: str, fence: int | None, result: Sequence[Any]) -> None:
    """Raise ``LeaseLostError`` if a fenced statement's result says it was refused."""
    if fence is not None and not result[-3]:  # ..., fenced.ok, fenced.epoch, fenced.status
        epoch, status = result[-2:]
        runs.check_fence(thread_id, fence, None if status is None else (epoch, status))
        raise AssertionError("a fenced write was refused that check_fence lets through")


def _put_statement(
    rows: CheckpointRows,
    shadow: str,
    fence: int | None,
    release: tuple[Lease, RunStatus] | None,
    *,
    require_parent: bool,
) -> Statement:
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
        chain_start=_encode_optional(row.chain_start),
        value_channels=ByteaArray([encode(value.channel) for value in rows.values]),
        value_versions=ByteaArray([encode(value.version) for value in rows.values]),
        value_types=TextArray([value.type for value in rows.values]),
        value_values=ByteaArray([value.value for value in rows.values]),
        value_kinds=Int2Array([value.kind for value in rows.values]),
        value_bases=ByteaArray([_encode_optional(value.base_version) for value in rows.values]),
    )
    if release is not None:
        lease, status = release
        params.update(
            release_status=status, release_epoch=lease.epoch, release_owner=encode(lease.owner)
        )
    if fence is None:
        return Statement(
            _PUT_STEP if release is None else _PUT_STEP_AND_RELEASE, params, fetch=True
        )
    params["fence"] = fence
    sql = _FENCED_PUT_STEP if release is None else _FENCED_PUT_STEP_AND_RELEASE
    return Statement(sql, params, fetch=True)


def put_writes(
    serde: SerializerProtocol, config: RunnableConfig, tasks: Sequence[TaskWrites]
) -> Callable[[], Plan[None]] | None:
    """The plan of ``put_writes`` (one task) or ``put_writes_batch`` (several): one statement,
    serialized here; None if there is nothing to write. Run with ``Scope.STATEMENT``."""
    rows = task_write_rows(serde, config, tasks)
    if not rows:
        return None
    thread_id = get_thread_id(config)
    params = _writes_params(thread_id, get_checkpoint_ns(config), get_checkpoint_id(config), rows)
    fence = fence_of(config)
    if fence is None:
        return functools.partial(execute, Statement(_UPSERT_WRITES, params))
    params["fence"] = fence
    statement = Statement(_FENCED_UPSERT_WRITES, params, fetch=True)

    def plan() -> Plan[None]:
        result = yield statement
        _check_fence(thread_id, fence, result[0])

    return plan


def execute(statement: Statement) -> Plan[None]:
    """A plan of one prepared statement; run with ``Scope.STATEMENT``."""
    yield statement


def _encode_optional(text: str | None) -> bytes | None:
    return None if text is None else encode(text)


# -- reading ----------------------------------------------------------------------------------

_CHECKPOINT_COLUMNS = (
    "thread_id, checkpoint_ns, checkpoint_id, parent_checkpoint_id, ts, run_id,"
    " checkpoint_type, checkpoint, metadata_type, metadata, chain_start"
)


def _with_chains(page: str) -> str:
    """``page`` (a SELECT of checkpoint rows, in order) followed, in the same statement, by
    the rows its rows of changes are read with.

    That is ``storage.chain_spans`` in SQL: per chain of the page, the ids from its
    ``chain_start`` up to the newest page row in it, one primary-key range read each, so a
    page of rows of changes costs no extra round trip, and a page of whole rows nothing at
    all. Page rows are not sent twice, and chain rows only for their blobs (no metadata). The
    first column tells the two apart; the page's rows keep their order.

    The ORDER BY keeps the LATERAL subquery from being flattened into a join, which a generic
    plan (it cannot see how few spans a page has) turned into a hash join over a scan of the
    whole table. NOT IN is hashed, so dropping the page's own rows stays linear in the page
    (up to 1024 rows).

    The last parameter names a checkpoint whose whole blob the reader keeps (or is NULL): its
    chain is not read."""
    return f"""
WITH page AS MATERIALIZED ({page}), spans AS (
    SELECT thread_id, checkpoint_ns, chain_start AS low,
        (array_agg(checkpoint_id ORDER BY checkpoint_id DESC))[1] AS high  -- no max() for bytea
    FROM page WHERE chain_start IS NOT NULL AND checkpoint_id IS DISTINCT FROM %b::bytea
    GROUP BY 1, 2, 3
)
SELECT false AS chain, * FROM page
UNION ALL
SELECT true, s.thread_id, s.checkpoint_ns, c.checkpoint_id, c.parent_checkpoint_id, c.ts,
    c.run_id, c.checkpoint_type, c.checkpoint, '', ''::bytea, c.chain_start
FROM spans AS s CROSS JOIN LATERAL (
    SELECT checkpoint_id, parent_checkpoint_id, ts, run_id, checkpoint_type, checkpoint,
        chain_start
    FROM stepgraph_checkpoints
    WHERE thread_id = s.thread_id AND checkpoint_ns = s.checkpoint_ns
        AND checkpoint_id >= s.low AND checkpoint_id < s.high
    ORDER BY checkpoint_id
) AS c
WHERE (s.thread_id, s.checkpoint_ns, c.checkpoint_id)
    NOT IN (SELECT thread_id, checkpoint_ns, checkpoint_id FROM page)
ORDER BY chain, checkpoint_id DESC, thread_id DESC, checkpoint_ns DESC
"""


_SELECT_CHECKPOINTS = _with_chains(f"""
SELECT {_CHECKPOINT_COLUMNS} FROM stepgraph_checkpoints
WHERE {{where}}
ORDER BY checkpoint_id DESC, thread_id DESC, checkpoint_ns DESC
LIMIT %b
""")
# A thread's checkpoints across its namespaces, newest first: each namespace's newest rows (a
# primary-key range read each, found by a skip scan over the thread's namespaces), merged.
# Sorting all of the thread's rows instead would make the newest page of a long thread cost
# as much as the thread is long.
_SELECT_THREAD_CHECKPOINTS = _with_chains(f"""
WITH RECURSIVE ns (name) AS (
    (SELECT checkpoint_ns FROM stepgraph_checkpoints WHERE thread_id = %b
        ORDER BY checkpoint_ns LIMIT 1)
    UNION ALL
    SELECT (SELECT c.checkpoint_ns FROM stepgraph_checkpoints AS c
        WHERE c.thread_id = %b AND c.checkpoint_ns > ns.name ORDER BY c.checkpoint_ns LIMIT 1)
    FROM ns WHERE ns.name IS NOT NULL
)
SELECT {_CHECKPOINT_COLUMNS} FROM ns CROSS JOIN LATERAL (
    SELECT {_CHECKPOINT_COLUMNS} FROM stepgraph_checkpoints
    WHERE checkpoint_ns = ns.name AND {{where}}
    ORDER BY checkpoint_id DESC
    LIMIT %b
) AS c
ORDER BY checkpoint_id DESC, thread_id DESC, checkpoint_ns DESC
LIMIT %b
""")
# The value rows and pending writes of a page of checkpoints, in one statement: each key list
# arrives as arrays, and every key is one primary-key probe. A value key names a span of
# versions of its channel: the version alone for a whole value, ``chain_start`` up to it for
# appended items, so the rows that make up a value come in the same round trip, as one
# primary-key range (spans that start alike are merged). A span may hold rows of forked
# branches too: ``storage.load_tuple`` follows base versions and ignores them. The first
# column tells the two kinds of row apart; columns line up by type.
# As in the step statement, each array is wrapped in a scalar subquery, so every execution has
# the same estimates and the generic plan is kept (planning the statement afresh cost ~0.3 ms
# a read). Every probe is a LATERAL subquery with an ORDER BY, which keeps it from being
# flattened into a join: a generic plan cannot see how few keys there are, and joined, it
# hashed the keys and scanned the whole table.
_SELECT_VALUES_AND_WRITES = """
WITH spans AS (
    SELECT k.thread_id, k.checkpoint_ns, k.channel,
        coalesce(v.chain_start, v.version) AS low,
        (array_agg(v.version ORDER BY v.version DESC))[1] AS high  -- no max() for bytea
    FROM unnest((SELECT %b::bytea[]), (SELECT %b::bytea[]), (SELECT %b::bytea[]),
        (SELECT %b::bytea[])) AS k (thread_id, checkpoint_ns, channel, version)
    CROSS JOIN LATERAL (
        SELECT version, chain_start FROM stepgraph_checkpoint_values
        WHERE thread_id = k.thread_id AND checkpoint_ns = k.checkpoint_ns
            AND channel = k.channel AND version = k.version
        ORDER BY version
    ) AS v
    GROUP BY 1, 2, 3, 4
)
SELECT 0, s.thread_id, s.checkpoint_ns, s.channel, v.version, v.type, v.value,
    v.kind::integer, v.base_version, NULL::bytea, NULL::smallint
FROM spans AS s CROSS JOIN LATERAL (
    SELECT version, type, value, kind, base_version FROM stepgraph_checkpoint_values
    WHERE thread_id = s.thread_id AND checkpoint_ns = s.checkpoint_ns
        AND channel = s.channel AND version BETWEEN s.low AND s.high
    ORDER BY version
) AS v
UNION ALL
SELECT 1, k.thread_id, k.checkpoint_ns, k.checkpoint_id, w.task_id, w.type, w.value, w.idx,
    w.channel, w.task_path, w.kind
FROM unnest((SELECT %b::bytea[]), (SELECT %b::bytea[]), (SELECT %b::bytea[]))
    AS k (thread_id, checkpoint_ns, checkpoint_id)
CROSS JOIN LATERAL (
    SELECT task_id, type, value, idx, channel, task_path, kind FROM stepgraph_checkpoint_writes
    WHERE thread_id = k.thread_id AND checkpoint_ns = k.checkpoint_ns
        AND checkpoint_id = k.checkpoint_id
    ORDER BY task_id, idx
) AS w
"""


def _checkpoint_row(fields: Sequence[Any]) -> CheckpointRow:
    thread_id, ns, checkpoint_id, parent_id, ts, run_id, ctype, blob, mtype, meta, start = fields
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
        _decode_optional(start),
    )


RelatedKeys = tuple[list[tuple[str, str, str, str]], list[tuple[str, str, str]]]
"""What ``storage.related_keys`` returns: the keys of value rows and of checkpoints."""


def _select_related(keys: RelatedKeys) -> Statement:
    value_keys, checkpoint_keys = keys
    params = (*_columns(value_keys, 4), *_columns(checkpoint_keys, 3))
    return Statement(_SELECT_VALUES_AND_WRITES, params, fetch=True)


def _load_page(
    serde: SerializerProtocol,
    heads: ChainHeads | None,
    found: Sequence[Sequence[Any]],
    filter: dict[str, Any] | None = None,
    guessed: tuple[RelatedKeys, Statement] | None = None,
    newest: bool = False,
    kept: Mapping[tuple[str, str, str], dict[str, Any]] | None = None,
) -> Plan[tuple[list[CheckpointRow], list[CheckpointTuple]]]:
    """The checkpoint rows SQL ``found`` (newest first, then the rows of their chains: see
    ``_with_chains``) and the tuples of those that match ``filter``, with their value rows and
    writes: one more statement (which rows to fetch is only known once the checkpoints are
    decoded). ``guessed``: keys and the statement sent ahead with the one that found the
    rows; if the keys are right, that statement's rows are used, and the read took one round
    trip; if not, its value rows that the found rows name too are. ``newest``: the one row
    found is its namespace's newest (``heads`` learns what it names). ``kept``: blobs the
    reader holds (``ChainHeads.blob``), whose chains SQL did not read."""
    rows: list[CheckpointRow] = []
    chains: list[CheckpointRow] = []
    for chain, *fields in found:
        (chains if chain else rows).append(_checkpoint_row(fields))
    candidates = page_candidates(serde, rows, filter, chains, heads, kept)
    if not candidates:
        return rows, []
    keys = related_keys(candidates)
    if heads is not None and newest:
        stored = [(channel, version) for _, _, channel, version in keys[0]]
        heads.seen_newest(*rows[0][:3], stored)
    if guessed is None:
        related = yield _select_related(keys)
    elif _same_keys(keys, guessed[0]):
        related = yield guessed[1]
    else:  # value rows never change: those the found rows name too need no second fetch
        fetched = yield guessed[1]  # already here
        had = set(guessed[0][0])
        missing = [key for key in keys[0] if key not in had]
        related = [row for row in fetched if row[0] == 0]
        related += yield _select_related((missing, keys[1]))
    values: list[ValueRow] = []
    writes: list[WriteRow] = []
    for part, thread_id, ns, c3, c4, type_, value, number, c8, c9, kind in related:
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
                    kind,
                )
            )
    return rows, list(assemble_page(serde, candidates, values, writes))


def _same_keys(keys: RelatedKeys, guessed: RelatedKeys) -> bool:
    return keys[1] == guessed[1] and set(keys[0]) == set(guessed[0])


def _columns(keys: Iterable[Sequence[str]], width: int) -> list[ByteaArray]:
    """Keys (tuples of strings) as one array of encoded identifiers per column."""
    columns = [ByteaArray() for _ in range(width)]
    for key in keys:
        for column, part in zip(columns, key, strict=True):
            column.append(encode(part))
    return columns


def get_tuple(
    serde: SerializerProtocol, config: RunnableConfig, heads: ChainHeads | None = None
) -> Plan[CheckpointTuple | None]:
    """Run with ``Scope.STATEMENT``. When ``heads`` knows which checkpoint the read will
    likely find and the value rows it names (``ChainHeads.guess``), those rows and its writes
    are asked for in the same round trip as the checkpoint row."""
    thread_id, checkpoint_ns = get_thread_id(config), get_checkpoint_ns(config)
    where = "thread_id = %b AND checkpoint_ns = %b"
    params: list[Any] = [encode(thread_id), encode(checkpoint_ns)]
    if checkpoint_id := get_checkpoint_id(config):
        where += " AND checkpoint_id = %b"
        params.append(encode(checkpoint_id))
    guessed = None
    kept: dict[tuple[str, str, str], dict[str, Any]] = {}
    if heads is not None and (guess := heads.guess(thread_id, checkpoint_ns, checkpoint_id)):
        guessed_id, stored = guess
        key = (thread_id, checkpoint_ns, guessed_id)
        keys: RelatedKeys = ([(*key[:2], channel, version) for channel, version in stored], [key])
        guessed = (keys, _select_related(keys))
        if (blob := heads.blob(key)) is not None:
            kept[key] = blob
    rows = yield Statement(
        _SELECT_CHECKPOINTS.format(where=where),
        (*params, 1, encode(guessed_id) if kept else None),  # a kept blob's chain is not read
        fetch=True,
        ahead=guessed[1] if guessed else None,
    )
    _, found = yield from _load_page(
        serde, heads, rows, guessed=guessed, newest=not checkpoint_id, kept=kept
    )
    return found[0] if found else None


# -- list -------------------------------------------------------------------------------------


def list_page(
    serde: SerializerProtocol, query: PageQuery, heads: ChainHeads | None = None
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
    if query.thread_id is not None and query.checkpoint_ns is None:
        thread = encode(query.thread_id)
        sql = _SELECT_THREAD_CHECKPOINTS.format(where=where)
        params = [thread, thread, *params, query.size, query.size, None]
        found = yield Statement(sql, params, fetch=True)
    else:
        sql = _SELECT_CHECKPOINTS.format(where=where)
        found = yield Statement(sql, (*params, query.size, None), fetch=True)
    return (yield from _load_page(serde, heads, found, query.filter))


# -- thread management ------------------------------------------------------------------------

# Returns how many checkpoint rows it deleted. An unfenced step in flight holds its parent's
# row FOR KEY SHARE: the DELETE waits for it, but the step's new rows committed after the
# DELETE's snapshot and survive it, a row of changes without its parent. So the plan deletes
# again, in a new snapshot (READ COMMITTED), until nothing is left: a step that comes later
# finds its parent deleted (it waits for this transaction first) and stores itself whole.
_DELETE_THREADS = """
WITH checkpoints AS (
    DELETE FROM stepgraph_checkpoints WHERE thread_id = ANY(%(thread_ids)b::bytea[])
    RETURNING 1
), checkpoint_values AS (
    DELETE FROM stepgraph_checkpoint_values WHERE thread_id = ANY(%(thread_ids)b::bytea[])
), writes AS (
    DELETE FROM stepgraph_checkpoint_writes WHERE thread_id = ANY(%(thread_ids)b::bytea[])
)
SELECT count(*) FROM checkpoints
"""


# ``delete_thread`` leaves a tombstone (``storage.runs.deleted``): the epoch moves on, so a run
# still writing to the thread is refused. The tombstones come first, in a statement of their
# own: writing them waits for fenced writes in flight (they hold the row FOR SHARE), and the
# DELETE, a later statement, then sees (and deletes) what those committed. Rows are locked in
# thread_id order, so concurrent deletes of overlapping threads cannot deadlock.
_TOMBSTONE_SET = """
epoch = r.epoch + 1, owner = NULL, expires_at = NULL, status = 'deleted', attempts = 0,
    updated_at = excluded.updated_at, error = NULL, input_type = NULL, input_blob = NULL,
    head = NULL
"""
_TOMBSTONES = f"""
INSERT INTO stepgraph_thread_runs AS r (thread_id, epoch, owner, expires_at, status, attempts,
    updated_at)
SELECT t.thread_id, 1, NULL, NULL, 'deleted', 0, {_NOW}
FROM unnest(%(thread_ids)b::bytea[]) AS t (thread_id)
ORDER BY t.thread_id
ON CONFLICT (thread_id) DO UPDATE SET {_TOMBSTONE_SET}
"""


def delete_threads(thread_ids: Iterable[str]) -> Plan[None]:
    """Three statements, or more while steps in flight keep committing rows; run with
    ``Scope.TRANSACTION``."""
    threads = [encode(thread_id) for thread_id in id_list(thread_ids, "thread_ids")]
    if not threads:
        return
    yield Statement(_TOMBSTONES, {"thread_ids": threads})
    delete = Statement(_DELETE_THREADS, {"thread_ids": threads}, fetch=True)
    while (yield delete)[0][0]:
        pass


# Nothing in the stored bytes names the thread, so copying is re-keying rows in SQL. One
# statement: atomic, and all three tables read at one snapshot. Existing rows of the target
# are replaced, as SQLite's INSERT OR REPLACE does.
_COPY_THREAD = """
WITH checkpoints AS (
    INSERT INTO stepgraph_checkpoints (thread_id, checkpoint_ns, checkpoint_id,
        parent_checkpoint_id, ts, run_id, checkpoint_type, checkpoint, metadata_type, metadata,
        metadata_json, chain_start)
    SELECT %(target)b::bytea, checkpoint_ns, checkpoint_id, parent_checkpoint_id, ts, run_id,
        checkpoint_type, checkpoint, metadata_type, metadata, metadata_json, chain_start
    FROM stepgraph_checkpoints WHERE thread_id = %(source)b::bytea
    ON CONFLICT (thread_id, checkpoint_ns, checkpoint_id) DO UPDATE
    SET parent_checkpoint_id = excluded.parent_checkpoint_id, ts = excluded.ts,
        run_id = excluded.run_id, checkpoint_type = excluded.checkpoint_type,
        checkpoint = excluded.checkpoint, metadata_type = excluded.metadata_type,
        metadata = excluded.metadata, metadata_json = excluded.metadata_json,
        chain_start = excluded.chain_start
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
    channel, type, value, task_path, kind)
SELECT %(target)b::bytea, checkpoint_ns, checkpoint_id, task_id, idx, channel, type, value,
    task_path, kind
FROM stepgraph_checkpoint_writes WHERE thread_id = %(source)b::bytea
ON CONFLICT (thread_id, checkpoint_ns, checkpoint_id, task_id, idx) DO UPDATE
SET channel = excluded.channel, type = excluded.type, value = excluded.value,
    task_path = excluded.task_path, kind = excluded.kind
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
# The rows of changes whose chain a deletion cut, rewritten whole (``storage.unchained``).
_UNCHAIN = """
UPDATE stepgraph_checkpoints AS c
SET checkpoint_type = k.checkpoint_type, checkpoint = k.checkpoint, chain_start = NULL
FROM unnest(%b::bytea[], %b::bytea[], %b::bytea[], %b::text[], %b::bytea[])
    AS k (thread_id, checkpoint_ns, checkpoint_id, checkpoint_type, checkpoint)
WHERE (c.thread_id, c.checkpoint_ns, c.checkpoint_id)
    = (k.thread_id, k.checkpoint_ns, k.checkpoint_id)
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
    rows only they needed (``storage.deleted_values``); rewrite whole the remaining rows of
    changes whose chain went with them (``storage.unchained``).

    Run with ``Scope.TRANSACTION`` (or inside the caller's transaction). Only value rows that
    the deleted checkpoints name are candidates, so rows a concurrent ``put`` commits
    meanwhile never are. A ``put_step`` forking from a checkpoint being deleted holds its
    parent FOR KEY SHARE: if it got there first, the DELETE waits for it, and the remaining
    checkpoints, read after the DELETE, include it (at READ COMMITTED); if the DELETE got
    there first, the put waits, finds its parent gone and saves every value. If a checkpoint
    cannot be decoded, the error rolls everything back and nothing is deleted.

    The remaining rows are the ones read after the DELETE for the same reason: a step that
    committed first, as changes to a parent now deleted, is among them and is rewritten whole.
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
    rewritten = [
        row
        for thread_id, rows in deleted.items()
        for row in unchained(serde, kept.get(thread_id, ()), rows)
    ]
    if rewritten:
        thread_keys, nss, checkpoint_ids = _columns((row[:3] for row in rewritten), 3)
        yield Statement(
            _UNCHAIN,
            (
                thread_keys,
                nss,
                checkpoint_ids,
                TextArray([row.checkpoint_type for row in rewritten]),
                ByteaArray([row.checkpoint for row in rewritten]),
            ),
        )
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


def prune(
    serde: SerializerProtocol,
    thread_ids: Sequence[str],
    strategy: PruneStrategy,
    keep_last: int | None,
    older_than: timedelta | None,
) -> Plan[None]:
    """Run with ``Scope.TRANSACTION``."""
    check_prune_strategy(strategy)
    if strategy == "delete":
        return (yield from delete_threads(thread_ids))
    now = datetime.now(UTC)

    def doomed(rows: list[CheckpointRow]) -> set[tuple[str, str]]:
        return prune_doomed(rows, keep_last=keep_last, older_than=older_than, now=now)

    yield from _delete_checkpoints(serde, id_list(thread_ids, "thread_ids"), doomed)


# -- ownership and the run registry -----------------------------------------------------------

_RUN_COLUMNS = (
    "thread_id, epoch, owner, expires_at, status, attempts, updated_at, error, input_type,"
    " input_blob, head"
)
# Taking the lease is one statement, so racing runs serialize on the row (or, for a new thread,
# on its primary key) and exactly one wins. Its rules are ``storage.runs.take_lease``'s: the
# row is free when no live lease holds it; a live lease of the same owner (a retried call,
# after a dropped connection, say) is only extended, with the same epoch; otherwise the epoch
# moves on and ``attempts`` counts on from a run that died still 'running'. In the SET, ``r``
# is the row as it was: still live (``r.expires_at > now``) only if it is the caller's own
# lease, since the WHERE lets no other live row through.
_ACQUIRE = f"""
INSERT INTO stepgraph_thread_runs AS r ({_RUN_COLUMNS})
SELECT %(thread_id)b::bytea, 1, %(owner)b::bytea, clock.now + %(ttl)b::double precision,
    'running', 1, clock.now, NULL, %(input_type)b::text, %(input_blob)b::bytea,
    (SELECT checkpoint_id FROM stepgraph_checkpoints
        WHERE thread_id = %(thread_id)b::bytea AND checkpoint_ns = ''::bytea
        ORDER BY checkpoint_id DESC LIMIT 1)
FROM (SELECT {_NOW} AS now) AS clock
-- Recovery takes over an existing row (the ON CONFLICT branch) or nothing.
WHERE (%(expect)b::bigint IS NULL
        OR EXISTS (SELECT FROM stepgraph_thread_runs WHERE thread_id = %(thread_id)b::bytea))
    -- Another run holds the thread: propose nothing, so no conflict locks the holder's row
    -- (a run's start reads the thread in the same transaction; the holder's renewals and
    -- saves must not wait for that). A lease taken after this snapshot is still refused by
    -- the WHERE below, once the conflict's lock is granted.
    AND NOT EXISTS (SELECT FROM stepgraph_thread_runs
        WHERE thread_id = %(thread_id)b::bytea AND expires_at > clock.now
            AND owner <> %(owner)b::bytea)
ON CONFLICT (thread_id) DO UPDATE SET
    epoch = CASE WHEN r.expires_at > excluded.updated_at THEN r.epoch ELSE r.epoch + 1 END,
    owner = excluded.owner,
    expires_at = excluded.expires_at,
    status = CASE WHEN r.expires_at > excluded.updated_at THEN r.status ELSE 'running' END,
    attempts = CASE WHEN r.expires_at > excluded.updated_at THEN r.attempts
        WHEN r.status = 'running' THEN r.attempts + 1 ELSE 1 END,
    updated_at = excluded.updated_at,
    error = CASE WHEN r.expires_at > excluded.updated_at THEN r.error END,
    input_type = CASE WHEN r.expires_at > excluded.updated_at THEN r.input_type
        ELSE excluded.input_type END,
    input_blob = CASE WHEN r.expires_at > excluded.updated_at THEN r.input_blob
        ELSE excluded.input_blob END,
    head = CASE WHEN r.expires_at > excluded.updated_at THEN r.head ELSE excluded.head END
WHERE (r.expires_at > excluded.updated_at AND r.owner = excluded.owner)  -- a retried call
    OR CASE WHEN %(expect)b::bigint IS NULL
        THEN r.expires_at IS NULL OR r.expires_at <= excluded.updated_at
        -- recovery: only from the dead run it listed (storage.runs.take_lease)
        ELSE r.epoch = %(expect)b::bigint AND r.status = 'running'
            AND (r.expires_at IS NULL OR r.expires_at <= excluded.updated_at) END
RETURNING r.epoch, r.expires_at, r.attempts
"""
_HOLDER = f"""
SELECT owner, expires_at, {_NOW} FROM stepgraph_thread_runs WHERE thread_id = %b::bytea
"""
_RENEW = f"""
UPDATE stepgraph_thread_runs AS r
SET expires_at = clock.now + %(ttl)b::double precision, updated_at = clock.now
FROM (SELECT {_NOW} AS now) AS clock
WHERE r.thread_id = %(thread_id)b::bytea AND r.epoch = %(epoch)b::bigint
    AND r.owner = %(owner)b::bytea AND r.expires_at IS NOT NULL AND r.status <> 'deleted'
RETURNING r.epoch, r.expires_at, r.attempts
"""
_RELEASE = f"""
UPDATE stepgraph_thread_runs
SET expires_at = NULL, status = %(status)b::text, updated_at = {_NOW}, error = %(error)b::text,
    input_type = NULL, input_blob = NULL
WHERE thread_id = %(thread_id)b::bytea AND epoch = %(epoch)b::bigint AND owner = %(owner)b::bytea
"""
# Handed back unfinished (storage.runs.released): incomplete again, this take not counted.
_HAND_BACK = f"""
UPDATE stepgraph_thread_runs
SET expires_at = NULL, attempts = greatest(attempts - 1, 1), updated_at = {_NOW}
WHERE thread_id = %(thread_id)b::bytea AND epoch = %(epoch)b::bigint AND owner = %(owner)b::bytea
"""
_GET_RUN = f"SELECT {_RUN_COLUMNS} FROM stepgraph_thread_runs WHERE thread_id = %b::bytea"
# The runs that died: 'running' with the lease run out (``storage.runs.is_incomplete``).
_LIST_INCOMPLETE = f"""
SELECT {_RUN_COLUMNS} FROM stepgraph_thread_runs
WHERE status = 'running' AND (expires_at IS NULL OR expires_at <= (SELECT {_NOW}))
ORDER BY updated_at, thread_id
LIMIT %b::bigint
"""
_BUSY_RETRIES = 5


def _run_row(fields: Sequence[Any]) -> RunRow:
    thread_id, epoch, owner, expires_at, status, attempts, updated_at, error, itype, blob, head = (
        fields
    )
    return RunRow(
        decode(thread_id),
        epoch,
        _decode_optional(owner),
        expires_at,
        status,
        attempts,
        updated_at,
        error,
        itype,
        None if blob is None else bytes(blob),
        _decode_optional(head),
    )


def _text(text: str | None) -> str | None:
    """``text`` as a Postgres ``text`` can hold it (no NUL, no lone surrogates)."""
    if text is None:
        return None
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


def acquire_lease(
    serde: SerializerProtocol,
    thread_id: str,
    owner: str,
    ttl: float,
    input: Any,
    expect_epoch: int | None,
) -> Callable[[], Plan[Lease]]:
    """Run with ``Scope.STATEMENT``: one statement, and one more to name the holder when the
    thread is busy. The input is serialized here, before a connection is taken."""
    thread_id, owner = str(thread_id), str(owner)
    check_key("thread_id", thread_id)
    ttl = runs.check_ttl(ttl)
    input_type, input_blob = runs.encode_input(serde, input)
    params = {
        "thread_id": encode(thread_id),
        "owner": encode(owner),
        "ttl": ttl,
        "input_type": input_type,
        "input_blob": input_blob,
        "expect": expect_epoch,
    }

    def plan() -> Plan[Lease]:
        for _ in range(_BUSY_RETRIES):
            taken = yield Statement(_ACQUIRE, params, fetch=True)
            if taken:
                epoch, expires_at, attempts = taken[0]
                return Lease(thread_id, owner, epoch, expires_at, attempts)
            if expect_epoch is not None:  # the dead run is gone: recovered, or finished
                raise ThreadBusyError(thread_id, None, None)
            found = yield Statement(_HOLDER, (params["thread_id"],), fetch=True)
            if found:
                holder, expires_at, now = found[0]
                if expires_at is not None and expires_at > now:
                    raise ThreadBusyError(thread_id, _decode_optional(holder), expires_at - now)
            # The holder let go between the two statements: try again.
        raise ThreadBusyError(thread_id, None, None)

    return plan


def renew_lease(lease: Lease, ttl: float) -> Plan[Lease]:
    """Run with ``Scope.STATEMENT``: one statement, and one more to say why when it was lost."""
    ttl = runs.check_ttl(ttl)
    thread_key = encode(lease.thread_id)
    params = {
        "thread_id": thread_key,
        "epoch": lease.epoch,
        "owner": encode(lease.owner),
        "ttl": ttl,
    }
    renewed = yield Statement(_RENEW, params, fetch=True)
    if renewed:
        epoch, expires_at, attempts = renewed[0]
        return lease._replace(epoch=epoch, expires_at=expires_at, attempts=attempts)
    found = yield Statement(_GET_RUN, (thread_key,), fetch=True)
    row = _run_row(found[0]) if found else None
    runs.renewed(row, lease, ttl, 0.0)  # raises LeaseLostError with the reason
    raise LeaseLostError(lease.thread_id, "the run no longer holds the thread's lease")


def release_lease(lease: Lease, status: RunStatus, error: str | None) -> Plan[None]:
    """One statement; run with ``Scope.STATEMENT``. A lost lease lets go of nothing."""
    runs.check_release_status(status)
    params = {
        "thread_id": encode(lease.thread_id),
        "epoch": lease.epoch,
        "owner": encode(lease.owner),
        "status": status,
        "error": _text(error),
    }
    if status == "running":
        yield Statement(_HAND_BACK, params)
    else:
        yield Statement(_RELEASE, params)


def get_run(serde: SerializerProtocol, thread_id: str) -> Plan[RunInfo | None]:
    """One statement; run with ``Scope.STATEMENT``."""
    found = yield Statement(_GET_RUN, (encode(str(thread_id)),), fetch=True)
    return runs.run_info(serde, _run_row(found[0])) if found else None


def list_incomplete(serde: SerializerProtocol, limit: int | None) -> Plan[list[RunInfo]]:
    """One statement; run with ``Scope.STATEMENT``."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be at least 0, not {limit}")
    found = yield Statement(_LIST_INCOMPLETE, (limit,), fetch=True)
    return [runs.run_info(serde, _run_row(fields)) for fields in found]


# -- retention --------------------------------------------------------------------------------

# One statement, so the counts are of one snapshot. Bytes are of the serialized columns
# (checkpoint, metadata, values, writes), as every saver counts them: not metadata_json, the
# filter's JSON copy of the metadata, nor index overhead.
_STORAGE_REPORT = """
SELECT c.n, w.n, v.n, (c.size + w.size + v.size)::bigint
FROM (SELECT count(*) AS n,
        coalesce(sum(octet_length(checkpoint) + octet_length(metadata)), 0) AS size
    FROM stepgraph_checkpoints WHERE thread_id = %(thread_id)b::bytea) AS c,
    (SELECT count(*) AS n, coalesce(sum(octet_length(value)), 0) AS size
    FROM stepgraph_checkpoint_writes WHERE thread_id = %(thread_id)b::bytea) AS w,
    (SELECT count(*) AS n, coalesce(sum(octet_length(value)), 0) AS size
    FROM stepgraph_checkpoint_values WHERE thread_id = %(thread_id)b::bytea) AS v
"""


def storage_report(thread_id: str) -> Plan[StorageReport]:
    """One statement; run with ``Scope.STATEMENT``."""
    thread_id = str(thread_id)
    found = yield Statement(_STORAGE_REPORT, {"thread_id": encode(thread_id)}, fetch=True)
    checkpoints, writes, values, size = found[0]
    return StorageReport(thread_id, checkpoints, writes, values, size)


# The idle threads get their tombstones first, as in ``delete_threads``: the ON CONFLICT's
# WHERE sees the newest version of each locked row, so a thread a run took meanwhile is left
# alone, and a run that comes after finds the tombstone. The DELETE, the next statement, then
# also sees what fenced writes in flight committed.
_SWEEP_TOMBSTONES = f"""
WITH clock AS MATERIALIZED (SELECT clock_timestamp() AS at), idle AS (
    SELECT thread_id FROM stepgraph_checkpoints
    GROUP BY thread_id
    HAVING bool_and(stepgraph_ts_before(ts, (SELECT at FROM clock) - %(age)b::interval))
)
INSERT INTO stepgraph_thread_runs AS r (thread_id, epoch, owner, expires_at, status, attempts,
    updated_at)
SELECT idle.thread_id, 1, NULL, NULL, 'deleted', 0,
    extract(epoch FROM clock.at)::double precision
FROM idle, clock
ORDER BY idle.thread_id
ON CONFLICT (thread_id) DO UPDATE SET {_TOMBSTONE_SET}
WHERE r.expires_at IS NULL OR r.expires_at <= excluded.updated_at
RETURNING r.thread_id
"""


def sweep(older_than: timedelta) -> Plan[list[str]]:
    """Run with ``Scope.TRANSACTION``: the tombstones and the deletion commit together."""
    swept = yield Statement(_SWEEP_TOMBSTONES, {"age": older_than}, fetch=True)
    threads = sorted(bytes(thread_id) for (thread_id,) in swept)
    if threads:
        yield Statement(_DELETE_THREADS, {"thread_ids": threads})
    return [decode(thread_id) for thread_id in threads]


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
_AHEAD_CURSOR = "_stepgraph_ahead_cursor"


def cursor_of(conn: Any, ahead: int = 0) -> Any:
    """The saver's cursor on ``conn`` (sync or async): binary, tuple rows, made once; with
    ``ahead`` n, the one for the n-th statement sent ahead in the same pipeline
    (``Statement.ahead``, that statement's own ``ahead``, ...).

    Kept on the connection itself, so it lives and dies with it: a cursor caches how each
    parameter type is adapted, and rebuilding that for every call costs more than the plan's
    own Python work.
    """
    name = f"{_AHEAD_CURSOR}_{ahead}" if ahead else _CURSOR
    cursor = conn.__dict__.get(name)
    if cursor is None or cursor.closed:
        cursor = conn.__dict__[name] = conn.cursor(binary=True, row_factory=tuple_row)
        _arrays.register(cursor.adapters)
    return cursor


def sent_ahead(conn: Any, statement: Statement) -> list[tuple[Statement, Any]]:
    """What ``statement`` sends ahead (its ``ahead``, that one's ``ahead``, ...), in order,
    each with the cursor that will hold its rows."""
    chain: list[tuple[Statement, Any]] = []
    ahead = statement.ahead
    while ahead is not None:
        chain.append((ahead, cursor_of(conn, ahead=len(chain) + 1)))
        ahead = ahead.ahead
    return chain


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
        self, serde: SerializerProtocol, config: RunnableConfig, heads: ChainHeads | None = None
    ) -> Job[CheckpointTuple | None, Scope]:
        return Job(functools.partial(get_tuple, serde, config, heads), Scope.STATEMENT)

    def list_page(
        self, serde: SerializerProtocol, query: PageQuery, heads: ChainHeads | None = None
    ) -> Job[tuple[list[CheckpointRow], list[CheckpointTuple]], Scope]:
        return Job(functools.partial(list_page, serde, query, heads), Scope.STATEMENT)

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
    ) -> Job[RunnableConfig, Scope]:
        step = (config, writes, checkpoint, metadata, new_versions, heads, release)
        return Job(put_step(serde, *step), Scope.STATEMENT)

    def put_steps(
        self,
        serde: SerializerProtocol,
        config: RunnableConfig,
        steps: Sequence[Step],
        heads: ChainHeads,
        release: tuple[Lease, RunStatus] | None = None,
    ) -> Job[RunnableConfig, Scope]:
        return Job(put_steps(serde, config, steps, heads, release), Scope.STATEMENT)

    def put_writes(
        self, serde: SerializerProtocol, config: RunnableConfig, writes: Sequence[TaskWrites]
    ) -> Job[None, Scope] | None:
        plan = put_writes(serde, config, writes)
        return None if plan is None else Job(plan, Scope.STATEMENT)

    def delete_threads(self, thread_ids: Sequence[str]) -> Job[None, Scope]:
        # The tombstones and the deletion commit together: committed apart, a run could take
        # the thread between them and have what it then writes deleted.
        return Job(functools.partial(delete_threads, thread_ids), Scope.TRANSACTION)

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
        return Job(plan, Scope.TRANSACTION)

    # -- ownership and the run registry ----------------------------------------------------

    def acquire_lease(
        self,
        serde: SerializerProtocol,
        thread_id: str,
        owner: str,
        ttl: float,
        input: Any,
        expect_epoch: int | None,
    ) -> Job[Lease, Scope]:
        plan = acquire_lease(serde, thread_id, owner, ttl, input, expect_epoch)
        return Job(plan, Scope.STATEMENT)

    def renew_lease(self, lease: Lease, ttl: float) -> Job[Lease, Scope]:
        return Job(functools.partial(renew_lease, lease, ttl), Scope.STATEMENT)

    def release_lease(self, lease: Lease, status: RunStatus, error: str | None) -> Job[None, Scope]:
        runs.check_release_status(status)
        return Job(functools.partial(release_lease, lease, status, error), Scope.STATEMENT)

    def get_run(self, serde: SerializerProtocol, thread_id: str) -> Job[RunInfo | None, Scope]:
        return Job(functools.partial(get_run, serde, thread_id), Scope.STATEMENT)

    def list_incomplete(
        self, serde: SerializerProtocol, limit: int | None
    ) -> Job[list[RunInfo], Scope]:
        return Job(functools.partial(list_incomplete, serde, limit), Scope.STATEMENT)

    # -- retention -------------------------------------------------------------------------

    def storage_report(self, thread_id: str) -> Job[StorageReport, Scope]:
        return Job(functools.partial(storage_report, thread_id), Scope.STATEMENT)

    def sweep(self, older_than: timedelta) -> Job[list[str], Scope]:
        return Job(functools.partial(sweep, older_than), Scope.TRANSACTION)


PLANS = PostgresPlans()
