"""A process killed with SIGKILL in the middle of a durable run; a new process resumes it.

With ``durability="sync"`` (tests/crash_program.py's default) every finished step, and every
finished task of the running step, was committed before the kill: the resumed run redoes only
the work cut short, and the thread ends exactly as an uninterrupted run does. The "async" and
"exit" tests pin down what those modes leave behind.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stepgraph.checkpoint.postgres import PostgresSaver
from stepgraph.checkpoint.sqlite import SqliteSaver

PROGRAM = Path(__file__).with_name("crash_program.py")
NODES = ["a", "b", "c", "d", "e"]


def run_program(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(PROGRAM), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def thread(thread_id: str) -> dict:
    return {"configurable": {"thread_id": thread_id}}


def steps(saver: Any, thread_id: str) -> list[tuple[str, int]]:
    """(source, step) of the thread's checkpoints, oldest first."""
    return [(t.metadata["source"], t.metadata["step"]) for t in saver.list(thread(thread_id))][::-1]


@contextlib.contextmanager
def open_store(store: str, target: str) -> Iterator[Any]:
    saver_class = SqliteSaver if store == "sqlite" else PostgresSaver
    with saver_class.from_conn_string(target) as saver:
        yield saver


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """(store, target): a SQLite file, or a schema of its own on the Postgres server."""
    if request.param == "sqlite":
        return "sqlite", str(tmp_path / "crash.sqlite")
    return "postgres", request.getfixturevalue("postgres_uri")


def test_sigkill_mid_run_resumes_in_new_process(store: tuple[str, str], tmp_path: Path) -> None:
    kind, target = store
    log = tmp_path / "nodes.log"

    crashed = run_program("chain", kind, target, "crashed", log, "crash")
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    assert log.read_text().split() == ["a", "b", "c", "d"]

    # What the dead process left: steps -1..3 committed, the next task is d, nothing pending.
    with open_store(kind, target) as saver:
        latest = saver.get_tuple(thread("crashed"))
        assert latest.metadata["step"] == 3
        assert latest.checkpoint["channel_values"]["log"] == ["a", "b", "c"]
        assert not latest.pending_writes
        assert steps(saver, "crashed") == [("input", -1)] + [("loop", i) for i in range(4)]

    # A new process finds the run crashed once its lease runs out, and recovers it.
    resumed = run_program("chain", kind, target, "crashed", log, "recover")
    assert resumed.returncode == 0, resumed.stderr
    assert "recovery: 1 resumed, 0 failed, 0 abandoned, 0 busy" in resumed.stderr
    # Only the step cut short ran again.
    assert log.read_text().split() == ["a", "b", "c", "d", "d", "e"]

    log.unlink()
    uninterrupted = run_program("chain", kind, target, "uninterrupted", log, "start")
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    assert log.read_text().split() == NODES
    assert json.loads(resumed.stdout) == json.loads(uninterrupted.stdout)
    assert json.loads(resumed.stdout) == {"log": NODES, "total": 12345}

    with open_store(kind, target) as saver:
        crashed_state = saver.get_tuple(thread("crashed")).checkpoint["channel_values"]
        clean_state = saver.get_tuple(thread("uninterrupted")).checkpoint["channel_values"]
        assert crashed_state == clean_state
        assert steps(saver, "crashed") == steps(saver, "uninterrupted")

    if kind == "sqlite":
        assert_sqlite_intact(target)


def test_sigkill_with_async_durability_resumes_from_last_saved_step(
    store: tuple[str, str], tmp_path: Path
) -> None:
    """With durability="async" the steps saved before the kill are a prefix that depends on
    timing (LangGraph may save only the first ones); the resume starts from the latest of them."""
    kind, target = store
    log = tmp_path / "nodes.log"

    crashed = run_program("chain", kind, target, "crashed", log, "crash", "async")
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    with open_store(kind, target) as saver:
        saved_steps = steps(saver, "crashed")
    # Whatever was saved is a consistent prefix of the run.
    assert saved_steps == [("input", -1)] + [("loop", i) for i in range(len(saved_steps) - 1)]
    resume_from = max(step for _, step in saved_steps) if saved_steps else None

    resumed = run_program("chain", kind, target, "crashed", log, "resume", "async")
    if resume_from is None:
        # Nothing reached the store: there is nothing to resume.
        assert resumed.returncode != 0
        assert "EmptyInputError" in resumed.stderr
        return
    assert resumed.returncode == 0, resumed.stderr
    # The first process ran a..d; the resume runs every node from the saved step's on.
    rerun = NODES[max(resume_from, 0) :]
    assert log.read_text().split() == ["a", "b", "c", "d", *rerun]
    assert json.loads(resumed.stdout) == {"log": NODES, "total": 12345}
    if kind == "sqlite":
        assert_sqlite_intact(target)


def test_sigkill_with_exit_durability_saves_nothing(store: tuple[str, str], tmp_path: Path) -> None:
    """durability="exit" saves only when the run ends, and SIGKILL ends no run: the thread stays
    empty, a resume has no input to start from (LangGraph raises EmptyInputError) and the run
    must start again from its input."""
    kind, target = store
    log = tmp_path / "nodes.log"

    crashed = run_program("chain", kind, target, "crashed", log, "crash", "exit")
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    with open_store(kind, target) as saver:
        assert saver.get_tuple(thread("crashed")) is None
        assert steps(saver, "crashed") == []

    resumed = run_program("chain", kind, target, "crashed", log, "resume", "exit")
    assert resumed.returncode != 0
    assert "EmptyInputError" in resumed.stderr

    restarted = run_program("chain", kind, target, "crashed", log, "start", "exit")
    assert restarted.returncode == 0, restarted.stderr
    assert log.read_text().split() == ["a", "b", "c", "d", *NODES]
    assert json.loads(restarted.stdout) == {"log": NODES, "total": 12345}
    with open_store(kind, target) as saver:
        assert steps(saver, "crashed") == [("loop", len(NODES))]


def test_recovery_restarts_an_exit_durability_run_from_its_input(
    store: tuple[str, str], tmp_path: Path
) -> None:
    """The run registry keeps a run's input: recovery starts a crashed run that saved nothing
    (durability="exit") again from it, in a new process."""
    kind, target = store
    log = tmp_path / "nodes.log"

    crashed = run_program("chain", kind, target, "crashed", log, "crash", "exit")
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    recovered = run_program("chain", kind, target, "crashed", log, "recover", "exit")
    assert recovered.returncode == 0, recovered.stderr
    assert "recovery: 1 resumed, 0 failed, 0 abandoned, 0 busy" in recovered.stderr
    assert log.read_text().split() == ["a", "b", "c", "d", *NODES]
    assert json.loads(recovered.stdout) == {"log": NODES, "total": 12345}
    with open_store(kind, target) as saver:
        assert saver.get_run("crashed").status == "done"


@pytest.mark.parametrize("api", ["sync", "async"])
@pytest.mark.parametrize("crashing", ["left", "right"])
def test_sigkill_in_parallel_step_keeps_finished_sibling(
    store: tuple[str, str], tmp_path: Path, crashing: str, api: str
) -> None:
    """With durability="sync" a task's writes are saved as soon as it finishes, so a crash in
    its sibling does not make it run again, whichever of the two crashes (an executor may run one
    of them on the calling thread), under the sync API and under ``ainvoke`` with the store's
    async saver."""
    kind, target = store
    sibling = "right" if crashing == "left" else "left"
    graph = f"parallel-{crashing}"
    log = tmp_path / "nodes.log"

    crashed = run_program(graph, kind, target, "crashed", log, "crash", "sync", api)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    assert sorted(log.read_text().split()) == ["a", "left", "right"]
    with open_store(kind, target) as saver:
        latest = saver.get_tuple(thread("crashed"))
        assert latest.metadata["step"] == 1
        assert [v for _, c, v in latest.pending_writes if c == "log"] == [[sibling]]

    log.unlink()
    resumed = run_program(graph, kind, target, "crashed", log, "resume", "sync", api)
    assert resumed.returncode == 0, resumed.stderr
    assert log.read_text().split() == [crashing, "join"]

    uninterrupted = run_program(
        graph, kind, target, "uninterrupted", tmp_path / "x", "start", "sync", api
    )
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    assert json.loads(resumed.stdout) == json.loads(uninterrupted.stdout)
    with open_store(kind, target) as saver:
        assert steps(saver, "crashed") == steps(saver, "uninterrupted")
    if kind == "sqlite":
        assert_sqlite_intact(target)


def assert_sqlite_intact(path: str) -> None:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


# -- SQLite: killed inside the save of a step, around its COMMIT ---------------------------------

COMMIT_POINTS = ["begin", "insert", "commit", "commit1", "commit3", "after"]


@pytest.mark.parametrize("point", COMMIT_POINTS)
def test_sqlite_killed_at_the_commit_of_a_step(tmp_path: Path, point: str) -> None:
    """The process dies inside the ``put_step`` that saves c's step (checkpoint step 3), from as
    its transaction begins to the statement after its COMMIT. The step is saved whole or not at
    all: the resume reruns c exactly when its commit did not complete, never an earlier step."""
    target = str(tmp_path / "commit.sqlite")
    log = tmp_path / "nodes.log"

    crashed = run_program(f"commit-{point}", "sqlite", target, "crashed", log, "crash")
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    # "after" dies at the next save's first statement, once d has run.
    first = ["a", "b", "c", "d"] if point == "after" else ["a", "b", "c"]
    assert log.read_text().split() == first
    assert_sqlite_intact(target)

    with open_store("sqlite", target) as saver:
        latest = saver.get_tuple(thread("crashed"))
        saved_step = latest.metadata["step"]
        assert saved_step in (2, 3)  # b's step was committed before; c's is whole or absent
        assert latest.checkpoint["channel_values"]["log"] == list(NODES[:saved_step])
        assert not latest.pending_writes
        assert steps(saver, "crashed") == [("input", -1)] + [
            ("loop", i) for i in range(saved_step + 1)
        ]
    if point in ("begin", "insert", "commit"):
        assert saved_step == 2  # the COMMIT never ran
    if point == "after":
        assert saved_step == 3  # the COMMIT returned

    resumed = run_program(f"commit-{point}", "sqlite", target, "crashed", log, "resume")
    assert resumed.returncode == 0, resumed.stderr
    assert log.read_text().split() == [*first, *NODES[saved_step:]]
    assert json.loads(resumed.stdout) == {"log": NODES, "total": 12345}

    uninterrupted = run_program("chain", "sqlite", target, "clean", tmp_path / "x", "start")
    assert json.loads(uninterrupted.stdout) == json.loads(resumed.stdout)
    with open_store("sqlite", target) as saver:
        crashed_state = saver.get_tuple(thread("crashed")).checkpoint["channel_values"]
        assert crashed_state == saver.get_tuple(thread("clean")).checkpoint["channel_values"]
        assert steps(saver, "crashed") == steps(saver, "clean")
    assert_sqlite_intact(target)


# -- the functional API ----------------------------------------------------------------------------


def test_sigkill_in_a_workflow_task_resumes_without_rerunning_finished_tasks(
    store: tuple[str, str], tmp_path: Path
) -> None:
    """An ``@entrypoint`` killed inside its last ``@task``: every task that finished before was
    saved as it finished, so the new process reruns the function but only the killed task."""
    kind, target = store
    log = tmp_path / "tasks.log"

    crashed = run_program("workflow", kind, target, "crashed", log, "crash")
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    first = log.read_text().split()
    assert first[0] == "fetch" and sorted(first[1:3]) == ["double2", "double3"]
    assert first[3:] == ["send"]
    with open_store(kind, target) as saver:
        saved = saver.get_tuple(thread("crashed"))
        results = [v for _, channel, v in saved.pending_writes if channel == "__return__"]
        assert sorted(results) == [2, 4, 6]

    resumed = run_program("workflow", kind, target, "crashed", log, "recover")
    assert resumed.returncode == 0, resumed.stderr
    assert "recovery: 1 resumed" in resumed.stderr
    assert log.read_text().split() == [*first, "send"]
    assert json.loads(resumed.stdout) == {"sent": 15}

    uninterrupted = run_program("workflow", kind, target, "clean", tmp_path / "x", "start")
    assert json.loads(uninterrupted.stdout) == {"sent": 15}
    with open_store(kind, target) as saver:
        assert steps(saver, "crashed") == steps(saver, "clean")
        crashed_state = saver.get_tuple(thread("crashed")).checkpoint["channel_values"]
        assert crashed_state == saver.get_tuple(thread("clean")).checkpoint["channel_values"]
    if kind == "sqlite":
        assert_sqlite_intact(target)
