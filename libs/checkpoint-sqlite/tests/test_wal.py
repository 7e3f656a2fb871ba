"""The saver's own WAL checkpoints (``stepgraph.checkpoint.sqlite._wal``): the log is copied
back by a background thread and then starts over, instead of growing or being copied inside
a commit."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from stepgraph.checkpoint.base import empty_checkpoint
from stepgraph.checkpoint.sqlite import SqliteSaver
from stepgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
from stepgraph.config import RunnableConfig

PAGE = 4096
WRITES = 3000
# Without restarts the log of WRITES saves holds several frames per save (tens of MB); with
# them it stays near the 1,000 pages between passes, a few times that while a busy machine
# holds the background pass back (3,000 pages were once exceeded by 6 under a CPU-bound
# process on each core).
BOUND = 5 * 1000 * PAGE


def config(thread_id: str) -> RunnableConfig:
    return {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}


def wal_size(path: Path) -> int:
    wal = Path(f"{path}-wal")
    return wal.stat().st_size if wal.exists() else 0


def checkpoint(index: int) -> tuple[dict, dict]:
    saved = empty_checkpoint()
    version = f"{index + 1:08d}.0"
    saved["channel_values"] = {"count": index, "text": "x" * 300}
    saved["channel_versions"] = {"count": version, "text": version}
    return saved, {"count": version, "text": version}


def test_the_log_starts_over_instead_of_growing(tmp_path: Path) -> None:
    path = tmp_path / "wal.sqlite"
    with SqliteSaver.from_conn_string(path) as saver:
        saver.setup()
        assert saver.wal is not None
        assert saver.conn.execute("PRAGMA wal_autocheckpoint").fetchone() == (0,)
        for index in range(WRITES):
            saved, versions = checkpoint(index)
            saver.put(config(f"t{index % 7}"), saved, {"step": index}, versions)
            assert wal_size(path) < BOUND, f"the log grew past {BOUND} bytes by save {index}"
        assert saver.wal.passes > 0
        latest = saver.get_tuple(config(f"t{(WRITES - 1) % 7}"))
        assert latest is not None and latest.checkpoint["channel_values"]["count"] == WRITES - 1


def test_a_caller_transaction_is_never_checkpointed_inside(tmp_path: Path) -> None:
    path = tmp_path / "joined.sqlite"
    with SqliteSaver.from_conn_string(path) as saver:
        saver.setup()
        assert saver.wal is not None
        saver.wal._interval = 1  # a pass after every write, if it ran inside the transaction
        saver.conn.execute("BEGIN")
        for index in range(5):
            saved, versions = checkpoint(index)
            saver.put(config("t"), saved, {}, versions)
        assert saver.conn.in_transaction
        assert saver.wal.passes == 0
        saver.conn.execute("ROLLBACK")
        assert saver.get_tuple(config("t")) is None


@pytest.mark.parametrize("target", [":memory:", "journal"])
def test_other_databases_keep_sqlites_own_checkpoints(tmp_path: Path, target: str) -> None:
    if target == ":memory:":
        with SqliteSaver.from_conn_string(":memory:") as saver:
            saver.setup()
            assert saver.wal is None
        return
    import sqlite3

    conn = sqlite3.connect(tmp_path / "x.sqlite", isolation_level=None)
    conn.execute("PRAGMA journal_mode = DELETE")
    from stepgraph.checkpoint.sqlite._wal import WalCheckpoints

    assert WalCheckpoints.take_over(conn, 1.0) is None
    assert conn.execute("PRAGMA wal_autocheckpoint").fetchone() == (1000,)
    conn.close()


async def test_async_saver_log_starts_over_too(tmp_path: Path) -> None:
    path = tmp_path / "async.sqlite"
    async with AsyncSqliteSaver.from_conn_string(path) as saver:
        await saver.setup()
        assert saver.wal is not None
        for index in range(WRITES):
            saved, versions = checkpoint(index)
            await saver.aput(config("t"), saved, {"step": index}, versions)
        assert wal_size(path) < BOUND
        assert saver.wal.passes > 0


def test_a_pass_running_at_fork_does_not_stop_the_childs_passes(tmp_path: Path) -> None:
    path = tmp_path / "fork.sqlite"
    with SqliteSaver.from_conn_string(path) as saver:
        saver.setup()
        wal = saver.wal
        assert wal is not None
        wal._running, wal._pid = True, os.getpid() + 1  # as a child sees a parent's pass
        wal._interval = 1
        saved, versions = checkpoint(0)
        saver.put(config("t"), saved, {}, versions)
        deadline = time.monotonic() + 10
        while wal.passes == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert wal.passes == 1


def test_a_log_emptied_by_another_connection_does_not_stretch_the_passes(tmp_path: Path) -> None:
    # An outside TRUNCATE checkpoint makes the first pass see far fewer frames than the saver
    # wrote; the passes must not then wait so long that the log grows well past its size.
    import sqlite3

    path = tmp_path / "truncated.sqlite"
    with SqliteSaver.from_conn_string(path) as saver:
        saver.setup()
        for index in range(100):
            saved, versions = checkpoint(index)
            saver.put(config("t"), saved, {}, versions)
        # The saver's own background pass may hold the checkpoint lock for a moment: an
        # outside TRUNCATE then reports busy and leaves the log alone, so try again.
        outside = sqlite3.connect(path)
        deadline = time.monotonic() + 10
        while outside.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] != 0:
            assert time.monotonic() < deadline, "the log stayed busy for 10 s"
            time.sleep(0.01)
        outside.close()
        assert wal_size(path) == 0
        for index in range(100, WRITES):
            saved, versions = checkpoint(index)
            saver.put(config("t"), saved, {}, versions)
            assert wal_size(path) < BOUND, f"the log grew past {BOUND} bytes by save {index}"


def test_a_failing_checkpoint_never_fails_the_save(tmp_path: Path) -> None:
    # The save is committed before the checkpointing runs: an error there (here: no thread
    # can be started, as at interpreter shutdown) must not reach the caller.
    import threading

    path = tmp_path / "failing.sqlite"
    with SqliteSaver.from_conn_string(path) as saver:
        saver.setup()
        assert saver.wal is not None
        saver.wal._interval = 1
        start = threading.Thread.start

        def refuse(self: threading.Thread) -> None:
            raise RuntimeError("can't create new thread at interpreter shutdown")

        threading.Thread.start = refuse  # type: ignore[method-assign]
        try:
            saved, versions = checkpoint(0)
            saver.put(config("t"), saved, {}, versions)
        finally:
            threading.Thread.start = start  # type: ignore[method-assign]
        latest = saver.get_tuple(config("t"))
        assert latest is not None and latest.checkpoint["channel_values"]["count"] == 0
        saved, versions = checkpoint(1)
        saver.put(config("t"), saved, {}, versions)  # and later passes still run
        deadline = time.monotonic() + 10
        while saver.wal.passes == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert saver.wal.passes >= 1
