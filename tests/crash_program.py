"""A durable run in its own process, for the crash tests (test_crash_recovery.py).

    python crash_program.py GRAPH STORE TARGET THREAD_ID LOG MODE [DURABILITY] [API]

MODE is ``start``, ``crash``, ``resume`` or ``recover``.

GRAPH ``chain`` is a -> b -> c -> d -> e; with ``crash``, d (the node of step 3) kills its own
process with SIGKILL. GRAPH ``commit-POINT`` is the same chain on SQLite; with ``crash``, the
process kills itself inside the saver's save of step 2 (the ``put_step`` after c), at POINT:
``begin`` (as ``BEGIN IMMEDIATE`` starts), ``insert`` (as the checkpoint row is inserted, the
step's writes already in the open transaction), ``commit`` (as ``COMMIT`` starts), ``commit1`` /
``commit3`` (at the first / third progress-handler call inside ``COMMIT``) or ``after`` (at the
statement after that ``COMMIT``). GRAPH ``workflow`` is an ``@entrypoint`` calling ``fetch``,
two ``double`` tasks in parallel, then ``send``; with ``crash``, ``send`` kills the process.
GRAPH ``parallel-left`` and ``parallel-right`` are a -> (left, right) -> join; with ``crash``,
the named sibling kills the process once the other one's writes are in the store. STORE is
``sqlite`` (TARGET a file path) or ``postgres`` (TARGET a conninfo). Every node appends its name
to the LOG file when it starts.

``resume`` continues the thread with ``invoke(None, config)``, waiting
(``multitask_strategy="enqueue"``) for the killed process's lease to run out; ``recover`` waits
until the saver lists the thread's run as crashed and finishes it with ``graph.recover()`` (the
report goes to stderr); ``start`` runs it from the beginning without crashing. Every process
gives its runs a short lease (``LEASE_TTL``), so a killed one holds its thread for about a
second. DURABILITY is the run's mode, "sync" by default. API ``async`` runs a ``parallel-*``
graph with ``ainvoke`` on the store's async saver ("sync": ``invoke``, the default). The final
state is printed as JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import operator
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Annotated, Any, TypedDict

from stepgraph.func import entrypoint, task
from stepgraph.graph import END, START, StateGraph

NODES = ("a", "b", "c", "d", "e")
LEASE_TTL = 1.0  # seconds a killed process keeps holding its thread
CRASHING_NODE = "d"  # the node of step 3 (steps count from 0 after the input checkpoint)


class State(TypedDict):
    log: Annotated[list[str], operator.add]
    total: int


def record(log_path: str, name: str) -> None:
    with open(log_path, "a") as log:
        log.write(name + "\n")


def chain(log_path: str, crash: bool, on_return: Callable[[str], None] | None = None) -> StateGraph:
    """a -> ... -> e; ``on_return(name)`` is called as each node returns."""

    def make_node(name: str) -> Any:
        def node(state: State) -> dict:
            record(log_path, name)
            if crash and name == CRASHING_NODE:
                kill()
            if on_return is not None:
                on_return(name)
            return {"log": [name], "total": state["total"] * 10 + NODES.index(name) + 1}

        return node

    builder = StateGraph(State)
    for name in NODES:
        builder.add_node(name, make_node(name))
    builder.add_edge(START, NODES[0])
    for before, after in itertools.pairwise(NODES):
        builder.add_edge(before, after)
    builder.add_edge(NODES[-1], END)
    return builder


def kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def chain_killed_in_commit(log_path: str, point: str, saver: Any) -> StateGraph:
    """The chain; after c, the saver's connection kills the process at ``point`` of the save.

    The hooks are set on the saver's ``sqlite3`` connection from here: the saver has no test
    hooks of its own. SQLite reads the progress handler when a statement starts, so it is set
    (to count VM steps of the COMMIT statement only) before the save begins."""
    conn = saver.conn
    armed = False
    in_commit = False
    after_commit = False
    progress_calls = 0

    def on_progress() -> int:
        nonlocal progress_calls
        if in_commit:
            progress_calls += 1
            if progress_calls == int(point.removeprefix("commit")):
                kill()
        return 0

    def on_statement(sql: str) -> None:
        nonlocal in_commit, after_commit
        if not armed:
            return
        if after_commit:  # the statement after the step's COMMIT
            kill()
        statement = " ".join(sql.split()).upper()
        in_commit = statement == "COMMIT"
        if point == "begin" and statement.startswith("BEGIN"):
            kill()
        if point == "insert" and statement.startswith("INSERT OR REPLACE INTO CHECKPOINTS"):
            kill()
        if in_commit and point == "commit":
            kill()
        after_commit = in_commit and point == "after"

    conn.set_trace_callback(on_statement)

    def arm(name: str) -> None:
        nonlocal armed
        if name == "c":
            armed = True
            if point in ("commit1", "commit3"):
                conn.set_progress_handler(on_progress, 1)

    return chain(log_path, False, arm)


def workflow(log_path: str, crash: bool, saver: Any) -> Any:
    @task
    def fetch(x: int) -> int:
        record(log_path, "fetch")
        return x + 1

    @task
    def double(x: int) -> int:
        record(log_path, f"double{x}")
        return 2 * x

    @task
    def send(x: int) -> int:
        record(log_path, "send")
        if crash:
            kill()
        return x + 5

    @entrypoint(checkpointer=saver)
    def flow(x: int) -> dict:
        fetched = fetch(x).result()
        left, right = double(fetched), double(fetched + 1)
        return {"sent": send(left.result() + right.result()).result()}

    return flow


def wait_until_saved(store: str, target: str, config: dict, node: str) -> None:
    """Return once ``node``'s pending write is in the store (or after a 10 s guard)."""
    with open_saver(store, target) as reader:
        for _ in range(200):
            saved = reader.get_tuple(config)
            writes = saved.pending_writes or [] if saved else []
            if ("log", [node]) in [(channel, value) for _, channel, value in writes]:
                return
            time.sleep(0.05)


def parallel(
    log_path: str, crashing: str | None, store: str, target: str, config: dict
) -> StateGraph:
    def make_node(name: str) -> Any:
        def node(state: State) -> dict:
            record(log_path, name)
            if name == crashing:
                sibling = "right" if name == "left" else "left"
                wait_until_saved(store, target, config, sibling)
                kill()
            return {"log": [name]}

        return node

    builder = StateGraph(State)
    for name in ("a", "left", "right", "join"):
        builder.add_node(name, make_node(name))
    builder.add_edge(START, "a")
    builder.add_edge("a", "left")
    builder.add_edge("a", "right")
    builder.add_edge(["left", "right"], "join")
    builder.add_edge("join", END)
    return builder


def run_config(config: dict, mode: str) -> dict:
    """A resume waits for the killed process's lease to run out instead of being refused."""
    if mode != "resume":
        return config
    return {"configurable": {**config["configurable"], "multitask_strategy": "enqueue"}}


def wait_until_incomplete(saver: Any, config: dict) -> None:
    """Return once the saver lists the thread's run as crashed (its lease ran out)."""
    thread_id = config["configurable"]["thread_id"]
    deadline = time.monotonic() + 60
    while thread_id not in [run.thread_id for run in saver.list_incomplete()]:
        if time.monotonic() > deadline:
            raise TimeoutError(f"thread {thread_id!r} never showed up as an incomplete run")
        time.sleep(0.05)


async def wait_until_incomplete_async(saver: Any, config: dict) -> None:
    thread_id = config["configurable"]["thread_id"]
    deadline = time.monotonic() + 60
    while thread_id not in [run.thread_id for run in await saver.alist_incomplete()]:
        if time.monotonic() > deadline:
            raise TimeoutError(f"thread {thread_id!r} never showed up as an incomplete run")
        await asyncio.sleep(0.05)


def open_saver(store: str, target: str) -> contextlib.AbstractContextManager[Any]:
    if store == "sqlite":
        from stepgraph.checkpoint.sqlite import SqliteSaver

        return SqliteSaver.from_conn_string(target)
    from stepgraph.checkpoint.postgres import PostgresSaver

    return PostgresSaver.from_conn_string(target)


def open_async_saver(store: str, target: str) -> contextlib.AbstractAsyncContextManager[Any]:
    if store == "sqlite":
        from stepgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

        return AsyncSqliteSaver.from_conn_string(target)
    from stepgraph.checkpoint.postgres.aio import AsyncPostgresSaver

    return AsyncPostgresSaver.from_conn_string(target)


async def main_async(
    graph: str, store: str, target: str, config: dict, log_path: str, mode: str, durability: str
) -> Any:
    crashing = graph.removeprefix("parallel-") if mode == "crash" else None
    builder = parallel(log_path, crashing, store, target, config)
    async with open_async_saver(store, target) as saver:
        saver.lease_ttl = LEASE_TTL
        compiled = builder.compile(checkpointer=saver)
        if mode == "recover":
            await wait_until_incomplete_async(saver, config)
            report = await compiled.arecover()
            print(report, file=sys.stderr)
            return (await compiled.aget_state(config)).values
        start = None if mode == "resume" else {"log": [], "total": 0}
        return await compiled.ainvoke(start, run_config(config, mode), durability=durability)


def main(
    graph: str,
    store: str,
    target: str,
    thread_id: str,
    log_path: str,
    mode: str,
    durability: str = "sync",
    api: str = "sync",
) -> None:
    config = {"configurable": {"thread_id": thread_id}}
    crash = mode == "crash"
    if api == "async":
        result = asyncio.run(main_async(graph, store, target, config, log_path, mode, durability))
        print(json.dumps(result))
        return
    with open_saver(store, target) as saver:
        saver.lease_ttl = LEASE_TTL
        if graph == "workflow":
            compiled = workflow(log_path, crash, saver)
            start: Any = 1
        else:
            if graph == "chain":
                builder = chain(log_path, crash)
            elif graph.startswith("commit-"):
                point = graph.removeprefix("commit-")
                builder = (
                    chain_killed_in_commit(log_path, point, saver)
                    if crash
                    else chain(log_path, False)
                )
            else:
                crashing = graph.removeprefix("parallel-") if crash else None
                builder = parallel(log_path, crashing, store, target, config)
            compiled = builder.compile(checkpointer=saver)
            start = {"log": [], "total": 0}
        if mode == "recover":
            wait_until_incomplete(saver, config)
            print(compiled.recover(), file=sys.stderr)
            result = compiled.get_state(config).values
        else:
            result = compiled.invoke(
                None if mode == "resume" else start,
                run_config(config, mode),
                durability=durability,
            )
    print(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])
