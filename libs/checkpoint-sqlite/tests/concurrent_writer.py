"""A writer process for test_concurrent_processes: ``python concurrent_writer.py DB NAME THREADS``.

Prints "ready" once its saver is open, waits for a line on stdin, then writes THREADS threads of
two checkpoints (``put``, then ``put_step`` with the writes of one task) as fast as it can.
"""

from __future__ import annotations

import sys

from stepgraph.checkpoint.base import TaskWrites, empty_checkpoint
from stepgraph.checkpoint.sqlite import SqliteSaver
from stepgraph.config import RunnableConfig


def main(path: str, name: str, threads: int) -> None:
    with SqliteSaver.from_conn_string(path) as saver:
        print("ready", flush=True)
        sys.stdin.readline()
        for number in range(threads):
            config: RunnableConfig = {
                "configurable": {"thread_id": f"{name}-{number}", "checkpoint_ns": ""}
            }
            first = empty_checkpoint()
            version = saver.get_next_version(None)
            first["channel_values"] = {"count": 0}
            first["channel_versions"] = {"count": version}
            saved = saver.put(config, first, {"source": "input", "step": -1}, {"count": version})
            second = empty_checkpoint()
            version = saver.get_next_version(version)
            second["channel_values"] = {"count": number}
            second["channel_versions"] = {"count": version}
            writes = [TaskWrites("task", [("count", number)])]
            saver.put_step(saved, writes, second, {"source": "loop", "step": 0}, {"count": version})


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
