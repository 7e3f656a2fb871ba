"""A run in its own process, with the default lease ttl, for tests/test_died_here.py.

    python died_here_program.py SPEC_JSON

SPEC: ``phase``, ``store`` (``sqlite``: ``target`` a file; ``postgres``: a conninfo), ``thread``,
``dir``, ``tag``, and optionally ``api`` (``sync``, ``async`` or ``stream``; ``async`` runs
``ainvoke`` on the store's async saver) and ``block`` (node b waits for ``DIR/go``, announcing
it with ``DIR/<tag>.in-b``). The graph is the chain a -> b -> c -> d -> e; every node appends
``<node>:<tag>`` to ``DIR/ledger`` as it starts. Phases:

* ``start``: run the thread from its input;
* ``resume``: ``invoke(None, config)``, as a restarted script resumes its crashed run;
* ``update``: ``update_state`` on the thread;
* ``recover``: ``graph.recover()`` at once, without waiting for a run to show up.

The lease ttl is left at its default (30 s) and the strategy at ``reject``, unless ``strategy``
says otherwise. Prints ``{"result": ..., "seconds": ..., "run": {...}}`` as JSON; a run refused
its lease prints ``BUSY: ...`` and exits 2, ``RunIncompleteError`` prints ``INCOMPLETE: ...``
and exits 4.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import operator
import sys
import time
from pathlib import Path
from typing import Annotated, Any, TypedDict

from stepgraph.errors import RunIncompleteError, ThreadBusyError
from stepgraph.graph import END, START, StateGraph

CHAIN = ("a", "b", "c", "d", "e")


class State(TypedDict):
    log: Annotated[list[str], operator.add]
    total: int


def chain(work: Path, tag: str, block: bool) -> StateGraph:
    def make_node(name: str) -> Any:
        def node(state: State) -> dict:
            with (work / "ledger").open("a") as ledger:
                ledger.write(f"{name}:{tag}\n")
            if name == "b" and block:
                (work / f"{tag}.in-b").touch()
                deadline = time.monotonic() + 120
                while not (work / "go").exists() and time.monotonic() < deadline:
                    time.sleep(0.01)
            return {"log": [name], "total": state["total"] * 10 + CHAIN.index(name) + 1}

        return node

    builder = StateGraph(State)
    for name in CHAIN:
        builder.add_node(name, make_node(name))
    builder.add_edge(START, CHAIN[0])
    for before, after in itertools.pairwise(CHAIN):
        builder.add_edge(before, after)
    builder.add_edge(CHAIN[-1], END)
    return builder


def run_of(saver_run: Any) -> dict:
    if saver_run is None:
        return {}
    return {"owner": saver_run.run_id, "status": saver_run.status, "attempts": saver_run.attempts}


def config_of(spec: dict) -> dict:
    configurable = {"thread_id": spec["thread"]}
    if "strategy" in spec:
        configurable |= {"multitask_strategy": spec["strategy"], "enqueue_timeout": 60}
    return {"configurable": configurable}


def sync_saver(spec: dict) -> contextlib.AbstractContextManager[Any]:
    if spec["store"] == "sqlite":
        from stepgraph.checkpoint.sqlite import SqliteSaver

        return SqliteSaver.from_conn_string(spec["target"])
    from stepgraph.checkpoint.postgres import PostgresSaver

    return PostgresSaver.from_conn_string(spec["target"])


def async_saver(spec: dict) -> contextlib.AbstractAsyncContextManager[Any]:
    if spec["store"] == "sqlite":
        from stepgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

        return AsyncSqliteSaver.from_conn_string(spec["target"])
    from stepgraph.checkpoint.postgres.aio import AsyncPostgresSaver

    return AsyncPostgresSaver.from_conn_string(spec["target"])


def input_of(spec: dict) -> Any:
    return None if spec["phase"] == "resume" else {"log": [], "total": 0}


def main_sync(spec: dict, builder: StateGraph) -> dict:
    config = config_of(spec)
    with sync_saver(spec) as saver:
        graph = builder.compile(checkpointer=saver)
        started = time.monotonic()
        if spec["phase"] == "update":
            graph.update_state(config, {"log": ["x"]}, as_node="a")
            result: Any = None
        elif spec["phase"] == "recover":
            result = str(graph.recover())
        elif spec.get("api") == "stream":
            result = list(graph.stream(input_of(spec), config, stream_mode="values"))[-1]
        else:
            result = graph.invoke(input_of(spec), config)
        seconds = time.monotonic() - started
        state = graph.get_state(config).values
        return {
            "result": result,
            "state": state,
            "seconds": seconds,
            "run": run_of(saver.get_run(spec["thread"])),
        }


async def main_async(spec: dict, builder: StateGraph) -> dict:
    config = config_of(spec)
    async with async_saver(spec) as saver:
        graph = builder.compile(checkpointer=saver)
        started = time.monotonic()
        if spec["phase"] == "update":
            await graph.aupdate_state(config, {"log": ["x"]}, as_node="a")
            result: Any = None
        elif spec["phase"] == "recover":
            result = str(await graph.arecover())
        else:
            result = await graph.ainvoke(input_of(spec), config)
        seconds = time.monotonic() - started
        state = (await graph.aget_state(config)).values
        run = run_of(await saver.aget_run(spec["thread"]))
        return {"result": result, "state": state, "seconds": seconds, "run": run}


def main(argv: list[str]) -> None:
    spec = json.loads(argv[1])
    builder = chain(Path(spec["dir"]), spec["tag"], spec.get("block", False))
    try:
        if spec.get("api") == "async":
            output = asyncio.run(main_async(spec, builder))
        else:
            output = main_sync(spec, builder)
    except ThreadBusyError as busy:
        print(f"BUSY: {busy}", flush=True)
        sys.exit(2)
    except RunIncompleteError as incomplete:
        print(f"INCOMPLETE: {incomplete}", flush=True)
        sys.exit(4)
    print(json.dumps(output), flush=True)


if __name__ == "__main__":
    main(sys.argv)
