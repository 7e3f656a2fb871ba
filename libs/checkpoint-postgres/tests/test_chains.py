"""Checkpoint blobs stored as changes to their parent's (``storage.ChainHeads``): rows after the
first of a chain hold ``chain_start``, read back whole, and stay readable through prune,
delete_for_runs, copy_thread and a schema migration."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import psycopg
import pytest
from pg_test_helpers import migrate_to, protocol_messages, thread

from stepgraph.checkpoint.base import BaseCheckpointSaver, ChannelVersions, Checkpoint
from stepgraph.checkpoint.base import empty_checkpoint as new_checkpoint
from stepgraph.checkpoint.postgres import PostgresSaver, _schema
from stepgraph.checkpoint.postgres._plans import decode, encode
from stepgraph.checkpoint.postgres.aio import AsyncPostgresSaver
from stepgraph.checkpoint.storage import (
    MAX_CHAIN,
    CorruptCheckpointError,
    checkpoint_config,
    checkpoint_rows,
)
from stepgraph.config import RunnableConfig

Saved = tuple[RunnableConfig, Checkpoint, dict[str, Any]]


@pytest.fixture
def saver(postgres_uri: str) -> Iterator[PostgresSaver]:
    with PostgresSaver.from_conn_string(postgres_uri) as saver:
        saver.setup()
        yield saver


@pytest.fixture
async def async_saver(postgres_uri: str) -> AsyncIterator[AsyncPostgresSaver]:
    async with AsyncPostgresSaver.from_conn_string(postgres_uri) as saver:
        await saver.setup()
        yield saver


def step(
    saver: BaseCheckpointSaver, previous: Checkpoint | None, n: int
) -> tuple[Checkpoint, ChannelVersions]:
    """The checkpoint after node ``n`` of a chain of nodes ran: it saw and emptied its trigger,
    wrote ``x`` (inline) and ``text`` (a value row), and triggered node ``n + 1``. It says what
    changed, as the executor does (``versions_seen_changes``; ``put`` drops it again)."""
    checkpoint = new_checkpoint()
    if previous is not None:
        checkpoint["channel_values"] = dict(previous["channel_values"])
        checkpoint["channel_versions"] = dict(previous["channel_versions"])
        checkpoint["versions_seen"] = {k: dict(v) for k, v in previous["versions_seen"].items()}
    trigger = f"to:n{n}"
    checkpoint["channel_values"].pop(trigger, None)
    checkpoint["versions_seen_changes"] = []
    if trigger in checkpoint["channel_versions"]:
        checkpoint["versions_seen"][f"n{n}"] = {trigger: checkpoint["channel_versions"][trigger]}
        checkpoint["versions_seen_changes"] = [f"n{n}"]
    changes = {"x": n, "text": f"{'long text ' * 10}{n}", f"to:n{n + 1}": None}
    if trigger in checkpoint["channel_versions"]:
        changes[trigger] = _EMPTIED
    versions = checkpoint["channel_versions"]
    new_versions = {channel: saver.get_next_version(versions.get(channel)) for channel in changes}
    checkpoint["channel_values"].update(
        {channel: value for channel, value in changes.items() if value is not _EMPTIED}
    )
    versions.update(new_versions)
    checkpoint["updated_channels"] = sorted(changes)
    return checkpoint, new_versions


_EMPTIED: Any = object()


def put(saver: PostgresSaver, config: RunnableConfig, checkpoint: Checkpoint, *args: Any) -> Any:
    """``saver.put``, then the checkpoint as it reads back (without the executor's hint)."""
    saved = saver.put(config, checkpoint, *args)
    checkpoint.pop("versions_seen_changes", None)
    return saved


async def aput(
    saver: AsyncPostgresSaver, config: RunnableConfig, checkpoint: Checkpoint, *args: Any
) -> Any:
    saved = await saver.aput(config, checkpoint, *args)
    checkpoint.pop("versions_seen_changes", None)
    return saved


def save_chain(
    saver: PostgresSaver,
    config: RunnableConfig,
    length: int,
    after: Saved | None = None,
    **metadata: Any,
) -> list[Saved]:
    """``length`` consecutive puts from ``config`` (or after ``after``), each as its config,
    checkpoint and metadata."""
    saved: list[Saved] = []
    previous = None if after is None else after[1]
    if after is not None:
        config = after[0]
    start = 0 if after is None else after[2]["step"] + 1
    for n in range(start, start + length):
        checkpoint, versions = step(saver, previous, n)
        meta = {"source": "loop", "step": n, **metadata}
        config = put(saver, config, checkpoint, meta, versions)
        saved.append((config, checkpoint, meta))
        previous = checkpoint
    return saved


async def asave_chain(
    saver: AsyncPostgresSaver, config: RunnableConfig, length: int, **metadata: Any
) -> list[Saved]:
    saved: list[Saved] = []
    previous = None
    for n in range(length):
        checkpoint, versions = step(saver, previous, n)
        meta = {"source": "loop", "step": n, **metadata}
        config = await aput(saver, config, checkpoint, meta, versions)
        saved.append((config, checkpoint, meta))
        previous = checkpoint
    return saved


def ids(saved: list[Saved]) -> list[str]:
    return [config["configurable"]["checkpoint_id"] for config, _, _ in saved]


def chain_starts(postgres_uri: str, thread_id: str, checkpoint_ns: str = "") -> list[str | None]:
    """The stored ``chain_start`` of a namespace's rows, oldest first."""
    with psycopg.connect(postgres_uri) as conn:
        rows = conn.execute(
            "SELECT chain_start FROM stepgraph_checkpoints"
            " WHERE thread_id = %s AND checkpoint_ns = %s ORDER BY checkpoint_id",
            (encode(thread_id), encode(checkpoint_ns)),
        ).fetchall()
    return [None if start is None else decode(start) for (start,) in rows]


def expected_starts(saved: list[Saved]) -> list[str | None]:
    """A whole row, then MAX_CHAIN rows of changes leading to it, and again."""
    every = ids(saved)
    return [
        None if n % (MAX_CHAIN + 1) == 0 else every[n - n % (MAX_CHAIN + 1)]
        for n in range(len(saved))
    ]


def assert_reads_back(saver: PostgresSaver, saved: list[Saved]) -> None:
    for config, checkpoint, metadata in saved:
        found = saver.get_tuple(config)
        assert found is not None
        assert found.config == config
        assert found.checkpoint == checkpoint
        assert found.metadata == metadata


def assert_lists(found: Any, saved: list[Saved]) -> None:
    found = list(found)
    assert [f.config for f in found] == [config for config, _, _ in saved]
    assert [f.checkpoint for f in found] == [checkpoint for _, checkpoint, _ in saved]
    assert [f.metadata for f in found] == [metadata for _, _, metadata in saved]


# -- writing and reading ---------------------------------------------------------------------


def test_consecutive_puts_store_rows_of_changes_that_read_back_exactly(
    saver: PostgresSaver, postgres_uri: str
) -> None:
    saved = save_chain(saver, thread("t"), 34)  # several chains
    sub = save_chain(saver, thread("t", "sub"), 5)
    other = save_chain(saver, thread("u"), 3)
    assert chain_starts(postgres_uri, "t") == expected_starts(saved)
    assert chain_starts(postgres_uri, "t", "sub") == expected_starts(sub)

    assert_reads_back(saver, saved + sub + other)
    found = saver.get_tuple(thread("t"))
    assert found is not None and found.checkpoint == saved[-1][1]
    assert_lists(saver.list(thread("t")), saved[::-1])
    # Pages of 16, 32, ... rows: their chains start on earlier pages.
    assert_lists(saver.list(thread("t"), before=saved[30][0], limit=4), saved[26:30][::-1])
    # The filter selects page rows, never the rows their blobs are read with.
    assert_lists(saver.list(thread("t"), filter={"step": 20}), [saved[20]])
    # A thread's namespaces, merged (the other statement of list).
    everything = saver.list({"configurable": {"thread_id": "t"}})
    assert {f.config["configurable"]["checkpoint_id"] for f in everything} == set(
        ids(saved) + ids(sub)
    )
    newest_first = sorted([saved[1], sub[1], other[1]], key=lambda s: ids([s]), reverse=True)
    assert_lists(saver.list(None, filter={"step": 1}), newest_first)


def test_get_tuple_of_a_row_of_changes_is_still_two_statements(postgres_uri: str) -> None:
    with psycopg.connect(postgres_uri, autocommit=True) as conn:
        saver = PostgresSaver(conn)
        saver.setup()
        saved = save_chain(saver, thread("t"), 6)
        found: list[Any] = []
        messages = protocol_messages(conn, lambda: found.append(saver.get_tuple(thread("t"))))
        assert messages.count("F:Execute") == 2  # the page with its chain, then values
        assert found[0].checkpoint == saved[-1][1]


def test_a_missing_row_of_a_chain_is_named(saver: PostgresSaver, postgres_uri: str) -> None:
    saved = save_chain(saver, thread("t"), 6)
    other = save_chain(saver, thread("u"), 3)
    gone, child = ids(saved)[2], ids(saved)[3]
    with psycopg.connect(postgres_uri, autocommit=True) as conn:
        conn.execute(
            "DELETE FROM stepgraph_checkpoints WHERE thread_id = %s AND checkpoint_id = %s",
            (encode("t"), encode(gone)),
        )
    # The saver that wrote the chain keeps the head's blob and needs no row to read it back;
    # a reader without it (another process, a restart) finds the gap and names it.
    kept = saver.get_tuple(thread("t"))
    assert kept is not None and kept.checkpoint == saved[-1][1]
    with PostgresSaver.from_conn_string(postgres_uri) as fresh:
        for config in (thread("t"), saved[-1][0], saved[3][0]):
            with pytest.raises(CorruptCheckpointError, match=child) as raised:
                fresh.get_tuple(config)
            assert gone in str(raised.value)
        with pytest.raises(CorruptCheckpointError, match=child):
            list(fresh.list(thread("t")))
        assert_reads_back(fresh, saved[:2])  # rows before the gap do not need it
        assert_reads_back(fresh, other)
        assert_lists(fresh.list(thread("u")), other[::-1])


async def test_async_rows_of_changes_read_back_exactly(
    async_saver: AsyncPostgresSaver, postgres_uri: str
) -> None:
    saved = await asave_chain(async_saver, thread("t"), MAX_CHAIN + 4)
    assert chain_starts(postgres_uri, "t") == expected_starts(saved)
    for config, checkpoint, metadata in saved:
        found = await async_saver.aget_tuple(config)
        assert found is not None
        assert (found.checkpoint, found.metadata) == (checkpoint, metadata)
    assert_lists([f async for f in async_saver.alist(thread("t"))], saved[::-1])


# -- prune, delete_for_runs, copy_thread ----------------------------------------------------


def test_prune_rewrites_the_first_kept_row_whole(saver: PostgresSaver, postgres_uri: str) -> None:
    saved = save_chain(saver, thread("t"), MAX_CHAIN - 1)  # one chain, 2 rows short of full
    other = save_chain(saver, thread("u"), 4)
    saver.prune(["t"], keep_last=2)
    # The older kept row lost its chain and is whole now; the newer one still leads to it.
    assert chain_starts(postgres_uri, "t") == [None, ids(saved)[0]]
    assert_reads_back(saver, saved[-2:])
    assert_lists(saver.list(thread("t")), saved[:-3:-1])
    assert chain_starts(postgres_uri, "u") == expected_starts(other)  # untouched
    assert_reads_back(saver, other)

    more = save_chain(saver, thread("t"), 2, after=saved[-1])  # the chain goes on
    assert chain_starts(postgres_uri, "t") == [None, *[ids(saved)[0]] * 3]
    assert_reads_back(saver, saved[-2:] + more)


async def test_async_prune_rewrites_the_first_kept_row_whole(
    async_saver: AsyncPostgresSaver, postgres_uri: str
) -> None:
    saved = await asave_chain(async_saver, thread("t"), MAX_CHAIN - 1)
    await async_saver.aprune(["t"], keep_last=2)
    assert chain_starts(postgres_uri, "t") == [None, ids(saved)[0]]
    for config, checkpoint, _ in saved[-2:]:
        found = await async_saver.aget_tuple(config)
        assert found is not None and found.checkpoint == checkpoint


def test_delete_for_runs_keeps_a_later_runs_chain_readable(
    saver: PostgresSaver, postgres_uri: str
) -> None:
    first = save_chain(saver, thread("t"), 4, run_id="r1")
    second = save_chain(saver, thread("t"), 4, after=first[-1], run_id="r2")
    assert chain_starts(postgres_uri, "t") == expected_starts(first + second)
    saver.delete_for_runs(["r1"])
    assert chain_starts(postgres_uri, "t") == [None, *[ids(first)[0]] * 3]
    assert_reads_back(saver, second)
    assert_lists(saver.list(thread("t")), second[::-1])


async def test_async_delete_for_runs_keeps_a_later_runs_chain_readable(
    async_saver: AsyncPostgresSaver, postgres_uri: str
) -> None:
    saved = await asave_chain(async_saver, thread("t"), 3, run_id="r1")
    checkpoint, versions = step(async_saver, saved[-1][1], 3)
    metadata = {"source": "loop", "step": 3, "run_id": "r2"}
    config = await aput(async_saver, saved[-1][0], checkpoint, metadata, versions)
    assert chain_starts(postgres_uri, "t")[-1] == ids(saved)[0]
    await async_saver.adelete_for_runs(["r1"])
    assert chain_starts(postgres_uri, "t") == [None]
    found = await async_saver.aget_tuple(thread("t"))
    assert found is not None and found.config == config
    assert (found.checkpoint, found.metadata) == (checkpoint, metadata)


def test_copy_thread_copies_rows_of_changes(saver: PostgresSaver, postgres_uri: str) -> None:
    saved = save_chain(saver, thread("t"), MAX_CHAIN + 3)
    saver.copy_thread("t", "copy")
    assert chain_starts(postgres_uri, "copy") == expected_starts(saved)
    copied: list[Saved] = [
        (checkpoint_config("copy", "", checkpoint["id"]), checkpoint, metadata)
        for _, checkpoint, metadata in saved
    ]
    assert_reads_back(saver, copied)
    saver.delete_thread("t")
    assert_lists(saver.list(thread("copy")), copied[::-1])


def test_a_step_committed_on_a_parent_being_deleted_is_rewritten_whole(
    postgres_uri: str,
) -> None:
    """A row of changes committed while delete_for_runs deletes its parent (the DELETE waits
    for the step, which holds the parent locked) is among the rows read after the DELETE, and
    is rewritten whole."""
    with (
        psycopg.connect(postgres_uri, autocommit=True) as conn,
        psycopg.connect(postgres_uri) as stepping_conn,
    ):
        deleter, stepper = PostgresSaver(conn), PostgresSaver(stepping_conn)
        deleter.setup()
        stepping_conn.commit()
        saved = save_chain(stepper, thread("t"), 2, run_id="old")
        stepping_conn.commit()
        stepping_conn.execute("SELECT 1")  # the step is saved in an open transaction
        [late] = save_chain(stepper, thread("t"), 1, after=saved[-1], run_id="new")
        deleting = threading.Thread(target=deleter.delete_for_runs, args=(["old"],))
        deleting.start()
        deleting.join(0.5)
        assert deleting.is_alive()  # waiting for the step's lock on its parent
        stepping_conn.commit()
        deleting.join()
        assert chain_starts(postgres_uri, "t") == [None]
        assert_reads_back(deleter, [late])


# -- migration -------------------------------------------------------------------------------


def test_rows_of_schema_version_3_stay_readable(postgres_uri: str) -> None:
    """A database set up before chained rows existed is migrated; its rows read back, and the
    steps saved after them are chained again."""
    with psycopg.connect(postgres_uri, autocommit=True) as conn:
        migrate_to(conn, 3)
        saver = PostgresSaver(conn)
        old: list[Saved] = []
        config, previous = thread("old"), None
        for n in range(3):
            checkpoint, versions = step(saver, previous, n)
            metadata: dict[str, Any] = {"source": "loop", "step": n}
            rows = checkpoint_rows(
                saver.serde,
                config,
                checkpoint,
                metadata,  # type: ignore[arg-type]
                versions,
                inline=True,
            )
            checkpoint.pop("versions_seen_changes")
            row = rows.checkpoint
            conn.execute(
                "INSERT INTO stepgraph_checkpoints VALUES"
                " (%s, %s, %s, %s, %s, NULL, %s, %s, %s, %s, '{}')",
                (encode(row.thread_id), b"", encode(row.checkpoint_id),
                 None if row.parent_checkpoint_id is None else encode(row.parent_checkpoint_id),
                 row.ts, row.checkpoint_type, row.checkpoint, row.metadata_type, row.metadata),
            )  # fmt: skip
            for value in rows.values:
                conn.execute(
                    "INSERT INTO stepgraph_checkpoint_values (thread_id, checkpoint_ns, channel,"
                    " version, type, value) VALUES (%s, %s, %s, %s, %s, %s)",
                    (encode(value.thread_id), b"", encode(value.channel), encode(value.version),
                     value.type, value.value),
                )  # fmt: skip
            config = checkpoint_config("old", "", row.checkpoint_id)
            old.append((config, checkpoint, metadata))
            previous = checkpoint

        saver.setup()
        found = conn.execute("SELECT max(version) FROM stepgraph_migrations").fetchone()
        assert found == (_schema.SCHEMA_VERSION,)
        assert chain_starts(postgres_uri, "old") == [None, None, None]
        assert_reads_back(saver, old)
        # The first step after them is whole (this saver did not save its parent), then chained.
        new = save_chain(saver, thread("old"), 3, after=old[-1])
        assert chain_starts(postgres_uri, "old") == [None] * 4 + [ids(new)[0]] * 2
        assert_reads_back(saver, old + new)
        assert_lists(saver.list(thread("old")), (old + new)[::-1])
