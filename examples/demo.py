"""Durable execution in one minute: a run dies part-way, a new process resumes it.

`make demo` runs this file. It starts a worker process that runs a five-step pipeline on a
SQLite checkpoint file; the worker is killed (SIGKILL, no clean-up) inside the third step. A
second, fresh worker process resumes the same thread with `invoke(None, config)`. Every step
records its side effect in a ledger file, so the output shows which steps ran in which process:
the two steps that finished before the crash are not run again.
"""

from __future__ import annotations

import operator
import os
import signal
import subprocess
import sys
import tempfile
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
    with SqliteSaver.from_conn_string(db_path) as saver:
        graph = build(ledger, crash=(mode == "first"), saver=saver)
        if mode == "first":
            graph.invoke({"document": "raw", "done": []}, config, durability="sync")
        else:
            state = graph.get_state(config)
            print(
                f"  [pid {os.getpid()}] found thread at step {state.metadata['step']}, "
                f"next: {list(state.next)}; resuming with invoke(None, config)",
                flush=True,
            )
            result = graph.invoke(None, config, durability="sync")
            print(f"  [pid {os.getpid()}] finished: {result['document']}", flush=True)


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

        print("Run 2: a new process resumes the same thread from the checkpoint file")
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
