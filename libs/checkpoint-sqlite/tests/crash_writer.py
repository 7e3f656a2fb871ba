"""A writer process for test_killed_process_loses_no_committed_step.

``python crash_writer.py DB``: saves steps to one thread until killed, printing each saved
checkpoint id after ``put_step`` returned (that is, after its commit).
"""

from __future__ import annotations

import sys

from stepgraph.checkpoint.base import CheckpointMetadata, TaskWrites, empty_checkpoint
from stepgraph.checkpoint.sqlite import SqliteSaver
from stepgraph.config import RunnableConfig


def main(path: str) -> None:
    with SqliteSaver.from_conn_string(path) as saver:
        config: RunnableConfig = {"configurable": {"thread_id": "crash", "checkpoint_ns": ""}}
        version = None
        number = 0
        while True:
            checkpoint = empty_checkpoint()
            version = saver.get_next_version(version)
            checkpoint["channel_values"] = {"count": number}
            checkpoint["channel_versions"] = {"count": version}
            writes = [TaskWrites("task", [("count", number)])] if number else []
            metadata = CheckpointMetadata(source="loop", step=number)
            config = saver.put_step(config, writes, checkpoint, metadata, {"count": version})
            print(config["configurable"]["checkpoint_id"], flush=True)
            number += 1


if __name__ == "__main__":
    main(sys.argv[1])
