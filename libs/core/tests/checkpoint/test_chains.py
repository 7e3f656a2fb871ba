"""Checkpoint blobs stored as changes to their parent's blob (``storage.ChainHeads``)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stepgraph.checkpoint.base import Checkpoint, empty_checkpoint
from stepgraph.checkpoint.base.id import uuid6
from stepgraph.checkpoint.serde import MsgpackSerializer
from stepgraph.checkpoint.storage import (
    _NO_VALUE,
    MAX_CHAIN,
    ChainHeads,
    CheckpointRow,
    CheckpointRows,
    CorruptCheckpointError,
    _is_small,
    chain_spans,
    checkpoint_rows,
    load_checkpoint,
    page_candidates,
    referenced_values,
    stored_versions,
    unchained,
)
from stepgraph.config import RunnableConfig
from stepgraph.errors import UnknownTypeError

serde = MsgpackSerializer()


def at(parent: str | None, ns: str = "") -> RunnableConfig:
    configurable: dict[str, Any] = {"thread_id": "t", "checkpoint_ns": ns}
    if parent is not None:
        configurable["checkpoint_id"] = parent
    return {"configurable": configurable}


def step(checkpoint: Checkpoint, n: int) -> Checkpoint:
    """The next checkpoint of a chain-shaped graph, as the executor saves it: node n ran, its
    trigger was consumed, the next one set (``new_versions`` in ``updated_channels``)."""
    after = copy.deepcopy(checkpoint)
    after["id"] = str(uuid6())
    version = f"{n + 2:08x}.{n:016x}"
    changed = ["x", f"to:n{n}", f"to:n{n + 1}"]
    after["channel_versions"].update(dict.fromkeys(changed, version))
    after["versions_seen"][f"n{n}"] = {f"to:n{n}": f"{n + 1:08x}.{n - 1:016x}"}
    after["versions_seen_changes"] = [f"n{n}"]
    after["channel_values"]["x"] = n
    after["channel_values"].pop(f"to:n{n}", None)
    after["channel_values"][f"to:n{n + 1}"] = None
    after["updated_channels"] = changed
    return after


def new_versions(checkpoint: Checkpoint) -> dict[str, Any]:
    return {c: checkpoint["channel_versions"][c] for c in checkpoint["updated_channels"] or ()}


def save_chain(
    heads: ChainHeads | None,
    length: int,
    *,
    keep_blobs: bool = False,
    make_step: Callable[[Checkpoint, int], Checkpoint] = step,
) -> tuple[list[Checkpoint], list[CheckpointRow]]:
    checkpoint = empty_checkpoint()
    checkpoints, rows = [], []
    parent = None
    for n in range(length):
        checkpoint = make_step(checkpoint, n)
        saved = checkpoint_rows(
            serde,
            at(parent),
            checkpoint,
            {"step": n},
            new_versions(checkpoint),
            inline=True,
            heads=heads,
        )
        if heads is not None:
            heads.saved(saved, serde if keep_blobs else None)
        checkpoints.append(checkpoint)
        rows.append(saved.checkpoint)
        parent = checkpoint["id"]
    return checkpoints, rows


def read(
    row: CheckpointRow, rows: list[CheckpointRow], heads: ChainHeads | None = None
) -> Checkpoint:
    [found] = page_candidates(serde, [row], chains=rows, heads=heads)
    return found.checkpoint


def without_values(checkpoint: Checkpoint) -> dict[str, Any]:
    """The blob's part of a checkpoint (``load_tuple`` fills in the values)."""
    hints = ("channel_values", "versions_seen_changes")
    return {k: v for k, v in checkpoint.items() if k not in hints}


def test_rows_after_the_first_store_changes_and_read_back_whole() -> None:
    checkpoints, rows = save_chain(ChainHeads(), MAX_CHAIN + 1)
    _, whole_rows = save_chain(None, MAX_CHAIN + 1)
    assert rows[0].chain_start is None
    assert all(row.chain_start == rows[0].checkpoint_id for row in rows[1:])
    # Later rows stay small while whole blobs grow with the graph.
    assert len(rows[-1].checkpoint) < len(whole_rows[-1].checkpoint) / 3
    for checkpoint, row in zip(checkpoints, rows, strict=True):
        assert without_values(read(row, rows)) == without_values(checkpoint)


def test_a_chain_restarts_whole_after_max_chain_rows_of_changes() -> None:
    _, rows = save_chain(ChainHeads(), MAX_CHAIN + 3)
    starts = [row.chain_start for row in rows]
    assert starts[: MAX_CHAIN + 1] == [None] + [rows[0].checkpoint_id] * MAX_CHAIN
    assert starts[MAX_CHAIN + 1] is None
    assert starts[MAX_CHAIN + 2] == rows[MAX_CHAIN + 1].checkpoint_id


def test_forks_and_self_contained_rows_are_whole() -> None:
    heads = ChainHeads()
    checkpoints, rows = save_chain(heads, 3)
    fork = step(checkpoints[0], 7)
    forked = checkpoint_rows(
        serde, at(rows[0].checkpoint_id), fork, {}, new_versions(fork), heads=heads
    )
    assert forked.checkpoint.chain_start is None  # its parent is not the one remembered
    again = step(checkpoints[-1], 8)
    alone = checkpoint_rows(
        serde, at(rows[-1].checkpoint_id), again, {}, {}, heads=heads, self_contained=True
    )
    assert alone.checkpoint.chain_start is None
    other_ns = checkpoint_rows(
        serde, at(rows[-1].checkpoint_id, "sub"), again, {}, new_versions(again), heads=heads
    )
    assert other_ns.checkpoint.chain_start is None


def test_a_checkpoint_without_the_executors_word_is_whole() -> None:
    """A direct ``put`` does not say what changed since its parent: its blob is stored whole."""
    heads = ChainHeads()
    checkpoints, rows = save_chain(heads, 2)
    after = step(checkpoints[-1], 2)
    del after["versions_seen_changes"]
    saved = checkpoint_rows(
        serde, at(rows[-1].checkpoint_id), after, {}, new_versions(after), heads=heads
    )
    assert saved.checkpoint.chain_start is None


def test_a_missing_row_of_the_chain_is_named() -> None:
    _, rows = save_chain(ChainHeads(), 4)
    with pytest.raises(CorruptCheckpointError) as raised:
        read(rows[3], [rows[0], rows[1], rows[3]])
    message = str(raised.value)
    assert rows[3 - 1].checkpoint_id in message and "'t'" in message and "missing" in message
    with pytest.raises(CorruptCheckpointError, match="rows of its chain"):
        load_checkpoint(serde, rows[2])


def test_a_corrupt_row_of_changes_is_named() -> None:
    _, rows = save_chain(ChainHeads(), 3)
    bad = rows[1]._replace(checkpoint=serde.dumps_typed({"maps": 5})[1])
    with pytest.raises(CorruptCheckpointError, match=rf"{bad.checkpoint_id}.*bad row of changes"):
        read(rows[2], [rows[0], bad, rows[2]])
    # Bytes that do not decode, and a tag no serializer knows: the decoder's own errors.
    cut = rows[1]._replace(checkpoint=rows[1].checkpoint[:5])
    with pytest.raises(CorruptCheckpointError, match=rf"{cut.checkpoint_id}.*incomplete input"):
        read(rows[2], [rows[0], cut, rows[2]])
    alien = rows[1]._replace(checkpoint_type="alien")
    with pytest.raises(UnknownTypeError, match=rf"{alien.checkpoint_id}.*alien"):
        read(rows[2], [rows[0], alien, rows[2]])


def test_chain_spans_cover_each_chain_once() -> None:
    _, rows = save_chain(ChainHeads(), 5)
    assert chain_spans(rows) == [("t", "", rows[0].checkpoint_id, rows[-1].checkpoint_id)]
    assert chain_spans(rows[:1]) == []


def test_unchained_rewrites_the_first_row_after_a_cut() -> None:
    checkpoints, rows = save_chain(ChainHeads(), 8)
    deleted, remaining = rows[:4], rows[4:]
    rewritten = unchained(serde, remaining, deleted)
    assert [row.checkpoint_id for row in rewritten] == [rows[4].checkpoint_id]
    assert rewritten[0].chain_start is None
    after = [rewritten[0], *rows[5:]]
    for checkpoint, row in zip(checkpoints[4:], after, strict=True):
        assert without_values(read(row, after)) == without_values(checkpoint)
    assert unchained(serde, rows[:4], rows[4:]) == []  # the chain's start is kept


def test_referenced_values_read_rows_of_changes() -> None:
    heads = ChainHeads()
    first = empty_checkpoint()
    first["channel_values"] = {"big": "x" * 100}
    first["channel_versions"] = {"big": "1"}
    one = checkpoint_rows(serde, at(None), first, {}, {"big": "1"}, inline=True, heads=heads)
    heads.saved(one)
    second = step(first, 1)
    two = checkpoint_rows(
        serde, at(first["id"]), second, {}, new_versions(second), inline=True, heads=heads
    )
    assert two.checkpoint.chain_start is not None
    needed = referenced_values(serde, [two.checkpoint], chains=[one.checkpoint])
    assert needed == {("", "big", "1")}


def test_heads_forget_the_least_recently_saved() -> None:
    heads = ChainHeads(size=2)
    made: list[CheckpointRows] = []
    for thread_id in ("a", "b", "c"):
        config: RunnableConfig = {"configurable": {"thread_id": thread_id}}
        made.append(checkpoint_rows(serde, config, empty_checkpoint(), {}, {}, heads=heads))
        heads.saved(made[-1])
    assert heads.get("a", "") is None
    assert heads.get("c", "") == made[-1].link


_EMPTIED: Any = object()
small = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.floats(-2, 2), st.text(max_size=3)
)
values = st.one_of(small, st.lists(st.integers(), max_size=2), st.just("x" * 80))
# One step: for each channel it changes, its new value or None for "emptied"; the nodes that ran.
steps = st.tuples(
    st.dictionaries(st.sampled_from("abcdef"), st.one_of(st.just(_EMPTIED), values), max_size=4),
    st.lists(st.sampled_from("nmo"), unique=True, max_size=2),
)


# No time limits: a cold or loaded machine makes the first examples slow, never wrong.
@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(steps, min_size=2, max_size=6))
def test_any_sequence_of_steps_reads_back_exactly(sequence: list[Any]) -> None:
    """Whatever channels change (to small, large or no values) and whatever nodes run, every
    row of changes reads back as the whole blob of its checkpoint, types included."""
    heads = ChainHeads()
    checkpoint = empty_checkpoint()
    saved: list[tuple[Checkpoint, CheckpointRow]] = []
    parent = None
    for number, (changes, ran) in enumerate(sequence):
        checkpoint = copy.deepcopy(checkpoint)
        checkpoint["id"] = str(uuid6())
        version = f"{number + 1:08x}.0"
        for channel, value in changes.items():
            checkpoint["channel_versions"][channel] = version
            if value is _EMPTIED:
                checkpoint["channel_values"].pop(channel, None)
            else:
                checkpoint["channel_values"][channel] = value
        for node in ran:
            checkpoint["versions_seen"][node] = {"a": version}
        checkpoint["versions_seen_changes"] = list(ran)
        checkpoint["updated_channels"] = sorted(changes)
        stored = checkpoint_rows(
            serde,
            at(parent),
            checkpoint,
            {},
            dict.fromkeys(changes, version),
            inline=True,
            heads=heads,
        )
        heads.saved(stored)
        saved.append((copy.deepcopy(checkpoint), stored.checkpoint))
        parent = checkpoint["id"]
    rows = [row for _, row in saved]
    assert all(row.chain_start is not None for row in rows[1:])
    for checkpoint, row in saved:
        [found] = page_candidates(serde, [row], chains=rows)
        read = found.checkpoint
        inline = {k: v for k, v in read["channel_values"].items() if v is not _NO_VALUE}
        wanted = {k: v for k, v in checkpoint["channel_values"].items() if _is_small(v)}
        assert typed(inline) == typed(wanted)
        emptied = {k for k, v in read["channel_values"].items() if v is _NO_VALUE}
        assert (
            emptied == checkpoint["channel_versions"].keys() - checkpoint["channel_values"].keys()
        )
        assert without_values(read) == without_values(checkpoint)


def typed(value: Any) -> Any:
    if isinstance(value, dict):
        return sorted((key, typed(item)) for key, item in value.items())
    if isinstance(value, list):
        return [typed(item) for item in value]
    return type(value).__name__, repr(value)


def test_a_step_that_removes_a_channel_or_node_is_whole() -> None:
    """Steps never remove one, but a checkpoint that does is stored whole, not as changes."""
    heads = ChainHeads()
    checkpoints, rows = save_chain(heads, 2)
    for remove in ("channel_versions", "versions_seen"):
        after = step(checkpoints[-1], 2)
        changed = new_versions(after)
        if remove == "channel_versions":
            del after["channel_versions"]["to:n2"]
        else:
            del after["versions_seen"]["n2"]
        saved = checkpoint_rows(serde, at(rows[-1].checkpoint_id), after, {}, changed, heads=heads)
        assert saved.checkpoint.chain_start is None
        assert saved.link.depth == 0


# -- kept blobs --------------------------------------------------------------------------------


def key(row: CheckpointRow) -> tuple[str, str, str]:
    return row.thread_id, row.checkpoint_ns, row.checkpoint_id


def test_saved_blobs_follow_the_chain_and_shorten_reads() -> None:
    """``saved(rows, serde)`` carries the blob along the chain (STEPGRAPH_CHECK_CHAINS checks
    each against the whole blob), so a read of the head applies none of the chain's rows: it
    succeeds with every row of the chain but its own missing."""
    heads = ChainHeads()
    checkpoints, rows = save_chain(heads, 12, keep_blobs=True)
    assert rows[-1].chain_start == rows[0].checkpoint_id  # one chain
    assert without_values(read(rows[-1], rows[:1] + rows[-1:], heads)) == without_values(
        checkpoints[-1]
    )
    with pytest.raises(CorruptCheckpointError, match="missing"):
        read(rows[-1], rows[:1] + rows[-1:])  # without the kept blob, a row is missing
    # Only the head is kept: its ancestors' entries were given up as it moved on.
    assert heads.blob(key(rows[-2])) is None


def test_a_read_keeps_what_it_built_and_later_reads_start_there() -> None:
    checkpoints, rows = save_chain(ChainHeads(), 10)  # saved without keeping blobs
    heads = ChainHeads()
    assert without_values(read(rows[5], rows[:6], heads)) == without_values(checkpoints[5])
    # rows[1:5] are no longer needed: the read of rows[8] goes through the kept rows[5].
    found = read(rows[8], [rows[0], *rows[5:9]], heads)
    assert without_values(found) == without_values(checkpoints[8])


def step_with_document(checkpoint: Checkpoint, n: int) -> Checkpoint:
    """``step``, and a channel too big to travel inline changed at every other step."""
    after = step(checkpoint, n)
    if n % 2 == 0:
        after["channel_versions"]["doc"] = after["channel_versions"]["x"]
        after["channel_values"]["doc"] = f"{n}" * 100
        after["updated_channels"] = [*(after["updated_channels"] or ()), "doc"]
    return after


def test_guess_names_the_value_rows_a_read_would_fetch() -> None:
    def wanted(n: int, rows: list[CheckpointRow]) -> tuple[str, list[tuple[str, str]]]:
        return rows[n].checkpoint_id, list(stored_versions(read(rows[n], rows[: n + 1])).items())

    for length in (1, 6):  # a whole blob, then one carried along the chain
        heads = ChainHeads()
        assert heads.guess("t", "") is None
        _, rows = save_chain(heads, length, keep_blobs=True, make_step=step_with_document)
        assert wanted(length - 1, rows)[1]  # the document has a value row
        assert rows[-1].chain_start is (None if length == 1 else rows[0].checkpoint_id)
        assert heads.guess("t", "") == wanted(length - 1, rows)
        assert heads.guess("t", "", rows[-1].checkpoint_id) == wanted(length - 1, rows)
        assert heads.guess("t", "other") is None
    # A read that found the newest checkpoint says what it names: no blob needed.
    newest = (rows[2].checkpoint_id, [("doc", "v")])
    heads.seen_newest("t", "", *newest)
    assert heads.guess("t", "") == newest
    assert heads.guess("t", "", rows[2].checkpoint_id) == newest
    assert heads.guess("t", "", rows[1].checkpoint_id) is None  # neither newest nor kept
    assert heads.guess("t", "", rows[-1].checkpoint_id) == wanted(length - 1, rows)  # kept
    heads.forget(["t"])
    assert heads.guess("t", "") is None


def test_kept_blobs_are_bounded_and_private() -> None:
    heads = ChainHeads(blobs=2)
    kept = []
    for ns in ("a", "b", "c"):
        config = at(None, ns)
        rows = checkpoint_rows(serde, config, empty_checkpoint(), {}, {}, heads=heads)
        heads.saved(rows, serde)
        kept.append(key(rows.checkpoint))
    assert heads.blob(kept[0]) is None
    copy = heads.blob(kept[2])
    assert copy is not None
    copy["channel_versions"]["changed"] = "by the caller"
    again = heads.blob(kept[2])
    assert again is not None and "changed" not in again["channel_versions"]
    assert ChainHeads(blobs=0).blob(kept[2]) is None


def test_kept_blobs_fit_their_byte_budget() -> None:
    """A blob's size is estimated from the rows it was built from; the least recently used
    go first, and one larger than the whole budget is not kept at all."""
    _, rows = save_chain(heads := ChainHeads(blob_bytes=1), 3, keep_blobs=True)
    assert heads.blob(key(rows[-1])) is None
    roomy = ChainHeads(blob_bytes=10_000)
    _, first = save_chain(roomy, 3, keep_blobs=True)
    assert roomy.blob(key(first[-1])) is not None
    size = sum(len(row.checkpoint) for row in first)  # the head's estimate: its chain's rows
    tight = ChainHeads(blob_bytes=size + size // 2)
    _, first = save_chain(tight, 3, keep_blobs=True)
    _, second = save_chain(tight, 3, keep_blobs=True)  # a second chain does not fit beside it
    assert tight.blob(key(first[-1])) is None
    assert tight.blob(key(second[-1])) is not None


def test_a_blob_over_the_whole_budget_pushes_out_nothing() -> None:
    heads = ChainHeads(blob_bytes=2_000)
    _, small = save_chain(heads, 2, keep_blobs=True)
    big = empty_checkpoint()
    big["channel_versions"] = {f"channel-{i}": f"{i:08x}.{i:016x}" for i in range(200)}
    rows = checkpoint_rows(serde, at(None, "big"), big, {}, dict(big["channel_versions"]))
    heads.saved(rows, serde)
    assert heads.blob(key(rows.checkpoint)) is None
    assert heads.blob(key(small[-1])) is not None


def test_kept_blobs_of_a_thread_are_forgotten() -> None:
    heads = ChainHeads()
    _, rows = save_chain(heads, 3, keep_blobs=True)
    heads.forget(["other"])
    assert heads.blob(key(rows[-1])) is not None
    heads.forget(["t"])
    assert heads.blob(key(rows[-1])) is None


def test_what_a_read_returns_is_the_callers_own() -> None:
    """A key of a shape the saver does not know (a caller's, another version's) is copied
    whole: changing what a read returned must not change what the next read returns."""
    heads = ChainHeads()
    first = empty_checkpoint()
    first["extra"] = {"nested": [1]}  # type: ignore[typeddict-unknown-key]
    one = checkpoint_rows(serde, at(None), first, {}, {}, inline=True, heads=heads)
    heads.saved(one, serde)
    second = step(first, 1)
    two = checkpoint_rows(
        serde, at(first["id"]), second, {}, new_versions(second), inline=True, heads=heads
    )
    heads.saved(two, serde)
    read(two.checkpoint, [one.checkpoint], heads)["extra"]["nested"].append("changed")  # type: ignore[typeddict-item]
    again = read(two.checkpoint, [one.checkpoint], heads)
    assert again["extra"] == {"nested": [1]}  # type: ignore[typeddict-item]


def test_kept_blobs_under_concurrent_saves_and_reads() -> None:
    """Writers carry their namespaces' blobs forward while readers copy and remember them,
    with a budget small enough that entries come and go: every read is still exact."""
    import threading

    heads = ChainHeads(blobs=6)
    failures: list[BaseException] = []
    saved: dict[str, list[tuple[Checkpoint, CheckpointRow]]] = {}

    def write(ns: str) -> None:
        checkpoint, parent = empty_checkpoint(), None
        history = saved.setdefault(ns, [])
        for n in range(60):
            checkpoint = step(checkpoint, n)
            rows = checkpoint_rows(
                serde, at(parent, ns), checkpoint, {}, new_versions(checkpoint),
                inline=True, heads=heads,
            )  # fmt: skip
            heads.saved(rows, serde)
            history.append((checkpoint, rows.checkpoint))
            parent = checkpoint["id"]

    def read(ns: str) -> None:
        for _ in range(300):
            history = list(saved.get(ns, ()))
            if not history:
                continue
            checkpoint, row = history[-1]
            rows = [found for _, found in history]
            [found] = page_candidates(serde, [row], chains=rows, heads=heads)
            assert without_values(found.checkpoint) == without_values(checkpoint)

    def guarded(target: Any, ns: str) -> None:
        try:
            target(ns)
        except BaseException as error:  # reported below, with the thread's name
            failures.append(error)

    names = [f"ns{i}" for i in range(4)]
    threads = [
        threading.Thread(target=guarded, args=(target, ns))
        for ns in names
        for target in (write, read, read)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
