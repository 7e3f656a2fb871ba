"""WAL checkpoints off the commit path.

By default SQLite copies the write-ahead log back into the database file inside whichever
commit pushes the log past 1,000 pages: that commit also writes back every page the log holds
and syncs the database file, some milliseconds once in a few hundred steps, and most of the
time a run spends committing. A saver instead turns the automatic checkpoint off on its
connection and copies the log from a short-lived background thread on a connection of its own
(SQLite does that I/O without the GIL, and its PASSIVE mode never blocks the writer).

A log is only reused from its start (instead of growing) by a writer that finds every frame in
it copied, and a writer that keeps committing while the background copy runs always adds new
frames first. So after each background pass, the saver's connection copies the few frames
written meanwhile itself, right after its next write; the write after that starts the log
over. Durability is unchanged: a commit is in the log (and, with ``synchronous=FULL``, synced)
before it returns, whoever copies it to the database file later.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from contextlib import closing

__all__ = ["WalCheckpoints"]

# SQLite's default automatic checkpoint size, in pages.
LOG_PAGES = 1000
# Bounds on the writes between background passes (the count adapts to the pages per write).
MIN_WRITES, MAX_WRITES = 16, 4_000


class WalCheckpoints:
    """Checkpoints for one saver connection to a database file in WAL mode."""

    def __init__(self, path: str, busy_timeout: float) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self.passes = 0  # background passes finished (tests and diagnostics)
        self._interval = MIN_WRITES  # writes between passes; grows as passes measure the log
        self._writes = 0  # since the last pass began
        self._since_restart = 0  # writes since the log last started over (as far as we know)
        self._changes = -1
        self._running = False
        self._caught_up = True
        self._pid = os.getpid()

    @classmethod
    def take_over(cls, conn: sqlite3.Connection, busy_timeout: float) -> WalCheckpoints | None:
        """Turn off ``conn``'s automatic checkpoints and return what replaces them, or None
        (and change nothing) for a database that is not a file in WAL mode."""
        mode = conn.execute("PRAGMA journal_mode").fetchone()
        path = next(
            (row[2] for row in conn.execute("PRAGMA database_list") if row[1] == "main"), ""
        )
        if not mode or str(mode[0]).lower() != "wal" or not path:
            return None
        conn.execute("PRAGMA wal_autocheckpoint = 0")
        return cls(path, busy_timeout)

    def after_job(self, conn: sqlite3.Connection) -> None:
        """Call after each job on ``conn``, in the thread that uses ``conn``.

        Never raises: the job's writes are committed by now, and a caller must not take a
        failed checkpoint for a failed save. A checkpoint that fails is tried again later.
        """
        try:
            self._after_job(conn)
        except (sqlite3.Error, RuntimeError):  # RuntimeError: no new threads at shutdown
            self._running = False

    def _after_job(self, conn: sqlite3.Connection) -> None:
        changes = conn.total_changes
        if changes == self._changes or conn.in_transaction:
            return  # a read, or the caller's own transaction is still open
        self._changes = changes
        self._writes += 1
        self._since_restart += 1
        if self._running and self._pid != os.getpid():  # forked while a pass ran
            self._running, self._pid = False, os.getpid()
        if not self._caught_up and not self._running:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            self._caught_up = True
            self._since_restart = 0  # the next write starts the log over
        elif self._writes >= self._interval and not self._running:
            self._running = True
            self._writes = 0
            threading.Thread(
                target=self._copy,
                args=(self._since_restart,),
                name="stepgraph-wal-checkpoint",
                # Not a daemon: the interpreter waits for a pass (milliseconds; PASSIVE never
                # waits for a lock) before it tears down, so no thread is left inside SQLite
                # while it finalizes, a known way for a process to crash at exit.
                daemon=False,
            ).start()

    def _copy(self, writes: int) -> None:
        try:
            with closing(sqlite3.connect(self.path, timeout=self.busy_timeout)) as conn:
                row = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            # The log's frames over the writes that made them: writes for about LOG_PAGES
            # pages, less a fifth for the frames written while a pass runs, so the log starts
            # over about where SQLite's own checkpoints would start it. Another connection may
            # have emptied the log meanwhile (a TRUNCATE checkpoint), making writes look
            # smaller than they are: the interval grows at most twofold a pass.
            frames = row[1] if row and row[1] > 0 else 0
            estimate = LOG_PAGES * 4 // 5 * writes // frames if frames else 2 * self._interval
            self._interval = max(MIN_WRITES, min(MAX_WRITES, 2 * self._interval, estimate))
        except sqlite3.Error:
            pass  # the database was busy or went away: the next pass tries again
        finally:
            self.passes += 1
            self._caught_up = False
            self._running = False
