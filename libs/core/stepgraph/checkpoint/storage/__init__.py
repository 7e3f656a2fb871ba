"""Backend-neutral storage logic shared by every checkpoint saver. No I/O happens here.

A checkpoint is stored as three kinds of row (see docs/architecture.md, "Storage model"):

* one ``CheckpointRow``: the checkpoint without its channel values, plus its metadata;
* ``ValueRow``s: one per channel in ``new_versions``, keyed by ``(channel, version)``, so an
  unchanged channel costs nothing per step. A row holds the whole value (``FULL_VALUE``) or,
  for a list that only grew, the items appended to the value of an earlier version of the
  channel (``APPENDED_ITEMS``, see ``checkpoint_rows(deltas=True)``);
* ``WriteRow``s: the pending writes of the tasks of a step, keyed by ``(task_id, idx)``.

Savers turn ``put``/``put_writes``/``put_step`` arguments into rows with ``checkpoint_rows`` and
``write_rows``, store the rows however their database likes, and turn fetched rows back into a
``CheckpointTuple`` with ``load_checkpoint`` + ``load_tuple``. Rows are named tuples whose fields
are plain ``str``/``int``/``bytes``/``None``, so they can be handed to ``executemany`` as they are.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
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
    "APPENDED_ITEMS",
    "FULL_VALUE",
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
    "index_values",
    "load_checkpoint",
    "load_metadata",
    "load_tuple",
    "metadata_matches",
    "referenced_values",
    "rekey",
    "stored_versions",
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


FULL_VALUE = 0
"""``ValueRow.kind`` of a row holding the channel's whole value."""
APPENDED_ITEMS = 1
"""``ValueRow.kind`` of a row holding a list of items: the value at ``version`` is the value at
``base_version`` (of the same channel) followed by these items."""


class ValueRow(NamedTuple):
    """``(thread_id, checkpoint_ns, channel, version)`` -> the channel's value at that version.

    ``type`` and ``value`` are both ``None`` when the channel was empty at that version. With
    ``kind == APPENDED_ITEMS`` they hold the items appended since ``base_version``; reading such
    a row follows ``base_version`` down to a ``FULL_VALUE`` row (``load_tuple`` does).
    """

    thread_id: str
    checkpoint_ns: str
    channel: str
    version: str
    type: str | None
    value: bytes | None
    kind: int = FULL_VALUE
    base_version: str | None = None


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
# columns of the checkpoint row, channel_appends only says how to write the value rows.
_NOT_IN_BLOB = frozenset({"channel_values", "id", "ts", "channel_appends"})
# Blob keys of the small channel values stored in the checkpoint row and of the channels that
# have a version but no value (``inline=True``).
_INLINE = "inline_values"
_EMPTY = "empty_channels"
# Stands for an emptied channel in the channel_values of a checkpoint from load_checkpoint,
# until load_tuple drops it.
_NO_VALUE: Any = object()


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
    *,
    deltas: bool = False,
    inline: bool = False,
) -> CheckpointRows:
    """The rows of ``put(config, checkpoint, metadata, new_versions)``.

    With ``writes`` (``put_step``), also the rows of those tasks' writes against the parent
    checkpoint named by ``config``. Serializes everything before returning, so a saver that
    stores the result has nothing left to fail on.

    ``deltas``: the saver can read ``APPENDED_ITEMS`` rows (``load_tuple`` resolves them from
    the rows of their chain, and ``referenced_values`` is given the chains). Then a channel the
    checkpoint's ``channel_appends`` describes is stored as the appended items alone, unless
    the list's length grew by about a quarter since the last whole copy: that step stores the
    whole list (see ``_store_appended``). So the items stored for a list that grows to n items
    are O(n) in all, and reading one costs O(its length).

    ``inline``: the saver reads checkpoints through ``load_checkpoint`` and fetches only the
    ``stored_versions``. Then small scalar values (``None``, booleans, numbers, strings of up
    to 64 characters: trigger channels, counters, flags) travel in the checkpoint row itself,
    in every checkpoint that holds them, instead of a value row per change, and so does the
    list of emptied channels (cleared triggers): a step writes fewer rows, reading fetches fewer.
    """
    thread_id = get_thread_id(config)
    checkpoint_ns = get_checkpoint_ns(config)
    checkpoint_id = checkpoint["id"]
    where = _Where(thread_id, checkpoint_ns, checkpoint_id)

    blob = {key: value for key, value in checkpoint.items() if key not in _NOT_IN_BLOB}
    channel_values = checkpoint["channel_values"]
    inlined: Collection[str] = ()
    if inline:
        versions = checkpoint["channel_versions"]
        small = {c: v for c, v in channel_values.items() if c in versions and _is_small(v)}
        empty = [c for c in versions if c not in channel_values]
        if small:
            blob[_INLINE] = small
        if empty:
            blob[_EMPTY] = empty
        inlined = {*small, *empty}
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

    appends = checkpoint.get("channel_appends") if deltas else None
    values = []
    for channel, version in new_versions.items():
        if channel in inlined:
            continue
        if channel not in channel_values:
            values.append(ValueRow(thread_id, checkpoint_ns, channel, version, None, None))
            continue
        value = channel_values[channel]
        part = f"channel {channel!r}"
        appended = appends.get(channel) if appends else None
        if appended is not None and _store_appended(value, version, *appended):
            base_version, items = appended
            type_, data = where.dumps(serde, items, part)
            values.append(
                ValueRow(
                    thread_id,
                    checkpoint_ns,
                    channel,
                    version,
                    type_,
                    data,
                    APPENDED_ITEMS,
                    base_version,
                )
            )
        else:
            type_, data = where.dumps(serde, value, part)
            values.append(ValueRow(thread_id, checkpoint_ns, channel, version, type_, data))

    step_writes = [
        write
        for task in writes
        for write in write_rows(serde, config, task.writes, task.task_id, task.task_path)
    ]
    return CheckpointRows(row, values, step_writes)


def _is_small(value: Any) -> bool:
    """Whether a channel value is stored in the checkpoint row (``inline``)."""
    kind = type(value)
    if kind is str:
        return len(value) <= 64
    if kind is int:
        return -(1 << 63) <= value < 1 << 64
    return value is None or kind is bool or kind is float


def _store_appended(value: Any, version: str, base_version: str, items: Sequence[Any]) -> bool:
    """Whether ``value`` is stored as ``items`` appended to the value at ``base_version``.

    The whole list is stored instead when its length enters another ``_length_class``. A
    chain of appended items thus stays within one class: it holds fewer items than a quarter
    of the whole list it starts from, so all rows of a list that grew to n items hold O(n)
    items (about 6n when it grows one item per step), and reading a value reads its own items
    from a whole list and at most a quarter as many rows of appended items.
    """
    if base_version == version or type(value) is not list:
        return False
    length = len(value)
    return _length_class(length - len(items)) == _length_class(length)


def _length_class(length: int) -> tuple[int, int]:
    """Lengths in classes of a quarter of a power of two: [8, 9], [10, 11], ..., [896, 1023].

    Below 8, each length is a class of its own.
    """
    bits = length.bit_length()
    return bits, length >> max(bits - 3, 0)


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
    """The checkpoint stored in ``row``; ``load_tuple`` completes its ``channel_values``.

    Until then they only mark what the row itself holds (``inline``): read them through
    ``load_tuple`` only. ``stored_versions`` names the value rows to fetch: ``(channel,
    version)`` pairs.
    """
    where = _Where.of(row)
    blob = where.loads(serde, (row.checkpoint_type, row.checkpoint), "the checkpoint")
    if not isinstance(blob, dict) or not isinstance(blob.get("channel_versions"), dict):
        raise CorruptCheckpointError(
            where.describe("Cannot read the checkpoint", "not a checkpoint")
        )
    inlined = blob.pop(_INLINE, None)
    empty = blob.pop(_EMPTY, None)
    blob["id"] = row.checkpoint_id
    blob["ts"] = row.ts
    values = blob["channel_values"] = dict(inlined) if isinstance(inlined, dict) else {}
    if isinstance(empty, list):
        values.update(dict.fromkeys(empty, _NO_VALUE))
    return blob  # type: ignore[return-value]


def stored_versions(checkpoint: Checkpoint) -> dict[str, str]:
    """The ``(channel, version)``s of a loaded checkpoint whose values are in value rows."""
    values = checkpoint["channel_values"]
    versions = checkpoint["channel_versions"]
    if not values:
        return versions
    return {channel: version for channel, version in versions.items() if channel not in values}


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
    values: Iterable[ValueRow] | Mapping[tuple[str, str], ValueRow],
    writes: Iterable[WriteRow],
    metadata: CheckpointMetadata | None = None,
) -> CheckpointTuple:
    """Assemble the ``CheckpointTuple`` of ``row``.

    ``checkpoint`` comes from ``load_checkpoint(serde, row)`` and gets its values filled in
    from ``values``: the value rows named by its ``channel_versions`` and, for
    ``APPENDED_ITEMS`` rows, the rows their ``base_version``s name, down to a whole value (rows
    for other versions are ignored; a missing one is an error). ``writes`` are the checkpoint's
    write rows, in any order: pending writes come out ordered by task, then index. Pass
    ``metadata`` if it was already loaded (e.g. to apply a ``list`` filter). ``values`` may
    also be given keyed by ``(channel, version)`` (see ``index_values``), which pays off when
    the rows of many checkpoints of one namespace were fetched together.
    """
    where = _Where.of(row)
    versions = checkpoint["channel_versions"]
    channel_values = checkpoint["channel_values"]
    by_key = values if isinstance(values, Mapping) else index_values(values)
    missing = []
    some_inline = bool(channel_values)
    for channel, version in stored_versions(checkpoint).items():
        found = by_key.get((channel, version))
        if found is None:
            missing.append(channel)
        elif found.kind == FULL_VALUE:
            if found.type is not None:
                part = f"channel {channel!r}"
                channel_values[channel] = where.loads(serde, (found.type, found.value or b""), part)
        else:
            value = _resolve_appended(serde, where, found, by_key)
            if value is None:
                missing.append(channel)
            else:
                channel_values[channel] = value
    if some_inline:  # keep channel_versions order, whether a value came inline or from a row
        checkpoint["channel_values"] = {
            c: value
            for c in versions
            if (value := channel_values.get(c, _NO_VALUE)) is not _NO_VALUE
        }
    if missing:
        missing.sort()
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


def index_values(values: Iterable[ValueRow]) -> dict[tuple[str, str], ValueRow]:
    """Value rows (of one namespace of one thread) by ``(channel, version)``."""
    return {(row.channel, row.version): row for row in values}


def _resolve_appended(
    serde: SerializerProtocol,
    where: _Where,
    row: ValueRow,
    by_key: Mapping[tuple[str, str], ValueRow],
) -> list[Any] | None:
    """The list an ``APPENDED_ITEMS`` row stands for; None if a row of its chain is missing."""
    part = f"channel {row.channel!r}"
    chain: list[ValueRow] = []
    found: ValueRow | None = row
    while found is not None and found.kind == APPENDED_ITEMS and len(chain) <= len(by_key):
        chain.append(found)
        found = by_key.get((row.channel, found.base_version or ""))
    if found is None:
        return None
    if found.kind != FULL_VALUE:
        problem = "a cycle" if found.kind == APPENDED_ITEMS else f"unknown kind {found.kind!r}"
        raise CorruptCheckpointError(where.describe(f"Cannot read {part}", problem))
    value = (
        None if found.type is None else where.loads(serde, (found.type, found.value or b""), part)
    )
    if type(value) is not list:
        raise CorruptCheckpointError(
            where.describe(
                f"Cannot read {part}",
                f"items are appended to a {type(value).__name__} at version {found.version!r}",
            )
        )
    for delta in reversed(chain):
        items = where.loads(serde, (delta.type or "", delta.value or b""), part)
        if type(items) is not list:
            raise CorruptCheckpointError(
                where.describe(f"Cannot read {part}", f"no items stored at {delta.version!r}")
            )
        value.extend(items)
    return value


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


def referenced_values(
    serde: SerializerProtocol,
    rows: Iterable[CheckpointRow],
    bases: Mapping[ValueKey, str] | None = None,
) -> set[ValueKey]:
    """The value rows that ``rows`` (checkpoints of one thread) need to stay readable.

    ``bases`` maps the key of each of the thread's ``APPENDED_ITEMS`` rows to its
    ``base_version``: the rows a needed row's chain goes through are needed too. After
    ``prune`` or ``delete_for_runs`` removes checkpoints, a thread's value rows outside the set
    for its remaining checkpoints are garbage.
    """
    needed: set[ValueKey] = set()
    for row in rows:
        versions = stored_versions(load_checkpoint(serde, row))
        needed.update(
            (row.checkpoint_ns, channel, version) for channel, version in versions.items()
        )
    if bases:
        for key in list(needed):
            while (base := bases.get(key)) is not None:
                key = (key[0], key[1], base)
                if key in needed:
                    break
                needed.add(key)
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
