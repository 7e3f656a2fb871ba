"""Backend-neutral storage logic shared by every checkpoint saver. No I/O happens here.

A checkpoint is stored as three kinds of row (see docs/architecture.md, "Storage model"):

* one ``CheckpointRow``: the checkpoint without its channel values, plus its metadata;
* ``ValueRow``s: one per channel in ``new_versions``, keyed by ``(channel, version)``, so an
  unchanged channel costs nothing per step;
* ``WriteRow``s: the pending writes of the tasks of a step, keyed by ``(task_id, idx)``.

Savers turn ``put``/``put_writes``/``put_step`` arguments into rows with ``checkpoint_rows`` and
``write_rows``, store the rows however their database likes, and turn fetched rows back into a
``CheckpointTuple`` with ``load_checkpoint`` + ``load_tuple``. Rows are named tuples whose fields
are plain ``str``/``int``/``bytes``/``None``, so they can be handed to ``executemany`` as they are.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple, Protocol, TypeVar

from stepgraph.checkpoint.base import (
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
    PendingWrite,
    TaskWrites,
    get_checkpoint_id,
    get_checkpoint_metadata,
    get_checkpoint_ns,
    get_thread_id,
    write_index,
)
from stepgraph.checkpoint.serde.base import SerializerProtocol
from stepgraph.config import RunnableConfig
from stepgraph.errors import SerializationError, UnknownTypeError

__all__ = [
    "CheckpointKey",
    "CheckpointRow",
    "CheckpointRows",
    "CorruptCheckpointError",
    "ValueKey",
    "ValueRow",
    "WriteRow",
    "checkpoint_config",
    "checkpoint_rows",
    "checkpoints_to_keep",
    "load_checkpoint",
    "load_metadata",
    "load_tuple",
    "metadata_matches",
    "referenced_values",
    "rekey",
    "write_rows",
]


class CheckpointRow(NamedTuple):
    """``(thread_id, checkpoint_ns, checkpoint_id)`` -> the checkpoint without channel values.

    ``id`` and ``ts`` live in columns rather than in the blob; ``ts`` (ISO 8601) and ``run_id``
    (from the metadata) are columns so ``prune`` and ``delete_for_runs`` can select without
    deserializing anything.
    """

    thread_id: str
    checkpoint_ns: str
    checkpoint_id: str
    parent_checkpoint_id: str | None
    ts: str
    run_id: str | None
    checkpoint_type: str
    checkpoint: bytes
    metadata_type: str
    metadata: bytes


class ValueRow(NamedTuple):
    """``(thread_id, checkpoint_ns, channel, version)`` -> the channel's value at that version.

    ``type`` and ``value`` are both ``None`` when the channel was empty at that version.
    """

    thread_id: str
    checkpoint_ns: str
    channel: str
    version: str
    type: str | None
    value: bytes | None


class WriteRow(NamedTuple):
    """``(thread_id, checkpoint_ns, checkpoint_id, task_id, idx)`` -> one pending write.

    Store with insert-or-ignore when ``replaces_existing`` is false (repeating ``put_writes``
    must not duplicate), and with upsert when true (special channels replace the earlier write).
    """

    thread_id: str
    checkpoint_ns: str
    checkpoint_id: str
    task_id: str
    idx: int
    channel: str
    type: str
    value: bytes
    task_path: str

    @property
    def replaces_existing(self) -> bool:
        return self.idx < 0


class CheckpointRows(NamedTuple):
    """Everything one ``put`` (or ``put_step``) stores."""

    checkpoint: CheckpointRow
    values: list[ValueRow]
    writes: list[WriteRow]
    """For ``put_step``: the writes of the step's tasks, saved against the parent checkpoint."""


class CheckpointKey(Protocol):
    """What ``checkpoints_to_keep`` needs of a checkpoint; a ``CheckpointRow`` qualifies."""

    @property
    def checkpoint_ns(self) -> str: ...
    @property
    def checkpoint_id(self) -> str: ...
    @property
    def ts(self) -> str: ...


ValueKey = tuple[str, str, str]
"""``(checkpoint_ns, channel, version)``: a value row's key within a thread."""


class CorruptCheckpointError(SerializationError):
    """A stored row cannot be read back: unreadable bytes or a missing value row.

    The message names the thread, namespace, checkpoint and the part (channel) that failed.
    Disallowed types still raise ``UnknownTypeError`` (with the same context), since the fix
    for those is allowing the type, not repairing the data.
    """


# Checkpoint keys kept out of the serialized blob: values have their own rows, id and ts are
# columns of the checkpoint row.
_NOT_IN_BLOB = frozenset({"channel_values", "id", "ts"})


# -- writing ---------------------------------------------------------------------------------


def checkpoint_config(thread_id: str, checkpoint_ns: str, checkpoint_id: str) -> RunnableConfig:
    """The config naming one stored checkpoint (what ``put`` returns)."""
    return {
        "configurable": {
            "thread_id": thread_id,
            "checkpoint_ns": checkpoint_ns,
            "checkpoint_id": checkpoint_id,
        }
    }


def checkpoint_rows(
    serde: SerializerProtocol,
    config: RunnableConfig,
    checkpoint: Checkpoint,
    metadata: CheckpointMetadata,
    new_versions: ChannelVersions,
    writes: Sequence[TaskWrites] = (),
) -> CheckpointRows:
    """The rows of ``put(config, checkpoint, metadata, new_versions)``.

    With ``writes`` (``put_step``), also the rows of those tasks' writes against the parent
    checkpoint named by ``config``. Serializes everything before returning, so a saver that
    stores the result has nothing left to fail on.
    """
    thread_id = get_thread_id(config)
    checkpoint_ns = get_checkpoint_ns(config)
    checkpoint_id = checkpoint["id"]
    where = _Where(thread_id, checkpoint_ns, checkpoint_id)

    blob = {key: value for key, value in checkpoint.items() if key not in _NOT_IN_BLOB}
    checkpoint_type, checkpoint_bytes = where.dumps(serde, blob, "the checkpoint")
    merged = get_checkpoint_metadata(config, metadata)
    metadata_type, metadata_bytes = where.dumps(serde, merged, "the metadata")
    run_id = merged.get("run_id")
    row = CheckpointRow(
        thread_id,
        checkpoint_ns,
        checkpoint_id,
        get_checkpoint_id(config),
        checkpoint["ts"],
        None if run_id is None else str(run_id),
        checkpoint_type,
        checkpoint_bytes,
        metadata_type,
        metadata_bytes,
    )

    channel_values = checkpoint["channel_values"]
    values = []
    for channel, version in new_versions.items():
        if channel in channel_values:
            type_, value = where.dumps(serde, channel_values[channel], f"channel {channel!r}")
            values.append(ValueRow(thread_id, checkpoint_ns, channel, version, type_, value))
        else:
            values.append(ValueRow(thread_id, checkpoint_ns, channel, version, None, None))

    step_writes = [
        write
        for task in writes
        for write in write_rows(serde, config, task.writes, task.task_id, task.task_path)
    ]
    return CheckpointRows(row, values, step_writes)


def write_rows(
    serde: SerializerProtocol,
    config: RunnableConfig,
    writes: Sequence[tuple[str, Any]],
    task_id: str,
    task_path: str = "",
) -> list[WriteRow]:
    """The rows of ``put_writes(config, writes, task_id, task_path)``."""
    thread_id = get_thread_id(config)
    checkpoint_ns = get_checkpoint_ns(config)
    checkpoint_id = get_checkpoint_id(config)
    if not checkpoint_id:
        raise ValueError(
            'Saving writes requires config["configurable"]["checkpoint_id"]: the checkpoint '
            "the writes belong to."
        )
    where = _Where(thread_id, checkpoint_ns, checkpoint_id)
    rows = []
    for idx, (channel, value) in enumerate(writes):
        type_, data = where.dumps(serde, value, f"write to channel {channel!r} of task {task_id!r}")
        rows.append(
            WriteRow(
                thread_id,
                checkpoint_ns,
                checkpoint_id,
                task_id,
                write_index(channel, idx),
                channel,
                type_,
                data,
                task_path,
            )
        )
    return rows


# -- reading ---------------------------------------------------------------------------------


def load_checkpoint(serde: SerializerProtocol, row: CheckpointRow) -> Checkpoint:
    """The checkpoint stored in ``row``, with empty ``channel_values`` (``load_tuple`` fills them).

    Its ``channel_versions`` name the value rows to fetch: ``(channel, version)`` pairs.
    """
    where = _Where.of(row)
    blob = where.loads(serde, (row.checkpoint_type, row.checkpoint), "the checkpoint")
    if not isinstance(blob, dict) or not isinstance(blob.get("channel_versions"), dict):
        raise CorruptCheckpointError(
            where.describe("Cannot read the checkpoint", "not a checkpoint")
        )
    blob["id"] = row.checkpoint_id
    blob["ts"] = row.ts
    blob["channel_values"] = {}
    return blob  # type: ignore[return-value]


def load_metadata(serde: SerializerProtocol, row: CheckpointRow) -> CheckpointMetadata:
    where = _Where.of(row)
    metadata = where.loads(serde, (row.metadata_type, row.metadata), "the metadata")
    if not isinstance(metadata, dict):
        raise CorruptCheckpointError(where.describe("Cannot read the metadata", "not a dict"))
    return metadata  # type: ignore[return-value]


def load_tuple(
    serde: SerializerProtocol,
    row: CheckpointRow,
    checkpoint: Checkpoint,
    values: Iterable[ValueRow],
    writes: Iterable[WriteRow],
    metadata: CheckpointMetadata | None = None,
) -> CheckpointTuple:
    """Assemble the ``CheckpointTuple`` of ``row``.

    ``checkpoint`` comes from ``load_checkpoint(serde, row)`` and gets its values filled in
    from ``values``, the value rows named by its ``channel_versions`` (rows for other versions
    are ignored; a missing one is an error). ``writes`` are the checkpoint's write rows, in any
    order: pending writes come out ordered by task, then index. Pass ``metadata`` if it was
    already loaded (e.g. to apply a ``list`` filter).
    """
    where = _Where.of(row)
    versions = checkpoint["channel_versions"]
    channel_values = checkpoint["channel_values"]
    found: set[str] = set()
    for value_row in values:
        if versions.get(value_row.channel) != value_row.version:
            continue
        found.add(value_row.channel)
        if value_row.type is not None:
            channel_values[value_row.channel] = where.loads(
                serde,
                (value_row.type, value_row.value or b""),
                f"channel {value_row.channel!r}",
            )
    if len(found) != len(versions):
        missing = sorted(versions.keys() - found)
        raise CorruptCheckpointError(
            where.describe(
                f"Cannot read channel {missing[0]!r}",
                f"no stored value for version {versions[missing[0]]!r}"
                + (f" (nor for channels {missing[1:]!r})" if len(missing) > 1 else ""),
            )
        )

    pending_writes: list[PendingWrite] = [
        (
            write.task_id,
            write.channel,
            where.loads(
                serde,
                (write.type, write.value),
                f"write to channel {write.channel!r} of task {write.task_id!r}",
            ),
        )
        for write in sorted(writes, key=_write_order)
    ]
    return CheckpointTuple(
        checkpoint_config(row.thread_id, row.checkpoint_ns, row.checkpoint_id),
        checkpoint,
        load_metadata(serde, row) if metadata is None else metadata,
        checkpoint_config(row.thread_id, row.checkpoint_ns, row.parent_checkpoint_id)
        if row.parent_checkpoint_id
        else None,
        pending_writes,
    )


def _write_order(write: WriteRow) -> tuple[str, int]:
    return write.task_id, write.idx


# -- list filter -----------------------------------------------------------------------------


def metadata_matches(metadata: Mapping[str, Any], filter: Mapping[str, Any] | None) -> bool:
    """Whether stored ``metadata`` satisfies a ``list(filter=...)``.

    Every filter key must be present with a matching value. Matching is containment, as
    Postgres ``jsonb @>``: a dict matches a dict holding at least its keys with matching values,
    a list matches a list holding a match for each of its elements, and scalars must be equal,
    with ``None`` and booleans equal only to themselves (``True`` does not match ``1``).
    """
    if not filter:
        return True
    return all(
        key in metadata and _contains(metadata[key], expected) for key, expected in filter.items()
    )


def _contains(stored: Any, expected: Any) -> bool:
    if isinstance(expected, Mapping):
        return isinstance(stored, Mapping) and all(
            key in stored and _contains(stored[key], value) for key, value in expected.items()
        )
    if isinstance(expected, (list, tuple)):
        return isinstance(stored, (list, tuple)) and all(
            any(_contains(item, wanted) for item in stored) for wanted in expected
        )
    if expected is None or isinstance(expected, bool) or isinstance(stored, bool):
        return stored is expected
    if isinstance(stored, (Mapping, list, tuple)):
        return False
    return bool(stored == expected)


# -- prune, delete_for_runs, copy_thread -----------------------------------------------------


def checkpoints_to_keep(
    checkpoints: Iterable[CheckpointKey],
    *,
    keep_last: int | None = None,
    older_than: timedelta | None = None,
    now: datetime | None = None,
) -> set[tuple[str, str]]:
    """``(checkpoint_ns, checkpoint_id)`` of one thread's checkpoints that ``prune`` keeps.

    In every namespace: the latest checkpoint, the ``keep_last`` newest, and (with
    ``older_than``) every checkpoint created less than ``older_than`` before ``now``. A
    checkpoint whose ``ts`` cannot be parsed is kept: pruning errs towards keeping data.
    """
    if keep_last is not None and keep_last < 0:
        raise ValueError(f"keep_last must be >= 0, got {keep_last}")
    newest_count = max(keep_last or 1, 1)
    cutoff = None
    if older_than is not None:
        cutoff = (now or datetime.now(UTC)) - older_than

    by_ns: dict[str, list[CheckpointKey]] = {}
    for checkpoint in checkpoints:
        by_ns.setdefault(checkpoint.checkpoint_ns, []).append(checkpoint)
    keep: set[tuple[str, str]] = set()
    for ns, group in by_ns.items():
        group.sort(key=lambda c: c.checkpoint_id, reverse=True)
        for position, checkpoint in enumerate(group):
            if position < newest_count or (cutoff is not None and _newer_than(checkpoint, cutoff)):
                keep.add((ns, checkpoint.checkpoint_id))
    return keep


def _newer_than(checkpoint: CheckpointKey, cutoff: datetime) -> bool:
    try:
        created = datetime.fromisoformat(checkpoint.ts)
    except (TypeError, ValueError):
        return True
    if created.tzinfo is None:
        created = created.replace(tzinfo=UTC)
    return created >= cutoff


def referenced_values(serde: SerializerProtocol, rows: Iterable[CheckpointRow]) -> set[ValueKey]:
    """The value rows that ``rows`` (checkpoints of one thread) need to stay readable.

    After ``prune`` or ``delete_for_runs`` removes checkpoints, a thread's value rows outside
    the set for its remaining checkpoints are garbage.
    """
    needed: set[ValueKey] = set()
    for row in rows:
        versions = load_checkpoint(serde, row)["channel_versions"]
        needed.update(
            (row.checkpoint_ns, channel, version) for channel, version in versions.items()
        )
    return needed


_Row = TypeVar("_Row", CheckpointRow, ValueRow, WriteRow)


def rekey(rows: Iterable[_Row], thread_id: str) -> list[_Row]:
    """``rows`` moved to another thread, for ``copy_thread``.

    Nothing inside the stored bytes names the thread, so copying is re-keying.
    """
    return [row._replace(thread_id=thread_id) for row in rows]


# -- error context ---------------------------------------------------------------------------


class _Where(NamedTuple):
    """Where a row belongs, for error messages."""

    thread_id: str
    checkpoint_ns: str
    checkpoint_id: str

    @classmethod
    def of(cls, row: CheckpointRow) -> _Where:
        return cls(row.thread_id, row.checkpoint_ns, row.checkpoint_id)

    def describe(self, part: str, problem: object) -> str:
        return (
            f"{part} of checkpoint {self.checkpoint_id!r} (thread {self.thread_id!r}, "
            f"namespace {self.checkpoint_ns!r}): {problem}"
        )

    def dumps(self, serde: SerializerProtocol, value: Any, part: str) -> tuple[str, bytes]:
        try:
            return serde.dumps_typed(value)
        except SerializationError as exc:
            error = UnknownTypeError if isinstance(exc, UnknownTypeError) else SerializationError
            message = self.describe(f"Cannot save {part}", exc)
            raise error(message, type_name=exc.type_name, path=exc.path) from exc

    def loads(self, serde: SerializerProtocol, data: tuple[str, bytes], part: str) -> Any:
        try:
            return serde.loads_typed(data)
        except UnknownTypeError as exc:
            message = self.describe(f"Cannot read {part}", exc)
            raise UnknownTypeError(message, type_name=exc.type_name) from exc
        except Exception as exc:
            # Truncated or corrupted bytes surface as whatever the decoder raises.
            raise CorruptCheckpointError(self.describe(f"Cannot read {part}", exc)) from exc
