"""What a node receives as ``runtime`` and ``config``: LangGraph 1.2.22's values and keys."""

from __future__ import annotations

import asyncio
import operator
import time
import uuid
from typing import Annotated, Any, TypedDict

from stepgraph.checkpoint.memory import InMemorySaver
from stepgraph.config import (
    DefaultRecursionLimit,
    RunnableConfig,
    get_config,
    merge_configs,
)
from stepgraph.func import entrypoint, task
from stepgraph.graph import START, StateGraph
from stepgraph.runtime import (
    ExecutionInfo,
    Runtime,
    get_runtime,
)
from stepgraph.types import RetryPolicy


class State(TypedDict):
    log: Annotated[list[Any], operator.add]


def _chain(*nodes: Any, retry_policy: RetryPolicy | None = None) -> StateGraph:
    builder = StateGraph(State)
    previous = START
    for node in nodes:
        builder.add_node(node.__name__, node, retry_policy=retry_policy)
        builder.add_edge(previous, node.__name__)
        previous = node.__name__
    return builder


def _checkpoint_ids(graph: Any, config: RunnableConfig) -> dict[int, str]:
    """The id of the checkpoint each step started from, by step (the checkpoint of step - 1)."""
    return {
        snapshot.metadata["step"] + 1: snapshot.config["configurable"]["checkpoint_id"]
        for snapshot in graph.get_state_history(config)
    }


# -- execution_info in a run ---------------------------------------------------------------------


def test_execution_info_names_the_task_its_checkpoint_and_the_run() -> None:
    seen: list[tuple[ExecutionInfo, RunnableConfig]] = []

    def first(state: State, runtime: Runtime) -> dict[str, Any]:
        assert runtime.execution_info is not None
        seen.append((runtime.execution_info, get_config()))
        assert get_runtime() is runtime  # one Runtime per attempt
        return {"log": ["first"]}

    def second(state: State, config: RunnableConfig) -> dict[str, Any]:
        info = get_runtime().execution_info
        assert info is not None
        seen.append((info, config))
        return {"log": ["second"]}

    graph = _chain(first, second).compile(checkpointer=InMemorySaver())
    run_id = uuid.uuid4()
    config: RunnableConfig = {"configurable": {"thread_id": "t-1"}, "run_id": run_id}
    before = time.time()
    graph.invoke({"log": []}, config)
    started = _checkpoint_ids(graph, config)
    assert [info.checkpoint_id for info, _ in seen] == [started[1], started[2]]
    for info, node_config in seen:
        assert info.checkpoint_ns == node_config["configurable"]["checkpoint_ns"]
        assert info.checkpoint_ns == f"{node_config['metadata']['langgraph_node']}:{info.task_id}"
        assert info.thread_id == "t-1"
        assert info.run_id == str(run_id)
        assert info.node_attempt == 1
        assert info.node_first_attempt_time is not None
        assert before <= info.node_first_attempt_time <= time.time()


def test_execution_info_without_checkpointer_or_run_id() -> None:
    seen: list[ExecutionInfo] = []

    def node(state: State, runtime: Runtime) -> dict[str, Any]:
        assert runtime.execution_info is not None
        seen.append(runtime.execution_info)
        return {"log": [1]}

    _chain(node).compile().invoke({"log": []})
    (info,) = seen
    assert (info.thread_id, info.run_id, info.node_attempt) == (None, None, 1)
    assert info.checkpoint_id and info.task_id and info.checkpoint_ns == f"node:{info.task_id}"


def test_node_attempt_counts_retries_from_one() -> None:
    attempts: list[tuple[int, float | None, str]] = []

    def flaky(state: State, runtime: Runtime) -> dict[str, Any]:
        info = runtime.execution_info
        assert info is not None
        attempts.append((info.node_attempt, info.node_first_attempt_time, info.task_id))
        if info.node_attempt < 3:
            raise ConnectionError("try again")
        return {"log": [info.node_attempt]}

    policy = RetryPolicy(initial_interval=0.001, jitter=False, max_attempts=3)
    graph = _chain(flaky, retry_policy=policy).compile()
    assert graph.invoke({"log": []}) == {"log": [3]}
    assert [attempt for attempt, _, _ in attempts] == [1, 2, 3]
    # One first-attempt time and one task, whatever the attempt.
    assert len({first for _, first, _ in attempts}) == 1
    assert len({task_id for _, _, task_id in attempts}) == 1


async def test_node_attempt_counts_retries_under_the_async_api() -> None:
    attempts: list[int] = []

    async def flaky(state: State, runtime: Runtime) -> dict[str, Any]:
        assert runtime.execution_info is not None
        attempts.append(runtime.execution_info.node_attempt)
        if len(attempts) < 2:
            raise ConnectionError("try again")
        await asyncio.sleep(0)
        return {"log": ["ok"]}

    policy = RetryPolicy(initial_interval=0.001, jitter=False)
    graph = _chain(flaky, retry_policy=policy).compile()
    assert await graph.ainvoke({"log": []}) == {"log": ["ok"]}
    assert attempts == [1, 2]


def test_entrypoint_runtime_and_task_calls_see_previous_and_execution_info() -> None:
    seen: list[tuple[str, Any, ExecutionInfo | None]] = []

    @task
    def double(value: int) -> int:
        runtime = get_runtime()
        seen.append(("task", runtime.previous, runtime.execution_info))
        return value * 2

    @entrypoint(checkpointer=InMemorySaver())
    def flow(value: int, runtime: Runtime) -> int:
        seen.append(("entrypoint", runtime.previous, runtime.execution_info))
        assert get_runtime().previous == runtime.previous
        return double(value).result()

    config: RunnableConfig = {"configurable": {"thread_id": "t-ep"}}
    assert flow.invoke(1, config) == 2
    assert flow.invoke(5, config) == 10
    assert [(kind, previous) for kind, previous, _ in seen] == [
        ("entrypoint", None),
        ("task", None),
        ("entrypoint", 2),
        ("task", 2),
    ]
    infos = [info for _, _, info in seen]
    assert all(info is not None and info.thread_id == "t-ep" for info in infos)
    assert infos[0] is not None and infos[1] is not None
    assert infos[0].checkpoint_id == infos[1].checkpoint_id  # the same step
    assert infos[0].task_id != infos[1].task_id


# -- the config a node gets ----------------------------------------------------------------------


def test_node_config_has_checkpoint_map_and_no_run_scoped_extras() -> None:
    seen: list[RunnableConfig] = []

    def node(state: State, config: RunnableConfig) -> dict[str, Any]:
        seen.append(config)
        return {"log": [1]}

    graph = _chain(node).compile(checkpointer=InMemorySaver())
    config: RunnableConfig = {
        "configurable": {"thread_id": "t-2", "user": "ann"},
        "metadata": {"origin": "test"},
        "run_id": uuid.uuid4(),
    }
    graph.invoke({"log": []}, config)
    (node_config,) = seen
    configurable = node_config["configurable"]
    assert configurable["checkpoint_id"] is None
    assert configurable["checkpoint_map"] == {"": _checkpoint_ids(graph, config)[1]}
    assert configurable["checkpoint_ns"].startswith("node:")
    assert configurable["user"] == "ann"
    assert node_config["metadata"]["thread_id"] == "t-2"
    assert node_config["metadata"]["origin"] == "test"
    assert "user" not in node_config["metadata"]  # only LangGraph's id keys are copied
    # LangGraph's node config has neither a run_id nor a recursion_limit nobody set.
    assert "run_id" not in node_config
    assert "recursion_limit" not in node_config


def test_node_config_keeps_a_recursion_limit_the_caller_set() -> None:
    seen: list[RunnableConfig] = []

    def node(state: State, config: RunnableConfig) -> dict[str, Any]:
        seen.append(config)
        return {"log": [1]}

    _chain(node).compile().invoke({"log": []}, {"recursion_limit": 30})
    _chain(node).compile().with_config(recursion_limit=40).invoke({"log": []})
    assert [config["recursion_limit"] for config in seen] == [30, 40]
    assert "metadata" in seen[0] and "thread_id" not in seen[0]["metadata"]


def test_a_default_recursion_limit_never_replaces_one_that_was_set() -> None:
    default = DefaultRecursionLimit(10007)
    assert merge_configs({"recursion_limit": 5}, {"recursion_limit": default}) == {
        "recursion_limit": 5
    }
    merged = merge_configs({"recursion_limit": default}, {"recursion_limit": 7})
    assert merged == {"recursion_limit": 7}
    assert type(merged["recursion_limit"]) is int


def test_subgraph_node_config_maps_each_graphs_checkpoint() -> None:
    seen: list[tuple[RunnableConfig, ExecutionInfo | None]] = []

    def inner(state: State, config: RunnableConfig, runtime: Runtime) -> dict[str, Any]:
        seen.append((config, runtime.execution_info))
        return {"log": ["inner"]}

    subgraph = _chain(inner).compile()
    builder = StateGraph(State)
    builder.add_node("outer", subgraph)
    builder.add_edge(START, "outer")
    graph = builder.compile(checkpointer=InMemorySaver())
    config: RunnableConfig = {
        "configurable": {"thread_id": "t-3"},
        "tags": ["mine"],
        "run_id": uuid.uuid4(),
    }
    graph.invoke({"log": []}, config)
    ((node_config, info),) = seen
    outer_ns, inner_ns = node_config["configurable"]["checkpoint_ns"].split("|")
    assert outer_ns.startswith("outer:") and inner_ns.startswith("inner:")
    checkpoint_map = node_config["configurable"]["checkpoint_map"]
    assert list(checkpoint_map) == ["", outer_ns]
    assert checkpoint_map[""] == _checkpoint_ids(graph, config)[1]
    assert info is not None and info.checkpoint_id == checkpoint_map[outer_ns]
    inner_history = graph.get_state_history(
        {"configurable": {"thread_id": "t-3", "checkpoint_ns": outer_ns}}
    )
    assert info.checkpoint_id in {s.config["configurable"]["checkpoint_id"] for s in inner_history}
    assert node_config["metadata"]["checkpoint_ns"] == outer_ns  # as LangGraph's ensure_config
    assert node_config["tags"] == ["mine"]  # the parent's tags once, not twice
    assert info.run_id is None  # LangGraph hands a subgraph no run_id
    assert info.thread_id == "t-3"
