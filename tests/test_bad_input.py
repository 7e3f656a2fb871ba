"""Bad input, on every saver through its public API (issue #8, fault injection: "bad input").

Each case feeds one kind of bad input to a saver and checks three things:

1. the error type, and that its message names what was wrong (thread, namespace, checkpoint,
   channel or task, type name, limit);
2. other threads keep working: a healthy thread written before the bad input, and one written
   after it, in the same store, read back exactly;
3. a refused write stored nothing: the row count of every table is unchanged.

Damaged rows are made with raw access to the store: ``sqlite3`` on the SQLite file, ``psycopg``
on the test's Postgres schema, and for ``InMemorySaver`` its row dicts (it stores the same
serialized rows the SQL savers do, so the same damage applies). Per-backend tests already cover
parts of this on one saver each (``libs/checkpoint-sqlite/tests/test_sqlite.py`` corruption and
filter injection, ``libs/checkpoint-postgres/tests/test_postgres.py`` filter injection and NUL
identifiers, ``libs/core/tests/checkpoint`` and ``serde`` at the storage/serializer level, the
contract's ``unicode_ids``/``longest_ids``); here every input runs on all six savers, sync and
async, with the bystander and nothing-partial invariants.

Run with ``-s`` to see the one-line summary printed at the end of the session.
"""

from __future__ import annotations

import contextlib
import random
import sqlite3
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import msgpack
import psycopg
import pytest

from stepgraph.checkpoint.base import (
    Checkpoint,
    TaskWrites,
    copy_checkpoint,
    empty_checkpoint,
    uuid6,
)
from stepgraph.checkpoint.serde.codec import DATACLASS, ENUM, NAMEDTUPLE, PYDANTIC
from stepgraph.checkpoint.storage import KEY_LIMITS, METADATA_IN_JSON, CorruptCheckpointError
from stepgraph.checkpoint.testing.api import SaverApi
from stepgraph.config import RunnableConfig
from stepgraph.errors import UnknownTypeError
from stepgraph.graph import END, START, StateGraph

if TYPE_CHECKING:  # conftest is not importable under --import-mode=importlib
    from conftest import Backend, Harness

# -- the summary ------------------------------------------------------------------------------


@dataclass
class _Tally:
    cases: int = 0
    backends: set[str] = field(default_factory=set)
    checks: int = 0


TALLY = _Tally()


@pytest.fixture(scope="module", autouse=True)
def _print_summary(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if TALLY.cases:
        # Past pytest's output capture, so that make test's -q run shows the counts.
        capture = request.config.pluginmanager.get_plugin("capturemanager")
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            print(
                f"\nbad-input: {TALLY.cases} cases, {len(TALLY.backends)} backends, "
                f"{TALLY.checks} invariant checks",
                flush=True,
            )


def checked() -> None:
    TALLY.checks += 1


# -- raw access to the stored rows -------------------------------------------------------------

# A damaged part of a stored checkpoint: the checkpoint blob, its metadata, a channel's value
# row, or a pending write.
PARTS = ("checkpoint", "metadata", "value", "write")

Damage = Callable[[str, bytes], tuple[str, bytes]]
"""``(type tag, bytes) -> (type tag, bytes)``: what is done to one stored blob."""

# part -> (table, primary key columns, type column, blob column), as in the SQL schemas.
_SQL_LAYOUT = {
    "checkpoint": (
        "checkpoints",
        ("thread_id", "checkpoint_ns", "checkpoint_id"),
        "checkpoint_type",
        "checkpoint",
    ),
    "metadata": (
        "checkpoints",
        ("thread_id", "checkpoint_ns", "checkpoint_id"),
        "metadata_type",
        "metadata",
    ),
    "value": (
        "checkpoint_values",
        ("thread_id", "checkpoint_ns", "channel", "version"),
        "type",
        "value",
    ),
    "write": (
        "checkpoint_writes",
        ("thread_id", "checkpoint_ns", "checkpoint_id", "task_id", "idx"),
        "type",
        "value",
    ),
}


class RawStore:
    """The rows under a saver, bypassing it."""

    def damage(self, thread_id: str, part: str, change: Damage, channel: str | None = None) -> int:
        """Apply ``change`` to ``part`` of every stored checkpoint of ``thread_id`` (for
        ``value``/``write``: the rows of ``channel``); returns how many rows changed."""
        raise NotImplementedError

    def counts(self) -> dict[str, int]:
        """Rows per table (every table the saver keeps, schema bookkeeping aside)."""
        raise NotImplementedError


class SqlStore(RawStore):
    """SQLite and Postgres: same layout; Postgres prefixes tables and keys are UTF-8 bytea."""

    def __init__(self, connect: Callable[[], Any], postgres: bool) -> None:
        self.connect = connect
        self.postgres = postgres

    @contextlib.contextmanager
    def _connection(self) -> Iterator[Any]:
        conn = self.connect()
        try:
            yield conn
            conn.commit()
        finally:
            conn.close()

    def _key(self, text: str) -> Any:
        return text.encode("utf-8", "surrogatepass") if self.postgres else text

    def damage(self, thread_id: str, part: str, change: Damage, channel: str | None = None) -> int:
        table, keys, type_column, blob_column = _SQL_LAYOUT[part]
        if self.postgres:
            table = f"stepgraph_{table}"
        mark = "%s" if self.postgres else "?"
        where = f"thread_id = {mark}"
        params: list[Any] = [self._key(thread_id)]
        if channel is not None:
            where += f" AND channel = {mark}"
            params.append(self._key(channel))
        changed = 0
        with self._connection() as conn:
            rows = conn.execute(
                f"SELECT {', '.join(keys)}, {type_column}, {blob_column} FROM {table} "
                f"WHERE {where}",
                params,
            ).fetchall()
            for row in rows:
                key, tag, blob = row[: len(keys)], row[-2], row[-1]
                if tag is None:
                    continue  # an emptied channel: nothing stored to damage
                in_json = part == "metadata" and not self.postgres
                if in_json and tag == METADATA_IN_JSON:
                    # SQLite keeps such metadata only as its JSON copy.
                    (blob,) = conn.execute(
                        f"SELECT CAST(metadata_json AS BLOB) FROM {table} WHERE "
                        + " AND ".join(f"{column} = {mark}" for column in keys),
                        key,
                    ).fetchone()
                new_tag, new_blob = change(tag, bytes(blob))
                stored_in = blob_column
                if in_json and new_tag == METADATA_IN_JSON:
                    stored_in = "metadata_json"
                match = " AND ".join(f"{column} = {mark}" for column in keys)
                conn.execute(
                    f"UPDATE {table} SET {type_column} = {mark}, {stored_in} = {mark} "
                    f"WHERE {match}",
                    [new_tag, new_blob, *key],
                )
                changed += 1
        return changed

    def counts(self) -> dict[str, int]:
        with self._connection() as conn:
            if self.postgres:
                names = conn.execute(
                    "SELECT table_name FROM information_schema.tables WHERE table_schema = "
                    "current_schema() AND table_type = 'BASE TABLE' "
                    "AND table_name <> 'stepgraph_migrations'"
                ).fetchall()
            else:
                names = conn.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table' "
                    "AND name NOT LIKE 'sqlite_%' AND name <> 'checkpoint_migrations'"
                ).fetchall()
            counts = {
                name: conn.execute(f'SELECT count(*) FROM "{name}"').fetchone()[0]
                for (name,) in names
            }
        prefix = "stepgraph_" if self.postgres else ""
        expected = {f"{prefix}{table}" for table, *_ in _SQL_LAYOUT.values()}
        assert expected <= set(counts), f"tables {sorted(counts)}: not the expected schema"
        return counts


class MemoryStore(RawStore):
    """``InMemorySaver``'s own row dicts (private, but they hold the same rows as SQL)."""

    def __init__(self, saver: Any) -> None:
        self.saver = saver

    def damage(self, thread_id: str, part: str, change: Damage, channel: str | None = None) -> int:
        saver = self.saver
        changed = 0
        with saver._lock:
            if part in ("checkpoint", "metadata"):
                for history in saver._checkpoints.get(thread_id, {}).values():
                    for checkpoint_id, row in list(history.items()):
                        if part == "checkpoint":
                            tag, blob = change(row.checkpoint_type, row.checkpoint)
                            history[checkpoint_id] = row._replace(
                                checkpoint_type=tag, checkpoint=blob
                            )
                        else:
                            tag, blob = change(row.metadata_type, row.metadata)
                            history[checkpoint_id] = row._replace(metadata_type=tag, metadata=blob)
                        changed += 1
            elif part == "value":
                values = saver._values.get(thread_id, {})
                for key, row in list(values.items()):
                    if row.channel == channel and row.type is not None:
                        tag, blob = change(row.type, row.value)
                        values[key] = row._replace(type=tag, value=blob)
                        changed += 1
            else:
                for by_task in saver._writes.get(thread_id, {}).values():
                    for key, row in list(by_task.items()):
                        if row.channel == channel:
                            tag, blob = change(row.type, row.value)
                            by_task[key] = row._replace(type=tag, value=blob)
                            changed += 1
        return changed

    def counts(self) -> dict[str, int]:
        saver = self.saver
        with saver._lock:
            return {
                "checkpoints": sum(
                    len(history)
                    for namespaces in saver._checkpoints.values()
                    for history in namespaces.values()
                ),
                "values": sum(len(values) for values in saver._values.values()),
                "writes": sum(
                    len(by_task)
                    for by_checkpoint in saver._writes.values()
                    for by_task in by_checkpoint.values()
                ),
                "runs": len(saver._runs),
            }


# -- running a case ----------------------------------------------------------------------------


@dataclass
class Case:
    """One backend, and the way to its raw rows."""

    backend: Backend
    raw_for: Callable[[Any], RawStore]

    @property
    def name(self) -> str:
        return self.backend.name

    def run(self, scenario: Callable[..., Any], **kwargs: Any) -> Any:
        async def with_raw(harness: Harness) -> Any:
            api = SaverApi(harness.saver, use_async=harness.is_async)
            return await scenario(harness, api, self.raw_for(harness.saver), **kwargs)

        TALLY.cases += 1
        TALLY.backends.add(self.name)
        return self.backend.run(with_raw)


@pytest.fixture
def case(backend: Backend, request: pytest.FixtureRequest, tmp_path: Path) -> Case:
    store = backend.name.split("-")[0]
    if store == "memory":
        return Case(backend, MemoryStore)
    if store == "sqlite":
        path = tmp_path / "checkpoints.sqlite"  # where conftest opens the SQLite savers

        def connect_sqlite() -> sqlite3.Connection:
            assert path.exists(), f"no SQLite file at {path}"
            return sqlite3.connect(path)

        raw: RawStore = SqlStore(connect_sqlite, postgres=False)
        return Case(backend, lambda _saver: raw)
    uri = request.getfixturevalue("postgres_uri")  # the schema the backend's saver uses
    raw = SqlStore(lambda: psycopg.connect(uri), postgres=True)
    return Case(backend, lambda _saver: raw)


# -- writing and checking threads --------------------------------------------------------------


def thread(thread_id: str, checkpoint_ns: str = "") -> RunnableConfig:
    return {"configurable": {"thread_id": thread_id, "checkpoint_ns": checkpoint_ns}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


async def save(
    api: SaverApi,
    config: RunnableConfig,
    updates: dict[str, Any],
    metadata: dict[str, Any] | None = None,
    previous: Checkpoint | None = None,
    writes: list[TaskWrites] | None = None,
) -> tuple[RunnableConfig, Checkpoint]:
    """Save the checkpoint after ``previous`` with ``updates``, as the executor would."""
    checkpoint = copy_checkpoint(previous) if previous else empty_checkpoint()
    checkpoint["id"] = str(uuid6())
    checkpoint["ts"] = datetime.now(UTC).isoformat()
    new_versions = {}
    for channel, value in updates.items():
        version = api.saver.get_next_version(checkpoint["channel_versions"].get(channel))
        checkpoint["channel_versions"][channel] = new_versions[channel] = version
        checkpoint["channel_values"][channel] = value
    meta: Any = {"source": "loop", "step": 0, **(metadata or {})}
    if writes is None:
        saved = await api.put(config, checkpoint, meta, new_versions)
    else:
        saved = await api.put_step(config, writes, checkpoint, meta, new_versions)
    return saved, checkpoint


class Healthy:
    """A thread of ordinary data that must read back exactly, whatever else the store holds.

    Two checkpoints (a value row big enough not to be inlined, an inlined counter, a list), a
    pending write and metadata, all checked field by field, plus a listing of the thread.
    """

    def __init__(self, label: str) -> None:
        self.thread_id = new_id(f"healthy-{label}")
        self.label = label
        self.configs: list[RunnableConfig] = []

    async def write(self, api: SaverApi) -> Healthy:
        first, checkpoint = await save(
            api, thread(self.thread_id), {"big": {"k": "v" * 100}, "n": 1}, {"who": self.label}
        )
        second, _ = await save(
            api, first, {"n": 2, "items": [1, 2, 3]}, {"who": self.label}, checkpoint
        )
        await api.put_writes(second, [("w", {"x": "y" * 80})], "task-h")
        self.configs = [first, second]
        return self

    async def check(self, api: SaverApi) -> None:
        first, second = self.configs
        latest = await api.get_tuple(thread(self.thread_id))
        assert latest is not None, f"healthy thread {self.thread_id!r} is gone"
        assert latest.config == second
        assert latest.parent_config == first
        assert latest.checkpoint["channel_values"] == {
            "big": {"k": "v" * 100},
            "n": 2,
            "items": [1, 2, 3],
        }
        assert latest.pending_writes == [("task-h", "w", {"x": "y" * 80})]
        assert latest.metadata["who"] == self.label  # type: ignore[typeddict-item]
        older = await api.get_tuple(first)
        assert older is not None
        assert older.checkpoint["channel_values"] == {"big": {"k": "v" * 100}, "n": 1}
        listed = await api.list(thread(self.thread_id))
        assert [found.config for found in listed] == [second, first]
        checked()


async def bystanders_fine(api: SaverApi, before: Healthy) -> None:
    """The thread written before the bad input still reads back; a new one writes and reads."""
    await before.check(api)
    after = await Healthy("after").write(api)
    await after.check(api)


def names(error: BaseException, *parts: str) -> str:
    """Assert the error's message holds each of ``parts``; return the message."""
    message = str(error)
    for part in parts:
        assert part in message, f"{part!r} not in error message {message!r}"
    checked()
    return message


def checkpoint_tables(counts: dict[str, int]) -> dict[str, int]:
    """``counts`` without the run registry's tables."""
    return {table: rows for table, rows in counts.items() if "run" not in table}


def unchanged(raw: RawStore, before: dict[str, int]) -> None:
    assert raw.counts() == before, "a refused write left rows behind"
    checked()


# -- a victim thread to damage -----------------------------------------------------------------

VICTIM_NS = "ns-victim"
BIG_VALUE = {"a": "b" * 100}  # too big to be inlined in the checkpoint row: a value row
WRITE_VALUE = {"x": "y" * 80}


@dataclass
class Victim:
    thread_id: str
    config: RunnableConfig

    @property
    def checkpoint_id(self) -> str:
        return str(self.config["configurable"]["checkpoint_id"])

    def where(self, part: str) -> list[str]:
        """What an error reading ``part`` of this checkpoint must name."""
        named = {
            "checkpoint": "the checkpoint",
            "metadata": "the metadata",
            "value": "channel 'big'",
            "write": "write to channel 'w' of task 'task-v'",
        }[part]
        return [named, repr(self.thread_id), repr(VICTIM_NS), repr(self.checkpoint_id)]


async def write_victim(api: SaverApi) -> Victim:
    thread_id = new_id("victim")
    config, _ = await save(
        api, thread(thread_id, VICTIM_NS), {"big": BIG_VALUE, "n": 1}, {"who": "victim"}
    )
    await api.put_writes(config, [("w", WRITE_VALUE)], "task-v")
    return Victim(thread_id, config)


async def read_fails(
    api: SaverApi, victim: Victim, error: type[Exception]
) -> pytest.ExceptionInfo[Exception]:
    """Reading the victim by get_tuple and by list both raise ``error``; returns get_tuple's."""
    with pytest.raises(error) as caught:
        await api.get_tuple(thread(victim.thread_id, VICTIM_NS))
    with pytest.raises(error):
        await api.list({"configurable": {"thread_id": victim.thread_id}})  # every namespace
    # A run's start (lease and read in one call) fails too, and lets go of the lease.
    with pytest.raises(error):
        start = "acquire_lease_and_get_tuple"
        await api.call(start, thread(victim.thread_id, VICTIM_NS), "run-start", ttl=30)
    run = await api.call("get_run", victim.thread_id)
    assert (run.status, run.expires_at) == ("error", None)
    assert run.error.startswith(error.__name__)
    return caught


async def victim_removable(api: SaverApi, raw: RawStore, victim: Victim) -> None:
    """A damaged thread does not block deleting it: afterwards every listing works again."""
    await api.delete_thread(victim.thread_id)
    assert await api.get_tuple(thread(victim.thread_id, VICTIM_NS)) is None
    assert all(
        found.config["configurable"]["thread_id"] != victim.thread_id
        for found in await api.list(None)
    )
    checked()


# -- corrupted and truncated rows --------------------------------------------------------------


def random_bytes(tag: str, blob: bytes) -> tuple[str, bytes]:
    # Fixed seed: random bytes can, by chance, start with a msgpack extension header and read
    # as an unknown extension (UnknownTypeError) instead of corrupt bytes.
    return tag, random.Random(8).randbytes(max(len(blob), 16))


def cut_in_half(tag: str, blob: bytes) -> tuple[str, bytes]:
    return tag, blob[: len(blob) // 2]


@pytest.mark.parametrize("part", PARTS)
def test_corrupted_row_names_its_place(case: Case, part: str) -> None:
    async def scenario(harness: Harness, api: SaverApi, raw: RawStore) -> None:
        before = await Healthy("before").write(api)
        channel = {"value": "big", "write": "w"}.get(part)
        for damage in (random_bytes, cut_in_half):
            victim = await write_victim(api)
            assert raw.damage(victim.thread_id, part, damage, channel) == 1

            caught = await read_fails(api, victim, CorruptCheckpointError)
            names(caught.value, "Cannot read", *victim.where(part))
            await bystanders_fine(api, before)
            await victim_removable(api, raw, victim)

    case.run(scenario)


def test_prune_meets_a_corrupt_thread(case: Case) -> None:
    """``prune`` must read the checkpoints it keeps: a thread whose checkpoint blob is corrupt
    makes it fail naming that thread, and the other threads stay readable (all savers), and
    prunable on their own."""

    async def scenario(harness: Harness, api: SaverApi, raw: RawStore) -> None:
        before = await Healthy("before").write(api)
        victim = await write_victim(api)
        await save(api, victim.config, {"n": 2})  # something to prune
        assert raw.damage(victim.thread_id, "checkpoint", cut_in_half) == 2
        latest = before.configs[-1]

        with pytest.raises(CorruptCheckpointError) as caught:
            await api.prune([before.thread_id, victim.thread_id])
        names(caught.value, "the checkpoint", repr(victim.thread_id), repr(VICTIM_NS))
        # Whether the healthy thread was pruned before the failure differs by saver (memory
        # prunes thread by thread; the SQL savers roll the whole call back): only its latest
        # checkpoint is certain.
        found = await api.get_tuple(thread(before.thread_id))
        assert found is not None and found.config == latest
        assert found.pending_writes == [("task-h", "w", {"x": "y" * 80})]
        await api.prune([before.thread_id])
        listed = await api.list(thread(before.thread_id))
        assert [item.config for item in listed] == [latest]
        checked()
        after = await Healthy("after").write(api)
        await after.check(api)

    case.run(scenario)


# -- a blob of another type ---------------------------------------------------------------------


def retag(new_tag: str) -> Damage:
    return lambda _tag, blob: (new_tag, blob)


def stored_as(tag: str, blob: bytes) -> Damage:
    return lambda _tag, _blob: (tag, blob)


def replace_with(value: Any) -> Damage:
    return stored_as("msgpack", msgpack.packb(value))


# (part, damage, error, what the message must also name)
RETYPED = {
    "value-unknown-tag": ("value", retag("json"), UnknownTypeError, "'json'"),
    "value-unknown-extension": (
        "value",
        replace_with(msgpack.ExtType(99, b"\x00")),
        UnknownTypeError,
        "extension code 99",
    ),
    "write-unknown-tag": ("write", retag("pickle"), UnknownTypeError, "'pickle'"),
    "write-encrypted-tag": (
        "write",
        retag("msgpack+aesgcm"),
        UnknownTypeError,
        "EncryptedSerializer",
    ),
    "checkpoint-unknown-tag": ("checkpoint", retag("json"), UnknownTypeError, "'json'"),
    "metadata-encrypted-tag": (
        "metadata",
        retag("msgpack+aesgcm"),
        UnknownTypeError,
        "EncryptedSerializer",
    ),
    "checkpoint-tagged-bytes": ("checkpoint", retag("bytes"), CorruptCheckpointError, "not a"),
    "checkpoint-holds-a-list": (
        "checkpoint",
        replace_with([1, 2]),
        CorruptCheckpointError,
        "not a checkpoint",
    ),
    "metadata-holds-a-list": (
        "metadata",
        replace_with(["source", "loop"]),
        CorruptCheckpointError,
        "not a dict",
    ),
    "metadata-tagged-null": ("metadata", retag("null"), CorruptCheckpointError, "not a dict"),
}


@pytest.mark.parametrize("part", PARTS)
def test_blob_of_another_type_is_refused(case: Case, part: str) -> None:
    kinds = [kind for kind in RETYPED.values() if kind[0] == part]
    assert kinds

    async def scenario(harness: Harness, api: SaverApi, raw: RawStore) -> None:
        before = await Healthy("before").write(api)
        channel = {"value": "big", "write": "w"}.get(part)
        for _, damage, error, detail in kinds:
            victim = await write_victim(api)
            assert raw.damage(victim.thread_id, part, damage, channel) == 1

            caught = await read_fails(api, victim, error)
            names(caught.value, detail, *victim.where(part))
            await victim_removable(api, raw, victim)
        await bystanders_fine(api, before)

    case.run(scenario)


# -- a crafted payload naming a callable -------------------------------------------------------

TRAP_MODULE = "stepgraph_bad_input_trap"


def crafted(code: int, module: str, qualname: str, payload: Any) -> bytes:
    """msgpack naming ``module.qualname`` the way a stored user class would (test_security)."""
    body = msgpack.packb([module, qualname, payload], use_bin_type=True)
    return msgpack.packb({"value": msgpack.ExtType(code, body)}, use_bin_type=True)


@pytest.fixture
def trap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, list[Any]]:
    """A module that leaves a marker file if ever imported, and a recording ``os.system``."""
    marker = tmp_path / "trap.marker"
    folder = tmp_path / "trap"
    folder.mkdir()
    (folder / f"{TRAP_MODULE}.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('imported')\n"
        "class Payload:\n"
        "    def __init__(self, *args, **kwargs):\n"
        f"        Path({str(marker)!r}).write_text('called')\n"
    )
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, TRAP_MODULE, raising=False)
    calls: list[Any] = []
    monkeypatch.setattr("os.system", lambda *args: calls.append(args))
    return marker, calls


@pytest.mark.parametrize("part", PARTS)
def test_crafted_payload_naming_a_callable_is_refused(
    case: Case, part: str, trap: tuple[Path, list[Any]]
) -> None:
    marker, calls = trap
    payloads: list[tuple[int, str, str, Any]] = [
        (DATACLASS, "os", "system", "touch /tmp/stepgraph-pwned"),
        (ENUM, "builtins", "eval", "__import__('os').system('true')"),
        (NAMEDTUPLE, "subprocess", "Popen", ["true"]),
        (PYDANTIC, TRAP_MODULE, "Payload", [{}, None]),
    ]

    async def scenario(harness: Harness, api: SaverApi, raw: RawStore) -> None:
        before = await Healthy("before").write(api)
        channel = {"value": "big", "write": "w"}.get(part)
        for code, module, qualname, argument in payloads:
            victim = await write_victim(api)
            payload = crafted(code, module, qualname, argument)
            assert raw.damage(victim.thread_id, part, stored_as("msgpack", payload), channel)

            caught = await read_fails(api, victim, UnknownTypeError)
            names(caught.value, f"{module}.{qualname}", *victim.where(part))
            assert caught.value.type_name == f"{module}.{qualname}"  # type: ignore[attr-defined]
            await victim_removable(api, raw, victim)
        assert calls == []
        assert not marker.exists()
        assert TRAP_MODULE not in sys.modules
        checked()
        await bystanders_fine(api, before)

    case.run(scenario)


# -- metadata filters built to inject SQL ------------------------------------------------------

HOSTILE = [
    "a') OR 1=1 --",
    '$.x"',
    "'; DROP TABLE checkpoints; --",
    "'; DROP TABLE stepgraph_checkpoints; --",
    "x' OR '1'='1",
    "%s",
    "$1",
    "\\",
]


def test_filter_keys_built_to_inject_sql(case: Case) -> None:
    async def scenario(harness: Harness, api: SaverApi, raw: RawStore) -> None:
        before = await Healthy("before").write(api)
        target, _ = await save(
            api, thread(new_id("hostile")), {"n": 1}, {text: f"value {text}" for text in HOSTILE}
        )
        plain, _ = await save(api, thread(new_id("plain")), {"n": 1}, {"other": "row"})
        counts = raw.counts()
        everything = {
            found.config["configurable"]["checkpoint_id"] for found in await api.list(None)
        }

        async def listed(filter: dict[str, Any]) -> list[str]:
            found = await api.list(None, filter=filter)
            return [item.config["configurable"]["checkpoint_id"] for item in found]

        target_id = target["configurable"]["checkpoint_id"]
        for text in HOSTILE:
            assert await listed({text: f"value {text}"}) == [target_id], text
            assert await listed({text: "' OR 1=1 --"}) == [], text
            assert await listed({text: 1}) == [], text
            assert await listed({"other": text}) == [], text
            assert await listed({"other": {text: "row"}}) == [], text
            assert await listed({f"{text}.other": "row"}) == [], text
        assert await listed({"who": "before') OR ('1'='1"}) == []
        assert await listed({"other": "row"}) == [plain["configurable"]["checkpoint_id"]]
        checked()
        unchanged(raw, counts)

        for text in HOSTILE:  # the same texts as ids: they name no thread and delete nothing
            assert await api.get_tuple(thread(text)) is None
            assert await api.get_tuple(thread(before.thread_id, text)) is None
            assert await api.list({"configurable": {"thread_id": text}}) == []
            await api.delete_thread(text)
            await api.prune([text])
        # delete_thread records the deletion in the run registry (a tombstone per thread id,
        # for a run that may still hold the thread): only the checkpoint tables must not change.
        assert checkpoint_tables(raw.counts()) == checkpoint_tables(counts)
        checked()
        assert {
            found.config["configurable"]["checkpoint_id"] for found in await api.list(None)
        } == everything
        await bystanders_fine(api, before)

    case.run(scenario)


# -- NUL bytes ---------------------------------------------------------------------------------


class Text(TypedDict, total=False):
    text: str
    data: bytes
    out: str


def nul_graph() -> StateGraph:
    builder = StateGraph(Text)
    builder.add_node("echo", lambda state: {"out": state["text"] + "\x00out"})
    builder.add_edge(START, "echo")
    builder.add_edge("echo", END)
    return builder


def test_nul_bytes_round_trip_exactly(case: Case) -> None:
    """The documented behaviour (contract ``unicode_ids``): NUL is data like any other
    character, in ids, namespaces, channel names, task ids, metadata and values; no saver
    strips, truncates or refuses it."""

    async def scenario(harness: Harness, api: SaverApi, raw: RawStore) -> None:
        before = await Healthy("before").write(api)
        thread_id = new_id("nul") + "\x00end"
        ns = "child\x00ns"
        values = {
            "chan\x00nel": "long \x00 value " * 20,  # a value row
            "inline\x00": "\x00",  # small enough for the checkpoint row
            "raw": b"\x00" * 100,
            "nested": {"k\x00": ["\x00", b"\x00"]},
        }
        metadata = {"key\x00": "value\x00", "plain": "a\x00b"}
        config, _ = await save(api, thread(thread_id, ns), values, metadata)
        await api.put_writes(config, [("write\x00", "w\x00")], "task\x00id", "path\x00")

        found = await api.get_tuple(thread(thread_id, ns))
        assert found is not None
        assert found.config == config
        assert found.config["configurable"]["thread_id"] == thread_id
        assert found.checkpoint["channel_values"] == values
        assert found.pending_writes == [("task\x00id", "write\x00", "w\x00")]
        for key, value in metadata.items():
            assert found.metadata[key] == value  # type: ignore[literal-required]
        # NUL is not a terminator: the id cut at (or without) the NUL names no thread.
        assert await api.get_tuple(thread(thread_id.split("\x00")[0], ns)) is None
        assert await api.get_tuple(thread(thread_id.replace("\x00", ""), ns)) is None
        assert await api.get_tuple(thread(thread_id, "child")) is None
        for filter in ({"key\x00": "value\x00"}, {"plain": "a\x00b"}):
            listed = await api.list(None, filter=filter)
            assert [item.config for item in listed] == [config], filter
        assert await api.list(None, filter={"key": "value\x00"}) == []
        assert await api.list(None, filter={"plain": "a"}) == []
        checked()

        # Thread operations keep threads that differ only after a NUL apart.
        prefix = thread_id.split("\x00")[0]
        prefix_config, _ = await save(api, thread(prefix, ns), {"n": 1})
        await api.copy_thread(thread_id, prefix + "\x00copy")
        copied = await api.get_tuple(thread(prefix + "\x00copy", ns))
        assert copied is not None and copied.checkpoint["channel_values"] == values
        await api.delete_thread(thread_id)
        assert await api.get_tuple(thread(thread_id, ns)) is None
        kept = await api.get_tuple(thread(prefix, ns))
        assert kept is not None and kept.config == prefix_config
        assert await api.get_tuple(thread(prefix + "\x00copy", ns)) is not None
        checked()

        graph = harness.compile(nul_graph())
        run = {"configurable": {"thread_id": new_id("graph\x00nul")}}
        result = await graph.invoke({"text": "in\x00put", "data": b"\x00\xff"}, run)
        assert result == {"text": "in\x00put", "data": b"\x00\xff", "out": "in\x00put\x00out"}
        state = await graph.get_state(run)
        assert state.values == result
        assert state.config["configurable"]["thread_id"] == run["configurable"]["thread_id"]
        checked()
        await bystanders_fine(api, before)

    case.run(scenario)


# -- 10 MB values ------------------------------------------------------------------------------

TEN_MB = 10 * 1024 * 1024


def ten_mb_values() -> tuple[bytes, str]:
    data = random.Random(10).randbytes(TEN_MB)
    text = ("ten megabytes é\x00🙂 " * (TEN_MB // 16))[:TEN_MB]
    return data, text


class Big(TypedDict, total=False):
    data: bytes
    text: str
    seen: int


def big_graph() -> StateGraph:
    builder = StateGraph(Big)
    builder.add_node("measure", lambda state: {"seen": len(state["data"]) + len(state["text"])})
    builder.add_edge(START, "measure")
    builder.add_edge("measure", END)
    return builder


def test_ten_megabyte_values_round_trip(case: Case) -> None:
    data, text = ten_mb_values()

    async def scenario(harness: Harness, api: SaverApi, raw: RawStore) -> None:
        before = await Healthy("before").write(api)
        config, _ = await save(api, thread(new_id("big")), {"data": data, "text": text})
        await api.put_writes(config, [("data", data)], "task-big")
        found = await api.get_tuple(config)
        assert found is not None
        assert found.checkpoint["channel_values"]["data"] == data
        assert found.checkpoint["channel_values"]["text"] == text
        assert found.pending_writes == [("task-big", "data", data)]
        checked()

        graph = harness.compile(big_graph())
        run = {"configurable": {"thread_id": new_id("big-graph")}}
        result = await graph.invoke({"data": data, "text": text}, run)
        assert result["seen"] == 2 * TEN_MB
        state = await graph.get_state(run)
        assert state.values["data"] == data
        assert state.values["text"] == text
        assert state.values["seen"] == 2 * TEN_MB
        checked()
        await bystanders_fine(api, before)

    case.run(scenario)


# -- ids too long to store ---------------------------------------------------------------------

TOO_LONG = 10_000
DURABILITIES = ("sync", "async", "exit")  # as in conftest


class Counter(TypedDict, total=False):
    n: int


def test_ten_thousand_character_thread_id_is_refused(case: Case) -> None:
    long_id = "t" * TOO_LONG
    calls: list[int] = []

    def count(state: Counter) -> Counter:
        calls.append(state.get("n", 0))
        return {"n": state.get("n", 0) + 1}

    builder = StateGraph(Counter)
    builder.add_node("count", count)
    builder.add_edge(START, "count")
    builder.add_edge("count", END)

    def too_long(caught: pytest.ExceptionInfo[Exception], part: str = "thread_id") -> None:
        names(
            caught.value,
            f"{part} is too long",
            f"{TOO_LONG} bytes",
            f"at most {KEY_LIMITS[part]}",
            "KEY_LIMITS",
        )

    async def scenario(harness: Harness, api: SaverApi, raw: RawStore) -> None:
        before = await Healthy("before").write(api)
        counts = raw.counts()

        with pytest.raises(ValueError) as caught:
            await save(api, thread(long_id), {"n": 1})
        too_long(caught)
        # put_writes against a checkpoint of a thread whose id is too long.
        with pytest.raises(ValueError) as caught:
            await api.put_writes(
                {"configurable": {**thread(long_id)["configurable"], "checkpoint_id": "x"}},
                [("n", 1)],
                "task",
            )
        too_long(caught)
        with pytest.raises(ValueError) as caught:
            await api.copy_thread(before.thread_id, long_id)
        too_long(caught)
        graph = harness.compile(builder)
        for durability in DURABILITIES:
            with pytest.raises(ValueError) as caught:
                await graph.invoke(
                    {"n": 0}, {"configurable": {"thread_id": long_id}}, durability=durability
                )
            too_long(caught)
        assert calls == [], "a node ran on a thread whose checkpoints cannot be stored"
        unchanged(raw, counts)
        assert await api.get_tuple(thread(long_id)) is None
        assert await api.list(thread(long_id)) == []
        checked()
        await bystanders_fine(api, before)

    case.run(scenario)


def test_overlong_key_parts_store_nothing_of_the_save(case: Case) -> None:
    """A save naming one over-long key part (namespace, channel, task id) is refused whole:
    not the checkpoint without that channel, nor the checkpoint without the writes."""
    long = "k" * TOO_LONG

    async def scenario(harness: Harness, api: SaverApi, raw: RawStore) -> None:
        before = await Healthy("before").write(api)
        thread_id = new_id("partial")
        config, checkpoint = await save(api, thread(thread_id), {"fine": "v" * 100})
        counts = raw.counts()

        attempts: list[tuple[str, Any]] = [
            ("checkpoint_ns", lambda: save(api, thread(thread_id, long), {"fine": 1})),
            (
                "channel",
                lambda: save(api, config, {"ok": "v" * 100, long: 1}, previous=checkpoint),
            ),
            (
                "task_id",
                lambda: save(
                    api,
                    config,
                    {"ok": "v" * 100},
                    previous=checkpoint,
                    writes=[TaskWrites("good", [("ok", 1)]), TaskWrites(long, [("ok", 2)])],
                ),
            ),
            (
                "channel",
                lambda: save(
                    api,
                    config,
                    {"ok": "v" * 100},
                    previous=checkpoint,
                    writes=[TaskWrites("good", [("ok", 1), (long, 2)])],
                ),
            ),
            ("channel", lambda: api.put_writes(config, [("ok", 1), (long, 2)], "task")),
        ]
        for part, attempt in attempts:
            with pytest.raises(ValueError) as caught:
                await attempt()
            names(caught.value, f"{part} is too long", f"at most {KEY_LIMITS[part]}")
            unchanged(raw, counts)

        found = await api.get_tuple(thread(thread_id))
        assert found is not None
        assert found.config == config
        assert found.checkpoint["channel_values"] == {"fine": "v" * 100}
        assert found.pending_writes == []
        checked()
        await bystanders_fine(api, before)

    case.run(scenario)
