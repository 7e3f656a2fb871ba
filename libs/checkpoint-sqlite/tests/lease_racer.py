"""A process racing for leases, for test_leases: ``python lease_racer.py DB OWNER``.

Prints "ready" once its saver is open; then for each thread id read from stdin tries to take
that thread's lease at once and prints "got EPOCH" or "busy".
"""

from __future__ import annotations

import sys

from stepgraph.checkpoint.sqlite import SqliteSaver
from stepgraph.errors import ThreadBusyError


def main(path: str, owner: str) -> None:
    with SqliteSaver.from_conn_string(path) as saver:
        saver.setup()
        print("ready", flush=True)
        for line in sys.stdin:
            try:
                lease = saver.acquire_lease(line.strip(), owner, ttl=60)
            except ThreadBusyError:
                print("busy", flush=True)
            else:
                print(f"got {lease.epoch}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
