"""A separate process for the multi-process tests: ``python pg_worker.py COMMAND URI ...``.

``setup URI START``: wait until the wall-clock time START, then call ``setup()``.
``steps URI THREAD_ID STEPS SHARED_CHECKPOINT_ID START``: wait until START, then save STEPS
one-task supersteps on THREAD_ID, after each also a write of its own to the checkpoint
SHARED_CHECKPOINT_ID of thread "shared"; finally prune THREAD_ID to its 3 newest checkpoints.
``acquire URI THREAD_ID OWNER START``: wait until START, then try to take THREAD_ID's lease for
run OWNER; print "won EPOCH" or "busy HOLDER".
"""

import sys
import time

from pg_test_helpers import run_steps, thread

from stepgraph.checkpoint.postgres import PostgresSaver
from stepgraph.errors import ThreadBusyError


def main(command: str, uri: str, *args: str) -> None:
    with PostgresSaver.from_conn_string(uri, pool={"min_size": 1, "max_size": 1}) as saver:
        if command == "acquire":
            saver.setup()  # before START: the race is of the acquires alone
        time.sleep(max(0.0, float(args[-1]) - time.time()))
        if command == "setup":
            saver.setup()
        elif command == "steps":
            thread_id, steps, shared_id = args[0], int(args[1]), args[2]
            shared = {
                "configurable": {**thread("shared")["configurable"], "checkpoint_id": shared_id}
            }

            def also_write_to_shared(step: int) -> None:
                saver.put_writes(shared, [("log", step)], f"{thread_id}-{step}")  # type: ignore[arg-type]

            run_steps(
                saver, thread(thread_id), steps, after_step=also_write_to_shared, run_id=thread_id
            )
            saver.prune([thread_id], keep_last=3)
        elif command == "acquire":
            thread_id, owner = args[0], args[1]
            try:
                lease = saver.acquire_lease(thread_id, owner, ttl=30)
            except ThreadBusyError as busy:
                print("busy", busy.holder)
            else:
                print("won", lease.epoch)
        else:
            raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(*sys.argv[1:])
