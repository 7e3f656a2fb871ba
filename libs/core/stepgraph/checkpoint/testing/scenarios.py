"""The contract scenarios, each written once against ``SaverApi`` (sync or async underneath).

Scenarios use fresh thread and run ids, so they also hold on a store shared between tests.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from functools import partial
from typing import Any

import pytest

from stepgraph.checkpoint.base import (
    ERROR,
    INTERRUPT,
    RESUME,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
    Step,
    TaskWrites,
    copy_checkpoint,
    empty_checkpoint,
    uuid6,
)
from stepgraph.checkpoint.base.runs import with_fence
from stepgraph.checkpoint.storage import KEY_LIMITS, metadata_matches
from stepgraph.checkpoint.testing.api import SaverApi
from stepgraph.checkpoint.testing.samples import SAMPLE_VALUES, allow_sample_types, assert_same
from stepgraph.config import RunnableConfig
from stepgraph.errors import LeaseLostError, SerializationError, ThreadBusyError

__all__ = ["SCENARIOS", "Scenario"]

Scenario = Callable[[SaverApi], Awaitable[None]]

EMPTY = object()
"""An update that empties a channel (it keeps a version but has no value)."""


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4()}"


def thread_config(thread_id: str, checkpoint_ns: str = "") -> RunnableConfig:
    return {"configurable": {"thread_id": thread_id, "checkpoint_ns": checkpoint_ns}}


class History:
    """Writes a chain of checkpoints into one thread and namespace, as the executor would."""

    def __init__(self, api: SaverApi, thread_id: str, checkpoint_ns: str = "") -> None:
        self.api = api
        self.config = thread_config(thread_id, checkpoint_ns)
        self.checkpoints: list[Checkpoint] = []
        self.configs: list[RunnableConfig] = []

    def next_checkpoint(
        self, updates: dict[str, Any], ts: datetime | None = None
    ) -> tuple[Checkpoint, dict[str, str]]:
        checkpoint = (
            copy_checkpoint(self.checkpoints[-1]) if self.checkpoints else empty_checkpoint()
        )
        checkpoint["id"] = str(uuid6())
        checkpoint["ts"] = (ts or datetime.now(UTC)).isoformat()
        new_versions = {}
        for channel, value in updates.items():
            version = self.api.saver.get_next_version(checkpoint["channel_versions"].get(channel))
            checkpoint["channel_versions"][channel] = new_versions[channel] = version
            checkpoint["versions_seen"].setdefault("node", {})[channel] = version
            if value is EMPTY:
                checkpoint["channel_values"].pop(channel, None)
            else:
                checkpoint["channel_values"][channel] = value
        checkpoint["updated_channels"] = sorted(updates)
        return checkpoint, new_versions

    async def step(
        self,
        updates: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        *,
        ts: datetime | None = None,
        writes: list[TaskWrites] | None = None,
    ) -> RunnableConfig:
        """Save the next checkpoint (with ``put``, or ``put_step`` when ``writes`` are given)."""
        checkpoint, new_versions = self.next_checkpoint(updates or {}, ts)
        meta: CheckpointMetadata = {"source": "loop", "step": len(self.checkpoints)}
        meta.update(metadata or {})  # type: ignore[typeddict-item]
        if writes is None:
            saved = await self.api.put(self.config, checkpoint, meta, new_versions)
        else:
            saved = await self.api.put_step(self.config, writes, checkpoint, meta, new_versions)
        self.checkpoints.append(checkpoint)
        self.configs.append(saved)
        self.config = saved
        return saved

    @property
    def thread_id(self) -> str:
        return str(self.config["configurable"]["thread_id"])


def with_checkpoint_id(config: RunnableConfig, checkpoint_id: str) -> RunnableConfig:
    return {"configurable": {**config["configurable"], "checkpoint_id": checkpoint_id}}


def ids(tuples: list[CheckpointTuple]) -> list[str]:
    return [found.config["configurable"]["checkpoint_id"] for found in tuples]


def checkpoint_id_of(config: RunnableConfig) -> str:
    return str(config["configurable"]["checkpoint_id"])


async def must_get(api: SaverApi, config: RunnableConfig) -> CheckpointTuple:
    found = await api.get_tuple(config)
    assert found is not None, f"no checkpoint for {config!r}"
    return found


# -- round trips -----------------------------------------------------------------------------


async def roundtrip_every_type(api: SaverApi) -> None:
    """Channel values and pending writes of every supported type come back identical."""
    allow_sample_types(api.saver.serde)
    history = History(api, new_id("types"))
    config = await history.step(SAMPLE_VALUES)
    await api.put_writes(config, list(SAMPLE_VALUES.items()), "task")

    found = await must_get(api, config)
    assert_same(found.checkpoint["channel_values"], SAMPLE_VALUES, "channel_values")
    assert found.pending_writes is not None
    assert [channel for _, channel, _ in found.pending_writes] == list(SAMPLE_VALUES)
    for task_id, channel, value in found.pending_writes:
        assert task_id == "task"
        assert_same(value, SAMPLE_VALUES[channel], f"write {channel!r}")


async def roundtrip_checkpoint_and_configs(api: SaverApi) -> None:
    """The whole checkpoint dict, ``config`` and ``parent_config`` come back as saved."""
    history = History(api, new_id("shape"))
    first = await history.step({"a": 1, "b": [1]})
    second = await history.step({"b": [1, 2], "gone": "x"})
    third = await history.step({"gone": EMPTY})

    assert first == {
        "configurable": {
            "thread_id": history.thread_id,
            "checkpoint_ns": "",
            "checkpoint_id": history.checkpoints[0]["id"],
        }
    }
    found = await must_get(api, third)
    assert found.config == third
    assert found.parent_config == second
    assert found.checkpoint == history.checkpoints[2]
    # Unchanged channels are read from the checkpoint that last wrote them.
    assert found.checkpoint["channel_values"] == {"a": 1, "b": [1, 2]}
    assert found.pending_writes == []
    assert (await must_get(api, first)).parent_config is None
    assert (await must_get(api, second)).checkpoint == history.checkpoints[1]


async def roundtrip_metadata(api: SaverApi) -> None:
    """Metadata round-trips exactly, with the run's config metadata merged in."""
    metadata = {
        "source": "update",
        "step": 7,
        "parents": {"": "parent-id"},
        "text": "ünïcødé ✓ 🙂 \x00 after-nul",
        "key\x00with nul": "v",
        "ratio": 0.1,
        "flag": False,
        "nothing": None,
        "nested": {"list": [1, "two", None, True], "deeper": {"x": -1}},
    }
    thread_id = new_id("meta")
    config: RunnableConfig = {
        **thread_config(thread_id),
        "metadata": {"user": "ann", "step": "ignored: the runtime's key wins", "__private": 1},
    }
    checkpoint = empty_checkpoint()
    saved = await api.put(config, checkpoint, metadata, {})  # type: ignore[arg-type]
    found = await must_get(api, saved)
    assert_same(found.metadata, {**metadata, "user": "ann"}, "metadata")


async def stored_state_is_isolated(api: SaverApi) -> None:
    """Mutating what was saved, or what was read, does not change what is stored."""
    history = History(api, new_id("isolated"))
    value = {"items": [1, 2]}
    config = await history.step({"state": value}, {"tags": ["a"]})
    writes = [("state", {"w": [1]})]
    await api.put_writes(config, writes, "task")
    value["items"].append(3)
    history.checkpoints[-1]["channel_versions"]["state"] = "mutated"
    writes[0][1]["w"].append(2)

    first = await must_get(api, config)
    first.checkpoint["channel_values"]["state"]["items"].append(4)
    first.metadata["tags"].append("b")  # type: ignore[typeddict-item]
    again = await must_get(api, config)
    assert again.checkpoint["channel_values"] == {"state": {"items": [1, 2]}}
    assert again.checkpoint["channel_versions"]["state"] != "mutated"
    assert again.metadata["tags"] == ["a"]  # type: ignore[typeddict-item]
    assert again.pending_writes == [("task", "state", {"w": [1]})]


async def very_large_values(api: SaverApi) -> None:
    """Values of 10 MB and more are stored and read back intact."""
    big_bytes = bytes(range(256)) * (40 * 1024)  # 10 MiB
    big_text = "ü🙂" * (3 * 1024 * 1024)  # 6 M characters, 18 MiB in UTF-8
    many = list(range(500_000))
    history = History(api, new_id("large"))
    config = await history.step({"bytes": big_bytes, "text": big_text, "many": many})
    await api.put_writes(config, [("bytes", big_bytes)], "task")
    found = await must_get(api, config)
    assert found.checkpoint["channel_values"]["bytes"] == big_bytes
    assert found.checkpoint["channel_values"]["text"] == big_text
    assert found.checkpoint["channel_values"]["many"] == many
    assert found.pending_writes == [("task", "bytes", big_bytes)]


async def unicode_and_nul_in_keys(api: SaverApi) -> None:
    """Thread ids, namespaces and metadata may hold any unicode, including NUL."""
    thread_id = new_id("thréad-🙂-\x00-end")
    checkpoint_ns = "child:ñ\x00|sub:✓"
    metadata = {"note": "a\x00b ✓", "ключ": "значение"}
    history = History(api, thread_id, checkpoint_ns)
    config = await history.step({"chännel": "välue\x00"}, metadata)
    await api.put_writes(config, [("chännel", "wrïte\x00")], "tâsk\x00")

    found = await must_get(api, thread_config(thread_id, checkpoint_ns))
    assert found.config == config
    assert found.config["configurable"]["thread_id"] == thread_id
    assert found.checkpoint["channel_values"] == {"chännel": "välue\x00"}
    assert found.pending_writes == [("tâsk\x00", "chännel", "wrïte\x00")]
    assert found.metadata["note"] == "a\x00b ✓"  # type: ignore[typeddict-item]
    listed = await api.list(thread_config(thread_id, checkpoint_ns), filter=metadata)
    assert ids(listed) == [checkpoint_id_of(config)]
    assert await api.get_tuple(thread_config(thread_id, "child:ñ")) is None
    assert await api.get_tuple(thread_config(thread_id.replace("\x00", ""), checkpoint_ns)) is None


async def longest_ids(api: SaverApi) -> None:
    """Ids up to ``storage.KEY_LIMITS`` work in every saver; longer ones (a 10,000-character
    thread id) raise ``ValueError`` naming the limit, and nothing is stored."""
    thread_id = new_id("long")
    thread_id += "é" * ((KEY_LIMITS["thread_id"] - len(thread_id.encode())) // 2)
    checkpoint_ns = "n" * KEY_LIMITS["checkpoint_ns"]
    channel = "c" * KEY_LIMITS["channel"]
    task_id = "t" * KEY_LIMITS["task_id"]
    history = History(api, thread_id, checkpoint_ns)
    config = await history.step({channel: "v" * 100})
    await api.put_writes(config, [(channel, 1)], task_id)
    found = await must_get(api, thread_config(thread_id, checkpoint_ns))
    assert found.checkpoint["channel_values"] == {channel: "v" * 100}
    assert found.pending_writes == [(task_id, channel, 1)]

    too_long = new_id("x") + "x" * 10_000
    with pytest.raises(ValueError, match=r"thread_id is too long.*at most 1024"):
        await History(api, too_long).step({"n": 1})
    with pytest.raises(ValueError, match="task_id is too long"):
        await api.put_writes(config, [(channel, 2)], task_id + "t")
    with pytest.raises(ValueError, match="thread_id is too long"):
        await api.copy_thread(thread_id, too_long)
    assert await api.get_tuple(thread_config(too_long)) is None
    found = await must_get(api, thread_config(thread_id, checkpoint_ns))
    assert found.pending_writes == [(task_id, channel, 1)]


# -- reading ---------------------------------------------------------------------------------


async def get_tuple_latest_or_by_id(api: SaverApi) -> None:
    """Without ``checkpoint_id`` the latest checkpoint; with one, exactly that one or None."""
    history = History(api, new_id("get"))
    configs = [await history.step({"n": n}) for n in range(3)]
    latest = await must_get(api, thread_config(history.thread_id))
    assert latest.config == configs[-1]
    assert latest.checkpoint["channel_values"] == {"n": 2}
    first = await must_get(api, configs[0])
    assert first.checkpoint["channel_values"] == {"n": 0}
    assert await api.get_tuple(with_checkpoint_id(configs[0], str(uuid6()))) is None
    assert await api.get_tuple(thread_config(new_id("nobody"))) is None


async def list_newest_first_with_before_and_limit(api: SaverApi) -> None:
    """``list`` yields newest first; ``before`` and ``limit`` narrow it."""
    history = History(api, new_id("list"))
    configs = [await history.step({"n": n}) for n in range(5)]
    newest_first = [checkpoint_id_of(config) for config in reversed(configs)]
    config = thread_config(history.thread_id)

    everything = await api.list(config)
    assert ids(everything) == newest_first
    assert [found.checkpoint["channel_values"]["n"] for found in everything] == [4, 3, 2, 1, 0]
    assert everything[0].parent_config == configs[3]
    assert ids(await api.list(config, limit=2)) == newest_first[:2]
    assert ids(await api.list(config, before=configs[2])) == newest_first[3:]
    assert ids(await api.list(config, before=configs[3], limit=1)) == newest_first[2:3]
    assert await api.list(config, before=configs[0]) == []
    assert ids(await api.list(configs[1])) == [checkpoint_id_of(configs[1])]
    assert await api.list(thread_config(new_id("nobody"))) == []


async def list_filter_on_metadata(api: SaverApi) -> None:
    """``filter`` matches metadata by containment: nested dicts, None, bools apart from ints."""
    history = History(api, new_id("filter"))
    rows = [
        {"kind": "a", "score": 1, "flag": True, "none": None, "nested": {"x": {"y": 1}, "z": 2}},
        {"kind": "b", "score": True, "flag": 1, "nested": {"x": {"y": 2}}, "list": [1, 2]},
        {"kind": "c", "score": 1.0, "flag": False, "none": "not none", "text": "é\x00"},
    ]
    configs = [await history.step({"n": n}, metadata) for n, metadata in enumerate(rows)]
    a, b, c = (checkpoint_id_of(config) for config in configs)
    config = thread_config(history.thread_id)

    async def matching(filter: dict[str, Any]) -> list[str]:
        return ids(await api.list(config, filter=filter))

    assert await matching({}) == [c, b, a]
    assert await matching({"kind": "a"}) == [a]
    assert await matching({"kind": "a", "score": 1}) == [a]
    assert await matching({"kind": "a", "score": 2}) == []
    assert await matching({"source": "loop"}) == [c, b, a]
    assert await matching({"flag": True}) == [a]
    assert await matching({"flag": 1}) == [b]
    assert await matching({"flag": False}) == [c]
    assert await matching({"score": True}) == [b]
    assert await matching({"none": None}) == [a]
    assert await matching({"absent": None}) == []
    assert await matching({"nested": {"x": {"y": 1}}}) == [a]
    assert await matching({"nested": {"x": {"y": 1}, "z": 2}}) == [a]
    assert await matching({"nested": {"x": {}}}) == [b, a]
    assert await matching({"nested": {"z": 3}}) == []
    assert await matching({"list": [1, 2]}) == [b]
    assert await matching({"text": "é\x00"}) == [c]
    assert await matching({"text": "é"}) == []
    assert ids(await api.list(config, filter={"source": "loop"}, limit=2)) == [c, b]
    before_c = await api.list(config, filter={"kind": "a"}, before=configs[2])
    assert ids(before_c) == [a]


class _Text(str):
    """A str subclass (as a ``StrEnum`` member is): equal to its plain value."""


def _random_metadata(rng: random.Random, depth: int = 0) -> Any:
    scalars: list[Any] = [
        0, 1, -7, 2**53 + 1, 2**60 + 1, -(2**63), 0.1, 2.5, -1e300, 1.0, True, False, None,
        "", "a", "é\x00z", "\uffffmark", "🙂",
    ]  # fmt: skip
    kind = rng.randrange(4 if depth < 2 else 1)
    if kind == 0:
        return rng.choice(scalars)
    if kind == 1:
        return [_random_metadata(rng, depth + 1) for _ in range(rng.randrange(3))]
    return {f"k{n}": _random_metadata(rng, depth + 1) for n in range(rng.randrange(1, 4))}


def _equal_twin(value: Any, rng: random.Random) -> Any:
    """A filter value that ``metadata_matches`` finds in ``value``, of other types if it can."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return rng.choice(
            [Decimal(value), Fraction(value), value, *([float(value)] * (abs(value) < 2**53))]
        )
    if isinstance(value, float):
        return rng.choice([Decimal(value), Fraction(value), value])
    if isinstance(value, str):
        return _Text(value)
    if isinstance(value, list):
        return [_equal_twin(item, rng) for item in value if rng.random() < 0.7]
    return {key: _equal_twin(item, rng) for key, item in value.items() if rng.random() < 0.7}


async def list_filter_has_no_false_negatives(api: SaverApi) -> None:
    """Whatever the SQL narrowing does, a checkpoint whose metadata ``metadata_matches`` a
    filter is listed, also for filter values of other types that compare equal (Decimal,
    Fraction, float, str subclasses) and for integers no float holds exactly."""
    rng = random.Random(20240607)
    history = History(api, new_id("filter-property"))
    saved = []
    for n in range(24):
        metadata = {"m": _random_metadata(rng), "n": n}
        saved.append((await history.step({"n": n}, metadata), metadata))
    config = thread_config(history.thread_id)
    for checkpoint_config, metadata in saved:
        filter = {"m": _equal_twin(metadata["m"], rng)}
        assert metadata_matches(metadata, filter)
        found = ids(await api.list(config, filter=filter))
        assert checkpoint_id_of(checkpoint_config) in found, (metadata, filter)


async def namespaces_are_isolated(api: SaverApi) -> None:
    """Each namespace of a thread has its own latest checkpoint, values and writes."""
    thread_id = new_id("ns")
    root = History(api, thread_id)
    child = History(api, thread_id, "child:1")
    root_config = await root.step({"x": "root"})
    child_config = await child.step({"x": "child"})
    await root.step({"x": "root 2"})
    await api.put_writes(child_config, [("x", "child write")], "task")

    latest_root = await must_get(api, thread_config(thread_id))
    latest_child = await must_get(api, thread_config(thread_id, "child:1"))
    assert latest_root.checkpoint["channel_values"] == {"x": "root 2"}
    assert latest_root.pending_writes == []
    assert latest_child.config == child_config
    assert latest_child.checkpoint["channel_values"] == {"x": "child"}
    assert latest_child.pending_writes == [("task", "x", "child write")]
    root_only = await api.list(thread_config(thread_id))
    assert ids(root_only) == [checkpoint_id_of(c) for c in reversed(root.configs)]
    every_ns = await api.list({"configurable": {"thread_id": thread_id}})
    assert sorted(ids(every_ns)) == sorted(
        checkpoint_id_of(c) for c in [*root.configs, child_config]
    )
    assert ids(every_ns) == sorted(ids(every_ns), reverse=True)
    wrong_ns = {"configurable": {**root_config["configurable"], "checkpoint_ns": "child:1"}}
    assert await api.get_tuple(wrong_ns) is None  # type: ignore[arg-type]


async def missing_thread_id_is_an_error(api: SaverApi) -> None:
    """A config without ``thread_id`` raises ``ValueError`` naming it."""
    bare: RunnableConfig = {"configurable": {}}
    with pytest.raises(ValueError, match="thread_id"):
        await api.get_tuple(bare)
    with pytest.raises(ValueError, match="thread_id"):
        await api.put(bare, empty_checkpoint(), {}, {})
    with pytest.raises(ValueError, match="thread_id"):
        await api.put_writes({"configurable": {"checkpoint_id": "x"}}, [("c", 1)], "task")
    with pytest.raises(ValueError, match="thread_id"):
        await api.put_step(bare, [TaskWrites("task", [("c", 1)])], empty_checkpoint(), {}, {})


# -- writing ---------------------------------------------------------------------------------


async def pending_writes_ordered_and_idempotent(api: SaverApi) -> None:
    """Writes come back ordered by task then index; repeating ``put_writes`` adds nothing."""
    history = History(api, new_id("writes"))
    config = await history.step({"n": 0})
    await api.put_writes(config, [("a", 1), ("b", 2), ("a", 3)], "task-2", "path-2")
    await api.put_writes(config, [("c", 4)], "task-1")
    await api.put_writes(config, [("a", 1), ("b", 2), ("a", 3)], "task-2", "path-2")
    await api.put_writes(config, [("c", "changed")], "task-1")

    expected = [("task-1", "c", 4), ("task-2", "a", 1), ("task-2", "b", 2), ("task-2", "a", 3)]
    assert (await must_get(api, config)).pending_writes == expected
    # Writes belong to their checkpoint only.
    later = await history.step({"n": 1})
    assert (await must_get(api, later)).pending_writes == []
    assert (await must_get(api, config)).pending_writes == expected


async def special_writes_replace(api: SaverApi) -> None:
    """Error, interrupt and resume writes replace the task's previous one of the same kind."""
    history = History(api, new_id("special"))
    config = await history.step({"n": 0})
    await api.put_writes(config, [(ERROR, "first error")], "task")
    await api.put_writes(config, [(ERROR, "second error")], "task")
    await api.put_writes(config, [(INTERRUPT, ["ask 1"]), ("out", 1)], "task")
    await api.put_writes(config, [(INTERRUPT, ["ask 2"]), ("out", 2)], "task")
    await api.put_writes(config, [(RESUME, "yes")], "task")
    await api.put_writes(config, [(RESUME, "no")], "task")
    await api.put_writes(config, [(ERROR, "other task")], "other")

    found = await must_get(api, config)
    assert found.pending_writes == [
        ("other", ERROR, "other task"),
        ("task", RESUME, "no"),
        ("task", INTERRUPT, ["ask 2"]),
        ("task", ERROR, "second error"),
        ("task", "out", 1),
    ]


async def put_writes_batch_is_put_writes_of_each_task(api: SaverApi) -> None:
    """``put_writes_batch`` stores what ``put_writes`` of each task would: first regular write
    wins, special writes replace, also within one batch; a failed batch stores nothing."""

    class NotAllowed:
        pass

    history = History(api, new_id("batch"))
    config = await history.step({"n": 0})
    await api.put_writes(config, [("a", "kept"), (ERROR, "old error")], "task-1")
    await api.put_writes_batch(
        config,
        [
            TaskWrites("task-2", [("a", 1), ("b", 2)], "path-2"),
            TaskWrites("task-1", [("a", "ignored"), (ERROR, "new error")]),
            TaskWrites("task-3", [(INTERRUPT, ["first"])]),
            TaskWrites("task-3", [(INTERRUPT, ["second"])]),
        ],
    )
    await api.put_writes_batch(config, [])
    expected = [  # by task path, task id, index (LangGraph's order)
        ("task-1", ERROR, "new error"),
        ("task-1", "a", "kept"),
        ("task-3", INTERRUPT, ["second"]),
        ("task-2", "a", 1),
        ("task-2", "b", 2),
    ]
    assert (await must_get(api, config)).pending_writes == expected
    with pytest.raises(SerializationError, match="bad"):
        await api.put_writes_batch(
            config,
            [TaskWrites("task-4", [("c", 1)]), TaskWrites("task-5", [("bad", NotAllowed())])],
        )
    assert (await must_get(api, config)).pending_writes == expected


async def put_step_saves_writes_and_checkpoint(api: SaverApi) -> None:
    """``put_step`` saves tasks' writes against the current checkpoint, then the next one."""
    history = History(api, new_id("step"))
    first = await history.step({"n": 0})
    step_writes = [
        TaskWrites("task-b", [("n", 1), ("log", "b")], "path-b"),
        TaskWrites("task-a", [("log", "a")]),
    ]
    second = await history.step({"n": 1, "log": ["a", "b"]}, writes=step_writes)

    parent = await must_get(api, first)
    assert parent.pending_writes == [
        ("task-a", "log", "a"),
        ("task-b", "n", 1),
        ("task-b", "log", "b"),
    ]
    latest = await must_get(api, thread_config(history.thread_id))
    assert latest.config == second
    assert latest.parent_config == first
    assert latest.checkpoint["channel_values"] == {"n": 1, "log": ["a", "b"]}
    assert latest.pending_writes == []
    # A step without task writes is a plain put.
    third = await history.step({"n": 2}, writes=[])
    assert (await must_get(api, thread_config(history.thread_id))).config == third


async def put_step_is_visible_with_its_writes(api: SaverApi) -> None:
    """A reader never sees a ``put_step`` checkpoint without the writes saved with it."""
    history = History(api, new_id("step-atomic"))
    await history.step({"n": 0})
    latest_config = thread_config(history.thread_id)
    writing = True

    async def write() -> None:
        nonlocal writing
        try:
            for n in range(1, 40):
                await history.step({"n": n}, writes=[TaskWrites("task", [("n", n)])])
                await api.pause()
        finally:
            writing = False

    async def read() -> None:
        while writing:
            latest = await must_get(api, latest_config)
            if latest.parent_config is not None:
                parent = await must_get(api, latest.parent_config)
                n = latest.checkpoint["channel_values"]["n"]
                assert parent.pending_writes == [("task", "n", n)], f"step {n}"
            await api.pause()

    await api.concurrently([write, read])


def _chain_step(
    history: History, updates: dict[str, Any], writes: list[TaskWrites], appended: list[str]
) -> Step:
    """The next checkpoint of ``history`` as one step of a ``put_steps`` chain (not saved yet:
    ``history`` only remembers it). Its blob may be stored as changes (the executor's word on
    what changed), and ``items`` as the items appended to the version before."""
    previous = history.checkpoints[-1]
    checkpoint, versions = history.next_checkpoint(updates)
    checkpoint["versions_seen_changes"] = ["node"]
    if appended:
        checkpoint["channel_appends"] = {"items": (previous["channel_versions"]["items"], appended)}
    history.checkpoints.append(checkpoint)
    meta: CheckpointMetadata = {"source": "loop", "step": len(history.checkpoints)}
    return Step(writes, checkpoint, meta, versions)


async def put_steps_saves_a_chain(api: SaverApi) -> None:
    """``put_steps`` saves a chain of steps as ``put_step`` would save each in turn: every
    checkpoint readable with its parent and the writes saved against it, appended items
    included; with ``lease``, the last step lets go of it (a run whose lease was taken over
    saves nothing)."""
    history = History(api, new_id("steps"))
    lease = await api.call("acquire_lease", history.thread_id, "run-a", ttl=30)
    history.config = with_fence(history.config, lease.epoch)
    first = await history.step({"n": 0, "items": [_LONG]})
    chain = [
        _chain_step(history, {"n": 1, "items": [_LONG, "a"]}, [], ["a"]),
        _chain_step(
            history,
            {"n": 2, "items": [_LONG, "a", "b"]},
            [TaskWrites("task-b", [("n", 2), ("items", ["b"])], "path-b")],
            ["b"],
        ),
        _chain_step(history, {"n": 3}, [TaskWrites("task-c", [("n", 3)])], []),
    ]
    with pytest.raises(ValueError, match="at least one step"):
        await api.call("put_steps", first, [])
    saved = await api.call("put_steps", with_fence(first, lease.epoch), chain)
    assert checkpoint_id_of(saved) == chain[-1].checkpoint["id"]
    listed = await api.list(thread_config(history.thread_id))
    assert ids(listed) == [step.checkpoint["id"] for step in reversed(chain)] + [
        checkpoint_id_of(first)
    ]
    parents = [checkpoint_id_of(first)] + [step.checkpoint["id"] for step in chain[:-1]]
    for step, parent, found in zip(chain, parents, reversed(listed[:-1]), strict=True):
        assert found.checkpoint["channel_values"] == step.checkpoint["channel_values"]
        assert found.parent_config is not None
        assert checkpoint_id_of(found.parent_config) == parent
        assert found.metadata["step"] == step.metadata["step"]
    assert (await must_get(api, first)).pending_writes == []
    assert (await must_get(api, listed[2].config)).pending_writes == [
        ("task-b", "n", 2),
        ("task-b", "items", ["b"]),
    ]
    assert (await must_get(api, listed[1].config)).pending_writes == [("task-c", "n", 3)]
    assert (await api.call("get_run", history.thread_id)).status == "running"

    history.config = with_fence(saved, lease.epoch)
    last = [_chain_step(history, {"n": 4}, [], []), _chain_step(history, {"n": 5}, [], [])]
    done = await api.call("put_steps", history.config, last, lease=lease)
    assert (await must_get(api, thread_config(history.thread_id))).config == done
    run = await api.call("get_run", history.thread_id)
    assert (run.status, run.expires_at) == ("done", None)

    await api.call("acquire_lease", history.thread_id, "run-b", ttl=30)
    stale = [_chain_step(history, {"n": 6}, [], []), _chain_step(history, {"n": 7}, [], [])]
    with pytest.raises(LeaseLostError):
        await api.call("put_steps", with_fence(done, lease.epoch), stale)
    assert (await must_get(api, thread_config(history.thread_id))).config == done


async def put_steps_after_a_pruned_parent(api: SaverApi) -> None:
    """A chain whose first parent was pruned meanwhile is saved whole and reads back."""
    history = History(api, new_id("steps-pruned"))
    await history.step({"a": _LONG + "1", "items": [_LONG]})
    first_config = history.configs[0]
    await history.step({"a": _LONG + "2"})
    await api.prune([history.thread_id])  # drops the first checkpoint and its rows
    history.checkpoints = history.checkpoints[:1]  # the chain forks from the first
    chain = [
        _chain_step(history, {"items": [_LONG, "x"]}, [], ["x"]),
        _chain_step(history, {"items": [_LONG, "x", "y"]}, [TaskWrites("t", [("a", 1)])], ["y"]),
    ]
    saved = await api.call("put_steps", first_config, chain)
    found = await must_get(api, saved)
    assert found.checkpoint["channel_values"] == {"a": _LONG + "1", "items": [_LONG, "x", "y"]}
    assert found.parent_config is not None
    parent = await must_get(api, found.parent_config)
    assert parent.checkpoint["channel_values"] == {"a": _LONG + "1", "items": [_LONG, "x"]}
    assert parent.pending_writes == [("t", "a", 1)]
    assert parent.parent_config == first_config


async def failed_serialization_saves_nothing(api: SaverApi) -> None:
    """An unserializable value fails ``put``/``put_step`` naming the channel; nothing is saved."""

    class NotAllowed:
        pass

    history = History(api, new_id("unserializable"))
    first = await history.step({"n": 0})
    checkpoint, new_versions = history.next_checkpoint({"n": 1, "bad": NotAllowed()})
    metadata: CheckpointMetadata = {"source": "loop", "step": 1}
    with pytest.raises(SerializationError, match="bad") as raised:
        await api.put(first, checkpoint, metadata, new_versions)
    assert history.thread_id in str(raised.value)
    with pytest.raises(SerializationError, match="bad"):
        await api.put_step(
            first, [TaskWrites("task", [("n", 1)])], checkpoint, metadata, new_versions
        )
    with pytest.raises(SerializationError, match="bad"):
        await api.put_writes(first, [("n", 1), ("bad", NotAllowed())], "task")

    latest = await must_get(api, thread_config(history.thread_id))
    assert latest.config == first
    assert latest.pending_writes == []
    assert await api.get_tuple(with_checkpoint_id(first, checkpoint["id"])) is None


async def versions_increase(api: SaverApi) -> None:
    """``get_next_version`` increases as strings and differs across branches."""
    saver = api.saver
    current = None
    seen = []
    for _ in range(300):
        current = saver.get_next_version(current)
        seen.append(current)
    assert seen == sorted(seen)
    assert len(set(seen)) == len(seen)
    branch_a = saver.get_next_version(seen[10])
    branch_b = saver.get_next_version(seen[10])
    assert branch_a != branch_b
    assert seen[10] < branch_a < seen[12]
    assert seen[10] < branch_b < seen[12]
    # An integer version (LangGraph's simplest savers count so) counts on from it.
    assert saver.get_next_version(2) > saver.get_next_version(1) > saver.get_next_version(None)


async def concurrent_threads(api: SaverApi) -> None:
    """Many threads written at the same time each keep exactly their own history."""
    histories = [History(api, new_id(f"concurrent-{n}")) for n in range(12)]

    async def run(history: History) -> None:
        for step in range(6):
            config = await history.step({"step": step, "owner": history.thread_id})
            await api.put_writes(config, [("step", step)], f"task-{step}")

    await api.concurrently([partial(run, history) for history in histories])
    for history in histories:
        listed = await api.list(thread_config(history.thread_id))
        assert ids(listed) == [checkpoint_id_of(c) for c in reversed(history.configs)]
        for found, step in zip(listed, reversed(range(6)), strict=True):
            assert found.checkpoint["channel_values"] == {
                "step": step,
                "owner": history.thread_id,
            }
            assert found.pending_writes == [(f"task-{step}", "step", step)]


# -- thread management -----------------------------------------------------------------------


async def delete_thread_removes_all_namespaces(api: SaverApi) -> None:
    """``delete_thread`` removes one thread entirely and leaves the others alone."""
    doomed, kept = new_id("doomed"), new_id("kept")
    for thread_id in (doomed, kept):
        for checkpoint_ns in ("", "child:1"):
            history = History(api, thread_id, checkpoint_ns)
            config = await history.step({"x": thread_id})
            await api.put_writes(config, [("x", 1)], "task")
    await api.delete_thread(doomed)

    assert await api.list({"configurable": {"thread_id": doomed}}) == []
    assert await api.get_tuple(thread_config(doomed, "child:1")) is None
    assert len(await api.list({"configurable": {"thread_id": kept}})) == 2
    assert (await must_get(api, thread_config(kept))).pending_writes == [("task", "x", 1)]
    # The id can be used again, starting from nothing.
    again = History(api, doomed)
    await again.step({"y": 1})
    assert (await must_get(api, thread_config(doomed))).checkpoint["channel_values"] == {"y": 1}


async def copy_thread_copies_whole_history(api: SaverApi) -> None:
    """``copy_thread`` duplicates every namespace, checkpoint, value and write."""
    source, target = new_id("source"), new_id("target")
    root = History(api, source)
    child = History(api, source, "child:1")
    await root.step({"a": 1, "b": "kept"})
    root_config = await root.step({"a": 2})
    await api.put_writes(root_config, [("a", 3), (ERROR, "boom")], "task")
    await child.step({"c": [1]})
    await api.copy_thread(source, target)

    for checkpoint_ns in ("", "child:1"):
        originals = await api.list(thread_config(source, checkpoint_ns))
        copies = await api.list(thread_config(target, checkpoint_ns))
        assert ids(copies) == ids(originals)
        for original, copy in zip(originals, copies, strict=True):
            assert copy.config["configurable"]["thread_id"] == target
            assert copy.checkpoint == original.checkpoint
            assert copy.metadata == original.metadata
            assert copy.pending_writes == original.pending_writes
            if original.parent_config is None:
                assert copy.parent_config is None
            else:
                assert copy.parent_config is not None
                assert copy.parent_config["configurable"] == {
                    **original.parent_config["configurable"],
                    "thread_id": target,
                }
    # The copies are independent of the source.
    continued = History(api, target)
    continued.checkpoints = list(root.checkpoints)
    continued.config = {**root_config, "configurable": {**root_config["configurable"]}}
    continued.config["configurable"]["thread_id"] = target
    await continued.step({"a": 99})
    await api.delete_thread(source)
    latest = await must_get(api, thread_config(target))
    assert latest.checkpoint["channel_values"] == {"a": 99, "b": "kept"}
    assert len(await api.list(thread_config(target))) == 3


async def delete_for_runs_keeps_other_runs_readable(api: SaverApi) -> None:
    """``delete_for_runs`` removes the runs' checkpoints; later runs stay fully readable."""
    first_run, second_run = new_id("run"), new_id("run")
    history = History(api, new_id("runs"))
    await history.step({"a": "from first run", "b": 0}, {"run_id": first_run})
    first_latest = await history.step({"b": 1}, {"run_id": first_run})
    await api.put_writes(first_latest, [("b", 2)], "task")
    await history.step({"b": 2}, {"run_id": second_run})
    other_thread = History(api, new_id("runs-other"))
    await other_thread.step({"x": 1}, {"run_id": first_run})
    await api.delete_for_runs([first_run])

    remaining = await api.list(thread_config(history.thread_id))
    assert ids(remaining) == [checkpoint_id_of(history.configs[2])]
    assert remaining[0].checkpoint["channel_values"] == {"a": "from first run", "b": 2}
    assert await api.get_tuple(first_latest) is None
    assert await api.list(thread_config(other_thread.thread_id)) == []
    assert await api.list(thread_config(history.thread_id), filter={"run_id": first_run}) == []


async def prune_keeps_latest(api: SaverApi) -> None:
    """``prune`` keeps each namespace's latest checkpoints, fully readable, and drops the rest."""
    thread_id, bystander = new_id("prune"), new_id("bystander")
    root = History(api, thread_id)
    child = History(api, thread_id, "child:1")
    await root.step({"set_once": "first value", "n": 0, "emptied": "x"})
    for n in range(1, 5):
        config = await root.step({"n": n, **({"emptied": EMPTY} if n == 2 else {})})
        await api.put_writes(config, [("n", n * 10)], "task")
    for n in range(3):
        await child.step({"c": n})
    await History(api, bystander).step({"x": 1})

    await api.prune([thread_id], keep_last=2)
    kept = await api.list(thread_config(thread_id))
    assert ids(kept) == [checkpoint_id_of(c) for c in reversed(root.configs[-2:])]
    assert kept[0].checkpoint == root.checkpoints[-1]
    assert kept[0].pending_writes == [("task", "n", 40)]
    assert kept[1].checkpoint["channel_values"] == {"set_once": "first value", "n": 3}
    assert ids(await api.list(thread_config(thread_id, "child:1"))) == [
        checkpoint_id_of(c) for c in reversed(child.configs[-2:])
    ]

    await api.prune([thread_id])
    latest = await api.list({"configurable": {"thread_id": thread_id}})
    assert sorted(ids(latest)) == sorted(
        [checkpoint_id_of(root.configs[-1]), checkpoint_id_of(child.configs[-1])]
    )
    assert (await must_get(api, thread_config(thread_id))).checkpoint == root.checkpoints[-1]
    assert len(await api.list(thread_config(bystander))) == 1


async def prune_older_than(api: SaverApi) -> None:
    """With ``older_than``, recent checkpoints are kept too; the latest always is."""
    now = datetime.now(UTC)
    recent = History(api, new_id("prune-age"))
    for days_ago in (30, 20, 10):
        await recent.step({"n": days_ago}, ts=now - timedelta(days=days_ago))
    await recent.step({"n": 0}, ts=now - timedelta(minutes=1))
    await recent.step({"n": -1}, ts=now)
    await api.prune([recent.thread_id], older_than=timedelta(days=15))
    assert ids(await api.list(thread_config(recent.thread_id))) == [
        checkpoint_id_of(c) for c in reversed(recent.configs[2:])
    ]

    stale = History(api, new_id("prune-stale"))
    for days_ago in (3, 2, 1):
        await stale.step({"n": days_ago}, ts=now - timedelta(days=days_ago))
    await api.prune([stale.thread_id], older_than=timedelta(hours=1), keep_last=2)
    kept = await api.list(thread_config(stale.thread_id))
    assert ids(kept) == [checkpoint_id_of(c) for c in reversed(stale.configs[1:])]
    assert kept[0].checkpoint == stale.checkpoints[-1]


async def prune_delete_strategy(api: SaverApi) -> None:
    """``strategy="delete"`` removes the named threads entirely."""
    doomed, kept = new_id("prune-delete"), new_id("prune-kept")
    for thread_id in (doomed, kept):
        history = History(api, thread_id)
        await history.step({"n": 0})
        await history.step({"n": 1})
    await api.prune([doomed], strategy="delete")
    assert await api.list({"configurable": {"thread_id": doomed}}) == []
    assert len(await api.list(thread_config(kept))) == 2


async def ids_must_be_a_collection(api: SaverApi) -> None:
    """``prune`` and ``delete_for_runs`` refuse a single string: it is not a list of ids."""
    history = History(api, new_id("single-string"))
    await history.step({"n": 0}, {"run_id": "r"})
    await history.step({"n": 1}, {"run_id": "r"})
    for call in (
        lambda: api.prune(history.thread_id),
        lambda: api.prune(history.thread_id, strategy="delete"),
        lambda: api.delete_for_runs("r"),
        lambda: api.delete_for_runs(b"r"),  # type: ignore[arg-type]
    ):
        with pytest.raises(TypeError, match="not a single"):
            await call()
    assert len(await api.list(thread_config(history.thread_id))) == 2


# Longer than any value stored inline in the checkpoint row, so each lives in a value row.
_LONG = "v" * 100


async def fork_from_pruned_parent_is_readable(api: SaverApi) -> None:
    """A checkpoint saved against a parent that was pruned meanwhile is fully readable.

    Its unchanged channels name value rows that the prune removed with the parent: the saver
    notices the missing parent while saving and stores every channel.
    """
    history = History(api, new_id("fork-pruned"))
    await history.step({"a": _LONG + "1", "b": [_LONG]})
    first = history.checkpoints[0]
    first_config = history.configs[0]
    await history.step({"a": _LONG + "2", "b": [_LONG, "x"]})
    await api.prune([history.thread_id])  # drops the first checkpoint and its "a" row
    assert await api.get_tuple(first_config) is None

    fork = copy_checkpoint(first)
    fork["id"] = str(uuid6())
    version = api.saver.get_next_version(fork["channel_versions"]["b"])
    fork["channel_versions"]["b"] = version
    fork["channel_values"]["b"] = [_LONG, "forked"]
    fork["channel_appends"] = {"b": (first["channel_versions"]["b"], ["forked"])}
    saved = await api.put(first_config, fork, {"source": "fork", "step": 1}, {"b": version})
    found = await must_get(api, saved)
    assert found.checkpoint["channel_values"] == {"a": _LONG + "1", "b": [_LONG, "forked"]}
    assert found.parent_config == first_config


async def appended_items_read_back_exactly(api: SaverApi) -> None:
    """A list saved as the items appended to an earlier version (``channel_appends``) reads
    back whole, in every checkpoint, also after prune, copy_thread and forks."""
    history = History(api, new_id("appends"))
    items: list[str] = []
    for n in range(40):
        previous = history.checkpoints[-1] if history.checkpoints else None
        items = [*items, f"item {n} " + "x" * 70]
        checkpoint, versions = history.next_checkpoint({"items": items, "n": n})
        if previous is not None:
            base = previous["channel_versions"]["items"]
            checkpoint["channel_appends"] = {"items": (base, items[-1:])}
        saved = await api.put(history.config, checkpoint, {"source": "loop", "step": n}, versions)
        history.checkpoints.append(checkpoint)
        history.configs.append(saved)
        history.config = saved

    async def assert_exact(thread_id: str, configs: list[RunnableConfig]) -> None:
        for config in configs:
            cid = checkpoint_id_of(config)
            found = await must_get(api, with_checkpoint_id(thread_config(thread_id), cid))
            n = found.checkpoint["channel_values"]["n"]
            assert found.checkpoint["channel_values"]["items"] == items[: n + 1]
        listed = await api.list(thread_config(thread_id))
        for found in listed:
            values = found.checkpoint["channel_values"]
            assert values["items"] == items[: values["n"] + 1]

    await assert_exact(history.thread_id, history.configs)
    await api.prune([history.thread_id], keep_last=7)
    await assert_exact(history.thread_id, history.configs[-7:])
    copy = new_id("appends-copy")
    await api.copy_thread(history.thread_id, copy)
    await assert_exact(copy, history.configs[-7:])

    # A fork appends to the version of the checkpoint it starts from.
    start = history.checkpoints[-4]
    fork = copy_checkpoint(start)
    fork["id"] = str(uuid6())
    version = api.saver.get_next_version(start["channel_versions"]["items"])
    fork["channel_versions"]["items"] = version
    fork["channel_values"]["items"] = [*start["channel_values"]["items"], "forked"]
    fork["channel_appends"] = {"items": (start["channel_versions"]["items"], ["forked"])}
    saved = await api.put(
        history.configs[-4], fork, {"source": "fork", "step": 99}, {"items": version}
    )
    found = await must_get(api, saved)
    assert found.checkpoint["channel_values"]["items"] == [*items[:37], "forked"]


async def a_version_keeps_its_first_value(api: SaverApi) -> None:
    """A ``(channel, version)`` names one value: saved again with another value, the first
    stays (versions are unique, so this only happens with a misbehaving caller)."""
    history = History(api, new_id("same-version"))
    first = await history.step({"a": _LONG + "first"})
    second = copy_checkpoint(history.checkpoints[-1])
    second["id"] = str(uuid6())
    second["channel_values"]["a"] = _LONG + "second"
    version = second["channel_versions"]["a"]
    saved = await api.put(first, second, {"source": "loop", "step": 1}, {"a": version})
    for config in (first, saved):
        found = await must_get(api, config)
        assert found.checkpoint["channel_values"] == {"a": _LONG + "first"}


# -- ownership and the run registry ------------------------------------------------------------


async def lease_is_exclusive(api: SaverApi) -> None:
    """One run holds a thread at a time; the holder may take it again (a retried call)."""
    thread_id = new_id("lease")
    first = await api.call("acquire_lease", thread_id, "run-a", ttl=30)
    assert (first.thread_id, first.owner, first.attempts) == (thread_id, "run-a", 1)
    with pytest.raises(ThreadBusyError) as busy:
        await api.call("acquire_lease", thread_id, "run-b", ttl=30)
    assert busy.value.holder == "run-a" and thread_id in str(busy.value)
    again = await api.call("acquire_lease", thread_id, "run-a", ttl=30)
    assert again.epoch == first.epoch
    await api.call("release_lease", again, "done")
    run = await api.call("get_run", thread_id)
    assert (run.status, run.run_id, run.expires_at) == ("done", "run-a", None)
    second = await api.call("acquire_lease", thread_id, "run-b", ttl=30)
    assert second.epoch > first.epoch and second.attempts == 1
    assert await api.call("get_run", new_id("never-leased")) is None


async def a_run_starts_with_one_call(api: SaverApi) -> None:
    """``acquire_lease_and_get_tuple`` takes the thread and reads the checkpoint the config
    names, as ``acquire_lease`` then ``get_tuple`` would; on a busy thread it raises
    ``ThreadBusyError`` and takes nothing."""
    history = History(api, new_id("start"))
    start = "acquire_lease_and_get_tuple"
    lease, found = await api.call(start, history.config, "run-a", ttl=30, input={"q": 1})
    assert found is None
    assert (lease.thread_id, lease.owner, lease.attempts) == (history.thread_id, "run-a", 1)
    run = await api.call("get_run", history.thread_id)
    assert (run.status, run.run_id, run.input, run.epoch) == ("running", "run-a", {"q": 1}, 1)
    with pytest.raises(ThreadBusyError) as busy:
        await api.call(start, history.config, "run-b", ttl=30)
    assert busy.value.holder == "run-a"
    await api.call("release_lease", lease, "done")

    configs = [await history.step({"n": n}) for n in range(3)]
    await api.put_writes(configs[-1], [("n", 9)], "task-1")
    for config, expected in ((thread_config(history.thread_id), configs[-1]), (configs[0],) * 2):
        lease, found = await api.call(start, config, "run-b", ttl=30)
        assert found is not None and found.config == expected
        assert found == await api.get_tuple(config)
        assert (await api.call("get_run", history.thread_id)).head == checkpoint_id_of(configs[-1])
        await api.call("release_lease", lease, "done")


async def the_last_step_lets_go_of_the_lease(api: SaverApi) -> None:
    """``put_step_and_release`` saves a run's last step and lets go of its lease (status
    ``done``) together; a run whose lease was taken over saves nothing and lets go of
    nothing."""
    history = History(api, new_id("last"))
    lease = await api.call("acquire_lease", history.thread_id, "run-a", ttl=30, input=[1])
    history.config = with_fence(history.config, lease.epoch)
    first = await history.step({"n": 1})
    checkpoint, versions = history.next_checkpoint({"n": 2})
    step = (first, [TaskWrites("task-1", [("n", 2)])], checkpoint, {"step": 1}, versions)
    with pytest.raises(ValueError, match="'running'"):
        await api.call("put_step_and_release", *step, lease, "running")
    assert (await api.call("get_run", history.thread_id)).status == "running"

    saved = await api.call("put_step_and_release", *step, lease)
    latest = await must_get(api, thread_config(history.thread_id))
    assert latest.config == saved and latest.checkpoint["channel_values"] == {"n": 2}
    assert (await must_get(api, first)).pending_writes == [("task-1", "n", 2)]
    run = await api.call("get_run", history.thread_id)
    assert (run.status, run.expires_at, run.input, run.epoch) == ("done", None, None, lease.epoch)

    new = await api.call("acquire_lease", history.thread_id, "run-b", ttl=30)
    checkpoint, versions = history.next_checkpoint({"n": 3})
    stale = with_fence(saved, lease.epoch)
    with pytest.raises(LeaseLostError):
        await api.call("put_step_and_release", stale, [], checkpoint, {"step": 2}, versions, lease)
    assert (await must_get(api, thread_config(history.thread_id))).config == saved
    # Saving the stored checkpoint again (its id, other metadata and writes) is refused too.
    again = (with_fence(first, lease.epoch), [TaskWrites("task-9", [("n", 9)])], *step[2:3])
    with pytest.raises(LeaseLostError):
        await api.call("put_step_and_release", *again, {"step": 9}, step[4], lease)
    latest = await must_get(api, thread_config(history.thread_id))
    assert latest.config == saved and latest.metadata.get("step") == 1
    assert (await must_get(api, first)).pending_writes == [("task-1", "n", 2)]
    run = await api.call("get_run", history.thread_id)
    assert (run.status, run.run_id, run.epoch) == ("running", "run-b", new.epoch)


async def expired_lease_is_taken_over_and_fenced(api: SaverApi) -> None:
    """After a lease runs out another run may take the thread; every later write of the old
    holder is refused and leaves nothing behind, so the history cannot fork."""
    history = History(api, new_id("fenced"))
    old = await api.call("acquire_lease", history.thread_id, "run-old", ttl=0.3)
    history.config = with_fence(history.config, old.epoch)
    kept = await history.step({"n": 1})
    renewed = await api.call("renew_lease", old, ttl=0.3)  # an expired-but-free lease renews too
    assert renewed.epoch == old.epoch and renewed.expires_at >= old.expires_at
    await api.sleep(0.5)
    new = await api.call("acquire_lease", history.thread_id, "run-new", ttl=30)
    assert new.epoch > old.epoch
    assert new.attempts == 2  # the old run was still "running": it counts as having died

    checkpoint, versions = history.next_checkpoint({"n": 2})
    stale = with_fence(kept, old.epoch)
    with pytest.raises(LeaseLostError, match="took the thread over"):
        await api.put(stale, checkpoint, {"source": "loop", "step": 1}, versions)
    with pytest.raises(LeaseLostError):
        await api.put_writes(stale, [("n", 3)], "task-1")
    with pytest.raises(LeaseLostError):
        await api.put_step(
            stale, [TaskWrites("task-1", [("n", 3)])], checkpoint, {"step": 1}, versions
        )
    with pytest.raises(LeaseLostError):
        await api.put_writes_batch(stale, [TaskWrites("task-2", [("n", 4)])])
    with pytest.raises(LeaseLostError):
        await api.call("renew_lease", old, ttl=30)
    await api.call("release_lease", old, "done")  # a lost lease lets go of nothing
    found = await must_get(api, thread_config(history.thread_id))
    assert checkpoint_id_of(found.config) == checkpoint_id_of(kept)
    assert found.pending_writes == []
    assert (await api.call("get_run", history.thread_id)).run_id == "run-new"

    # The new holder writes on.
    saved = await api.put(with_fence(kept, new.epoch), checkpoint, {"step": 1}, versions)
    assert checkpoint_id_of((await must_get(api, thread_config(history.thread_id))).config) == (
        checkpoint_id_of(saved)
    )


async def writes_after_delete_thread_are_refused(api: SaverApi) -> None:
    """Deleting a thread fences out the run writing to it: no resurrected thread. A new run
    may start the thread afresh."""
    history = History(api, new_id("deleted"))
    lease = await api.call("acquire_lease", history.thread_id, "run-a", ttl=30)
    history.config = with_fence(history.config, lease.epoch)
    saved = await history.step({"n": 1})
    await api.delete_thread(history.thread_id)
    checkpoint, versions = history.next_checkpoint({"n": 2})
    with pytest.raises(LeaseLostError, match="deleted"):
        await api.put(with_fence(saved, lease.epoch), checkpoint, {"step": 1}, versions)
    with pytest.raises(LeaseLostError, match="deleted"):
        await api.put_writes(with_fence(saved, lease.epoch), [("n", 3)], "task-1")
    assert await api.list(thread_config(history.thread_id)) == []
    assert (await api.call("get_run", history.thread_id)).status == "deleted"

    fresh = await api.call("acquire_lease", history.thread_id, "run-b", ttl=30)
    assert fresh.epoch > lease.epoch and fresh.attempts == 1
    restart = History(api, history.thread_id)
    restart.config = with_fence(restart.config, fresh.epoch)
    await restart.step({"n": 10})
    assert len(await api.list(thread_config(history.thread_id))) == 1


async def incomplete_runs_are_listed(api: SaverApi) -> None:
    """A run still ``running`` whose lease ran out died: it is listed with its input. Live,
    finished and interrupted runs are not."""
    died, live, paused, done = (new_id(name) for name in ("died", "live", "paused", "done"))
    await api.call("acquire_lease", died, "run-died", ttl=0.2, input={"question": "why"})
    await api.call("acquire_lease", live, "run-live", ttl=30)
    for thread_id, status in ((paused, "interrupted"), (done, "done")):
        lease = await api.call("acquire_lease", thread_id, f"run-{status}", ttl=0.2)
        await api.call("release_lease", lease, status)
    await api.sleep(0.4)
    found = {run.thread_id: run for run in await api.call("list_incomplete")}
    assert died in found and not {live, paused, done} & set(found)
    run = found[died]
    assert (run.run_id, run.status, run.attempts) == ("run-died", "running", 1)
    assert run.input == {"question": "why"}
    assert len(await api.call("list_incomplete", limit=1)) == 1
    # Recovery takes it over: one more attempt, and it is no longer listed while held.
    lease = await api.call("acquire_lease", died, "run-recover", ttl=30)
    assert lease.attempts == 2
    assert died not in {run.thread_id for run in await api.call("list_incomplete")}
    await api.call("release_lease", lease, "error", "it failed again")
    run = await api.call("get_run", died)
    assert (run.status, run.error, run.input) == ("error", "it failed again", None)


async def recovery_takes_over_only_the_dead_run(api: SaverApi) -> None:
    """``expect_epoch`` takes a thread only from the dead run at that epoch; the run record
    keeps the thread's head checkpoint from when the run started; a lease handed back
    ``running`` leaves the run incomplete, that take not counted."""
    history = History(api, new_id("recover"))
    first = await history.step({"n": 1})
    lease = await api.call("acquire_lease", history.thread_id, "run-a", ttl=0.2, input=[1])
    run = await api.call("get_run", history.thread_id)
    assert (run.epoch, run.head) == (lease.epoch, checkpoint_id_of(first))
    with pytest.raises(ThreadBusyError):  # still alive
        await api.call(
            "acquire_lease", history.thread_id, "rec-1", ttl=30, expect_epoch=lease.epoch
        )
    await api.sleep(0.4)
    with pytest.raises(ThreadBusyError):  # dead, but not at that epoch
        await api.call(
            "acquire_lease", history.thread_id, "rec-1", ttl=30, expect_epoch=lease.epoch + 7
        )
    taken = await api.call(
        "acquire_lease", history.thread_id, "rec-1", ttl=30, expect_epoch=lease.epoch
    )
    assert taken.attempts == 2
    await api.call("release_lease", taken, "running")  # handed back unfinished
    run = await api.call("get_run", history.thread_id)
    assert (run.status, run.attempts, run.expires_at) == ("running", 1, None)
    assert history.thread_id in {r.thread_id for r in await api.call("list_incomplete")}
    again = await api.call(
        "acquire_lease", history.thread_id, "rec-2", ttl=30, expect_epoch=run.epoch
    )
    await api.call("release_lease", again, "done")
    with pytest.raises(ThreadBusyError):  # finished now: nothing to recover
        await api.call(
            "acquire_lease", history.thread_id, "rec-3", ttl=30, expect_epoch=again.epoch
        )
    with pytest.raises(ThreadBusyError):  # never leased
        await api.call("acquire_lease", new_id("none"), "rec-4", ttl=30, expect_epoch=1)


async def lease_arguments_are_checked(api: SaverApi) -> None:
    thread_id = new_id("lease-args")
    for ttl in (0, -1.0):
        with pytest.raises(ValueError, match="ttl"):
            await api.call("acquire_lease", thread_id, "run-a", ttl=ttl)
    lease = await api.call("acquire_lease", thread_id, "run-a", ttl=30)
    with pytest.raises(ValueError, match="let go"):
        await api.call("release_lease", lease, "paused-ish")
    with pytest.raises(ValueError, match="thread_id"):
        await api.call("acquire_lease", "x" * 100_000, "run-a", ttl=30)
    with pytest.raises(ValueError, match="limit"):
        await api.call("list_incomplete", limit=-1)


# -- retention ---------------------------------------------------------------------------------


async def storage_report_counts_a_thread(api: SaverApi) -> None:
    history = History(api, new_id("report"))
    assert await api.call("storage_report", history.thread_id) == (
        await api.call("storage_report", history.thread_id)
    )
    empty = await api.call("storage_report", history.thread_id)
    assert (empty.checkpoints, empty.writes, empty.values, empty.bytes) == (0, 0, 0, 0)
    await history.step({"text": _LONG})
    for n in range(1, 4):
        await history.step({"text": _LONG + str(n)}, writes=[TaskWrites(f"t{n}", [("x", n)])])
    full = await api.call("storage_report", history.thread_id)
    assert (full.thread_id, full.checkpoints, full.writes) == (history.thread_id, 4, 3)
    assert full.bytes > 4 * len(_LONG)
    await api.prune([history.thread_id], keep_last=1)
    pruned = await api.call("storage_report", history.thread_id)
    assert pruned.checkpoints == 1 and pruned.bytes < full.bytes


async def sweep_deletes_idle_threads(api: SaverApi) -> None:
    """``sweep`` deletes threads idle for longer than its age, except those a run holds."""
    now = datetime.now(UTC)
    idle, recent, held = (new_id(name) for name in ("idle", "recent", "held"))
    for thread_id, age in ((idle, 10), (recent, 0), (held, 10)):
        history = History(api, thread_id)
        await history.step({"n": 1}, ts=now - timedelta(days=age + 1))
        await history.step({"n": 2}, ts=now - timedelta(days=age))
    await api.call("acquire_lease", held, "run-held", ttl=30)
    swept = await api.call("sweep", timedelta(days=5))
    assert idle in swept and not {recent, held} & set(swept)
    assert await api.list(thread_config(idle)) == []
    assert len(await api.list(thread_config(recent))) == 2
    assert len(await api.list(thread_config(held))) == 2
    if api.saver.retention is None or api.saver.retention.ttl is None:
        with pytest.raises(ValueError, match="older_than"):
            await api.call("sweep")


SCENARIOS: list[Scenario] = [
    roundtrip_every_type,
    roundtrip_checkpoint_and_configs,
    roundtrip_metadata,
    stored_state_is_isolated,
    very_large_values,
    unicode_and_nul_in_keys,
    longest_ids,
    get_tuple_latest_or_by_id,
    list_newest_first_with_before_and_limit,
    list_filter_on_metadata,
    list_filter_has_no_false_negatives,
    namespaces_are_isolated,
    missing_thread_id_is_an_error,
    pending_writes_ordered_and_idempotent,
    special_writes_replace,
    put_writes_batch_is_put_writes_of_each_task,
    put_step_saves_writes_and_checkpoint,
    put_step_is_visible_with_its_writes,
    put_steps_saves_a_chain,
    put_steps_after_a_pruned_parent,
    failed_serialization_saves_nothing,
    versions_increase,
    concurrent_threads,
    delete_thread_removes_all_namespaces,
    copy_thread_copies_whole_history,
    delete_for_runs_keeps_other_runs_readable,
    prune_keeps_latest,
    prune_older_than,
    prune_delete_strategy,
    ids_must_be_a_collection,
    fork_from_pruned_parent_is_readable,
    a_version_keeps_its_first_value,
    appended_items_read_back_exactly,
    lease_is_exclusive,
    a_run_starts_with_one_call,
    the_last_step_lets_go_of_the_lease,
    expired_lease_is_taken_over_and_fenced,
    writes_after_delete_thread_are_refused,
    incomplete_runs_are_listed,
    recovery_takes_over_only_the_dead_run,
    lease_arguments_are_checked,
    storage_report_counts_a_thread,
    sweep_deletes_idle_threads,
]
