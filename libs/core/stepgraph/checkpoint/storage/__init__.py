"""Backend-neutral storage logic shared by every checkpoint saver. No I/O happens here.

A checkpoint is stored as three kinds of row (see docs/architecture.md, "Storage model"):

* one ``CheckpointRow``: the checkpoint without its channel values, plus its metadata. Its
  blob is whole, or (``chain_start`` set) only what changed since its parent checkpoint's
  blob (see ``ChainHeads``);
* ``ValueRow``s: one per channel in ``new_versions``, keyed by ``(channel, version)``, so an
  unchanged channel costs nothing per step. A row holds the whole value (``FULL_VALUE``) or,
  for a list that only grew, the items appended to the value of an earlier version of the
  channel (``APPENDED_ITEMS``, see ``checkpoint_rows(deltas=True)``);
* ``WriteRow``s: the pending writes of the tasks of a step, keyed by ``(task_id, idx)``: one
  row per special write (error, interrupt, ...) and one row for the regular writes of each
  ``put_writes`` of a task (``TASK_WRITES``).

Savers turn ``put``/``put_writes``/``put_step`` arguments into rows with ``checkpoint_rows`` and
``write_rows``, store the rows however their database likes, and turn fetched rows back into a
``CheckpointTuple`` with ``load_checkpoint`` + ``load_tuple``. Rows are named tuples whose fields
are plain ``str``/``int``/``bytes``/``None``, so they can be handed to ``executemany`` as they are.
"""

from __future__ import annotations

import itertools
import json
import math
import numbers
import os
import threading
from collections import OrderedDict
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from copy import deepcopy
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple, Protocol, TypeVar

import msgpack

from stepgraph.checkpoint.base import (
    WRITES_IDX_MAP,
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
    PendingWrite,
    Step,
    TaskWrites,
    child_config,
    get_checkpoint_id,
    get_checkpoint_metadata,
    get_checkpoint_ns,
    get_thread_id,
)
from stepgraph.checkpoint.serde.base import SerializerProtocol
from stepgraph.config import RunnableConfig
from stepgraph.errors import SerializationError, UnknownTypeError

__all__ = [
    "APPENDED_ITEMS",
    "CHECK_CHAINS",
    "FULL_VALUE",
    "KEY_LIMITS",
    "MAX_CHAIN",
    "METADATA_IN_JSON",
    "ONE_WRITE",
    "TASK_WRITES",
    "Candidate",
    "ChainHeads",
    "ChainLink",
    "ChainedBlobs",
    "CheckpointKey",
    "CheckpointRow",
    "CheckpointRows",
    "CorruptCheckpointError",
    "ListPager",
    "PageQuery",
    "ValueKey",
    "ValueRow",
    "WriteRow",
    "assemble_page",
    "chain_rows",
    "chain_spans",
    "check_key",
    "check_prune_strategy",
    "check_schema_version",
    "checkpoint_config",
    "checkpoint_rows",
    "checkpoints_to_keep",
    "deleted_values",
    "id_list",
    "index_values",
    "json_text",
    "load_checkpoint",
    "load_guessed",
    "load_metadata",
    "load_tuple",
    "metadata_filter_json",
    "metadata_json",
    "metadata_json_text",
    "metadata_matches",
    "page_candidates",
    "prune_doomed",
    "referenced_values",
    "rekey",
    "related_keys",
    "stored_versions",
    "task_write_rows",
    "unchained",
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
    chain_start: str | None = None
    """None for a whole blob. Otherwise ``checkpoint`` holds the changes since the blob of the
    parent checkpoint, and the rows that make up the whole blob are the row's ancestors from
    ``chain_start`` (the id of a whole row, or of an earlier one) on: one range of the key."""


METADATA_IN_JSON = ""
"""``CheckpointRow.metadata_type`` of metadata stored only as its JSON copy (no serializer's
tag is empty): see ``checkpoint_rows(json_metadata=True)``."""

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


ONE_WRITE = 0
"""``WriteRow.kind`` of a row holding one write: ``value`` is written to ``channel``."""
TASK_WRITES = 1
"""``WriteRow.kind`` of a row holding a task's regular writes up to index ``idx`` (its last),
packed in ``value`` (see ``_pack_writes``; ``channel`` is empty). A step's task usually writes
a few channels; one row for them all stores and indexes the key once."""


class WriteRow(NamedTuple):
    """``(thread_id, checkpoint_ns, checkpoint_id, task_id, idx)`` -> pending writes.

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
    kind: int = ONE_WRITE

    @property
    def replaces_existing(self) -> bool:
        return self.idx < 0


class CheckpointRows(NamedTuple):
    """Everything one ``put`` (or ``put_step``) stores."""

    checkpoint: CheckpointRow
    values: list[ValueRow]
    writes: list[WriteRow]
    """For ``put_step``: the writes of the step's tasks, saved against the parent checkpoint."""
    metadata: CheckpointMetadata
    """The metadata as stored (merged with the config's, ``get_checkpoint_metadata``), for
    savers that keep a ``metadata_json`` copy of it."""
    link: ChainLink
    """What ``ChainHeads.saved`` remembers once these rows are committed."""
    metadata_json: Any = None
    """``metadata_json(metadata)``, with ``json_metadata=True``."""


class ChainLink(NamedTuple):
    """The last checkpoint a saver stored in one namespace of a thread, as ``ChainHeads`` keeps it."""

    checkpoint_id: str
    chain_start: str
    """The ``chain_start`` of its row, or its own id if its blob is whole."""
    depth: int
    """How many rows of changes lead from the whole blob at the chain's start to it."""
    blob: dict[str, Any] | None = None
    """Its whole blob, kept only when ``CHECK_CHAINS`` is on."""


CHECK_CHAINS = os.environ.get("STEPGRAPH_CHECK_CHAINS") == "1"
"""Check every row of changes against the whole blob it stands for (the test suites turn this
on: it keeps every whole blob in ``ChainHeads``)."""

MAX_CHAIN = 32
"""At most this many rows of changes follow a whole blob: reading a checkpoint decodes at
most ``MAX_CHAIN + 1`` rows. A whole blob grows with the graph (about 2 kB for the bench's
20-node chain, a row of changes about 160 bytes), so the longer the chains, the fewer bytes
per step; a read costs about one row's decoding per step of depth. Measured with
SqliteSaver on a 20-node graph: ``get_tuple`` 60 us at depth 0, 117 us at depth 8, 224 us at
depth 32. 32 stores one whole blob per run of the bench's chain (22 checkpoints); 8 stored
three (``bench/run.py --only chain``: 21.6 kB on disk per run with 8, 18.8 kB with 32)."""


class ChainHeads:
    """The last checkpoint each (thread, namespace) saved through one saver.

    A saver that can read chained blobs (``load_checkpoint`` with the rows of the chain) passes
    this to ``checkpoint_rows``: when a checkpoint's parent is the one remembered here and the
    executor vouches for what changed since (``Checkpoint["versions_seen_changes"]`` with
    ``new_versions``), its row stores only the blob entries that changed. Most of a blob
    (``channel_versions``, ``versions_seen``) grows with the graph while a step changes a few
    entries, so a step stores, and spends time on, O(what changed) instead of O(graph). A
    checkpoint whose parent is not here (a fork, another process's checkpoint, the first save
    after a restart) or that comes without the executor's word (a direct ``put``) is whole.

    It also keeps the whole blobs of the checkpoints the saver saved or read last (``blobs``
    of them), so that reading a checkpoint whose chain leads through one applies only the rows
    of changes after it: reading a thread's latest checkpoint, or one a step or two later,
    costs the same at any depth of its chain. A blob is carried forward as each row of
    changes is saved (O(what changed)), and a checkpoint's blob never changes once saved, so
    an entry never goes stale, whatever other processes write.

    Thread-safe, and bounded: the least recently saved namespaces are forgotten first, and
    the least recently used blobs once there are ``blobs`` of them or their serialized sizes
    add up to more than ``blob_bytes`` (about; held in memory, they take a few times more).
    Only committed rows may be remembered (``saved``); a row is never changed once stored,
    except by ``prune`` and friends, which rewrite a row as its whole blob (the same
    checkpoint).
    """

    def __init__(self, size: int = 1024, blobs: int = 256, blob_bytes: int = 4 << 20) -> None:
        self._size = size
        self._links: OrderedDict[tuple[str, str], ChainLink] = OrderedDict()
        # (thread_id, checkpoint_ns) -> the newest checkpoint this saver saved or read there:
        # its id, and the (channel, version)s of its value rows if a read found them.
        self._newest: OrderedDict[tuple[str, str], tuple[str, list[tuple[str, str]] | None]]
        self._newest = OrderedDict()
        self._blobs_size = blobs
        self._blob_bytes = blob_bytes
        # (thread_id, checkpoint_ns, checkpoint_id) -> an open blob (``_open_blob``), changed
        # only in ``_carry`` under the lock (readers get copies), and its estimated size.
        self._blobs: OrderedDict[tuple[str, str, str], tuple[dict[str, Any], int]] = OrderedDict()
        self._weight = 0
        self._lock = threading.Lock()

    def get(self, thread_id: str, checkpoint_ns: str) -> ChainLink | None:
        return self._links.get((thread_id, checkpoint_ns))

    def saved(self, rows: CheckpointRows, serde: SerializerProtocol | None = None) -> None:
        """Remember the checkpoint of ``rows``, once committed; with ``serde``, also its blob
        (see ``_carry``)."""
        row = rows.checkpoint
        key = (row.thread_id, row.checkpoint_ns)
        stored = None
        if serde is not None and self._blobs_size:
            try:  # outside the lock: a whole blob is O(graph) to decode and copy
                stored = serde.loads_typed((row.checkpoint_type, row.checkpoint))
                if row.chain_start is None:
                    stored = _open_blob(stored)
            except Exception:
                stored = None  # committed and readable: it only goes unkept
        with self._lock:
            self._links[key] = rows.link
            self._links.move_to_end(key)
            if len(self._links) > self._size:
                self._links.popitem(last=False)
            self._note_newest(key, (row.checkpoint_id, None))
            if stored is not None:
                self._carry(rows, stored)

    def seen_newest(
        self,
        thread_id: str,
        checkpoint_ns: str,
        checkpoint_id: str,
        stored: Iterable[tuple[str, str]],
    ) -> None:
        """A read found ``checkpoint_id`` to be the namespace's newest checkpoint, naming the
        value rows ``stored`` (``(channel, version)``s: ``stored_versions``)."""
        with self._lock:
            self._note_newest((thread_id, checkpoint_ns), (checkpoint_id, list(stored)))

    def _note_newest(
        self, key: tuple[str, str], newest: tuple[str, list[tuple[str, str]] | None]
    ) -> None:
        self._newest[key] = newest
        self._newest.move_to_end(key)
        if len(self._newest) > self._size:
            self._newest.popitem(last=False)

    def guess(
        self, thread_id: str, checkpoint_ns: str, checkpoint_id: str | None = None
    ) -> tuple[str, list[tuple[str, str]]] | None:
        """What a read of checkpoint ``checkpoint_id`` (by default the namespace's newest this
        saver saved or read) will likely find: its id and the ``(channel, version)``s of the
        value rows it names (``stored_versions``), as a read of it found them or its kept blob
        says. Only a guess, to be checked against the rows the read finds: another process
        may have saved a newer checkpoint. A saver with round trips fetches those value rows
        along with the checkpoint row, and so reads a checkpoint in one round trip, not two."""
        with self._lock:
            newest = self._newest.get((thread_id, checkpoint_ns))
            stored = None
            if newest is not None and checkpoint_id in (None, newest[0]):
                checkpoint_id, stored = newest
            if checkpoint_id is None:
                return None
            if stored is not None:
                return checkpoint_id, list(stored)
            found = self._blobs.get((thread_id, checkpoint_ns, checkpoint_id))
            if found is None:
                return None
            blob = found[0]
            held = {*(blob.get(_INLINE) or ()), *(blob.get(_EMPTY) or ())}
            versions = blob["channel_versions"]
            return checkpoint_id, [(c, v) for c, v in versions.items() if c not in held]

    def forget(self, thread_ids: Iterable[str]) -> None:
        """Drop what is kept of these threads (blobs, and what reads found newest): their rows
        were deleted, or replaced by a ``copy_thread`` onto them, which may store other
        contents under the same ids."""
        threads = set(thread_ids)
        with self._lock:
            for found in [key for key in self._blobs if key[0] in threads]:
                self._weight -= self._blobs.pop(found)[1]
            for newest in [key for key in self._newest if key[0] in threads]:
                del self._newest[newest]

    def kept(self, rows: Iterable[CheckpointRow]) -> dict[tuple[str, str, str], dict[str, Any]]:
        """Copies of the kept blobs of those ``rows`` that are rows of changes: pass them to
        ``page_candidates`` and fetch only the chains of the other rows (``chain_spans``)."""
        found = {}
        for row in rows:
            if row.chain_start is not None and (blob := self.blob(row[:3])) is not None:
                found[row[:3]] = blob
        return found

    def blob(self, key: tuple[str, str, str], *, whole: bool = False) -> dict[str, Any] | None:
        """A copy of the blob of checkpoint ``key`` (thread, namespace, id), if kept: open, or
        with ``whole`` a whole one (for ``load_checkpoint``)."""
        with self._lock:
            found = self._blobs.get(key)
            if found is None:
                return None
            self._blobs.move_to_end(key)
            return _close_blob(found[0]) if whole else _open_blob(found[0])

    def remember(self, key: tuple[str, str, str], opened: Mapping[str, Any]) -> None:
        """Keep (a copy of) the open blob a reader built for checkpoint ``key``."""
        if self._blobs_size:
            copy = _open_blob(opened)
            # About 40 serialized bytes an entry (a channel's or a node's version).
            seen = copy.get("versions_seen")
            entries = len(copy["channel_versions"]) + len(copy.get(_INLINE) or ())
            entries += sum(map(len, seen.values())) if isinstance(seen, dict) else 0
            with self._lock:
                self._keep(key, copy, 40 * entries)

    def _carry(self, rows: CheckpointRows, stored: Any) -> None:
        """The blob of the checkpoint just saved (``stored``: its row's, decoded): its
        parent's with the row of changes applied, in place (the parent's entry is given up),
        or the whole blob. Never raises: the rows are committed, and a blob not kept only
        makes a read walk its chain."""
        row = rows.checkpoint
        parent_key = (row.thread_id, row.checkpoint_ns, row.parent_checkpoint_id or "")
        parent = self._blobs.pop(parent_key, None)
        if parent is not None:
            self._weight -= parent[1]
        weight = len(row.checkpoint)  # a row of changes adds at most its size to a blob's
        try:
            if row.chain_start is None:
                blob = stored
            elif parent is not None:
                blob, parent_weight = parent
                _apply_in_place(blob, stored)
                weight += parent_weight
            else:
                return
        except Exception:
            return
        if CHECK_CHAINS and rows.link.blob is not None:
            found, wanted = _comparable(_close_blob(blob)), _comparable(rows.link.blob)
            if found != wanted:
                where = _Where.of(row)
                raise AssertionError(where.describe("Kept blob", f"is {found}, not {wanted}"))
        self._keep(row[:3], blob, weight)

    def _keep(self, key: tuple[str, str, str], blob: dict[str, Any], weight: int) -> None:
        if (old := self._blobs.pop(key, None)) is not None:
            self._weight -= old[1]
        if weight > self._blob_bytes:  # would push out every other blob
            return
        self._blobs[key] = (blob, weight)
        self._weight += weight
        while self._blobs and (
            len(self._blobs) > self._blobs_size or self._weight > self._blob_bytes
        ):
            self._weight -= self._blobs.popitem(last=False)[1][1]


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
# columns of the checkpoint row, channel_appends and versions_seen_changes only say how to write
# the rows.
_NOT_IN_BLOB = frozenset({"channel_values", "id", "ts", "channel_appends", "versions_seen_changes"})
# Blob keys of the small channel values stored in the checkpoint row and of the channels that
# have a version but no value (``inline=True``).
_INLINE = "inline_values"
_EMPTY = "empty_channels"
# Stands for an emptied channel in the channel_values of a checkpoint from load_checkpoint,
# until load_tuple drops it.
_NO_VALUE: Any = object()


# -- writing ---------------------------------------------------------------------------------

KEY_LIMITS = {
    "thread_id": 1024,
    "checkpoint_ns": 1024,
    "checkpoint_id": 128,
    "task_id": 256,
    "channel": 256,
}
"""The most UTF-8 bytes each part of a stored row's key may have, in every saver.

Together they keep each key within what a database index can hold (Postgres b-tree entries
hold at most about 2.7 kB), so all savers accept and refuse the same ids: a save naming a
longer one raises ``ValueError`` before anything is stored."""


def check_key(part: str, text: str) -> None:
    """Raise ``ValueError`` if ``text`` is too long to be the key part ``part`` (``KEY_LIMITS``)."""
    limit = KEY_LIMITS[part]
    if len(text) * 4 > limit and len(text.encode("utf-8", "surrogatepass")) > limit:
        raise ValueError(
            f"{part} is too long to store: {len(text.encode('utf-8', 'surrogatepass'))} bytes "
            f"of UTF-8, at most {limit} allowed (storage.KEY_LIMITS): {text[:40]!r}..."
        )


def check_row_key(
    thread_id: str, checkpoint_ns: str, checkpoint_id: str, task_id: str = ""
) -> None:
    """``check_key`` for each part of a row's key; one quick test passes the usual short ids."""
    if not (
        len(thread_id) <= 256
        and len(checkpoint_ns) <= 256
        and len(checkpoint_id) <= 128
        and checkpoint_id.isascii()
        and len(task_id) <= 64
    ):
        check_key("thread_id", thread_id)
        check_key("checkpoint_ns", checkpoint_ns)
        check_key("checkpoint_id", checkpoint_id)
        check_key("task_id", task_id)


_SHORT_CHANNEL = KEY_LIMITS["channel"] // 4
"""A channel name this long or shorter fits whatever its characters."""


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
    self_contained: bool = False,
    heads: ChainHeads | None = None,
    json_metadata: bool = False,
    after: CheckpointRows | None = None,
) -> CheckpointRows:
    """The rows of ``put(config, checkpoint, metadata, new_versions)``.

    ``self_contained``: store every channel of the checkpoint, as whole values, whatever
    ``new_versions`` says. A saver asks for these rows when it finds, inside the transaction
    of the save, that the parent checkpoint is gone (pruned or deleted meanwhile): the value
    rows of the unchanged channels may have gone with it, and the new checkpoint must not
    name rows that do not exist.

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

    ``heads``: the saver reads chained blobs (see ``ChainHeads``). When the parent checkpoint
    is the one ``heads`` remembers for this namespace, the row's blob holds only what changed
    since the parent's (``CheckpointRow.chain_start``). Call ``heads.saved(rows)`` once the
    rows are committed. ``self_contained`` rows are always whole.

    ``after``: the rows of the parent checkpoint, saved in the same call (``put_steps``) and not
    committed yet: the parent ``heads`` would know once they are.

    ``json_metadata``: the saver stores ``CheckpointRows.metadata_json`` as JSON text that reads
    back exactly as written (key order included), encoding it at once (plain metadata comes as
    itself, not a copy, and the caller may change it later), and when reading a row whose
    ``metadata_type`` is ``METADATA_IN_JSON`` gives that text as its ``metadata``. Then
    metadata that JSON holds exactly (the executor's always is) is not serialized a second time.
    """
    thread_id = get_thread_id(config)
    checkpoint_ns = get_checkpoint_ns(config)
    checkpoint_id = checkpoint["id"]
    check_row_key(thread_id, checkpoint_ns, checkpoint_id)
    if self_contained:
        new_versions = checkpoint["channel_versions"]
        deltas = False
    # Only value rows have a channel in their key; the other channels are names inside the
    # checkpoint blob (and were checked when their values were stored).
    for channel in new_versions:
        if len(channel) > _SHORT_CHANNEL:
            check_key("channel", channel)
    where = _Where(thread_id, checkpoint_ns, checkpoint_id)

    blob = {key: value for key, value in checkpoint.items() if key not in _NOT_IN_BLOB}
    channel_values = checkpoint["channel_values"]
    versions = checkpoint["channel_versions"]
    parent_id = get_checkpoint_id(config)
    link = ChainLink(checkpoint_id, checkpoint_id, 0)
    stored: Any = None
    parent = None
    seen_changes = checkpoint.get("versions_seen_changes")
    if heads is not None and seen_changes is not None and not self_contained and parent_id:
        parent = heads.get(thread_id, checkpoint_ns) if after is None else after.link
        # Ids grow along a chain, so its rows are one range of the key from chain_start.
        if (
            parent is not None
            and parent.checkpoint_id == parent_id
            and parent.depth < MAX_CHAIN
            and checkpoint_id > parent_id
        ):
            stored = _step_changes(blob, checkpoint, new_versions, seen_changes, inline)
            if stored is not None:
                link = ChainLink(checkpoint_id, parent.chain_start, parent.depth + 1)
    if inline and (stored is None or CHECK_CHAINS):  # the whole blob: O(channels) work
        small = {c: v for c, v in channel_values.items() if c in versions and _is_small(v)}
        empty = [c for c in versions if c not in channel_values]
        if small:
            blob[_INLINE] = small
        if empty:
            blob[_EMPTY] = empty
    if stored is None:
        stored = blob
    elif CHECK_CHAINS and parent is not None and parent.blob is not None:
        _check_changes(parent.blob, stored, blob, where)
    if CHECK_CHAINS and heads is not None:
        link = link._replace(blob=_copy_blob(blob))
    checkpoint_type, checkpoint_bytes = where.dumps(serde, stored, "the checkpoint")
    merged = get_checkpoint_metadata(config, metadata)
    shadow = None
    if json_metadata:  # encoded by the caller at once, so plain metadata is its own copy
        shadow = merged if _plain_json_or_not(merged) else metadata_json(merged)
    if shadow is not None and (shadow is merged or _same_json_or_not(merged, shadow)):
        metadata_type, metadata_bytes = METADATA_IN_JSON, b""
    else:
        metadata_type, metadata_bytes = where.dumps(serde, merged, "the metadata")
    run_id = merged.get("run_id")
    row = CheckpointRow(
        thread_id,
        checkpoint_ns,
        checkpoint_id,
        parent_id,
        checkpoint["ts"],
        None if run_id is None else str(run_id),
        checkpoint_type,
        checkpoint_bytes,
        metadata_type,
        metadata_bytes,
        None if link.depth == 0 else link.chain_start,
    )

    appends = checkpoint.get("channel_appends") if deltas else None
    values = []
    for channel, version in new_versions.items():
        # Small values and emptied channels travel in the checkpoint row (``inline``).
        if (
            inline
            and channel in versions
            and (channel not in channel_values or _is_small(channel_values[channel]))
        ):
            continue
        if channel not in channel_values:
            values.append(ValueRow(thread_id, checkpoint_ns, channel, version, None, None))
            continue
        value = channel_values[channel]
        appended = appends.get(channel) if appends else None
        if appended is not None and _store_appended(value, version, *appended):
            base_version, items = appended
            type_, data = where.dumps(serde, items, "channel %r", channel)
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
            type_, data = where.dumps(serde, value, "channel %r", channel)
            values.append(ValueRow(thread_id, checkpoint_ns, channel, version, type_, data))

    writes_rows = task_write_rows(serde, config, writes)
    return CheckpointRows(row, values, writes_rows, merged, link, shadow)


def chain_rows(
    rows: Callable[..., CheckpointRows],
    config: RunnableConfig,
    steps: Sequence[Step],
    *,
    self_contained: bool = False,
) -> list[CheckpointRows]:
    """The rows of ``put_steps(config, steps)``: ``rows`` (``checkpoint_rows`` with the
    saver's options bound) of each step against the one before (``after``). With
    ``self_contained``, the first step's rows are (see ``checkpoint_rows``)."""
    made: list[CheckpointRows] = []
    for step in steps:
        after = made[-1] if made else None
        whole = self_contained and after is None
        made.append(rows(config, *step[1:], step.writes, self_contained=whole, after=after))
        config = child_config(config, step.checkpoint["id"])
    return made


def _plain_json_or_not(value: Any) -> bool:
    try:
        return _plain_json(value, 0)
    except RecursionError:
        return False


def _plain_json(value: Any, depth: int) -> bool:
    """Whether ``metadata_json`` would copy ``value`` unchanged (``_same_json``), judged in one
    pass without copying: exact JSON types, ASCII strings without NULs, integers a float
    holds, finite floats that are not whole, nested at most 64 deep. False for some values
    that do copy unchanged (non-ASCII strings, say): those take the copy and compare."""
    kind = type(value)
    if kind is str:
        return value.isascii() and "\x00" not in value
    if kind is int:
        return -_EXACT_INT <= value <= _EXACT_INT
    if kind is bool or value is None:
        return True
    if depth > 64:
        return False
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str or not key.isascii() or "\x00" in key:
                return False
            if not _plain_json(item, depth + 1):
                return False
        return True
    if kind is list:
        return all(_plain_json(item, depth + 1) for item in value)
    if kind is float:
        return math.isfinite(value) and not value.is_integer()
    return False


def _same_json_or_not(value: Any, copy: Any) -> bool:
    try:
        return _same_json(value, copy)
    except RecursionError:  # deeper than it is worth checking: serialize it as well
        return False


def _same_json(value: Any, copy: Any) -> bool:
    """Whether ``copy`` (its ``metadata_json``) reads back as ``value``: same types, same
    order of keys (``_json_copy`` changes NULs, whole floats, numbers of other types...)."""
    kind = type(value)
    if kind is not type(copy):
        return False
    if kind is dict:
        return len(value) == len(copy) and all(
            key == other and type(key) is str and _same_json(item, copy[other])
            for (key, item), other in zip(value.items(), copy, strict=True)
        )
    if kind is list:
        return len(value) == len(copy) and all(map(_same_json, value, copy))
    if kind is float:
        return value == copy and math.isfinite(value)
    return (kind is str or kind is int or kind is bool or value is None) and value == copy


# The blob keys a row of changes stores entry by entry (``_step_changes``).
_CHAINED_KEYS = frozenset({"channel_versions", "versions_seen", _INLINE, _EMPTY})
_GONE: Any = object()
# Maps whose entries are never maps or lists: versions, small scalar values.
_SCALAR_MAPS = frozenset({"channel_versions", _INLINE})
_FLAT_KEYS = _SCALAR_MAPS | {"updated_channels", _EMPTY}


def _step_changes(
    blob: Mapping[str, Any],
    checkpoint: Checkpoint,
    new_versions: ChannelVersions,
    seen_changes: Iterable[str],
    inline: bool,
) -> list[Any] | None:
    """The row of changes that turns the parent's whole blob into ``blob``, from what the
    executor says changed: the channels of ``new_versions`` and the nodes of
    ``seen_changes``; None if the blob must be stored whole (a channel or node was removed).
    O(what changed), whatever the size of the graph.

    A row of changes is ``[set, versions, seen, small, emptied]``: top-level keys stored as
    they are (``updated_channels`` as True when it lists exactly the changed channels), the
    changed channels grouped by their new version (a step gives all of them one), the nodes'
    new ``versions_seen`` entries, and with ``inline`` the changed channels' small values and
    the emptied ones (None without ``inline``): every other changed channel has a value row.
    """
    versions = checkpoint["channel_versions"]
    values = checkpoint["channel_values"]
    by_version: dict[Any, list[str]] = {}
    small: dict[str, Any] = {}
    emptied: list[str] = []
    for channel in new_versions:  # one pass: this runs at every step
        version = versions.get(channel, _GONE)
        if version is _GONE:
            return None
        group = by_version.get(version)
        if group is None:
            by_version[version] = [channel]
        else:
            group.append(channel)
        if inline:
            value = values.get(channel, _GONE)
            if value is _GONE:
                emptied.append(channel)
            elif _is_small(value):
                small[channel] = value
    seen = checkpoint["versions_seen"]
    now: dict[str, Any] = {}
    for node in seen_changes:
        entry = seen.get(node)
        if entry is None:
            return None
        now[node] = entry
    set_ = {key: value for key, value in blob.items() if key not in _CHAINED_KEYS}
    if set_.get("updated_channels") == sorted(new_versions):  # as the executor lists them
        set_["updated_channels"] = True
    return [set_, by_version, now, small if inline else None, emptied if inline else None]


def _check_changes(
    before: Mapping[str, Any], changes: list[Any], whole: Mapping[str, Any], where: _Where
) -> None:
    """``CHECK_CHAINS``: raise if ``changes`` applied to ``before`` is not ``whole``."""
    found, wanted = _comparable(_apply_changes(before, changes)), _comparable(whole)
    if found != wanted:
        raise AssertionError(where.describe("Row of changes", f"reads as {found}, not {wanted}"))


def _comparable(blob: Mapping[str, Any]) -> dict[str, Any]:
    """A blob as load_checkpoint sees it: no empty inline keys, emptied channels as a set,
    inline values with their types."""
    comparable = {key: value for key, value in blob.items() if value or key not in _CHAINED_KEYS}
    if _EMPTY in comparable:
        comparable[_EMPTY] = set(comparable[_EMPTY])
    if _INLINE in comparable:  # a NaN equals itself only as the same object
        inline = comparable[_INLINE].items()
        comparable[_INLINE] = {k: (type(v), v if v == v else "NaN") for k, v in inline}
    return comparable


def _apply_changes(before: Mapping[str, Any], changes: Any) -> dict[str, Any]:
    """The whole blob after a row of changes (``_step_changes``) to ``before``, which is left
    as it was. Raises ``ValueError`` when ``changes`` is not a row of changes."""
    opened = _open_blob(before)
    _apply_in_place(opened, changes)
    return _close_blob(opened)


# Reading a chain applies its rows of changes one after the other to one "open" blob: its maps
# private, emptied channels as a dict, so that each row costs O(what it changed).
_OPEN_MAPS = ("channel_versions", "versions_seen", _INLINE)


def _open_blob(blob: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a whole (or open) blob that ``_apply_in_place`` may change."""
    opened = dict(blob)
    for key in _OPEN_MAPS:
        if type(value := blob.get(key)) is dict:
            opened[key] = dict(value)
    if (empty := blob.get(_EMPTY)) is not None:
        opened[_EMPTY] = dict.fromkeys(empty)
    return opened


def _apply_in_place(opened: dict[str, Any], changes: Any) -> None:
    if type(changes) is not list or len(changes) != 5:
        raise ValueError("not a row of changes")
    set_, by_version, seen, small, emptied = changes
    versions = opened["channel_versions"]
    changed: list[str] = []
    for version, channels in by_version.items():  # one version, as a step gives them
        versions.update(dict.fromkeys(channels, version))
        changed = [*changed, *channels] if changed else channels
    opened.update(set_)
    if opened.get("updated_channels") is True:
        opened["updated_channels"] = sorted(changed)
    if seen:
        opened.setdefault("versions_seen", {}).update(seen)
    if small is not None:  # inline: the changed channels' entries are all new
        inlined = opened.setdefault(_INLINE, {})
        empty = opened.setdefault(_EMPTY, {})
        for channel in changed:
            inlined.pop(channel, None)
            empty.pop(channel, None)
        inlined.update(small)
        empty.update(dict.fromkeys(emptied))


def _close_blob(opened: Mapping[str, Any]) -> dict[str, Any]:
    """A whole blob of its own (maps of maps copied too) from an open one."""
    closed = _copy_blob(opened)
    for key in (_INLINE, _EMPTY):
        if key in closed and not closed[key]:
            del closed[key]
    if _EMPTY in closed:
        closed[_EMPTY] = list(closed[_EMPTY])
    return closed


def _copy_blob(blob: Mapping[str, Any]) -> dict[str, Any]:
    """``blob`` with its maps (and maps of maps, as ``versions_seen``) and lists copied, so
    later changes to the caller's checkpoint do not reach it; keys of unknown shape (another
    version's, a caller's own) are copied whole."""
    copy = dict(blob)
    for key, value in blob.items():
        kind = type(value)
        if key in _FLAT_KEYS:  # maps and lists of scalars
            copy[key] = value.copy() if kind is dict or kind is list else value
        elif key == "versions_seen" and kind is dict:
            copy[key] = {k: dict(v) if type(v) is dict else v for k, v in value.items()}
        elif value is not None and not isinstance(value, (str, int, float, bytes)):
            copy[key] = deepcopy(value)
    return copy


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


def task_write_rows(
    serde: SerializerProtocol, config: RunnableConfig, tasks: Sequence[TaskWrites]
) -> list[WriteRow]:
    """The rows of ``put_writes_batch(config, tasks)``: every task's ``write_rows``."""
    return [
        row
        for task in tasks
        for row in write_rows(serde, config, task.writes, task.task_id, task.task_path)
    ]


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
    check_row_key(thread_id, checkpoint_ns, checkpoint_id, task_id)
    where = _Where(thread_id, checkpoint_ns, checkpoint_id)
    special: list[WriteRow] = []
    # (idx, channel, type, data) of the regular writes, in order
    regular: list[tuple[int, str, str, bytes]] = []
    for idx, (channel, value) in enumerate(writes):
        if len(channel) > _SHORT_CHANNEL:
            check_key("channel", channel)
        index = WRITES_IDX_MAP.get(channel, idx)
        type_, data = where.dumps(serde, value, _WRITE_PART, channel, task_id)
        if index >= 0:
            regular.append((index, channel, type_, data))
        else:
            special.append(
                WriteRow(
                    thread_id,
                    checkpoint_ns,
                    checkpoint_id,
                    task_id,
                    index,
                    channel,
                    type_,
                    data,
                    task_path,
                )
            )
    if not regular:
        return special
    # One row for the task's regular writes when their indices follow each other (a special
    # write between them, as in ``[("a", 1), (INTERRUPT, 2), ("b", 3)]``, keeps a row each),
    # keyed by the last: a repeated call with more writes is a row of its own.
    key = (thread_id, checkpoint_ns, checkpoint_id, task_id)
    if len(regular) > 1 and regular[-1][0] - regular[0][0] == len(regular) - 1:
        packed = _pack_writes([write[1:] for write in regular])
        return [
            *special,
            WriteRow(*key, regular[-1][0], "", regular[0][2], packed, task_path, TASK_WRITES),
        ]
    return special + [WriteRow(*key, *write, task_path) for write in regular]


def _pack_writes(writes: Sequence[tuple[str, str, bytes]]) -> bytes:
    """A ``TASK_WRITES`` value: msgpack's flat list of ``channel, type, data`` triples, the
    type nil where it is the first one's (the row's ``type``). Each value was serialized on
    its own, exactly as a row of its own would hold it: serializers may type a nested value
    differently from a top-level one (a ``bytearray``)."""
    first = writes[0][1]
    flat: list[Any] = []
    for channel, type_, data in writes:
        flat += (channel, None if type_ == first else type_, data)
    # Channel names may hold lone surrogates (stored as such, like every key part).
    return msgpack.packb(flat, use_bin_type=True, unicode_errors="surrogatepass")


def _unpack_writes(row: WriteRow) -> list[tuple[str, str, bytes]]:
    flat = msgpack.unpackb(row.value, raw=False, use_list=True, unicode_errors="surrogatepass")
    if type(flat) is not list or len(flat) % 3:
        raise ValueError("not a list of channel, type, data triples")
    found = []
    for offset in range(0, len(flat), 3):
        channel, type_, data = flat[offset : offset + 3]
        type_ = row.type if type_ is None else type_
        if type(channel) is not str or type(type_) is not str or type(data) is not bytes:
            raise ValueError(f"write {offset // 3} is not a channel, type and data")
        found.append((channel, type_, data))
    return found


_WRITE_PART = "write to channel %r of task %r"


# -- reading ---------------------------------------------------------------------------------


def load_checkpoint(
    serde: SerializerProtocol,
    row: CheckpointRow,
    blobs: ChainedBlobs | None = None,
    *,
    whole: dict[str, Any] | None = None,
) -> Checkpoint:
    """The checkpoint stored in ``row``; ``load_tuple`` completes its ``channel_values``.

    Until then they only mark what the row itself holds (``inline``): read them through
    ``load_tuple`` only. ``stored_versions`` names the value rows to fetch: ``(channel,
    version)`` pairs. A row of changes (``chain_start`` set) is read through ``blobs``, which
    holds the rows of its chain, or from ``whole``, its whole blob (``ChainHeads.blob``).
    """
    where = _Where.of(row)
    if whole is not None:
        blob = whole
    elif row.chain_start is None:
        blob = where.loads(serde, (row.checkpoint_type, row.checkpoint), "the checkpoint")
    elif blobs is None:
        raise CorruptCheckpointError(
            where.describe("Cannot read the checkpoint", "the rows of its chain were not read")
        )
    else:
        blob = blobs.whole(row)
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


class ChainedBlobs:
    """The whole blobs of checkpoint rows, rows of changes included, given the rows of their
    chains (``chain_spans`` names them; extra rows are ignored). Each blob is decoded once,
    however many rows of a page share it."""

    def __init__(
        self,
        serde: SerializerProtocol,
        rows: Iterable[CheckpointRow],
        heads: ChainHeads | None = None,
        kept: Mapping[tuple[str, str, str], dict[str, Any]] | None = None,
    ) -> None:
        self._serde = serde
        self._rows = {row[:3]: row for row in rows}
        self._whole: dict[tuple[str, str, str], Any] = dict(kept or {})
        self._heads = heads  # blobs kept by the saver: a chain is applied from the newest one

    def whole(self, row: CheckpointRow) -> Any:
        """The whole blob of ``row``: a new object, the caller's to change."""
        return _close_blob(self._resolve(row))

    def read_ahead(self, rows: Iterable[CheckpointRow]) -> None:
        """Resolve ``rows`` oldest first, so each one that leads through another applies only
        the rows of changes after it (a page is listed newest first)."""
        for row in sorted(rows, key=_checkpoint_id):
            if row.chain_start is not None:
                self._resolve(row)

    def _resolve(self, row: CheckpointRow) -> dict[str, Any]:
        """The open blob of ``row``, kept for the rows of the page that lead through it."""
        rows, known, heads = self._rows, self._whole, self._heads
        path: list[CheckpointRow] = []
        found = row
        while (base := known.get(found[:3])) is None:
            if heads is not None and (base := heads.blob(found[:3])) is not None:
                known[found[:3]] = base
                break
            if found.chain_start is None:
                base = known[found[:3]] = _open_blob(self._whole_blob(found))
                break
            path.append(found)
            parent = rows.get(
                (found.thread_id, found.checkpoint_ns, found.parent_checkpoint_id or "")
            )
            if parent is None or len(path) > len(rows):
                problem = (
                    f"it stores changes to checkpoint {found.parent_checkpoint_id!r},"
                    " whose row is missing"
                    if parent is None
                    else "its chain of parents has a cycle"
                )
                raise CorruptCheckpointError(
                    _Where.of(found).describe("Cannot read the checkpoint", problem)
                )
            found = parent
        if not path:
            return base
        opened = _open_blob(base)  # one copy, then O(what changed) per row
        loads = self._serde.loads_typed
        for changed in reversed(path):
            try:
                _apply_in_place(opened, loads((changed.checkpoint_type, changed.checkpoint)))
            except Exception as exc:
                raise self._unreadable(changed, exc) from exc
        known[row[:3]] = opened
        if heads is not None:
            heads.remember(row[:3], opened)
        return opened

    def _unreadable(self, row: CheckpointRow, exc: Exception) -> Exception:
        """The error for a row of changes that failed to decode or to apply (found out
        again here, off the path of every read)."""
        where = _Where.of(row)
        try:
            where.loads(self._serde, (row.checkpoint_type, row.checkpoint), "the checkpoint")
        except (UnknownTypeError, CorruptCheckpointError) as error:
            return error
        problem = f"bad row of changes: {exc!r}"  # any shape but a row of changes
        return CorruptCheckpointError(where.describe("Cannot read the checkpoint", problem))

    def _whole_blob(self, row: CheckpointRow) -> dict[str, Any]:
        where = _Where.of(row)
        blob = where.loads(self._serde, (row.checkpoint_type, row.checkpoint), "the checkpoint")
        if type(blob) is not dict or type(blob.get("channel_versions")) is not dict:
            raise CorruptCheckpointError(
                where.describe("Cannot read the checkpoint", "not a checkpoint")
            )
        return blob


def chain_spans(rows: Iterable[CheckpointRow]) -> list[tuple[str, str, str, str]]:
    """What to fetch so ``ChainedBlobs`` can read ``rows``: per chain, ``(thread_id,
    checkpoint_ns, low, high)``, the ids ``low <= checkpoint_id < high`` of the namespace.
    A span may hold rows of forked branches too; they are ignored."""
    spans: dict[tuple[str, str, str], str] = {}
    for row in rows:
        if row.chain_start is not None:
            key = (row.thread_id, row.checkpoint_ns, row.chain_start)
            high = spans.get(key)
            if high is None or row.checkpoint_id > high:
                spans[key] = row.checkpoint_id
    return [(*key, high) for key, high in spans.items()]


def stored_versions(checkpoint: Checkpoint) -> dict[str, str]:
    """The ``(channel, version)``s of a loaded checkpoint whose values are in value rows."""
    values = checkpoint["channel_values"]
    versions = checkpoint["channel_versions"]
    if not values:
        return versions
    return {channel: version for channel, version in versions.items() if channel not in values}


def load_metadata(serde: SerializerProtocol, row: CheckpointRow) -> CheckpointMetadata:
    where = _Where.of(row)
    if row.metadata_type == METADATA_IN_JSON:
        try:
            metadata = json.loads(row.metadata)
        except ValueError as exc:
            raise CorruptCheckpointError(where.describe("Cannot read the metadata", exc)) from exc
    else:
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
                data = (found.type, found.value or b"")
                channel_values[channel] = where.loads(serde, data, "channel %r", channel)
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

    return CheckpointTuple(
        checkpoint_config(row.thread_id, row.checkpoint_ns, row.checkpoint_id),
        checkpoint,
        load_metadata(serde, row) if metadata is None else metadata,
        checkpoint_config(row.thread_id, row.checkpoint_ns, row.parent_checkpoint_id)
        if row.parent_checkpoint_id
        else None,
        pending_writes(serde, where, writes),
    )


def pending_writes(
    serde: SerializerProtocol, where: _Where, writes: Iterable[WriteRow]
) -> list[PendingWrite]:
    """The pending writes the rows stand for, ordered by task path, task, then index.

    A ``TASK_WRITES`` row is keyed by its last index, so a task's regular writes saved again
    with the list grown are a row of their own (the executor does this with the updates of the
    ``Command``s sent to one checkpoint: the same writes, then more). An index that rows of
    one task share keeps the write of the row with the most writes (then the lowest key): the
    fullest list, whether a repeat came with more writes or with fewer.
    """
    found: list[PendingWrite] = []
    for task_id, rows in itertools.groupby(sorted(writes, key=_write_order), _task_of):
        candidates: list[tuple[int, int, WriteRow, list[tuple[str, str, bytes]] | None]] = []
        for write in rows:
            if write.idx < 0:  # special: one row each, in key order
                value = where.loads(serde, write[6:8], _WRITE_PART, write.channel, task_id)
                found.append((task_id, write.channel, value))
            elif write.kind == ONE_WRITE:
                candidates.append((-1, write.idx, write, None))
            else:
                packed = _read_packed(where, write)
                candidates.append((-len(packed), write.idx, write, packed))
        regular: dict[int, PendingWrite] = {}
        for _size, idx, write, unpacked in sorted(candidates, key=_fullest_first):
            entries = [(write.channel, write.type, write.value)] if unpacked is None else unpacked
            for index, (channel, type_, data) in enumerate(entries, idx - len(entries) + 1):
                if index not in regular:
                    value = where.loads(serde, (type_, data), _WRITE_PART, channel, task_id)
                    regular[index] = (task_id, channel, value)
        found += (regular[index] for index in sorted(regular))
    return found


def _fullest_first(candidate: tuple[int, int, Any, Any]) -> tuple[int, int]:
    return candidate[0], candidate[1]


def _task_of(write: WriteRow) -> str:
    return write.task_id


def _read_packed(where: _Where, write: WriteRow) -> list[tuple[str, str, bytes]]:
    part = "Cannot read writes of task %r"
    if write.kind != TASK_WRITES:
        problem = f"unknown kind {write.kind!r}"
        raise CorruptCheckpointError(where.describe(part % (write.task_id,), problem))
    try:
        return _unpack_writes(write)
    except Exception as exc:
        raise CorruptCheckpointError(where.describe(part % (write.task_id,), repr(exc))) from exc


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


def _write_order(write: WriteRow) -> tuple[str, str, int]:
    # LangGraph's savers' order: by task path (a step's nodes by name, then its Sends in
    # order), task id, index.
    return write.task_path, write.task_id, write.idx


# -- pages of checkpoints (get_tuple, list) ------------------------------------------------


class Candidate(NamedTuple):
    """A fetched checkpoint row that passed the ``list`` filter, decoded as far as needed to
    know which value rows it names."""

    row: CheckpointRow
    checkpoint: Checkpoint
    metadata: CheckpointMetadata | None
    """Loaded if a filter needed it, else None (``load_tuple`` loads it)."""


def page_candidates(
    serde: SerializerProtocol,
    rows: Sequence[CheckpointRow],
    filter: Mapping[str, Any] | None = None,
    chains: Iterable[CheckpointRow] = (),
    heads: ChainHeads | None = None,
    kept: Mapping[tuple[str, str, str], dict[str, Any]] | None = None,
) -> list[Candidate]:
    """The rows that match ``filter`` exactly (SQL only narrowed them), decoded. ``chains``:
    the rows ``chain_spans(rows)`` names (but for the rows ``kept`` has blobs of: see
    ``ChainHeads.kept``); ``heads``: the saver's, whose kept blobs shorten the chains."""
    blobs = None
    if any(row.chain_start is not None for row in rows):
        blobs = ChainedBlobs(serde, itertools.chain(rows, chains), heads, kept)
        blobs.read_ahead(rows)
    candidates = []
    for row in rows:
        metadata = None
        if filter:
            metadata = load_metadata(serde, row)
            if not metadata_matches(metadata, filter):
                continue
        candidates.append(Candidate(row, load_checkpoint(serde, row, blobs), metadata))
    return candidates


def related_keys(
    candidates: Iterable[Candidate],
) -> tuple[list[tuple[str, str, str, str]], list[tuple[str, str, str]]]:
    """What to fetch for ``candidates``: the keys ``(thread_id, checkpoint_ns, channel,
    version)`` of the value rows they name (each once; for ``APPENDED_ITEMS`` rows, the rows
    of their chains are needed too), and the keys of the checkpoints whose writes to fetch."""
    values: dict[tuple[str, str, str, str], None] = {}
    checkpoints = []
    for candidate in candidates:
        thread_id, ns, checkpoint_id = candidate.row[:3]
        for channel, version in stored_versions(candidate.checkpoint).items():
            values[thread_id, ns, channel, version] = None
        checkpoints.append((thread_id, ns, checkpoint_id))
    return list(values), checkpoints


def load_guessed(
    serde: SerializerProtocol,
    heads: ChainHeads,
    row: CheckpointRow,
    stored: Iterable[tuple[str, str]],
    values: Iterable[ValueRow],
    writes: Iterable[WriteRow],
) -> CheckpointTuple | None:
    """The tuple of ``row``, read with the value rows a guess named (``ChainHeads.guess``:
    ``stored``) and its writes; None if the guess does not hold: the row names other value
    rows, or it is a row of changes whose whole blob ``heads`` no longer keeps."""
    whole = None
    if row.chain_start is not None and (whole := heads.blob(row[:3], whole=True)) is None:
        return None
    checkpoint = load_checkpoint(serde, row, whole=whole)
    if dict(stored) != stored_versions(checkpoint):
        return None
    return load_tuple(serde, row, checkpoint, values, writes)


def assemble_page(
    serde: SerializerProtocol,
    candidates: Iterable[Candidate],
    values: Iterable[ValueRow],
    writes: Iterable[WriteRow],
) -> Iterator[CheckpointTuple]:
    """The ``CheckpointTuple``s of ``candidates``, from the value rows and write rows fetched
    for all of them together (extra rows are ignored), decoded one by one as iterated."""
    by_namespace: dict[tuple[str, str], dict[tuple[str, str], ValueRow]] = {}
    for value in values:
        by_namespace.setdefault(value[:2], {})[value.channel, value.version] = value
    by_checkpoint: dict[tuple[str, str, str], list[WriteRow]] = {}
    for write in writes:
        by_checkpoint.setdefault(write[:3], []).append(write)
    for row, checkpoint, metadata in candidates:
        named = by_namespace.get(row[:2], {})
        yield load_tuple(serde, row, checkpoint, named, by_checkpoint.get(row[:3], ()), metadata)


class PageQuery(NamedTuple):
    """One page of a ``list``, for a backend to render as SQL: newest first by
    ``(checkpoint_id, thread_id, checkpoint_ns)``, at most ``size`` rows."""

    thread_id: str | None
    checkpoint_ns: str | None
    checkpoint_id: str | None
    before_id: str | None
    """Only checkpoints with a smaller id."""
    filter: dict[str, Any] | None
    after: CheckpointRow | None
    """The page starts after this row (in the sort order), or at the start if None."""
    size: int

    @property
    def one_namespace(self) -> bool:
        """Thread and namespace are fixed: ``checkpoint_id`` alone orders the rows, and the
        next page is a range of it (otherwise copied threads tie on checkpoint ids)."""
        return self.thread_id is not None and self.checkpoint_ns is not None


_FIRST_PAGE = 16
_LARGEST_PAGE = 1024


class ListPager:
    """The state of one ``list`` call, read page by page (keyset pagination).

    Each page is fetched separately (``query()``, then ``advance()`` with what it found), so
    no statement, transaction or pooled connection stays held while the caller consumes
    results. Pages grow from 16 to 1024 rows.
    """

    def __init__(
        self,
        config: RunnableConfig | None,
        filter: dict[str, Any] | None,
        before: RunnableConfig | None,
        limit: int | None,
    ) -> None:
        configurable = (config or {}).get("configurable") or {}
        checkpoint_ns = configurable.get("checkpoint_ns")
        self._query = PageQuery(
            get_thread_id(config) if config is not None else None,
            None if checkpoint_ns is None else str(checkpoint_ns),
            configurable.get("checkpoint_id") or None,
            (get_checkpoint_id(before) if before is not None else None) or None,
            filter or None,
            None,
            _FIRST_PAGE,
        )
        self._remaining = limit
        self.done = limit is not None and limit <= 0

    def query(self) -> PageQuery:
        """The next page to fetch."""
        query = self._query
        if self._remaining is not None:
            # Only the exact filter check rejects rows (rarely: SQL matches almost exactly), so
            # ask for what is still wanted.
            wanted = max(query.size, self._remaining) if query.filter else self._remaining
            query = query._replace(size=min(wanted, _LARGEST_PAGE))
        return query

    def advance(
        self, query: PageQuery, rows: Sequence[CheckpointRow], page: Iterable[CheckpointTuple]
    ) -> list[CheckpointTuple]:
        """Record the page fetched for ``query``: ``rows`` as SQL returned them (before the
        exact filter), ``page`` the tuples they gave. Returns what the caller gets."""
        found = list(page)
        if self._remaining is not None:
            found = found[: self._remaining]
            self._remaining -= len(found)
        full = len(rows) >= query.size
        self._query = self._query._replace(
            after=rows[-1] if full else None, size=min(self._query.size * 2, _LARGEST_PAGE)
        )
        self.done = not full or self._remaining == 0
        return found

    def run(self, fetch: Callable[[PageQuery], _Fetched]) -> Iterator[CheckpointTuple]:
        """The listing, fetching each page with ``fetch(query) -> (rows, tuples)``."""
        while not self.done:
            query = self.query()
            yield from self.advance(query, *fetch(query))

    async def arun(
        self, fetch: Callable[[PageQuery], Awaitable[_Fetched]]
    ) -> AsyncIterator[CheckpointTuple]:
        """``run`` with an awaited ``fetch``."""
        while not self.done:
            query = self.query()
            for found in self.advance(query, *await fetch(query)):
                yield found


_Fetched = tuple[Sequence[CheckpointRow], Iterable[CheckpointTuple]]


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


# JSON copies of metadata narrow list(filter=...) in SQL, before metadata_matches decides.
# Contract: no false negatives. For stored metadata ``m`` and a filter ``f``,
# ``metadata_matches(m, f)`` implies that ``metadata_json(m)`` contains ``metadata_filter_json(f)``
# in the sense of jsonb ``@>`` (the SQLite saver checks the top level with json_each, which
# selects at least as much). SQL may select more; Python drops those rows. This holds for
# metadata made of None, booleans, strings, numbers (``numbers.Number``: int, float, Decimal,
# Fraction, numpy scalars, ...), mappings, lists and tuples; a value of any other type is
# assumed never equal to one of those (it is stored as null, and a filter does not constrain it).

# Strings JSON (or jsonb, or SQLite's JSON functions) cannot hold exactly, and strings that
# start with this mark, become the mark plus the hex of their UTF-8: distinct strings stay
# distinct, equal strings stay equal. A non-string key of stored metadata becomes the mark,
# "?" and its repr, which no escaped string equals (hex has no "?").
_MARK = "\uffff"
_UNCONSTRAINED: Any = object()


def metadata_json(metadata: Mapping[str, Any]) -> Any:
    """The JSON copy of stored metadata (plain ``dict``/``list``/``str``/``int``/``float``/
    ``bool``/``None``, ready for ``json.dumps`` or a jsonb parameter). A copy always: a jsonb
    parameter is encoded only when its statement runs, and the caller may have changed its
    metadata by then."""
    return _json_copy(metadata, for_filter=False)


json_text = json.JSONEncoder(separators=(",", ":")).encode
"""Compact JSON text. Escapes keep it ASCII, so every string is storable; one encoder for
all calls (``json.dumps`` builds one per call when given separators)."""


def metadata_json_text(metadata: Mapping[str, Any]) -> str:
    """``metadata_json(metadata)`` as JSON text, made at once (plain metadata is not copied
    first: ``_plain_json``)."""
    return json_text(metadata if _plain_json_or_not(metadata) else metadata_json(metadata))


def metadata_filter_json(filter: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON document a ``list(filter=...)`` selects with: stored metadata that matches
    ``filter`` contains it (``@>``). Parts SQL cannot judge (keys that are not strings, values
    of other types) are left out, so they select everything."""
    document: dict[str, Any] = _json_copy(filter, for_filter=True)
    return document


# Integers a float holds exactly: _json_number returns them unchanged.
_EXACT_INT = 1 << 53


def _json_copy(value: Any, *, for_filter: bool) -> Any:
    kind = type(value)  # exact types first: this runs for every saved step's metadata
    if kind is str:
        return _json_str(value)
    if kind is int and -_EXACT_INT <= value <= _EXACT_INT:
        return value
    if value is None or kind is bool:
        return value
    if isinstance(value, str):
        return _json_str(value)
    if isinstance(value, numbers.Number):
        return _json_number(value)
    if kind is dict or isinstance(value, Mapping):
        copy = {}
        for key, item in value.items():
            if isinstance(key, str):
                name = _json_str(key)
            elif for_filter:
                continue
            else:
                name = f"{_MARK}?{key!r}"
            item_copy = _json_copy(item, for_filter=for_filter)
            if item_copy is not _UNCONSTRAINED:
                copy[name] = item_copy
        return copy
    if isinstance(value, (list, tuple)):
        items = (_json_copy(item, for_filter=for_filter) for item in value)
        return [item for item in items if item is not _UNCONSTRAINED]
    return _UNCONSTRAINED if for_filter else None


def _json_str(text: str) -> str:
    if type(text) is str and text.isascii():  # the common case: kept unless it holds a NUL
        return text if "\x00" not in text else _MARK + text.encode().hex()
    text = text[:]  # a str subclass (StrEnum) compares as its plain value
    if "\x00" in text or text.startswith(_MARK) or not _is_utf8(text):
        return _MARK + text.encode("utf-8", "surrogatepass").hex()
    return str(text)


def _is_utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:  # a lone surrogate
        return False
    return True


def _json_number(value: Any) -> int | float | None:
    """Equal numbers of any types map to one JSON number: their value rounded to a float
    (conversions are correctly rounded), written as an integer when it is whole. Numbers no
    float holds (complex, infinite, NaN, too large) map to null."""
    try:
        number = complex(value)
    except (TypeError, ValueError, OverflowError):
        return None
    real = number.real
    if number.imag or not math.isfinite(real):
        return None
    return int(real) if real.is_integer() else real


# -- prune, delete_for_runs, copy_thread -----------------------------------------------------


def id_list(ids: Iterable[str], what: str) -> list[str]:
    """``ids`` (thread or run ids) as distinct strings, in order.

    A single ``str`` (or ``bytes``) is refused: iterating it would name one-character ids.
    """
    if isinstance(ids, (str, bytes)):
        raise TypeError(f"{what} must be a collection of ids, not a single {type(ids).__name__}")
    return [str(one) for one in dict.fromkeys(ids)]


def check_prune_strategy(strategy: str) -> None:
    if strategy not in ("keep_latest", "delete"):
        raise ValueError(f"Unknown prune strategy {strategy!r}: use 'keep_latest' or 'delete'.")


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


def prune_doomed(
    checkpoints: Iterable[CheckpointKey],
    *,
    keep_last: int | None = None,
    older_than: timedelta | None = None,
    now: datetime | None = None,
) -> set[tuple[str, str]]:
    """``(checkpoint_ns, checkpoint_id)`` of one thread's checkpoints that ``prune`` deletes:
    those ``checkpoints_to_keep`` does not keep."""
    checkpoints = list(checkpoints)
    keep = checkpoints_to_keep(checkpoints, keep_last=keep_last, older_than=older_than, now=now)
    return {(c.checkpoint_ns, c.checkpoint_id) for c in checkpoints} - keep


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
    chains: Iterable[CheckpointRow] = (),
) -> set[ValueKey]:
    """The value rows that ``rows`` (checkpoints of one thread) need to stay readable.

    ``bases`` maps the key of each of the thread's ``APPENDED_ITEMS`` rows to its
    ``base_version``: the rows a needed row's chain goes through are needed too. After
    ``prune`` or ``delete_for_runs`` removes checkpoints, a thread's value rows outside the set
    for its remaining checkpoints are garbage. ``chains``: more rows of the thread, to read
    rows of changes with.
    """
    rows = list(rows)
    blobs = ChainedBlobs(serde, itertools.chain(chains, rows))
    blobs.read_ahead(rows)
    needed: set[ValueKey] = set()
    for row in rows:
        versions = stored_versions(load_checkpoint(serde, row, blobs))
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


def deleted_values(
    serde: SerializerProtocol,
    deleted: Iterable[CheckpointRow],
    remaining: Iterable[CheckpointRow],
    bases: Mapping[ValueKey, str] | None = None,
) -> set[ValueKey]:
    """The value rows to delete with the ``deleted`` checkpoints of one thread.

    Only rows the deleted checkpoints name (with their chains) are candidates, minus those
    the ``remaining`` checkpoints need. So a row that another writer commits while the
    deletion runs (whatever the isolation level) is never taken for garbage: no deleted
    checkpoint names a version that did not exist when it was read. ``bases`` as in
    ``referenced_values``.
    """
    deleted, remaining = list(deleted), list(remaining)
    candidates = referenced_values(serde, deleted, bases, remaining)
    if not candidates:
        return candidates
    return candidates - referenced_values(serde, remaining, bases, deleted)


def unchained(
    serde: SerializerProtocol,
    remaining: Iterable[CheckpointRow],
    deleted: Iterable[CheckpointRow],
) -> list[CheckpointRow]:
    """The rows of changes among ``remaining`` (one thread's checkpoints after some were
    ``deleted``) that no longer lead to a whole blob, rewritten whole: the rows to update
    where ``prune`` or ``delete_for_runs`` cut a chain. Only the first row after each cut is
    rewritten; the rows after it lead to it. ``deleted`` must still hold the cut rows."""
    remaining = sorted(remaining, key=_checkpoint_id)  # ids grow along a chain
    by_key = {row[:3]: row for row in remaining}
    blobs = ChainedBlobs(serde, itertools.chain(deleted, remaining))
    whole: set[tuple[str, str, str]] = set()  # rows that are, or lead to, a whole blob
    rewritten = []
    for row in remaining:
        if row.chain_start is None:
            whole.add(row[:3])
            continue
        parent_key = (row.thread_id, row.checkpoint_ns, row.parent_checkpoint_id or "")
        if parent_key not in by_key or parent_key not in whole:
            type_, data = _Where.of(row).dumps(serde, blobs.whole(row), "the checkpoint")
            rewritten.append(row._replace(checkpoint_type=type_, checkpoint=data, chain_start=None))
        whole.add(row[:3])
    return rewritten


def _checkpoint_id(row: CheckpointRow) -> str:
    return row.checkpoint_id


_Row = TypeVar("_Row", CheckpointRow, ValueRow, WriteRow)


def rekey(rows: Iterable[_Row], thread_id: str) -> list[_Row]:
    """``rows`` moved to another thread, for ``copy_thread``.

    Nothing inside the stored bytes names the thread, so copying is re-keying.
    """
    return [row._replace(thread_id=thread_id) for row in rows]


# -- schema ----------------------------------------------------------------------------------


def check_schema_version(found: int, known: int, package: str) -> None:
    """Refuse a database whose schema is newer than the saver knows (``known``, the number of
    its migrations): it may hold rows this version would misread."""
    if found > known:
        raise RuntimeError(
            f"This database has checkpoint schema version {found}, newer than version {known} "
            f"known to this {package}: upgrade the package."
        )


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

    def dumps(
        self, serde: SerializerProtocol, value: Any, part: str, *args: object
    ) -> tuple[str, bytes]:
        """``serde.dumps_typed(value)``; an error names the row and ``part % args`` (formatted
        only then: this runs for every value of every step)."""
        try:
            return serde.dumps_typed(value)
        except SerializationError as exc:
            error = UnknownTypeError if isinstance(exc, UnknownTypeError) else SerializationError
            message = self.describe(f"Cannot save {part % args if args else part}", exc)
            raise error(message, type_name=exc.type_name, path=exc.path) from exc

    def loads(
        self, serde: SerializerProtocol, data: tuple[str, bytes], part: str, *args: object
    ) -> Any:
        """``serde.loads_typed(data)``; an error names the row and ``part % args``."""
        try:
            return serde.loads_typed(data)
        except UnknownTypeError as exc:
            message = self.describe(f"Cannot read {part % args if args else part}", exc)
            raise UnknownTypeError(message, type_name=exc.type_name) from exc
        except Exception as exc:
            # Truncated or corrupted bytes surface as whatever the decoder raises.
            what = part % args if args else part
            raise CorruptCheckpointError(self.describe(f"Cannot read {what}", exc)) from exc
