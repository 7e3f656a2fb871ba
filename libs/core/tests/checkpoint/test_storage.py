"""The backend-neutral storage logic: rows from saves, tuples from rows, filter, prune."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from typing import Any, NamedTuple

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stepgraph.checkpoint.base import (
    ERROR,
    INTERRUPT,
    Checkpoint,
    CheckpointTuple,
    TaskWrites,
    empty_checkpoint,
)
from stepgraph.checkpoint.serde import MsgpackSerializer
from stepgraph.checkpoint.storage import (
    APPENDED_ITEMS,
    FULL_VALUE,
    METADATA_IN_JSON,
    ONE_WRITE,
    TASK_WRITES,
    CheckpointRows,
    CorruptCheckpointError,
    WriteRow,
    checkpoint_rows,
    checkpoints_to_keep,
    index_values,
    load_checkpoint,
    load_metadata,
    load_tuple,
    metadata_filter_json,
    metadata_json,
    metadata_matches,
    referenced_values,
    rekey,
    stored_versions,
    write_rows,
)
from stepgraph.config import RunnableConfig
from stepgraph.errors import SerializationError, UnknownTypeError

serde = MsgpackSerializer()


def thread(thread_id: str = "t", checkpoint_ns: str = "", **extra: Any) -> RunnableConfig:
    return {"configurable": {"thread_id": thread_id, "checkpoint_ns": checkpoint_ns, **extra}}


def make_checkpoint(values: dict[str, Any], versions: dict[str, str]) -> Checkpoint:
    checkpoint = empty_checkpoint()
    checkpoint["channel_values"] = dict(values)
    checkpoint["channel_versions"] = dict(versions)
    return checkpoint


def read_back(rows: CheckpointRows, writes: Sequence[WriteRow] = ()) -> CheckpointTuple:
    checkpoint = load_checkpoint(serde, rows.checkpoint)
    return load_tuple(serde, rows.checkpoint, checkpoint, rows.values, writes)


class Unregistered:
    pass


class Point(NamedTuple):
    x: int


# -- rows from saves -------------------------------------------------------------------------


def test_put_stores_values_only_for_new_versions() -> None:
    checkpoint = make_checkpoint({"a": 1, "b": 2}, {"a": "1", "b": "2", "gone": "3"})
    rows = checkpoint_rows(serde, thread(checkpoint_id="parent"), checkpoint, {}, {"b": "2"})
    assert [(v.channel, v.version) for v in rows.values] == [("b", "2")]
    assert rows.checkpoint.parent_checkpoint_id == "parent"
    assert rows.writes == []

    emptied = checkpoint_rows(serde, thread(), checkpoint, {}, {"gone": "3"})
    assert [(v.channel, v.type, v.value) for v in emptied.values] == [("gone", None, None)]


def test_checkpoint_blob_leaves_out_values_id_and_ts() -> None:
    checkpoint = make_checkpoint({"a": "x" * 1000}, {"a": "1"})
    row = checkpoint_rows(serde, thread(), checkpoint, {}, {"a": "1"}).checkpoint
    blob = serde.loads_typed((row.checkpoint_type, row.checkpoint))
    assert set(blob) == {"v", "channel_versions", "versions_seen", "updated_channels"}
    assert (row.checkpoint_id, row.ts) == (checkpoint["id"], checkpoint["ts"])


def test_metadata_merges_config_and_exposes_run_id() -> None:
    config: RunnableConfig = {**thread(), "metadata": {"user": "u", "run_id": "r-1"}}
    rows = checkpoint_rows(serde, config, empty_checkpoint(), {"source": "input", "step": -1}, {})
    found = read_back(rows)
    assert found.metadata == {"source": "input", "step": -1, "user": "u", "run_id": "r-1"}
    assert rows.checkpoint.run_id == "r-1"


def test_round_trip_builds_configs_and_orders_writes() -> None:
    checkpoint = make_checkpoint({"a": [1]}, {"a": "1"})
    rows = checkpoint_rows(serde, thread("t", "ns", checkpoint_id="p"), checkpoint, {}, {"a": "1"})
    at = thread("t", "ns", checkpoint_id=checkpoint["id"])
    writes = [
        *write_rows(serde, at, [("x", 1), ("y", 2)], "task-b"),
        *write_rows(serde, at, [("z", 3), (ERROR, "e")], "task-a", "path"),
    ]
    found = read_back(rows, list(reversed(writes)))
    assert found.config == at
    assert found.parent_config == thread("t", "ns", checkpoint_id="p")
    assert found.checkpoint == checkpoint
    assert found.pending_writes == [  # by task path ("" first), task id, index
        ("task-b", "x", 1),
        ("task-b", "y", 2),
        ("task-a", ERROR, "e"),
        ("task-a", "z", 3),
    ]


def test_write_rows_index_rule() -> None:
    rows = write_rows(serde, thread(checkpoint_id="c"), [("a", 1), (INTERRUPT, 2), ("b", 3)], "t")
    assert [(row.idx, row.replaces_existing) for row in rows] == [
        (-3, True),
        (0, False),
        (2, False),
    ]
    assert {row.task_path for row in rows} == {""}


@pytest.mark.parametrize(
    ("metadata", "json_only"),
    [
        ({"source": "loop", "step": 3, "parents": {"": "1f0"}, "ok": True, "f": 0.5}, True),
        ({"nested": {"list": [1, "a", None, {"b": False}]}}, True),
        ({"whole float": 1.0}, False),  # JSON's copy says 1
        ({"nul": "a\x00b"}, False),
        ({"tuple": (1, 2)}, False),
        ({"big": 2**60}, True),
        ({"bigger": 2**60 + 1}, False),  # the JSON copy rounds it to a float's
        ({"lone": "\ud800"}, False),
        ({"decimal": Decimal("0.5")}, False),
        ({"inf": float("inf")}, False),
        ({1: "key not a string"}, False),
    ],
)
def test_metadata_that_json_holds_exactly_is_stored_once(metadata: Any, json_only: bool) -> None:
    rows = checkpoint_rows(
        serde, thread("t"), make_checkpoint({}, {}), metadata, {}, json_metadata=True
    )
    row = rows.checkpoint
    assert (row.metadata_type == METADATA_IN_JSON) is json_only
    if json_only:
        assert row.metadata == b""
        text = json.dumps(rows.metadata_json, separators=(",", ":"))
        row = row._replace(metadata=text.encode())  # what the saver reads back
    loaded = load_metadata(serde, row)
    assert repr(loaded) == repr(metadata)  # types and key order too


def test_metadata_judged_plain_json_copies_unchanged() -> None:
    """The one-pass check that spares the executor's metadata its JSON copy never says yes
    where the copy would differ (it may say no where it would not)."""
    from stepgraph.checkpoint import storage

    values: list[Any] = [
        "a", "é", "a\x00", "\ud800", 0, -(2**53), 2**53, 2**53 + 1, 2**60, 0.5, 1.0, -0.0,
        float("nan"), True, None, Decimal("0.5"), (1,), [1, [2, {"a": 0.25}]], {"k": 1},
        {"k": (1,)}, {1: 2}, {"é": 1}, {"a\x00": 1}, [1.0], {"n": {"m": [None, False]}},
    ]  # fmt: skip
    for value in values:
        if storage._plain_json(value, 0):
            copy = metadata_json({"v": value})["v"]
            assert storage._same_json(value, copy), value
    deep: Any = 1
    for _ in range(70):
        deep = [deep]
    assert not storage._plain_json(deep, 0)


def test_the_json_copy_of_metadata_shares_nothing_with_it() -> None:
    """Postgres hands the copy to a jsonb parameter, encoded only when the statement runs:
    changes the caller makes to its metadata meanwhile must not reach it."""
    metadata = {"info": {"k": "a"}, "tags": ["x"]}
    copy = metadata_json(metadata)
    metadata["info"]["k"] = "b"
    metadata["tags"].append("y")
    assert copy == {"info": {"k": "a"}, "tags": ["x"]}


def test_a_tasks_regular_writes_share_one_row() -> None:
    checkpoint = make_checkpoint({}, {})
    rows = checkpoint_rows(serde, thread("t"), checkpoint, {}, {})
    at = thread("t", checkpoint_id=checkpoint["id"])
    values = [("a", 1), ("b", None), ("c", b"\x00"), ("d", bytearray(b"1")), ("a", [2])]
    written = write_rows(serde, at, [(ERROR, "e"), *values], "task", "path")
    assert [(row.idx, row.channel, row.kind) for row in written] == [
        (-1, ERROR, ONE_WRITE),
        (5, "", TASK_WRITES),  # keyed by its last index
    ]
    found = read_back(rows, written).pending_writes
    assert found == [("task", ERROR, "e"), *(("task", c, v) for c, v in values)]
    # Each value typed as a row of its own would type it.
    assert [type(value) for _task, _channel, value in found[1:]] == [
        int, type(None), bytes, bytearray, list,
    ]  # fmt: skip


def test_a_task_whose_writes_are_saved_again_reads_as_the_fullest_list() -> None:
    """The executor saves the updates of the ``Command``s sent to one checkpoint as one list
    that grows; a repeat with fewer writes adds nothing."""
    checkpoint = make_checkpoint({}, {})
    rows = checkpoint_rows(serde, thread("t"), checkpoint, {}, {})
    at = thread("t", checkpoint_id=checkpoint["id"])
    calls = [[("a", 1)], [("a", 1), ("b", 2)], [("a", 1), ("b", 2), ("c", 3)], [("a", 0)]]
    written = [row for writes in calls for row in write_rows(serde, at, writes, "task")]
    keys = [(row.idx, row.kind) for row in written]
    assert keys == [(0, ONE_WRITE), (1, TASK_WRITES), (2, TASK_WRITES), (0, ONE_WRITE)]
    stored = {row.idx: row for row in reversed(written)}  # insert-or-ignore keeps the first
    found = read_back(rows, list(stored.values())).pending_writes
    assert found == [("task", "a", 1), ("task", "b", 2), ("task", "c", 3)]
    shorter = write_rows(serde, at, [("a", "other"), ("b", "other")], "task")
    found = read_back(rows, [*shorter, *stored.values()]).pending_writes
    assert found == [("task", "a", 1), ("task", "b", 2), ("task", "c", 3)]
    # A special write between regular ones: a row each, keyed by its own index.
    mixed = write_rows(serde, at, [(INTERRUPT, "i"), ("c", 3), (INTERRUPT, "j"), ("d", 4)], "t2")
    assert [row.idx for row in mixed] == [-3, -3, 1, 3]
    found = read_back(rows, [mixed[1], *mixed[2:]]).pending_writes
    assert found == [("t2", INTERRUPT, "j"), ("t2", "c", 3), ("t2", "d", 4)]


def test_packed_writes_keep_channels_with_lone_surrogates() -> None:
    checkpoint = make_checkpoint({}, {})
    rows = checkpoint_rows(serde, thread("t"), checkpoint, {}, {})
    at = thread("t", checkpoint_id=checkpoint["id"])
    writes = [("chan\ud83d", 1), ("other\udfff", 2)]
    (packed,) = write_rows(serde, at, writes, "task")
    assert packed.kind == TASK_WRITES
    assert read_back(rows, [packed]).pending_writes == [("task", c, v) for c, v in writes]


def test_deeply_nested_metadata_is_serialized_as_before() -> None:
    deep: Any = "leaf"
    for _ in range(600):
        deep = {"k": deep}
    rows = checkpoint_rows(
        serde, thread("t"), make_checkpoint({}, {}), {"deep": deep}, {}, json_metadata=True
    )
    assert rows.checkpoint.metadata_type != METADATA_IN_JSON  # too deep to compare: serialized
    assert load_metadata(serde, rows.checkpoint)["deep"] == deep


def test_an_unreadable_row_of_task_writes_names_the_task() -> None:
    checkpoint = make_checkpoint({}, {})
    rows = checkpoint_rows(serde, thread("t"), checkpoint, {}, {})
    at = thread("t", checkpoint_id=checkpoint["id"])
    (packed,) = write_rows(serde, at, [("a", 1), ("b", 2)], "task-x")
    for broken in (
        packed._replace(value=packed.value[:-3]),
        packed._replace(value=b"\x93\x01\x02\x03"),  # three numbers, no channel
        packed._replace(kind=7),
    ):
        with pytest.raises(CorruptCheckpointError, match=r"writes of task 'task-x'.*thread 't'"):
            read_back(rows, [broken])


def test_put_step_rows_include_task_writes_against_parent() -> None:
    checkpoint = make_checkpoint({}, {})
    tasks = [TaskWrites("t1", [("a", 1)], "p1"), TaskWrites("t2", [("b", 2)])]
    rows = checkpoint_rows(serde, thread(checkpoint_id="parent"), checkpoint, {}, {}, tasks)
    assert [(w.checkpoint_id, w.task_id, w.task_path) for w in rows.writes] == [
        ("parent", "t1", "p1"),
        ("parent", "t2", ""),
    ]


def test_writes_need_a_checkpoint_id() -> None:
    with pytest.raises(ValueError, match="checkpoint_id"):
        write_rows(serde, thread(), [("a", 1)], "task")
    with pytest.raises(ValueError, match="thread_id"):
        write_rows(serde, {"configurable": {"checkpoint_id": "c"}}, [("a", 1)], "task")


def test_serialization_error_names_channel_thread_and_checkpoint() -> None:
    checkpoint = make_checkpoint({"fine": 1, "bad": Unregistered()}, {"fine": "1", "bad": "1"})
    with pytest.raises(SerializationError) as raised:
        checkpoint_rows(serde, thread("my-thread"), checkpoint, {}, {"fine": "1", "bad": "1"})
    message = str(raised.value)
    assert "'bad'" in message and "'my-thread'" in message and checkpoint["id"] in message

    with pytest.raises(SerializationError, match="'out' of task 'task-9'"):
        write_rows(serde, thread(checkpoint_id="c"), [("out", Unregistered())], "task-9")


# -- reading broken rows ---------------------------------------------------------------------


def test_truncated_value_names_channel() -> None:
    checkpoint = make_checkpoint({"a": "x" * 100}, {"a": "1"})
    rows = checkpoint_rows(serde, thread("t-1"), checkpoint, {}, {"a": "1"})
    stored = rows.values[0].value
    assert stored is not None
    broken = rows._replace(values=[rows.values[0]._replace(value=stored[:5])])
    with pytest.raises(CorruptCheckpointError) as raised:
        read_back(broken)
    message = str(raised.value)
    assert "channel 'a'" in message and "'t-1'" in message and checkpoint["id"] in message


def test_corrupt_checkpoint_blob_is_reported() -> None:
    rows = checkpoint_rows(serde, thread("t-2"), empty_checkpoint(), {}, {})
    broken = rows.checkpoint._replace(checkpoint=b"\xc1garbage")
    with pytest.raises(CorruptCheckpointError, match=r"checkpoint .*'t-2'"):
        load_checkpoint(serde, broken)
    not_a_checkpoint = rows.checkpoint._replace(checkpoint=serde.dumps_typed([1, 2])[1])
    with pytest.raises(CorruptCheckpointError, match="not a checkpoint"):
        load_checkpoint(serde, not_a_checkpoint)


def test_missing_value_row_names_channel() -> None:
    checkpoint = make_checkpoint({"a": 1, "b": 2}, {"a": "1", "b": "2"})
    rows = checkpoint_rows(serde, thread(), checkpoint, {}, {"a": "1", "b": "2"})
    with pytest.raises(CorruptCheckpointError, match=r"channel 'b'.*'2'"):
        read_back(rows._replace(values=rows.values[:1]))
    stale_version = rows.values[1]._replace(version="1")
    with pytest.raises(CorruptCheckpointError, match="channel 'b'"):
        read_back(rows._replace(values=[rows.values[0], stale_version]))


def test_disallowed_type_stays_unknown_type_error_with_context() -> None:
    permissive = MsgpackSerializer(allowed_types=[Point])
    checkpoint = make_checkpoint({"p": Point(1)}, {"p": "1"})
    rows = checkpoint_rows(permissive, thread("t-3"), checkpoint, {}, {"p": "1"})
    with pytest.raises(UnknownTypeError, match=r"channel 'p'.*'t-3'"):
        read_back(rows)


# -- filter semantics ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stored", "filter", "matches"),
    [
        ({"a": 1}, {}, True),
        ({"a": 1}, None, True),
        ({"a": 1}, {"a": 1}, True),
        ({"a": 1}, {"a": 1.0}, True),
        ({"a": 1}, {"a": True}, False),
        ({"a": True}, {"a": 1}, False),
        ({"a": False}, {"a": 0}, False),
        ({"a": 0}, {"a": False}, False),
        ({"a": None}, {"a": None}, True),
        ({}, {"a": None}, False),
        ({"a": 0}, {"a": None}, False),
        ({"a": "x"}, {"a": "x", "b": 1}, False),
        ({"a": {"b": {"c": 1, "d": 2}, "e": 3}}, {"a": {"b": {"c": 1}}}, True),
        ({"a": {"b": {"c": 1}}}, {"a": {"b": {"c": 1, "d": 2}}}, False),
        ({"a": {"b": 1}}, {"a": {}}, True),
        ({"a": 1}, {"a": {}}, False),
        ({"a": {"b": True}}, {"a": {"b": 1}}, False),
        ({"a": [1, 2, 3]}, {"a": [3, 1]}, True),
        ({"a": [1, 2]}, {"a": [4]}, False),
        ({"a": [{"k": 1, "j": 2}]}, {"a": [{"k": 1}]}, True),
        ({"a": [1]}, {"a": 1}, False),
        ({"a": "é\x00"}, {"a": "é\x00"}, True),
        ({"a": "é\x00"}, {"a": "é"}, False),
    ],
)
def test_metadata_matches(stored: dict[str, Any], filter: Any, matches: bool) -> None:
    assert metadata_matches(stored, filter) is matches


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=12,
)


@given(st.dictionaries(st.text(), json_values, max_size=5), st.data())
def test_metadata_contains_itself_and_its_parts(metadata: dict[str, Any], data: Any) -> None:
    assert metadata_matches(metadata, metadata)
    keys = data.draw(
        st.lists(st.sampled_from(sorted(metadata)), unique=True) if metadata else st.just([])
    )
    assert metadata_matches(metadata, {key: metadata[key] for key in keys})
    assert not metadata_matches(metadata, {**metadata, "\x00absent": None})


# -- prune -----------------------------------------------------------------------------------


class Key(NamedTuple):
    checkpoint_ns: str
    checkpoint_id: str
    ts: str


NOW = datetime(2026, 1, 10, tzinfo=UTC)


def keys(days_ago: list[float], checkpoint_ns: str = "") -> list[Key]:
    return [
        Key(checkpoint_ns, f"id-{n:02d}", (NOW - timedelta(days=days)).isoformat())
        for n, days in enumerate(days_ago)
    ]


def test_keep_latest_by_default_per_namespace() -> None:
    checkpoints = keys([3, 2, 1]) + keys([5, 4], "child")
    assert checkpoints_to_keep(checkpoints) == {("", "id-02"), ("child", "id-01")}
    assert checkpoints_to_keep(checkpoints, keep_last=0) == {("", "id-02"), ("child", "id-01")}


def test_keep_last_and_older_than_combine() -> None:
    checkpoints = keys([9, 8, 7, 1.5, 0.5])
    assert checkpoints_to_keep(checkpoints, keep_last=2) == {("", "id-03"), ("", "id-04")}
    by_age = checkpoints_to_keep(checkpoints, older_than=timedelta(days=2), now=NOW)
    assert by_age == {("", "id-03"), ("", "id-04")}
    assert checkpoints_to_keep(
        checkpoints, keep_last=3, older_than=timedelta(hours=1), now=NOW
    ) == {("", "id-02"), ("", "id-03"), ("", "id-04")}
    assert checkpoints_to_keep(keys([9, 8]), older_than=timedelta(days=1), now=NOW) == {
        ("", "id-01")
    }


def test_naive_and_unparseable_timestamps() -> None:
    naive = Key("", "id-00", (NOW - timedelta(hours=1)).replace(tzinfo=None).isoformat())
    garbage = Key("", "id-01", "not a time")
    latest = Key("", "id-02", NOW.isoformat())
    kept = checkpoints_to_keep([naive, garbage, latest], older_than=timedelta(hours=2), now=NOW)
    assert kept == {("", "id-00"), ("", "id-01"), ("", "id-02")}


def test_negative_keep_last_is_rejected() -> None:
    with pytest.raises(ValueError, match="keep_last"):
        checkpoints_to_keep([], keep_last=-1)


def test_referenced_values_and_rekey() -> None:
    first = make_checkpoint({"a": 1}, {"a": "1"})
    second = make_checkpoint({"a": 1, "b": 2}, {"a": "1", "b": "2"})
    rows = [
        checkpoint_rows(serde, thread("t", "ns"), first, {}, {"a": "1"}),
        checkpoint_rows(serde, thread("t", "ns"), second, {}, {"b": "2"}),
    ]
    assert referenced_values(serde, [rows[1].checkpoint]) == {("ns", "a", "1"), ("ns", "b", "2")}
    [moved] = rekey([rows[1].checkpoint], "other")
    assert moved == rows[1].checkpoint._replace(thread_id="other")
    assert {row.thread_id for row in rekey(rows[1].values, "other")} == {"other"}


# -- appended items (channel_appends) ---------------------------------------------------------


def appended_save(
    config: RunnableConfig, value: list[Any], version: str, base: str | None, items: list[Any]
) -> CheckpointRows:
    checkpoint = make_checkpoint({"log": value}, {"log": version})
    if base is not None:
        checkpoint["channel_appends"] = {"log": (base, items)}
    return checkpoint_rows(serde, config, checkpoint, {}, {"log": version}, deltas=True)


def test_appends_are_stored_as_items_until_the_length_doubles() -> None:
    rows = [appended_save(thread(), [], "01", None, [])]
    kinds = []
    value: list[int] = []
    for n in range(1, 40):
        value = [*value, n]
        saved = appended_save(thread(), value, f"{n + 1:02}", f"{n:02}", [n])
        rows.append(saved)
        kinds.append(saved.values[0].kind)
    whole = [n for n, kind in enumerate(kinds, start=1) if kind == FULL_VALUE]
    assert whole == [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32]
    assert "channel_appends" not in load_checkpoint(serde, rows[-1].checkpoint)

    every_value = index_values(row for saved in rows for row in saved.values)
    for n, saved in enumerate(rows):
        checkpoint = load_checkpoint(serde, saved.checkpoint)
        found = load_tuple(serde, saved.checkpoint, checkpoint, every_value, [])
        assert found.checkpoint["channel_values"]["log"] == list(range(1, n + 1))


def test_appends_are_ignored_without_deltas_or_with_an_unusable_base() -> None:
    checkpoint = make_checkpoint({"log": [1, 2, 3]}, {"log": "02"})
    checkpoint["channel_appends"] = {"log": ("01", [3])}
    ignored = checkpoint_rows(serde, thread(), checkpoint, {}, {"log": "02"})
    assert ignored.values[0].kind == FULL_VALUE
    assert read_back(ignored).checkpoint["channel_values"]["log"] == [1, 2, 3]
    # A base equal to the version itself (a fork re-saving a version) is never a delta.
    checkpoint["channel_appends"] = {"log": ("02", [])}
    same = checkpoint_rows(serde, thread(), checkpoint, {}, {"log": "02"}, deltas=True)
    assert same.values[0].kind == FULL_VALUE


def test_broken_chains_are_reported_with_their_place() -> None:
    base = appended_save(thread(), list(range(8)), "01", None, [])
    delta = appended_save(thread(), list(range(9)), "02", "01", [8])
    assert delta.values[0].kind == APPENDED_ITEMS
    checkpoint = load_checkpoint(serde, delta.checkpoint)
    with pytest.raises(CorruptCheckpointError, match=r"'log'.*no stored value"):
        load_tuple(serde, delta.checkpoint, checkpoint, delta.values, [])

    type_, data = serde.dumps_typed({"a": 1})
    not_a_list = base.values[0]._replace(type=type_, value=data)
    with pytest.raises(CorruptCheckpointError, match="appended to a dict"):
        load_tuple(serde, delta.checkpoint, checkpoint, [not_a_list, *delta.values], [])

    cycle = delta.values[0]._replace(base_version="02")
    with pytest.raises(CorruptCheckpointError, match="cycle"):
        load_tuple(serde, delta.checkpoint, checkpoint, [cycle], [])

    unknown = base.values[0]._replace(kind=7)
    with pytest.raises(CorruptCheckpointError, match="unknown kind 7"):
        load_tuple(serde, delta.checkpoint, checkpoint, [unknown, *delta.values], [])


def test_referenced_values_follow_chains() -> None:
    first = appended_save(thread(), list(range(16)), "01", None, [])
    second = appended_save(thread(), list(range(17)), "02", "01", [16])
    third = appended_save(thread(), list(range(18)), "03", "02", [17])
    assert third.values[0].kind == APPENDED_ITEMS
    bases = {
        (row.checkpoint_ns, row.channel, row.version): row.base_version
        for saved in (first, second, third)
        for row in saved.values
        if row.kind == APPENDED_ITEMS and row.base_version is not None
    }
    assert referenced_values(serde, [third.checkpoint]) == {("", "log", "03")}
    assert referenced_values(serde, [third.checkpoint], bases) == {
        ("", "log", "01"),
        ("", "log", "02"),
        ("", "log", "03"),
    }


def test_inline_values_and_emptied_channels_need_no_value_rows() -> None:
    values = {"trigger": None, "count": 7, "text": "t" * 65, "items": [1]}
    versions = {"trigger": "02", "gone": "02", "count": "02", "text": "01", "items": "02"}
    checkpoint = make_checkpoint(values, versions)
    rows = checkpoint_rows(serde, thread(), checkpoint, {}, versions, inline=True)
    assert sorted(row.channel for row in rows.values) == ["items", "text"]
    loaded = load_checkpoint(serde, rows.checkpoint)
    assert stored_versions(loaded) == {"text": "01", "items": "02"}
    found = load_tuple(serde, rows.checkpoint, loaded, rows.values, [])
    assert found.checkpoint["channel_values"] == values
    assert list(found.checkpoint["channel_values"]) == ["trigger", "count", "text", "items"]
    assert referenced_values(serde, [rows.checkpoint]) == {("", "text", "01"), ("", "items", "02")}


# -- metadata JSON copies: no false negatives ------------------------------------------------


def _jsonb_contains(stored: Any, wanted: Any) -> bool:
    """Postgres ``jsonb @>`` on JSON values (the SQL prefilter's semantics)."""
    if isinstance(wanted, dict):
        return isinstance(stored, dict) and all(
            key in stored and _jsonb_contains(stored[key], value) for key, value in wanted.items()
        )
    if isinstance(wanted, list):
        return isinstance(stored, list) and all(
            any(_jsonb_contains(item, one) for item in stored) for one in wanted
        )
    if isinstance(wanted, bool) or wanted is None or isinstance(stored, bool):
        return stored is wanted
    if isinstance(wanted, str):
        return stored == wanted
    return type(stored) in (int, float) and stored == wanted


_numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.decimals(allow_nan=False, allow_infinity=False, places=3),
    st.fractions(max_denominator=8),
)
_scalars = st.one_of(st.none(), st.booleans(), _numbers, st.text(max_size=4), st.binary(max_size=2))
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.one_of(st.text(max_size=2), st.integers(0, 2)), inner, max_size=3),
    ),
    max_leaves=8,
)


@given(st.dictionaries(st.text(max_size=2), _values, max_size=4), st.data())
def test_metadata_json_has_no_false_negatives(metadata: dict[str, Any], data: Any) -> None:
    """Whenever ``metadata_matches`` keeps a row, the JSON copies select it too."""
    wanted = data.draw(st.dictionaries(st.text(max_size=2), _values, max_size=2))
    # Mostly filters built from the metadata itself, with values of other numeric types.
    picked = data.draw(st.lists(st.sampled_from(sorted(metadata)), max_size=3)) if metadata else []
    for key in picked:
        value = metadata[key]
        if isinstance(value, int) and not isinstance(value, bool):
            value = data.draw(st.sampled_from([Decimal(value), Fraction(value), value]))
        wanted[key] = value
    stored_json = metadata_json(metadata)
    json.dumps(stored_json, allow_nan=False)  # storable as it is
    if metadata_matches(metadata, wanted):
        assert _jsonb_contains(stored_json, metadata_filter_json(wanted))
