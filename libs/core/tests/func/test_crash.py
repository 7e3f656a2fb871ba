"""SIGKILL while a workflow waits inside a task; a new process resumes it from SQLite."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from stepgraph.checkpoint.sqlite import SqliteSaver

PROGRAM = Path(__file__).with_name("crash_workflow.py")


def test_killed_inside_a_task_resumes_without_rerunning_finished_tasks(tmp_path: Path) -> None:
    db = tmp_path / "workflow.sqlite"
    args = [sys.executable, str(PROGRAM), str(db), "t1", str(tmp_path)]
    first = subprocess.Popen([*args, "first"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "waiting").exists():
            assert first.poll() is None, first.stderr.read() if first.stderr else ""
            assert time.monotonic() < deadline, "the workflow never reached its third task"
            time.sleep(0.02)
        first.send_signal(signal.SIGKILL)
        assert first.wait(timeout=30) == -signal.SIGKILL
    finally:
        if first.poll() is None:
            first.kill()
        if first.stderr:
            first.stderr.close()

    # What the killed process left: the run's checkpoint and the two finished task results.
    with SqliteSaver.from_conn_string(db) as saver:
        saved = saver.get_tuple({"configurable": {"thread_id": "t1"}})
        assert saved is not None
        results = sorted(v for _, channel, v in saved.pending_writes if channel == "__return__")
        assert results == [2, 20]

    resumed = subprocess.run([*args, "resume"], capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout) == {"sent": 25}

    runs = [line.split() for line in (tmp_path / "runs").read_text().splitlines()]
    names = [name for name, _ in runs]
    assert names == ["fetch", "transform", "slow_send", "slow_send"]
    # fetch and transform ran only in the killed process; slow_send ran again in the new one.
    assert runs[0][1] == runs[1][1] == runs[2][1] != runs[3][1]
