"""InMemorySaver specifics the contract cannot see: what it stores and how it fails."""

from __future__ import annotations

import operator
from typing import Annotated, Any, TypedDict

import pytest

from stepgraph.checkpoint.base import empty_checkpoint, uuid6
from stepgraph.checkpoint.memory import InMemorySaver, MemorySaver
from stepgraph.checkpoint.storage import APPENDED_ITEMS, CorruptCheckpointError
from stepgraph.config import RunnableConfig
from stepgraph.graph import END, START, StateGraph


def thread(thread_id: str) -> RunnableConfig:
    return {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}


def save(
    saver: InMemorySaver, thread_id: str, values: dict[str, Any], run_id: str = "run"
) -> RunnableConfig:
    """Save a checkpoint that changes ``values`` on top of the thread's latest."""
    latest = saver.get_tuple(thread(thread_id))
    checkpoint = empty_checkpoint()
    config = thread(thread_id)
    if latest is not None:
        config = latest.config
        checkpoint["channel_values"] = dict(latest.checkpoint["channel_values"])
        checkpoint["channel_versions"] = dict(latest.checkpoint["channel_versions"])
    new_versions = {}
    for channel, value in values.items():
        version = saver.get_next_version(checkpoint["channel_versions"].get(channel))
        checkpoint["channel_versions"][channel] = new_versions[channel] = version
        checkpoint["channel_values"][channel] = value
    return saver.put(
        config, checkpoint, {"source": "loop", "step": 0, "run_id": run_id}, new_versions
    )


def value_row_count(saver: InMemorySaver, thread_id: str) -> int:
    return len(saver._values.get(thread_id, {}))


def test_memory_saver_is_the_old_name() -> None:
    assert MemorySaver is InMemorySaver


def test_unchanged_channels_store_nothing_per_step() -> None:
    saver = InMemorySaver()
    save(saver, "t", {"big": "x" * 10_000, "counter": [0]})
    for n in range(1, 10):
        save(saver, "t", {"counter": [n]})
    assert value_row_count(saver, "t") == 11
    assert saver.get_tuple(thread("t")).checkpoint["channel_values"]["big"] == "x" * 10_000  # type: ignore[union-attr]


def test_prune_and_delete_for_runs_drop_unreferenced_values() -> None:
    saver = InMemorySaver()
    save(saver, "t", {"kept": ["since the start"], "counter": [0]})
    for n in range(1, 5):
        save(saver, "t", {"counter": [n]})
    saver.prune(["t"])
    assert value_row_count(saver, "t") == 2  # "kept" at its only version, "counter" at the last
    assert saver.get_tuple(thread("t")).checkpoint["channel_values"] == {  # type: ignore[union-attr]
        "kept": ["since the start"],
        "counter": [4],
    }

    save(saver, "t", {"counter": [5], "extra": ["from run 2"]}, run_id="run-2")
    saver.delete_for_runs(["run-2"])
    assert value_row_count(saver, "t") == 2
    saver.delete_for_runs(["run"])
    assert "t" not in saver._values
    assert saver.get_tuple(thread("t")) is None


def test_corrupt_row_names_its_place_and_other_threads_keep_working() -> None:
    saver = InMemorySaver()
    broken = save(saver, "broken", {"good": 1, "bad": ["some text"]})
    save(saver, "healthy", {"good": 1})
    values = saver._values["broken"]
    for key, row in values.items():
        if row.channel == "bad":
            values[key] = row._replace(value=row.value[:2])  # type: ignore[index]

    with pytest.raises(CorruptCheckpointError) as raised:
        saver.get_tuple(thread("broken"))
    message = str(raised.value)
    assert "'bad'" in message and "'broken'" in message
    assert broken["configurable"]["checkpoint_id"] in message
    with pytest.raises(CorruptCheckpointError):
        list(saver.list(thread("broken")))

    assert saver.get_tuple(thread("healthy")).checkpoint["channel_values"] == {"good": 1}  # type: ignore[union-attr]
    save(saver, "healthy", {"good": 2})
    assert len(list(saver.list(thread("healthy")))) == 2


def test_prune_rejects_bad_arguments() -> None:
    saver = InMemorySaver()
    save(saver, "t", {"a": 1})
    with pytest.raises(ValueError, match="strategy"):
        saver.prune(["t"], strategy="everything")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="keep_last"):
        saver.prune(["t"], keep_last=-1)
    assert saver.get_tuple(thread("t")) is not None


def test_list_without_thread_spans_all_threads_newest_first() -> None:
    saver = InMemorySaver()
    first = save(saver, "one", {"a": 1})
    second = save(saver, "two", {"a": 2})
    listed = [found.config for found in saver.list(None)]
    assert listed == [second, first]
    assert [found.config for found in saver.list(None, filter={"step": 0}, limit=1)] == [second]


# -- lists that only grow are stored as appended items ---------------------------------------


class Counter(TypedDict):
    n: int
    items: Annotated[list[int], operator.add]


def counter_graph(saver: InMemorySaver, stop: int) -> Any:
    builder = StateGraph(Counter)
    builder.add_node("add", lambda s: {"n": s["n"] + 1, "items": [s["n"]]})
    builder.add_edge(START, "add")
    builder.add_conditional_edges("add", lambda s: "add" if s["n"] < stop else END, ["add", END])
    return builder.compile(checkpointer=saver)


def stored_items(saver: InMemorySaver, thread_id: str) -> tuple[int, int]:
    """(items stored for channel "items", how many of its rows hold appended items)."""
    rows = [row for row in saver._values[thread_id].values() if row.channel == "items"]
    items = sum(len(saver.serde.loads_typed((row.type or "", row.value or b""))) for row in rows)
    return items, sum(row.kind == APPENDED_ITEMS for row in rows)


def assert_history_exact(graph: Any, thread_id: str, total: int) -> None:
    history = list(graph.get_state_history(thread(thread_id)))
    assert len(history) == total
    for snapshot in history:
        assert snapshot.values["items"] == list(range(snapshot.values.get("n", 0)))


def test_appends_store_linear_items_and_prune_and_copy_keep_chains() -> None:
    saver = InMemorySaver()
    graph = counter_graph(saver, 1_000)
    config = {**thread("t"), "recursion_limit": 1_010}
    assert graph.invoke({"n": 0, "items": []}, config)["items"] == list(range(1_000))
    items, appended = stored_items(saver, "t")
    assert items < 7_000  # whole lists at every step would be ~500,000 items
    assert appended == 1_001 - 36  # whole lists at lengths 0..7, 8, 10, 12, 14, 16, 20, ...
    assert_history_exact(graph, "t", 1_002)

    saver.copy_thread("t", "copy")
    saver.prune(["t"], keep_last=10)  # keeps 991..1000, whose chains start at 896
    assert stored_items(saver, "t") == (896 + 1_000 - 896, 1_000 - 896)
    assert_history_exact(graph, "t", 10)
    assert_history_exact(graph, "copy", 1_002)


def test_list_merges_namespaces_newest_first_with_out_of_order_ids() -> None:
    """Histories keep their ids sorted even when an older id arrives late (copies, imports)."""
    saver = InMemorySaver()
    ids = [str(uuid6()) for _ in range(6)]
    for position in (5, 0, 3, 1, 4, 2):  # out of order, alternating namespaces
        checkpoint = empty_checkpoint()
        checkpoint["id"] = ids[position]
        config = {"configurable": {"thread_id": "t", "checkpoint_ns": "ab"[position % 2]}}
        saver.put(config, checkpoint, {"source": "loop", "step": position}, {})
    every = [found.checkpoint["id"] for found in saver.list({"configurable": {"thread_id": "t"}})]
    assert every == ids[::-1]
    before = {"configurable": {"checkpoint_id": ids[4]}}
    listed = saver.list({"configurable": {"thread_id": "t"}}, before=before, limit=2)
    assert [found.checkpoint["id"] for found in listed] == [ids[3], ids[2]]
    only_a = saver.list({"configurable": {"thread_id": "t", "checkpoint_ns": "a"}})
    assert [found.checkpoint["id"] for found in only_a] == [ids[4], ids[2], ids[0]]
    assert saver.get_tuple(thread("t")) is None  # namespace "" has none
    latest_b = saver.get_tuple({"configurable": {"thread_id": "t", "checkpoint_ns": "b"}})
    assert latest_b is not None and latest_b.checkpoint["id"] == ids[5]
