"""Durable runs in their own process, killed at chosen points (tests/test_faults.py and
tests/test_ownership.py drive it).

    python fault_program.py SPEC_JSON

SPEC is a JSON object; ``phase`` says what to do:

* ``clean``: run the fan-out graph (a -> p1, p2, p3, p4 -> z) start to end.
* ``crash``: the same run, on a saver whose ``kill["index"]``-th write call (put, put_step,
  put_writes, put_writes_batch, or their async twins, counted from 0 in call order) kills the
  process at ``kill["boundary"]``:

  - ``before``: before the call; ``after``: once it returned;
  - ``mid``: SQLite, as the transaction's first write statement starts; Postgres, with the
    statement sent and blocked on a lock the test holds, on a connection whose server checks
    for a vanished client (``client_connection_check_interval``), so the server aborts it;
  - ``commit``: SQLite, inside ``COMMIT`` (its first progress-handler call); Postgres, as
    ``mid`` without the check, so the server finishes (commits) the statement after the kill.

  For Postgres ``mid``/``commit`` the program hands over to the test before the call: it creates
  ``DIR/at-write`` and waits for ``DIR/locked`` (the test has locked the thread's run row).
* ``resume``: in a new process, wait until the saver lists the thread's run as crashed (its lease
  ran out), finish it with ``graph.recover()``, print ``{"report": ..., "state": ...}``.
* ``own-run`` / ``own-recover``: the chain a -> b -> c -> d -> e for tests/test_ownership.py;
  node b waits for ``DIR/go`` when ``block`` is set (announcing it with ``DIR/<tag>.in-b``).
  A run refused its lease prints ``BUSY: ...`` and exits 2; a run whose write is refused
  because it lost its lease prints ``LEASE LOST: ...`` and exits 3.

Every node appends ``<node>:<attempt>`` (``attempt`` from the spec) to ``DIR/ledger`` as it
starts; every write call appends ``start|done <kind> <index>`` to ``DIR/calls``. STORE is
``sqlite`` (TARGET a file) or ``postgres`` (TARGET a conninfo); API ``sync`` runs ``invoke`` on
the sync saver, ``async`` runs ``ainvoke`` on the async one. Runs get a lease of ``lease_ttl``
seconds (1 by default), so a killed process holds its thread about that long.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import json
import operator
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypedDict

from stepgraph.errors import LeaseLostError, ThreadBusyError
from stepgraph.graph import END, START, StateGraph

FAN = ("p1", "p2", "p3", "p4")
NODES = ("a", *FAN, "z")
CHAIN = ("a", "b", "c", "d", "e")
WRITE_METHODS = {
    "put": "put",
    "put_step": "put_step",
    "put_writes": "put_writes",
    "put_writes_batch": "put_writes_batch",
    "put_step_and_release": "put_step_and_release",  # a run's last save, and its lease's release
    "put_steps": "put_steps",  # a new input's checkpoint with START's step
    "aput": "put",
    "aput_step": "put_step",
    "aput_writes": "put_writes",
    "aput_writes_batch": "put_writes_batch",
    "aput_step_and_release": "put_step_and_release",
    "aput_steps": "put_steps",
}
# How long the fan-out's tasks take (p1 at once): p1's save is held up (PUT_WRITES_DELAY) until
# p2 and p3 have finished, so their writes go together in one put_writes_batch, and p4 finishes
# last, so its writes go with the step's checkpoint in put_step. The same call sequence in every
# process (checked by the tests against a clean run).
NODE_SECONDS = {"p2": 0.1, "p3": 0.1, "p4": 0.6}
PUT_WRITES_DELAY = 0.3


class State(TypedDict):
    log: Annotated[list[str], operator.add]
    total: Annotated[int, operator.add]


def kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def append(path: Path, line: str) -> None:
    # One write() per line on an O_APPEND file: lines from threads never interleave, and what
    # was written survives a SIGKILL (it is in the kernel's page cache).
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def wait_for(path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            sys.exit(f"fault_program: {path.name} never appeared")
        time.sleep(0.005)


# -- graphs -------------------------------------------------------------------------------------


def fan_out(work: Path, attempt: int) -> StateGraph:
    def make_node(name: str) -> Any:
        def node(state: State) -> dict:
            append(work / "ledger", f"{name}:{attempt}")
            time.sleep(NODE_SECONDS.get(name, 0.0))
            return {"log": [name], "total": 1 << NODES.index(name)}

        return node

    builder = StateGraph(State)
    for name in NODES:
        builder.add_node(name, make_node(name))
    builder.add_edge(START, "a")
    for name in FAN:
        builder.add_edge("a", name)
    builder.add_edge(list(FAN), "z")
    builder.add_edge("z", END)
    return builder


def chain(work: Path, tag: str, block: bool) -> StateGraph:
    def make_node(name: str) -> Any:
        def node(state: State) -> dict:
            append(work / "ledger", f"{name}:{tag}")
            if name == "b" and block:
                (work / f"{tag}.in-b").touch()
                wait_for(work / "go", timeout=120)
            return {"log": [name], "total": 1 << CHAIN.index(name)}

        return node

    builder = StateGraph(State)
    for name in CHAIN:
        builder.add_node(name, make_node(name))
    builder.add_edge(START, CHAIN[0])
    for before, after in itertools.pairwise(CHAIN):
        builder.add_edge(before, after)
    builder.add_edge(CHAIN[-1], END)
    return builder


# -- the instrumented saver ---------------------------------------------------------------------


class Faults:
    """Counts the saver's write calls and kills the process at the chosen one."""

    def __init__(self, spec: dict, work: Path) -> None:
        kill_at = spec.get("kill") or {}
        self.index: int | None = kill_at.get("index")
        self.boundary: str | None = kill_at.get("boundary")
        self.store = spec["store"]
        self.work = work
        self.count = itertools.count()
        self.lock = threading.Lock()
        self.nested = threading.local()
        self.anested: contextvars.ContextVar[bool] = contextvars.ContextVar("nested", default=False)

    def _begin(self, kind: str, args: tuple) -> tuple[int, bool]:
        with self.lock:
            index = next(self.count)
        nodes = ",".join(effect(kind, args))
        append(self.work / "calls", f"start {kind} {index} {nodes} {checkpoints(kind, args)}")
        return index, index == self.index

    def _end(self, kind: str, index: int, armed: bool) -> None:
        append(self.work / "calls", f"done {kind} {index}")
        if armed:
            if self.boundary == "after":
                kill()
            sys.stderr.write(f"fault_program: the {self.boundary} kill of call {index} missed\n")
            os._exit(5)

    def _hand_over(self) -> None:
        """Postgres mid/commit: let the test lock the thread's run row, then write (and block)."""
        (self.work / "at-write").touch()
        wait_for(self.work / "locked")

    def call(self, saver: Any, kind: str, args: tuple, method: Callable[[], Any]) -> Any:
        if getattr(self.nested, "on", False):
            return method()
        index, armed = self._begin(kind, args)
        if kind == "put_writes":
            time.sleep(PUT_WRITES_DELAY)
        if armed:
            if self.boundary == "before":
                kill()
            elif self.store == "sqlite":
                arm_sqlite(saver.conn, self.boundary)
            elif self.boundary in ("mid", "commit"):
                self._hand_over()
        self.nested.on = True
        try:
            result = method()
        finally:
            self.nested.on = False
        self._end(kind, index, armed)
        return result

    async def acall(self, saver: Any, kind: str, args: tuple, method: Callable[[], Any]) -> Any:
        if self.anested.get():
            return await method()
        index, armed = self._begin(kind, args)
        if kind == "put_writes":
            await asyncio.sleep(PUT_WRITES_DELAY)
        if armed:
            if self.boundary == "before":
                kill()
            elif self.store == "sqlite":
                await saver.conn._execute(arm_sqlite, saver.conn._conn, self.boundary)
            elif self.boundary in ("mid", "commit"):
                await asyncio.to_thread(self._hand_over)
        token = self.anested.set(True)
        try:
            result = await method()
        finally:
            self.anested.reset(token)
        self._end(kind, index, armed)
        return result


CHECKPOINT_SAVES = ("put", "put_step", "put_step_and_release", "put_steps")


def checkpoints(kind: str, args: tuple) -> int:
    """How many checkpoints the write call saves."""
    if kind == "put_steps":
        return len(args[1])
    return 1 if kind in CHECKPOINT_SAVES else 0


def effect(kind: str, args: tuple) -> list[str]:
    """The nodes whose effect (their ``log`` entry) the write call makes durable: the
    checkpoint's ``log`` and the ``log`` writes it carries."""
    if kind == "put_steps":  # (config, steps): each step as a put_step
        found = [effect("put_step", (args[0], *step)) for step in args[1]]
        return sorted(set().union(*found))
    nodes: list[str] = []
    if kind in CHECKPOINT_SAVES:
        checkpoint = args[1] if kind == "put" else args[2]
        nodes.extend(checkpoint["channel_values"].get("log", []))
    if kind == "put_writes":
        pairs: list[Any] = list(args[1])
    elif kind in ("put_step", "put_step_and_release", "put_writes_batch"):
        pairs = [pair for task in args[1] for pair in task.writes]
    else:
        pairs = []
    nodes.extend(item for channel, value in pairs if channel == "log" for item in value)
    return sorted(set(nodes))


def arm_sqlite(conn: Any, boundary: str | None) -> None:
    """Kill the process inside the next write transaction on ``conn`` (a ``sqlite3``
    connection): ``mid`` as its first write statement (not the lease's) starts, ``commit`` at the
    first progress-handler call of its ``COMMIT``. The lease keeper's statements share the
    connection, so only statements on the checkpoint tables count."""
    seen_write = False
    in_commit = False

    def on_statement(sql: str) -> None:
        nonlocal seen_write, in_commit
        statement = " ".join(sql.split()).upper()
        if statement.startswith(("INSERT", "UPDATE", "DELETE")) and "THREAD_RUNS" not in statement:
            if boundary == "mid":
                kill()
            seen_write = True
        in_commit = seen_write and statement.startswith("COMMIT")

    def on_progress() -> int:
        if in_commit:
            kill()
        return 0

    conn.set_trace_callback(on_statement)
    if boundary == "commit":
        conn.set_progress_handler(on_progress, 1)


def instrumented(saver_class: type, faults: Faults) -> type:
    """A subclass of ``saver_class`` whose write methods go through ``faults``."""
    namespace: dict[str, Any] = {}
    for method_name, kind in WRITE_METHODS.items():
        if method_name.startswith("a"):

            def amethod(self: Any, *args: Any, _m: str = method_name, _k: str = kind, **kw: Any):
                parent = getattr(super(subclass, self), _m)
                return faults.acall(self, _k, args, lambda: parent(*args, **kw))

            namespace[method_name] = amethod
        else:

            def method(self: Any, *args: Any, _m: str = method_name, _k: str = kind, **kw: Any):
                parent = getattr(super(subclass, self), _m)
                return faults.call(self, _k, args, lambda: parent(*args, **kw))

            namespace[method_name] = method
    subclass = type(f"Faulty{saver_class.__name__}", (saver_class,), namespace)
    return subclass


def saver_class(store: str, api: str) -> type:
    if store == "sqlite":
        if api == "async":
            from stepgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

            return AsyncSqliteSaver
        from stepgraph.checkpoint.sqlite import SqliteSaver

        return SqliteSaver
    if api == "async":
        from stepgraph.checkpoint.postgres.aio import AsyncPostgresSaver

        return AsyncPostgresSaver
    from stepgraph.checkpoint.postgres import PostgresSaver

    return PostgresSaver


def target_of(spec: dict) -> str:
    """The store's address; for a Postgres ``mid`` kill, on connections whose server notices
    a vanished client while the statement waits."""
    target = spec["target"]
    if spec["store"] == "postgres" and (spec.get("kill") or {}).get("boundary") == "mid":
        from psycopg.conninfo import conninfo_to_dict, make_conninfo

        options = conninfo_to_dict(target).get("options") or ""
        target = make_conninfo(
            target, options=f"{options} -c client_connection_check_interval=50".strip()
        )
    return target


# -- phases -------------------------------------------------------------------------------------


def thread_config(spec: dict, **extra: Any) -> dict:
    return {"configurable": {"thread_id": spec["thread"], **extra}}


def incomplete(spec: dict, runs: list[Any]) -> bool:
    return spec["thread"] in [run.thread_id for run in runs]


def report_of(report: Any) -> dict:
    return {
        "resumed": report.resumed,
        "failed": report.failed,
        "abandoned": report.abandoned,
        "busy": report.busy,
    }


def deadline_passed(started: float) -> bool:
    return time.monotonic() - started > 60


def main_sync(spec: dict, work: Path) -> Any:
    phase = spec["phase"]
    cls = instrumented(saver_class(spec["store"], "sync"), Faults(spec, work))
    with cls.from_conn_string(target_of(spec)) as saver:
        saver.lease_ttl = spec.get("lease_ttl", 1.0)
        if phase.startswith("own-"):
            return own(spec, work, saver)
        graph = fan_out(work, spec.get("attempt", 1)).compile(checkpointer=saver)
        if phase == "resume":
            started = time.monotonic()
            while not incomplete(spec, saver.list_incomplete()):
                if deadline_passed(started):
                    sys.exit("fault_program: the crashed run never showed up as incomplete")
                time.sleep(0.02)
            report = graph.recover()  # repeats the run's own durability
            return {
                "report": report_of(report),
                "state": graph.get_state(thread_config(spec)).values,
            }
        return graph.invoke(
            {"log": [], "total": 0}, thread_config(spec), durability=spec["durability"]
        )


async def main_async(spec: dict, work: Path) -> Any:
    phase = spec["phase"]
    cls = instrumented(saver_class(spec["store"], "async"), Faults(spec, work))
    async with cls.from_conn_string(target_of(spec)) as saver:
        saver.lease_ttl = spec.get("lease_ttl", 1.0)
        graph = fan_out(work, spec.get("attempt", 1)).compile(checkpointer=saver)
        if phase == "resume":
            started = time.monotonic()
            while not incomplete(spec, await saver.alist_incomplete()):
                if deadline_passed(started):
                    sys.exit("fault_program: the crashed run never showed up as incomplete")
                await asyncio.sleep(0.02)
            report = await graph.arecover()
            state = (await graph.aget_state(thread_config(spec))).values
            return {"report": report_of(report), "state": state}
        return await graph.ainvoke(
            {"log": [], "total": 0}, thread_config(spec), durability=spec["durability"]
        )


def own(spec: dict, work: Path, saver: Any) -> Any:
    """The ownership phases (tests/test_ownership.py)."""
    tag = spec.get("tag", "run")
    graph = chain(work, tag, spec.get("block", False)).compile(checkpointer=saver)
    extra = {"multitask_strategy": spec.get("strategy", "reject"), "enqueue_timeout": 60}
    try:
        if spec["phase"] == "own-recover":
            started = time.monotonic()
            while not incomplete(spec, saver.list_incomplete()):
                if deadline_passed(started):
                    sys.exit("fault_program: the run never showed up as incomplete")
                time.sleep(0.02)
            report = graph.recover()
            return {
                "report": report_of(report),
                "state": graph.get_state(thread_config(spec)).values,
            }
        return graph.invoke(
            {"log": [], "total": 0}, thread_config(spec, **extra), durability="sync"
        )
    except ThreadBusyError as busy:
        print(f"BUSY: {busy}", flush=True)
        sys.exit(2)
    except LeaseLostError as lost:
        print(f"LEASE LOST: {lost}", flush=True)
        sys.exit(3)


def main(argv: list[str]) -> None:
    spec = json.loads(argv[1])
    work = Path(spec["dir"])
    if spec.get("api", "sync") == "async":
        result = asyncio.run(main_async(spec, work))
    else:
        result = main_sync(spec, work)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main(sys.argv)
