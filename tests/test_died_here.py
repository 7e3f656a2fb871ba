"""A run that died on this machine is taken over at once, with the default lease ttl (30 s).

Each process runs ``died_here_program.py``: the chain a -> b -> c -> d -> e, whose node b can
wait for a ``go`` file. A holder is SIGKILLed in b; a new process resumes the thread with
``invoke(None, config)`` at once, without ``ThreadBusyError``, as a restarted script does. A
holder that is alive, on another host, without a location, or whose PID names a live process
is left alone; a holder whose PID was reused (another start time) counts as dead.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stepgraph.checkpoint.postgres import PostgresSaver
from stepgraph.checkpoint.sqlite import SqliteSaver
from stepgraph.pregel import _lease

PROGRAM = Path(__file__).with_name("died_here_program.py")
CHAIN = ["a", "b", "c", "d", "e"]
THREAD = "crashy"
DEFAULT_TTL = 30.0
FINAL = {"log": CHAIN, "total": 12345}
# Well under the default ttl: a take-over that waited for the lease to run out would miss it.
AT_ONCE = 10.0


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    if request.param == "sqlite":
        return "sqlite", str(tmp_path / "runs.sqlite")
    return "postgres", request.getfixturevalue("postgres_uri")


@contextlib.contextmanager
def open_store(kind: str, target: str) -> Iterator[Any]:
    if kind == "sqlite":
        with SqliteSaver.from_conn_string(target) as saver:
            yield saver
    else:
        with PostgresSaver.from_conn_string(target) as saver:
            yield saver


class Procs:
    """The processes of one test, on one store and one work folder."""

    def __init__(self, store: tuple[str, str], work: Path) -> None:
        self.kind, self.target = store
        self.work = work
        self.started: list[subprocess.Popen[str]] = []
        self.by_tag: dict[str, subprocess.Popen[str]] = {}

    def start(self, tag: str, phase: str, **spec: Any) -> subprocess.Popen[str]:
        full = {"phase": phase, "store": self.kind, "target": self.target, "thread": THREAD}
        full |= {"dir": str(self.work), "tag": tag, **spec}
        process = subprocess.Popen(
            [sys.executable, str(PROGRAM), json.dumps(full)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.started.append(process)
        self.by_tag[tag] = process
        return process

    def run(self, tag: str, phase: str, **spec: Any) -> tuple[int, str, str]:
        return finish(self.start(tag, phase, **spec))

    def wait_in_b(self, *tags: str) -> str:
        """The tag of the first process to reach node b."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for tag in tags:
                if (self.work / f"{tag}.in-b").exists():
                    return tag
            # The winner may not reach b until after a refused loser exited: only all
            # of them gone is a failure.
            running = [self.by_tag[tag] for tag in tags]
            assert any(p.poll() is None for p in running), [p.communicate() for p in running]
            time.sleep(0.01)
        raise AssertionError("no run reached node b")

    def hold_then_kill(self) -> subprocess.Popen[str]:
        """A run that took the lease with the default ttl and is SIGKILLed in node b."""
        holder = self.start("A", "start", block=True)
        self.wait_in_b("A")
        with open_store(self.kind, self.target) as saver:
            run = saver.get_run(THREAD)
            assert run.status == "running" and run.run_id.endswith(
                f"/{holder.pid}/" + start_of(holder.pid)
            )
            assert saver.lease_ttl == DEFAULT_TTL and run.expires_at - time.time() > AT_ONCE
        holder.send_signal(signal.SIGKILL)
        assert holder.wait(timeout=30) == -signal.SIGKILL
        return holder

    def go(self) -> None:
        (self.work / "go").touch()

    def ledger(self) -> list[str]:
        path = self.work / "ledger"
        return path.read_text().split() if path.exists() else []

    def close(self) -> None:
        for process in self.started:
            if process.poll() is None:
                process.kill()
            process.communicate()


@pytest.fixture
def procs(store: tuple[str, str], tmp_path: Path) -> Iterator[Procs]:
    started = Procs(store, tmp_path)
    try:
        yield started
    finally:
        started.close()


def finish(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=120)
    return process.returncode, out, err


def start_of(pid: int) -> str:
    return _lease._proc_stat(pid)[1]


def history(kind: str, target: str) -> list[Any]:
    with open_store(kind, target) as saver:
        return list(saver.list({"configurable": {"thread_id": THREAD, "checkpoint_ns": ""}}))[::-1]


def assert_one_chain(saved: list[Any]) -> None:
    ids = [t.config["configurable"]["checkpoint_id"] for t in saved]
    parents = [
        t.parent_config["configurable"]["checkpoint_id"] if t.parent_config else None for t in saved
    ]
    assert parents == [None, *ids[:-1]], "the history forked or has a gap"


def here(pid: int, start: str) -> str:
    """A lease owner naming process ``pid``, started at ``start``, on this machine."""
    token = _lease._here()[0]
    assert token is not None, "these tests need Linux's /proc"
    return f"{uuid.uuid4()}@{token}/{pid}/{start}"


# -- the owner's name and the judgement ----------------------------------------------------------


def test_owner_names_this_process_and_is_new_every_run() -> None:
    first, second = _lease.owner_name(), _lease.owner_name()
    assert first != second
    assert first.split("@")[1] == second.split("@")[1]
    uuid.UUID(first.split("@")[0])
    token, pid, start = first.split("@")[1].split("/")
    assert (token, int(pid), start) == (_lease._here()[0], os.getpid(), start_of(os.getpid()))
    assert not _lease.died_here(first)


def test_a_gone_or_zombie_process_died_a_live_one_did_not() -> None:
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from stepgraph.pregel import _lease; print(_lease.owner_name())"
            + "; import sys; sys.stdout.flush(); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    owner = child.stdout.readline().strip()
    assert f"/{child.pid}/" in owner and not _lease.died_here(owner)  # alive
    child.send_signal(signal.SIGSTOP)
    assert not _lease.died_here(owner)  # stopped is not dead
    child.kill()
    deadline = time.monotonic() + 10
    while _lease._proc_stat(child.pid)[0] != "Z" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _lease.died_here(owner)  # a zombie: killed, not yet reaped
    child.communicate()
    assert _lease.died_here(owner)  # gone


def test_a_process_whose_main_thread_ended_while_others_run_is_alive() -> None:
    """Its first thread shows as a zombie in /proc, yet the process runs (and may hold a
    lease from another thread)."""
    code = (
        "import ctypes, sys, threading, time\n"
        "from stepgraph.pregel import _lease\n"
        "print(_lease.owner_name(), flush=True)\n"
        "threading.Thread(target=lambda: (sys.stdin.read(), time.sleep(0))).start()\n"
        "ctypes.CDLL(None).pthread_exit(None)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    owner = child.stdout.readline().strip()
    deadline = time.monotonic() + 10
    while _lease._proc_stat(child.pid)[0] != "Z" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _lease._proc_stat(child.pid)[0] == "Z"
    assert not _lease.died_here(owner)
    child.communicate("")
    assert _lease.died_here(owner)


def test_a_proc_of_another_pid_namespace_gives_no_location(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``unshare --pid`` without a new /proc: pids there are the parent namespace's."""
    monkeypatch.setattr(_lease, "_SELF", None)
    monkeypatch.setattr(_lease, "_proc_is_ours", lambda pid: False)
    assert "@" not in _lease.owner_name()
    assert not _lease.died_here(f"{uuid.uuid4()}@x.1/{os.getpid()}/1")


def test_a_reused_pid_counts_as_dead() -> None:
    """The PID names a live process that started at another time than the holder did."""
    me = os.getpid()
    assert not _lease.died_here(here(me, start_of(me)))
    assert _lease.died_here(here(me, str(int(start_of(me)) + 1)))


def test_a_holder_elsewhere_or_unknown_is_never_judged_dead() -> None:
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    pid = int(gone.stdout)
    token = _lease._here()[0]
    assert _lease.died_here(here(pid, "1"))
    boot, namespace = str(token).split(".")
    for elsewhere in [
        f"{uuid.uuid4()}@{uuid.uuid4()}.{namespace}/{pid}/1",  # another boot
        f"{uuid.uuid4()}@{boot}.1/{pid}/1",  # another PID namespace (a container)
        str(uuid.uuid4()),  # no location: a platform without /proc, an older version
        f"{uuid.uuid4()}@{token}/not-a-pid/1",
        f"{uuid.uuid4()}@{token}/{pid}",
        f"{uuid.uuid4()}@{token}/{10**30}/1",
        "",
        None,
    ]:
        assert not _lease.died_here(elsewhere), elsewhere


def test_without_proc_owners_carry_no_location(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_lease, "_SELF", (os.getpid(), None, None))
    owner = _lease.owner_name()
    assert "@" not in owner
    uuid.UUID(owner)
    assert not _lease.died_here(f"{uuid.uuid4()}@x.1/{os.getpid()}/1")


# -- across processes ------------------------------------------------------------------------------


@pytest.mark.parametrize("api", ["sync", "async", "stream"])
def test_a_killed_run_is_resumed_at_once_in_a_new_process(procs: Procs, api: str) -> None:
    holder = procs.start("A", "start", block=True)
    procs.wait_in_b("A")
    # Alive, the holder keeps the thread: a second process is refused, naming it.
    code, out, _ = procs.run("B", "resume", api=api)
    assert code == 2 and out.startswith("BUSY: ") and f"/{holder.pid}/" in out, out
    holder.send_signal(signal.SIGKILL)
    assert holder.wait(timeout=30) == -signal.SIGKILL

    # Killed, its lease has ~30 s left; a restarted script resumes the thread at once.
    code, out, err = procs.run("C", "resume", api=api)
    assert code == 0, (out, err)
    resumed = json.loads(out)
    assert resumed["seconds"] < AT_ONCE
    assert resumed["state"] == FINAL
    assert resumed["run"]["status"] == "done" and resumed["run"]["attempts"] == 2
    # Only the step cut short ran again, and the history has no fork.
    assert procs.ledger() == ["a:A", "b:A", "b:C", "c:C", "d:C", "e:C"]
    assert_one_chain(history(procs.kind, procs.target))

    # The uninterrupted run, on a thread of its own.
    code, out, err = procs.run("D", "start", thread="clean")
    assert code == 0, err
    assert json.loads(out)["state"] == resumed["state"]
    with open_store(procs.kind, procs.target) as saver:
        clean = saver.get_tuple({"configurable": {"thread_id": "clean"}}).checkpoint
        crashed = saver.get_tuple({"configurable": {"thread_id": THREAD}}).checkpoint
        assert clean["channel_values"] == crashed["channel_values"]
        assert [
            t.metadata["step"] for t in saver.list({"configurable": {"thread_id": "clean"}})
        ] == [t.metadata["step"] for t in saver.list({"configurable": {"thread_id": THREAD}})]


@pytest.mark.parametrize("strategy", ["reject", "enqueue"])
def test_two_processes_take_over_one_dead_run_and_only_one_gets_it(
    procs: Procs, strategy: str
) -> None:
    procs.hold_then_kill()
    first = procs.start("B", "resume", block=True, strategy=strategy)
    second = procs.start("C", "resume", block=True, strategy=strategy)
    winner = procs.wait_in_b("B", "C")
    loser, taker = (second, first) if winner == "B" else (first, second)
    if strategy == "reject":
        code, out, _ = finish(loser)
        assert code == 2 and out.startswith("BUSY: ") and f"/{taker.pid}/" in out, out
    procs.go()
    code, out, err = finish(taker)
    assert code == 0, err
    assert json.loads(out)["state"] == FINAL
    if strategy == "enqueue":  # it waited for the winner, then found the thread finished
        code, out, err = finish(loser)
        assert code == 0, err
        assert json.loads(out)["state"] == FINAL
    assert procs.ledger() == ["a:A", "b:A", f"b:{winner}", *(f"{n}:{winner}" for n in "cde")]
    assert_one_chain(history(procs.kind, procs.target))
    with open_store(procs.kind, procs.target) as saver:
        run = saver.get_run(THREAD)
        # The take-over counted the dead run's attempt; a queued run after it is a new one.
        assert run.status == "done" and run.attempts == (2 if strategy == "reject" else 1)
        assert run.epoch == (2 if strategy == "reject" else 3)


def test_update_state_on_a_killed_run_says_recover_and_recover_finds_it_at_once(
    procs: Procs,
) -> None:
    procs.hold_then_kill()
    code, out, _ = procs.run("U", "update")
    assert code == 4 and out.startswith("INCOMPLETE: "), out
    # Nothing was taken: the dead run is still the thread's, now listed as incomplete.
    with open_store(procs.kind, procs.target) as saver:
        run = saver.get_run(THREAD)
        assert run.status == "running" and run.attempts == 1 and "/" in str(run.run_id)
        assert [r.thread_id for r in saver.list_incomplete()] == [THREAD]
    for api in ("sync", "async"):  # the second finds nothing left to do
        code, out, err = procs.run("R", "recover", api=api)
        assert code == 0, err
        report = json.loads(out)
        assert report["seconds"] < AT_ONCE
        expected = "1 resumed" if api == "sync" else "0 resumed"
        assert f"recovery: {expected}" in report["result"]
    assert procs.ledger() == ["a:A", "b:A", "b:R", "c:R", "d:R", "e:R"]
    assert json.loads(out)["state"] == FINAL


def lease_held_by(procs: Procs, owner: str) -> Any:
    with open_store(procs.kind, procs.target) as saver:
        saver.acquire_lease(THREAD, owner, ttl=DEFAULT_TTL)
        return saver.get_run(THREAD)


def test_a_holder_on_another_host_is_not_touched(procs: Procs) -> None:
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    boot, namespace = str(_lease._here()[0]).split(".")
    for owner in [
        f"{uuid.uuid4()}@{uuid.uuid4()}.{namespace}/{int(gone.stdout)}/1",
        f"{uuid.uuid4()}@{boot}.1/{int(gone.stdout)}/1",
        str(uuid.uuid4()),
    ]:
        before = lease_held_by(procs, owner)
        code, out, _ = procs.run("B", "start")
        assert code == 2 and owner in out, out
        with open_store(procs.kind, procs.target) as saver:
            assert saver.get_run(THREAD) == before
            saver.delete_thread(THREAD)
    assert procs.ledger() == []


def test_a_holder_whose_pid_was_reused_is_taken_over(procs: Procs) -> None:
    """The holder names a live process (this test's) with another start time: its PID was
    reused, so it died. Naming this process exactly, it is alive and keeps the thread."""
    me = os.getpid()
    lease_held_by(procs, here(me, start_of(me)))
    code, out, _ = procs.run("B", "start")
    assert code == 2 and f"/{me}/" in out, out

    with open_store(procs.kind, procs.target) as saver:
        saver.delete_thread(THREAD)
    before = lease_held_by(procs, here(me, str(int(start_of(me)) - 1)))
    code, out, err = procs.run("B", "start")
    assert code == 0, (out, err)
    result = json.loads(out)
    assert result["state"] == FINAL and result["seconds"] < AT_ONCE
    assert result["run"]["attempts"] == 2  # the dead holder's start is counted
    with open_store(procs.kind, procs.target) as saver:
        assert saver.get_run(THREAD).epoch == before.epoch + 1
