"""A workflow killed with SIGKILL while it waits inside a task (run by test_crash.py).

usage: crash_workflow.py <sqlite file> <thread id> <work dir> first|resume

``first`` starts the run; its third task announces it is waiting (``<work dir>/waiting``) and
sleeps until killed. ``resume`` continues the thread in a new process and prints the result,
waiting (``multitask_strategy="enqueue"``) for the killed run's short lease to run out.
Every task body appends its name to ``<work dir>/runs`` so the test sees what ran, and where.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from stepgraph.checkpoint.sqlite import SqliteSaver
from stepgraph.func import entrypoint, task

db, thread_id, work, phase = sys.argv[1:5]
work_dir = Path(work)


def record(name: str) -> None:
    with open(work_dir / "runs", "a") as runs:
        runs.write(f"{name} {os.getpid()}\n")


@task
def fetch(x: int) -> int:
    record("fetch")
    return x + 1


@task
def transform(x: int) -> int:
    record("transform")
    return x * 10


@task
def slow_send(x: int) -> int:
    record("slow_send")
    if phase == "first":
        (work_dir / "waiting").write_text("yes")
        time.sleep(600)  # killed here
    return x + 5


with SqliteSaver.from_conn_string(db) as saver:
    # A killed process holds its thread for at most this long (the default is 30 s).
    saver.lease_ttl = 1.0

    @entrypoint(checkpointer=saver)
    def workflow(x: int) -> dict[str, int]:
        fetched = fetch(x).result()
        transformed = transform(fetched).result()
        return {"sent": slow_send(transformed).result()}

    config = {"configurable": {"thread_id": thread_id}}
    if phase == "first":
        workflow.invoke(1, config, durability="sync")
    else:
        # The killed run's lease is still held for up to lease_ttl: wait for it to run out.
        config["configurable"]["multitask_strategy"] = "enqueue"
        print(json.dumps(workflow.invoke(None, config)))
