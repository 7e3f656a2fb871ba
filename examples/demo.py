"""Durable execution in one minute: a run dies part-way, a new process resumes it.

`make demo` runs this file. It starts a worker process that runs a five-step pipeline on a
SQLite checkpoint file; the worker is killed (SIGKILL, no clean-up) inside the third step. A
second, fresh worker process resumes the thread at once with `invoke(None, config)`, as a
restarted script would: the dead worker's lease still has most of its 30 s to run, but its
owner names a process of this machine that is gone, so the thread is taken over without waiting
(docs/ownership.md). Every step records its side effect in a ledger file, so the output shows
which steps ran in which process: the two steps that finished before the crash are not run
again.
"""

from __future__ import annotations

import operator
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, TypedDict

from stepgraph.checkpoint.sqlite import SqliteSaver
from stepgraph.graph import END, START, StateGraph

STEPS = ["fetch", "clean", "analyse", "summarise", "publish"]
CRASH_IN = "analyse"


class State(TypedDict):
    document: str
    done: Annotated[list[str], operator.add]


def make_step(name: str, ledger: Path, crash: bool):
    def step(state: State) -> dict:
        if crash and name == CRASH_IN:
            print(f"  [pid {os.getpid()}] {name}: process killed mid-step (SIGKILL)", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        with ledger.open("a") as f:  # the step's side effect, e.g. an API call
            f.write(f"{name} pid={os.getpid()}\n")
        print(f"  [pid {os.getpid()}] {name}: done", flush=True)
        return {"document": f"{state['document']} -> {name}", "done": [name]}

    return step


def build(ledger: Path, crash: bool, saver: SqliteSaver):
    builder = StateGraph(State)
    builder.add_sequence([(name, make_step(name, ledger, crash)) for name in STEPS])
    builder.add_edge(START, STEPS[0])
    builder.add_edge(STEPS[-1], END)
    return builder.compile(checkpointer=saver)


def worker(db_path: str, ledger_path: str, mode: str) -> None:
    ledger = Path(ledger_path)
    config = {"configurable": {"thread_id": "report-42"}}
    with SqliteSaver.from_conn_string(db_path) as saver:  # the default lease ttl, 30 s
        graph = build(ledger, crash=(mode == "first"), saver=saver)
        if mode == "first":
            graph.invoke({"document": "raw", "done": []}, config, durability="sync")
            return
        run = saver.get_run("report-42")
        assert run is not None and run.expires_at is not None
        state = graph.get_state(config)
        print(
            f"  [pid {os.getpid()}] run registry: thread {run.thread_id!r} is {run.status!r}, "
            f"its lease held {run.expires_at - time.time():.0f} s more by the killed worker "
            f"(pid {str(run.run_id).split('/')[-2]}); checkpoint at step "
            f"{state.metadata['step']}, next: {list(state.next)}",
            flush=True,
        )
        print(f"  [pid {os.getpid()}] resuming with graph.invoke(None, config)", flush=True)
        started = time.monotonic()
        # Where a process's liveness cannot be told (no Linux /proc), "enqueue" waits for the
        # dead worker's lease to run out instead; here the take-over is immediate.
        waiting = {"configurable": {**config["configurable"], "multitask_strategy": "enqueue"}}
        result = graph.invoke(None, waiting, durability="sync")
        print(
            f"  [pid {os.getpid()}] taken over and finished in {time.monotonic() - started:.1f} s"
            f": {result['document']}",
            flush=True,
        )


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        db_path = str(Path(tmp) / "checkpoints.sqlite")
        ledger = Path(tmp) / "side-effects.log"
        ledger.touch()

        def run(mode: str) -> int:
            cmd = [sys.executable, __file__, "--worker", mode, db_path, str(ledger)]
            return subprocess.run(cmd, check=False).returncode

        print(f"Run 1: a worker runs {' -> '.join(STEPS)} on SQLite ({db_path})")
        code = run("first")
        print(f"Run 1 ended with exit status {code} (killed by signal {-code})\n")

        print("Run 2: a new process resumes the dead run from the checkpoint file")
        if run("resume") != 0:
            print("resume failed")
            return 1

        effects = ledger.read_text().splitlines()
        names = [line.split()[0] for line in effects]
        print("\nSide-effect ledger (one line per step execution):")
        for line in effects:
            print(f"  {line}")
        repeated = sorted({n for n in names if names.count(n) > 1})
        print(
            f"\nSteps executed: {len(names)} for {len(STEPS)} steps; "
            f"repeated: {', '.join(repeated) if repeated else 'none'}"
        )
        return 0 if names == STEPS else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[3], sys.argv[4], sys.argv[2])
    else:
        sys.exit(main())
