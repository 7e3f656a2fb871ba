"""InMemorySaver specifics the contract cannot see: what it stores and how it fails."""

from __future__ import annotations

from typing import Any

import pytest

from stepgraph.checkpoint.base import empty_checkpoint
from stepgraph.checkpoint.memory import InMemorySaver, MemorySaver
from stepgraph.checkpoint.storage import CorruptCheckpointError
from stepgraph.config import RunnableConfig


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
    save(saver, "t", {"big": "x" * 10_000, "counter": 0})
    for n in range(1, 10):
        save(saver, "t", {"counter": n})
    assert value_row_count(saver, "t") == 11
    assert saver.get_tuple(thread("t")).checkpoint["channel_values"]["big"] == "x" * 10_000  # type: ignore[union-attr]


def test_prune_and_delete_for_runs_drop_unreferenced_values() -> None:
    saver = InMemorySaver()
    save(saver, "t", {"kept": "since the start", "counter": 0})
    for n in range(1, 5):
        save(saver, "t", {"counter": n})
    saver.prune(["t"])
    assert value_row_count(saver, "t") == 2  # "kept" at its only version, "counter" at the last
    assert saver.get_tuple(thread("t")).checkpoint["channel_values"] == {  # type: ignore[union-attr]
        "kept": "since the start",
        "counter": 4,
    }

    save(saver, "t", {"counter": 5, "extra": "from run 2"}, run_id="run-2")
    saver.delete_for_runs(["run-2"])
    assert value_row_count(saver, "t") == 2
    saver.delete_for_runs(["run"])
    assert "t" not in saver._values
    assert saver.get_tuple(thread("t")) is None


def test_corrupt_row_names_its_place_and_other_threads_keep_working() -> None:
    saver = InMemorySaver()
    broken = save(saver, "broken", {"good": 1, "bad": "some text"})
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
