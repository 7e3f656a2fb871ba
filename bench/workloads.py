"""The benchmark workloads, written once and run against whichever import root they are given.

LangGraph and stepgraph share one public API, so a workload imports `f"{root}.graph"` and the
only difference between the two runs is that root. Each workload builds its graph for a
checkpointer and runs one invocation through a `Driver`, which times the invoke or ainvoke.
"""

from __future__ import annotations

import importlib
import itertools
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Annotated, Any, Protocol, TypedDict

CHAIN_LENGTH = 20
FAN_OUT = 100
FAILING_NODE = 15  # the resume workload's node that raises once (1-based)
WIDE_KEYS = 1_000
WIDE_VALUE = "v" * 100


class Driver(Protocol):
    """Calls a graph the way its checkpointer needs: sync methods, or async ones on a loop."""

    def invoke(self, graph: Any, graph_input: Any, thread_id: str, **kwargs: Any) -> int:
        """Runs invoke (or ainvoke) and returns its wall time in ns."""
        ...

    # The reads return (wall time in ns, result).
    def get_state(self, graph: Any, thread_id: str) -> tuple[int, Any]: ...

    def list_checkpoints(self, graph: Any, thread_id: str, limit: int) -> tuple[int, list[Any]]:
        """The checkpointer's own `list` for the thread, newest first."""
        ...

    def get_state_history(
        self, graph: Any, thread_id: str, limit: int
    ) -> tuple[int, list[Any]]: ...


@dataclass
class Api:
    """The LangGraph-shaped names the workloads use, imported from one root."""

    root: str
    graph: ModuleType
    types: ModuleType

    @classmethod
    def load(cls, root: str) -> Api:
        return cls(
            root,
            importlib.import_module(f"{root}.graph"),
            importlib.import_module(f"{root}.types"),
        )

    def func(self) -> ModuleType:
        # Imported on demand: a library may not have its functional API yet.
        return importlib.import_module(f"{self.root}.func")


@dataclass
class Sample:
    ns: int  # wall time of the timed call
    units: int  # what the µs figure is per: supersteps, or tasks (see Workload.unit)
    # The commits durability "sync" needs at least (one per superstep; one per task call for the
    # functional API): what the raw one-commit floor is multiplied by.
    commits: int
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Workload:
    name: str
    build: Callable[[Api, Any], Any]
    run: Callable[[Any, Driver, str], Sample]
    prepare: Callable[[Any, Driver], None] = lambda graph, driver: None
    needs_checkpointer: bool = False
    unit: str = "step"  # "step" (a superstep) or "task"


# 1. Sequential chain -----------------------------------------------------------------------------


class ChainState(TypedDict):
    x: int
    log: Annotated[list[str], operator.add]


def chain_node(name: str) -> Callable[[ChainState], dict[str, Any]]:
    def node(state: ChainState) -> dict[str, Any]:
        return {"x": state["x"] + 1, "log": [name]}

    return node


def build_sequence(api: Api, schema: type, nodes: dict[str, Any], checkpointer: Any) -> Any:
    """START -> each node in order -> END."""
    builder = api.graph.StateGraph(schema)
    for name, node in nodes.items():
        builder.add_node(name, node)
    names = [api.graph.START, *nodes, api.graph.END]
    for before, after in itertools.pairwise(names):
        builder.add_edge(before, after)
    return builder.compile(checkpointer=checkpointer)


def build_chain(api: Api, checkpointer: Any, node: Callable[[str], Any] = chain_node) -> Any:
    names = [f"n{i}" for i in range(1, CHAIN_LENGTH + 1)]
    return build_sequence(api, ChainState, {name: node(name) for name in names}, checkpointer)


def run_chain(graph: Any, driver: Driver, thread_id: str) -> Sample:
    return Sample(driver.invoke(graph, {"x": 0, "log": []}, thread_id), CHAIN_LENGTH, CHAIN_LENGTH)


# 2. Fan-out --------------------------------------------------------------------------------------


class FanOutState(TypedDict):
    results: Annotated[list[int], operator.add]


def build_fan_out(api: Api, checkpointer: Any) -> Any:
    send = api.types.Send

    def dispatch(state: FanOutState) -> dict[str, Any]:
        return {}

    def work(job: dict[str, int]) -> dict[str, Any]:
        return {"results": [job["i"] * 2]}

    def collect(state: FanOutState) -> dict[str, Any]:
        assert len(state["results"]) == FAN_OUT
        return {}

    builder = api.graph.StateGraph(FanOutState)
    builder.add_node("dispatch", dispatch)
    builder.add_node("work", work)
    builder.add_node("collect", collect)
    builder.add_edge(api.graph.START, "dispatch")
    builder.add_conditional_edges(
        "dispatch", lambda state: [send("work", {"i": i}) for i in range(FAN_OUT)], ["work"]
    )
    builder.add_edge("work", "collect")
    builder.add_edge("collect", api.graph.END)
    return builder.compile(checkpointer=checkpointer)


FAN_OUT_TASKS = FAN_OUT + 2  # dispatch, the workers, collect
FAN_OUT_STEPS = 3


def run_fan_out(graph: Any, driver: Driver, thread_id: str) -> Sample:
    return Sample(driver.invoke(graph, {"results": []}, thread_id), FAN_OUT_TASKS, FAN_OUT_STEPS)


# 3. Wide state -----------------------------------------------------------------------------------

WIDE_DATA = {f"key{i:04d}": WIDE_VALUE for i in range(WIDE_KEYS)}


class WideState(TypedDict):
    data: dict[str, str]
    counter: int


def build_wide(api: Api, checkpointer: Any) -> Any:
    def bump(state: WideState) -> dict[str, Any]:
        return {"counter": state["counter"] + 1}

    nodes = {f"n{i}": bump for i in range(1, CHAIN_LENGTH + 1)}
    return build_sequence(api, WideState, nodes, checkpointer)


def prepare_wide(graph: Any, driver: Driver) -> None:
    # The thread holds the wide dict before timing starts; the timed steps change only the counter.
    driver.invoke(graph, {"data": WIDE_DATA, "counter": 0}, "wide")


def run_wide(graph: Any, driver: Driver, thread_id: str) -> Sample:
    # Every call continues the one seeded thread.
    graph_input = {"counter": 0} if graph.checkpointer else {"data": WIDE_DATA, "counter": 0}
    return Sample(driver.invoke(graph, graph_input, "wide"), CHAIN_LENGTH, CHAIN_LENGTH)


# 5. Resume after a failure -----------------------------------------------------------------------


class NodeFailure(Exception):
    pass


@dataclass
class ResumeProbe:
    """Makes the failing node raise once, and counts node runs."""

    armed: bool = False
    runs: int = 0


PROBE = ResumeProbe()


def resume_node(name: str) -> Callable[[ChainState], dict[str, Any]]:
    def node(state: ChainState) -> dict[str, Any]:
        PROBE.runs += 1
        if name == f"n{FAILING_NODE}" and PROBE.armed:
            PROBE.armed = False
            raise NodeFailure(name)
        return {"x": state["x"] + 1, "log": [name]}

    return node


def run_resume(graph: Any, driver: Driver, thread_id: str) -> Sample:
    PROBE.armed = True
    try:
        driver.invoke(graph, {"x": 0, "log": []}, thread_id)
    except NodeFailure:
        pass
    else:
        raise AssertionError(f"node n{FAILING_NODE} did not fail")
    PROBE.runs = 0
    ns = driver.invoke(graph, None, thread_id)
    state = driver.get_state(graph, thread_id)[1].values
    assert state["x"] == CHAIN_LENGTH, state
    needed = CHAIN_LENGTH - FAILING_NODE + 1
    return Sample(ns, needed, needed, {"node_runs": PROBE.runs, "rerun": PROBE.runs - needed})


# 6. Functional API -------------------------------------------------------------------------------


TASK_RUNS = [0]  # task bodies run by the functional workload since the last reset


def build_functional(api: Api, checkpointer: Any) -> Any:
    func = api.func()

    @func.task
    def step(x: int) -> int:
        TASK_RUNS[0] += 1
        return x + 1

    @func.entrypoint(checkpointer=checkpointer)
    def main(x: int) -> int:
        for _ in range(CHAIN_LENGTH):
            x = step(x).result()
        return x

    return main


def run_functional(graph: Any, driver: Driver, thread_id: str) -> Sample:
    TASK_RUNS[0] = 0
    ns = driver.invoke(graph, 0, thread_id)
    # Every call ran its task once: a new thread has no recorded result to replay.
    assert TASK_RUNS[0] == CHAIN_LENGTH, TASK_RUNS[0]
    return Sample(ns, CHAIN_LENGTH, CHAIN_LENGTH)


# 7. Short run -------------------------------------------------------------------------------------


class ShortState(TypedDict):
    x: int


def short_node(state: ShortState) -> dict[str, Any]:
    return {"x": state["x"] + 1}


def build_short_run(api: Api, checkpointer: Any) -> Any:
    """START -> one node -> END: a run that is mostly what every run pays besides its steps
    (taking and reading the thread, the input's checkpoint, letting go)."""
    return build_sequence(api, ShortState, {"only": short_node}, checkpointer)


def run_short_run(graph: Any, driver: Driver, thread_id: str) -> Sample:
    return Sample(driver.invoke(graph, {"x": 0}, thread_id), 1, 1)


WORKLOADS = {
    w.name: w
    for w in [
        Workload("chain", build_chain, run_chain),
        Workload("fan_out", build_fan_out, run_fan_out, unit="task"),
        Workload("wide", build_wide, run_wide, prepare=prepare_wide),
        Workload(
            "resume",
            lambda api, cp: build_chain(api, cp, resume_node),
            run_resume,
            needs_checkpointer=True,
        ),
        Workload("functional", build_functional, run_functional, unit="task"),
        Workload("short_run", build_short_run, run_short_run, unit="run"),
    ]
}


# 4. Long thread (reads, not invocations) ---------------------------------------------------------


class TickState(TypedDict):
    x: int
    target: int


def build_ticker(api: Api, checkpointer: Any) -> Any:
    """One node that loops until x reaches target: one checkpoint per superstep."""

    def tick(state: TickState) -> dict[str, Any]:
        return {"x": state["x"] + 1}

    builder = api.graph.StateGraph(TickState)
    builder.add_node("tick", tick)
    builder.add_edge(api.graph.START, "tick")
    builder.add_conditional_edges(
        "tick", lambda s: "tick" if s["x"] < s["target"] else api.graph.END, ["tick", api.graph.END]
    )
    return builder.compile(checkpointer=checkpointer)


LONG_THREAD = 1_000  # checkpoints in the long thread
SHORT_THREAD = 20  # checkpoints in the thread it is compared with
READ_LIMIT = 10


def prepare_long_thread(graph: Any, driver: Driver, other_threads: int) -> dict[str, int]:
    """Fills the store: `other_threads` threads of 20 checkpoints, then the long and the short one."""
    limit = {"recursion_limit": LONG_THREAD + 10}
    for i in range(other_threads):
        driver.invoke(graph, {"x": 0, "target": SHORT_THREAD - 2}, f"other-{i}", durability="sync")
    # A run of n ticks saves n + 2 checkpoints: the input's, the one before the first tick, then one per tick.
    driver.invoke(graph, {"x": 0, "target": LONG_THREAD - 2}, "long", durability="sync", **limit)
    driver.invoke(graph, {"x": 0, "target": SHORT_THREAD - 2}, "short", durability="sync")
    return {
        t: len(driver.list_checkpoints(graph, t, LONG_THREAD * 2)[1]) for t in ("long", "short")
    }


READS: dict[str, Callable[[Any, Driver, str], tuple[int, Any]]] = {
    "get_state": lambda graph, driver, thread: driver.get_state(graph, thread),
    f"list(limit={READ_LIMIT})": lambda graph, driver, thread: driver.list_checkpoints(
        graph, thread, READ_LIMIT
    ),
    f"get_state_history(limit={READ_LIMIT})": lambda graph, driver, thread: (
        driver.get_state_history(graph, thread, READ_LIMIT)
    ),
}
