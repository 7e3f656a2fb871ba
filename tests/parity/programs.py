"""Small graph programs whose observable behaviour must match LangGraph's.

The same definitions run under LangGraph (``record.py``, import root ``langgraph``, to write
``golden.json``) and under stepgraph (``test_parity.py``, import root ``stepgraph``). Each program
returns a JSON-able dict of what a user can observe: outputs, stream chunks, raised errors, and
the thread's history as ``(metadata source, step, next)``. Nothing in it depends on ids or clocks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import importlib
import json
import operator
import threading
import uuid
import warnings
from collections.abc import Callable
from types import SimpleNamespace
from typing import Annotated, Any, Literal, TypedDict

import pydantic

Observation = dict[str, Any]

# Every run commits each step before the next. Under "async", LangGraph 1.2.22's InMemorySaver
# may store a join barrier's set after the next step has already mutated it, so the recorded
# history would depend on thread timing (the join program showed it).
DURABILITY = "sync"


def load_api(root: str) -> SimpleNamespace:
    """The graph API under import root ``root`` ("langgraph" or "stepgraph")."""
    graph = importlib.import_module(f"{root}.graph")
    types = importlib.import_module(f"{root}.types")
    errors = importlib.import_module(f"{root}.errors")
    memory = importlib.import_module(f"{root}.checkpoint.memory")
    func = importlib.import_module(f"{root}.func")
    managed = importlib.import_module(f"{root}.managed")
    channels = importlib.import_module(f"{root}.channels")
    runtime = importlib.import_module(f"{root}.runtime")
    config = importlib.import_module(f"{root}.config")
    return SimpleNamespace(
        StateGraph=graph.StateGraph,
        START=graph.START,
        END=graph.END,
        Send=types.Send,
        Overwrite=types.Overwrite,
        Command=types.Command,
        StateUpdate=types.StateUpdate,
        interrupt=types.interrupt,
        GraphRecursionError=errors.GraphRecursionError,
        NodeInterrupt=errors.NodeInterrupt,
        GraphBubbleUp=errors.GraphBubbleUp,
        is_invalid_resume=errors.is_invalid_resume,
        InMemorySaver=memory.InMemorySaver,
        entrypoint=func.entrypoint,
        task=func.task,
        Runtime=runtime.Runtime,
        get_runtime=runtime.get_runtime,
        get_config=config.get_config,
        RetryPolicy=types.RetryPolicy,
        RemainingSteps=managed.RemainingSteps,
        IsLastStep=managed.IsLastStep,
        UntrackedValue=channels.UntrackedValue,
        AnyValue=channels.AnyValue,
    )


# -- observation helpers -------------------------------------------------------------------------


def jsonable(value: Any) -> Any:
    """Plain JSON: tuples become lists, other objects their class name (ids never leak in)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return f"<{type(value).__name__}>"


def new_thread(**configurable: Any) -> dict:
    return {"configurable": {"thread_id": str(uuid.uuid4()), **configurable}}


def history(graph: Any, config: dict) -> list[Any]:
    """(source, step, next) of each checkpoint of the thread, oldest first."""
    return jsonable(
        [
            (s.metadata["source"], s.metadata["step"], s.next)
            for s in reversed(list(graph.get_state_history(config)))
        ]
    )


def state(graph: Any, config: dict) -> Observation:
    snapshot = graph.get_state(config)
    return {
        "values": jsonable(snapshot.values),
        "next": jsonable(snapshot.next),
        "tasks": jsonable([(t.name, t.error is not None) for t in snapshot.tasks]),
    }


def streamed(graph: Any, input: Any, config: dict | None = None, **kwargs: Any) -> Observation:
    """Values and updates chunks of one streamed run on a new thread.

    Updates of tasks that ran in the same step come in completion order, which a thread pool
    does not fix, so each step's updates (the chunks between two values chunks) are sorted.
    """
    config = config or new_thread()
    values: list[Any] = []
    updates: list[Any] = []
    step: list[Any] = []
    for mode, chunk in graph.stream(
        input, config, stream_mode=["values", "updates"], durability=DURABILITY, **kwargs
    ):
        if mode == "updates":
            step.append(jsonable(chunk))
            continue
        updates.extend(sorted(step, key=json.dumps))
        step = []
        values.append(jsonable(chunk))
    updates.extend(sorted(step, key=json.dumps))
    return {"stream_values": values, "stream_updates": updates}


def raised(call: Callable[[], Any]) -> str | None:
    """The name of the exception ``call`` raised, or None."""
    try:
        call()
    except Exception as error:
        return type(error).__name__
    return None


def observe_run(graph: Any, input: Any, **kwargs: Any) -> Observation:
    """invoke on one thread (output, final state, history) and stream on another."""
    config = new_thread()
    observed = {"invoke": jsonable(graph.invoke(input, config, durability=DURABILITY, **kwargs))}
    observed.update(state(graph, config))
    observed["history"] = history(graph, config)
    observed.update(streamed(graph, input, **kwargs))
    return observed


# -- programs ------------------------------------------------------------------------------------


class Text(TypedDict):
    text: str


class Log(TypedDict):
    log: Annotated[list[str], operator.add]


class Reduced(TypedDict):
    log: Annotated[list[str], operator.add]
    total: Annotated[int, operator.add]
    last: str


class MapReduce(TypedDict):
    items: list[int]
    squares: Annotated[list[int], operator.add]
    total: int


class Routed(TypedDict):
    value: int
    route: list[str]


class Inner(TypedDict):
    question: str
    draft: str
    answer: str


class Question(TypedDict):
    question: str


class Answer(TypedDict):
    answer: str


def linear_chain(api: SimpleNamespace) -> Observation:
    builder = api.StateGraph(Text)
    builder.add_node("upper", lambda s: {"text": s["text"].upper()})
    builder.add_node("exclaim", lambda s: {"text": s["text"] + "!"})
    builder.add_node("wrap", lambda s: {"text": f"[{s['text']}]"})
    builder.add_edge(api.START, "upper")
    builder.add_edge("upper", "exclaim")
    builder.add_edge("exclaim", "wrap")
    builder.add_edge("wrap", api.END)
    graph = builder.compile(checkpointer=api.InMemorySaver())
    return observe_run(graph, {"text": "hi"})


def conditional_path_map(api: SimpleNamespace) -> Observation:
    def classify(state: Routed) -> str:
        return "large" if state["value"] > 10 else "small"

    builder = api.StateGraph(Routed)
    builder.add_node("check", lambda s: {"route": ["check"]})
    builder.add_node("halve", lambda s: {"value": s["value"] // 2, "route": [*s["route"], "halve"]})
    builder.add_node(
        "double", lambda s: {"value": s["value"] * 2, "route": [*s["route"], "double"]}
    )
    builder.add_edge(api.START, "check")
    builder.add_conditional_edges("check", classify, {"large": "halve", "small": "double"})
    builder.add_conditional_edges("halve", classify, {"large": "halve", "small": api.END})
    builder.add_edge("double", api.END)
    graph = builder.compile(checkpointer=api.InMemorySaver())
    return {
        "large": observe_run(graph, {"value": 50, "route": []}),
        "small": observe_run(graph, {"value": 3, "route": []}),
    }


def join(api: SimpleNamespace) -> Observation:
    builder = api.StateGraph(Log)
    builder.add_node("fetch", lambda s: {"log": ["fetch"]})
    builder.add_node("left", lambda s: {"log": ["left"]})
    builder.add_node("right", lambda s: {"log": ["right"]})
    builder.add_node("slow", lambda s: {"log": ["slow"]})
    builder.add_node("merge", lambda s: {"log": ["merge:" + "+".join(sorted(s["log"]))]})
    builder.add_edge(api.START, "fetch")
    builder.add_edge("fetch", "left")
    builder.add_edge("fetch", "right")
    builder.add_edge("right", "slow")
    # merge waits for both left and slow, which finish in different steps.
    builder.add_edge(["left", "slow"], "merge")
    builder.add_edge("merge", api.END)
    graph = builder.compile(checkpointer=api.InMemorySaver())
    return observe_run(graph, {"log": []})


def send_map_reduce(api: SimpleNamespace) -> Observation:
    def fan_out(state: MapReduce) -> list[Any]:
        return [api.Send("square", {"n": n}) for n in state["items"]]

    builder = api.StateGraph(MapReduce)
    builder.add_node("prepare", lambda s: {"items": [n + 1 for n in s["items"]]})
    builder.add_node("square", lambda arg: {"squares": [arg["n"] * arg["n"]]})
    builder.add_node("total", lambda s: {"total": sum(s["squares"])})
    builder.add_edge(api.START, "prepare")
    builder.add_conditional_edges("prepare", fan_out, ["square"])
    builder.add_edge("square", "total")
    builder.add_edge("total", api.END)
    graph = builder.compile(checkpointer=api.InMemorySaver())
    return observe_run(graph, {"items": [3, 1, 2, 0], "squares": [], "total": 0})


def reducers(api: SimpleNamespace) -> Observation:
    builder = api.StateGraph(Reduced)
    builder.add_node("one", lambda s: {"log": ["one"], "total": 1, "last": "one"})
    builder.add_node("two", lambda s: {"log": ["two", "2"], "total": 2})
    builder.add_node("three", lambda s: {"log": ["three"], "total": 3, "last": "three"})
    builder.add_edge(api.START, "one")
    builder.add_edge(api.START, "two")
    builder.add_edge(["one", "two"], "three")
    builder.add_edge("three", api.END)
    graph = builder.compile(checkpointer=api.InMemorySaver())
    return observe_run(graph, {"log": ["input"], "total": 10, "last": "input"})


def command_goto(api: SimpleNamespace) -> Observation:
    def decide(state: Routed) -> Any:
        target = "big" if state["value"] > 10 else "small"
        return api.Command(goto=target, update={"route": [*state["route"], "decide"]})

    decide.__annotations__["return"] = api.Command[Literal["big", "small"]]

    builder = api.StateGraph(Routed)
    builder.add_node("decide", decide)
    builder.add_node("big", lambda s: {"route": [*s["route"], "big"]})
    builder.add_node("small", lambda s: {"route": [*s["route"], "small"]})
    builder.add_edge(api.START, "decide")
    builder.add_edge("big", api.END)
    builder.add_edge("small", api.END)
    graph = builder.compile(checkpointer=api.InMemorySaver())
    return {
        "big": observe_run(graph, {"value": 11, "route": []}),
        "small": observe_run(graph, {"value": 1, "route": []}),
    }


def exception_resume(api: SimpleNamespace) -> Observation:
    failures = {"flaky": 1}
    steady_done = threading.Event()

    def flaky(state: Log) -> dict:
        if failures["flaky"]:
            failures["flaky"] -= 1
            # A failure cancels siblings still running: fail once steady has finished, so
            # that its writes are saved in every run (the timeout only guards against a hang).
            steady_done.wait(timeout=30)
            raise ValueError("flaky failed")
        return {"log": ["flaky"]}

    def steady(state: Log) -> dict:
        steady_done.set()
        return {"log": ["steady"]}

    builder = api.StateGraph(Log)
    builder.add_node("first", lambda s: {"log": ["first"]})
    builder.add_node("flaky", flaky)
    builder.add_node("steady", steady)
    builder.add_node("last", lambda s: {"log": ["last"]})
    builder.add_edge(api.START, "first")
    builder.add_edge("first", "flaky")
    builder.add_edge("first", "steady")
    builder.add_edge(["flaky", "steady"], "last")
    builder.add_edge("last", api.END)
    graph = builder.compile(checkpointer=api.InMemorySaver())
    config = new_thread()
    observed: Observation = {
        "error": raised(lambda: graph.invoke({"log": []}, config, durability=DURABILITY))
    }
    observed["after_error"] = state(graph, config)
    observed["history_after_error"] = history(graph, config)
    observed["resume"] = jsonable(graph.invoke(None, config, durability=DURABILITY))
    observed["after_resume"] = state(graph, config)
    observed["history"] = history(graph, config)
    return observed


def update_state_as_node(api: SimpleNamespace) -> Observation:
    builder = api.StateGraph(Log)
    for name in ("a", "b", "c"):
        builder.add_node(name, lambda s, name=name: {"log": [name]})
    builder.add_edge(api.START, "a")
    builder.add_edge("a", "b")
    builder.add_edge("b", "c")
    builder.add_edge("c", api.END)
    graph = builder.compile(checkpointer=api.InMemorySaver())
    config = new_thread()
    graph.invoke({"log": []}, config, durability=DURABILITY)
    observed: Observation = {}
    graph.update_state(config, {"log": ["edit-as-a"]}, as_node="a")
    observed["after_update_as_a"] = state(graph, config)
    observed["resume"] = jsonable(graph.invoke(None, config, durability=DURABILITY))
    graph.update_state(config, {"log": ["edit"]})
    observed["after_plain_update"] = state(graph, config)
    observed["history"] = history(graph, config)

    fresh = new_thread()
    graph.update_state(fresh, {"log": ["seed"]}, as_node="b")
    observed["fresh_thread_as_b"] = state(graph, fresh)
    observed["fresh_resume"] = jsonable(graph.invoke(None, fresh, durability=DURABILITY))
    observed["fresh_history"] = history(graph, fresh)
    return observed


def input_output_schemas(api: SimpleNamespace) -> Observation:
    builder = api.StateGraph(Inner, input_schema=Question, output_schema=Answer)
    builder.add_node("draft", lambda s: {"draft": s["question"] + "?"})
    builder.add_node("answer", lambda s: {"answer": s["draft"].upper()})
    builder.add_edge(api.START, "draft")
    builder.add_edge("draft", "answer")
    builder.add_edge("answer", api.END)
    graph = builder.compile(checkpointer=api.InMemorySaver())
    return observe_run(graph, {"question": "why"})


def interrupt_before(api: SimpleNamespace) -> Observation:
    builder = api.StateGraph(Log)
    for name in ("plan", "approve", "act"):
        builder.add_node(name, lambda s, name=name: {"log": [name]})
    builder.add_edge(api.START, "plan")
    builder.add_edge("plan", "approve")
    builder.add_edge("approve", "act")
    builder.add_edge("act", api.END)
    graph = builder.compile(checkpointer=api.InMemorySaver(), interrupt_before=["approve"])
    config = new_thread()
    observed: Observation = {
        "invoke": jsonable(graph.invoke({"log": []}, config, durability=DURABILITY))
    }
    observed["paused"] = state(graph, config)
    observed["resume"] = jsonable(graph.invoke(None, config, durability=DURABILITY))
    observed["after_resume"] = state(graph, config)
    observed["history"] = history(graph, config)
    observed.update(streamed(graph, {"log": []}))
    return observed


def recursion_limit(api: SimpleNamespace) -> Observation:
    builder = api.StateGraph(Log)
    builder.add_node("ping", lambda s: {"log": ["ping"]})
    builder.add_node("pong", lambda s: {"log": ["pong"]})
    builder.add_edge(api.START, "ping")
    builder.add_edge("ping", "pong")
    builder.add_edge("pong", "ping")
    graph = builder.compile(checkpointer=api.InMemorySaver())
    config = new_thread()
    observed: Observation = {
        "error": raised(
            lambda: graph.invoke(
                {"log": []}, {**config, "recursion_limit": 5}, durability=DURABILITY
            )
        ),
        "is_recursion_error": False,
    }
    try:
        graph.invoke({"log": []}, {**new_thread(), "recursion_limit": 3}, durability=DURABILITY)
    except api.GraphRecursionError as error:
        observed["is_recursion_error"] = isinstance(error, RecursionError)
    observed["after_error"] = state(graph, config)
    observed["history"] = history(graph, config)
    return observed


def async_api(api: SimpleNamespace) -> Observation:
    """Async nodes through ainvoke, astream, aget_state and aget_state_history, with a failure."""
    failures = {"check": 1}

    async def fetch(state: Log) -> dict:
        return {"log": ["fetch"]}

    async def check(state: Log) -> dict:
        if failures["check"]:
            failures["check"] -= 1
            raise ValueError("check failed")
        return {"log": ["check"]}

    async def store(state: Log) -> dict:
        return {"log": ["store:" + ",".join(state["log"])]}

    builder = api.StateGraph(Log)
    builder.add_node("fetch", fetch)
    builder.add_node("check", check)
    builder.add_node("store", store)
    builder.add_edge(api.START, "fetch")
    builder.add_edge("fetch", "check")
    builder.add_edge("check", "store")
    builder.add_edge("store", api.END)
    graph = builder.compile(checkpointer=api.InMemorySaver())

    async def snapshot(config: dict) -> Observation:
        state = await graph.aget_state(config)
        return {"values": jsonable(state.values), "next": jsonable(state.next)}

    async def run() -> Observation:
        config = new_thread()
        observed: Observation = {}
        try:
            await graph.ainvoke({"log": []}, config, durability=DURABILITY)
        except ValueError as error:
            observed["error"] = str(error)
        observed["after_error"] = await snapshot(config)
        observed["resume"] = jsonable(await graph.ainvoke(None, config, durability=DURABILITY))
        observed["after_resume"] = await snapshot(config)
        observed["history"] = jsonable(
            [
                (s.metadata["source"], s.metadata["step"], s.next)
                async for s in graph.aget_state_history(config)
            ][::-1]
        )
        observed["astream_updates"] = jsonable(
            [
                chunk
                async for chunk in graph.astream(
                    None, config, stream_mode="updates", durability=DURABILITY
                )
            ]
            + [
                chunk
                async for chunk in graph.astream(
                    {"log": ["again"]}, new_thread(), stream_mode="updates", durability=DURABILITY
                )
            ]
        )
        return observed

    return asyncio.run(run())


def command_goto_end(api: SimpleNamespace) -> Observation:
    """Command(goto=END) routes nowhere, as a conditional edge returning END does."""

    def route(state: Log) -> Any:
        return api.Command(update={"log": ["route"]}, goto=api.END)

    builder = api.StateGraph(Log)
    builder.add_node("route", route, destinations=(api.END,))
    builder.add_edge(api.START, "route")
    graph = builder.compile(checkpointer=api.InMemorySaver())
    return observe_run(graph, {"log": []})


def default_stream_mode(api: SimpleNamespace) -> Observation:
    """stream() without stream_mode: "updates" for a compiled StateGraph and an entrypoint."""
    builder = api.StateGraph(Log)
    builder.add_node("one", lambda s: {"log": ["one"]})
    builder.add_node("two", lambda s: {"log": ["two"]})
    builder.add_edge(api.START, "one")
    builder.add_edge("one", "two")
    graph = builder.compile()

    @api.task
    def double(x: int) -> int:
        return 2 * x

    @api.entrypoint()
    def workflow(x: int) -> int:
        return double(x).result() + 1

    return {
        "graph": jsonable(list(graph.stream({"log": []}))),
        "entrypoint": jsonable(list(workflow.stream(3))),
    }


def write_order(api: SimpleNamespace) -> Observation:
    """A reducer sees a step's writes by node name, then Send tasks in the order sent,
    whatever order the nodes were added or finished in."""

    def fan_out(state: Log) -> list[Any]:
        return [api.Send("worker", {"log": [f"w{i}"]}) for i in (3, 1, 2)]

    builder = api.StateGraph(Log)
    for name in ("zeta", "alpha", "mid"):
        builder.add_node(name, lambda s, name=name: {"log": [name]})
        builder.add_edge(api.START, name)
    builder.add_node("worker", lambda s: {"log": [s["log"][-1] + "!"]})
    builder.add_conditional_edges("mid", fan_out, ["worker"])
    builder.add_node("plain", lambda s: {"log": ["plain"]})
    builder.add_edge("mid", "plain")
    graph = builder.compile(checkpointer=api.InMemorySaver())
    return observe_run(graph, {"log": []})


def interrupt_beside_a_finished_task(api: SimpleNamespace) -> Observation:
    """A node interrupts while its sibling in the step finishes: the run's output and a last
    values chunk show the sibling's writes; resuming answers the interrupt."""

    def ask(state: Log) -> dict:
        return {"log": [f"ask={api.interrupt('ask?')}"]}

    builder = api.StateGraph(Log)
    builder.add_node("start", lambda s: {"log": ["start"]})
    builder.add_node("ask", ask)
    builder.add_node("plain", lambda s: {"log": ["plain"]})
    builder.add_edge(api.START, "start")
    builder.add_edge("start", "ask")
    builder.add_edge("start", "plain")
    graph = builder.compile(checkpointer=api.InMemorySaver())
    config = new_thread()

    def without_ids(output: Any) -> Any:
        return {k: v if k != "__interrupt__" else [i.value for i in v] for k, v in output.items()}

    first = graph.invoke({"log": []}, config, durability=DURABILITY)
    values = [
        without_ids(chunk)
        for chunk in graph.stream({"log": []}, new_thread(), stream_mode="values")
    ]
    resumed = graph.invoke(api.Command(resume="yes"), config, durability=DURABILITY)
    return {
        "invoke": jsonable(without_ids(first)),
        "stream_values": jsonable(values),
        "state": state(graph, config),
        "resumed": jsonable(resumed),
        "history": history(graph, config),
    }


@dataclasses.dataclass
class UserContext:
    user: str
    greeting: str = "hello"


def context_as_a_dict(api: SimpleNamespace) -> Observation:
    """context= given as a dict is made into the dataclass context_schema."""

    def greet(state: Text, runtime: Any) -> dict:
        return {"text": f"{runtime.context.greeting} {runtime.context.user}"}

    builder = api.StateGraph(Text, context_schema=UserContext)
    builder.add_node("greet", greet)
    builder.add_edge(api.START, "greet")
    graph = builder.compile()
    return {"invoke": jsonable(graph.invoke({"text": ""}, context={"user": "amy"}))}


def stream_details(api: SimpleNamespace) -> Observation:
    """output_keys as one string, debug events without a checkpointer, and the task events
    of an entrypoint's @task calls."""
    builder = api.StateGraph(Reduced)
    builder.add_node("add", lambda s: {"log": ["add"], "total": 2, "last": "add"})
    builder.add_edge(api.START, "add")
    graph = builder.compile()

    @api.task
    def double(x: int) -> int:
        return 2 * x

    @api.entrypoint()
    def workflow(x: int) -> int:
        return double(double(x).result()).result()

    def kinds(events: list[Any]) -> list[Any]:
        return [(event.get("type"), event.get("payload", event).get("name")) for event in events]

    start = {"log": [], "total": 0, "last": ""}
    return {
        "output_key": jsonable(graph.invoke(start, output_keys="total")),
        "debug_without_saver": jsonable(kinds(list(graph.stream(start, stream_mode="debug")))),
        "checkpoints_without_saver": jsonable(list(graph.stream(start, stream_mode="checkpoints"))),
        "entrypoint_tasks": jsonable(
            [
                (event["name"], "result" in event)
                for event in workflow.stream(1, stream_mode="tasks")
            ]
        ),
    }


def node_interrupt_and_subgraphs(api: SimpleNamespace) -> Observation:
    """A node raising NodeInterrupt pauses the run until the state lets it pass; the graphs a
    graph's nodes run, by get_subgraphs."""

    def guard(state: Reduced) -> dict:
        if state["total"] < 10:
            raise api.NodeInterrupt(f"total {state['total']} is too small")
        return {"log": ["passed"]}

    inner_builder = api.StateGraph(Reduced)
    inner_builder.add_node("guard", guard)
    inner_builder.add_edge(api.START, "guard")
    inner = inner_builder.compile()
    middle_builder = api.StateGraph(Reduced)
    middle_builder.add_node("inner", inner)
    middle_builder.add_edge(api.START, "inner")
    outer_builder = api.StateGraph(Reduced)
    outer_builder.add_node("middle", middle_builder.compile())
    outer_builder.add_node("plain", lambda s: {"log": ["plain"]})
    outer_builder.add_edge(api.START, "plain")
    outer_builder.add_edge("plain", "middle")
    graph = outer_builder.compile(checkpointer=api.InMemorySaver())

    config = new_thread()
    first = graph.invoke({"log": [], "total": 1, "last": ""}, config)
    graph.update_state(config, {"total": 20})
    resumed = graph.invoke(None, config)
    return {
        "first": jsonable({k: v for k, v in first.items() if k != "__interrupt__"}),
        "interrupts": [i.value for i in first["__interrupt__"]],
        "is_bubble_up": issubclass(api.NodeInterrupt, api.GraphBubbleUp),
        "resumed": jsonable(resumed),
        "subgraphs": [name for name, _ in graph.get_subgraphs()],
        "recursive": [name for name, _ in graph.get_subgraphs(recurse=True)],
        "by_namespace": [
            name for name, _ in graph.get_subgraphs(namespace="middle|inner", recurse=True)
        ],
    }


def bulk_update(api: SimpleNamespace) -> Observation:
    """bulk_update_state: each superstep of updates (as parallel nodes) makes one checkpoint."""
    builder = api.StateGraph(Reduced)
    builder.add_node("left", lambda s: {"log": ["left"], "total": 1})
    builder.add_node("right", lambda s: {"log": ["right"], "total": 10})
    builder.add_node("join", lambda s: {"log": ["join"], "last": "join"})
    builder.add_edge(api.START, "left")
    builder.add_edge(api.START, "right")
    builder.add_edge(["left", "right"], "join")
    graph = builder.compile(checkpointer=api.InMemorySaver())
    config = new_thread()
    graph.bulk_update_state(
        config,
        [
            [api.StateUpdate({"log": [], "total": 0, "last": ""}, "__start__")],
            [
                api.StateUpdate({"log": ["l"], "total": 1}, "left"),
                api.StateUpdate({"log": ["r"], "total": 10}, "right"),
            ],
        ],
    )
    observed = {"state": state(graph, config), "history": history(graph, config)}
    observed["resumed"] = jsonable(graph.invoke(None, config, durability=DURABILITY))
    observed["ambiguous"] = raised(
        lambda: graph.bulk_update_state(
            config, [[api.StateUpdate({"total": 1}), api.StateUpdate({"total": 2})]]
        )
    )
    return observed


def partial_resume(api: SimpleNamespace) -> Observation:
    """Two parallel interrupts, one answered by id: the live state asks only the other, which
    a plain resume value then answers; the step's record keeps both."""

    def ask(name: str) -> Callable[[Log], dict]:
        return lambda state: {"log": [f"{name}={api.interrupt(name + '?')}"]}

    builder = api.StateGraph(Log)
    for name in ("a", "b"):
        builder.add_node(name, ask(name))
        builder.add_edge(api.START, name)
    graph = builder.compile(checkpointer=api.InMemorySaver())
    config = new_thread()
    first = graph.invoke({"log": []}, config, durability=DURABILITY)
    ids = {i.value: i.id for i in first["__interrupt__"]}
    partial = graph.invoke(api.Command(resume={ids["a?"]: "A"}), config, durability=DURABILITY)
    live = graph.get_state(config)
    record = next(iter(graph.get_state_history(config)))
    done = graph.invoke(api.Command(resume="B"), config, durability=DURABILITY)
    return {
        "partial": jsonable(partial["log"]),
        "live_interrupts": [i.value for i in live.interrupts],
        "live_tasks": [(t.name, [i.value for i in t.interrupts]) for t in live.tasks],
        "record_tasks": [(t.name, [i.value for i in t.interrupts]) for t in record.tasks],
        "done": jsonable(done),
    }


def node_streams_a_subgraph(api: SimpleNamespace) -> Observation:
    """A node streams a graph itself while the root streams subgraphs: the node gets the
    chunks it asked for, the root's stream the subgraph's chunks of its own modes."""
    inner_builder = api.StateGraph(Log)
    inner_builder.add_node("s1", lambda s: {"log": ["s1"]})
    inner_builder.add_node("s2", lambda s: {"log": ["s2"]})
    inner_builder.add_edge(api.START, "s1")
    inner_builder.add_edge("s1", "s2")
    inner = inner_builder.compile()
    seen: list[Any] = []

    def node(state: Log) -> dict:
        chunks = list(inner.stream({"log": []}))
        seen.append(jsonable(chunks))
        return {"log": [f"{len(chunks)} chunks"]}

    builder = api.StateGraph(Log)
    builder.add_node("node", node)
    builder.add_edge(api.START, "node")
    graph = builder.compile()

    def run(**kwargs: Any) -> Any:
        return jsonable(
            [
                ([part.split(":")[0] for part in chunk[0]], *chunk[1:])
                for chunk in graph.stream({"log": []}, subgraphs=True, **kwargs)
            ]
        )

    return {
        "updates": run(),
        "values": run(stream_mode=["values"]),
        "node_saw": seen,
    }


def _ask(api: SimpleNamespace, name: str) -> Callable[[Log], dict]:
    return lambda state: {"log": [f"{name}={api.interrupt(name + '?')}"]}


def _chain(api: SimpleNamespace, *names: str, **compile_kwargs: Any) -> Any:
    """START -> names... -> END; a name starting with "ask" asks for its answer."""
    builder = api.StateGraph(Log)
    previous = api.START
    for name in names:
        action = _ask(api, name) if name.startswith("ask") else _say(name)
        builder.add_node(name, action)
        builder.add_edge(previous, name)
        previous = name
    return builder.compile(**compile_kwargs)


def _say(name: str) -> Callable[[Log], dict]:
    return lambda state: {"log": [name]}


def deferred_node_breakpoint(api: SimpleNamespace) -> Observation:
    """A deferred node waits for the longer branch: the checkpoint of the step that leaves
    nothing else to run names it next, so a breakpoint before it stops there."""
    builder = api.StateGraph(Log)
    for name in ("a1", "a2", "b"):
        builder.add_node(name, _say(name))
    builder.add_node("agg", _say("agg"), defer=True)
    builder.add_edge(api.START, "a1")
    builder.add_edge(api.START, "b")
    builder.add_edge("a1", "a2")
    builder.add_edge("a2", "agg")
    builder.add_edge("b", "agg")
    observed: Observation = {}
    for key in ("interrupt_before", "interrupt_after"):
        breakpoint = ["agg"] if key == "interrupt_before" else ["a2"]
        graph = builder.compile(checkpointer=api.InMemorySaver(), **{key: breakpoint})
        config = new_thread()
        first = graph.invoke({"log": []}, config, durability=DURABILITY)
        observed[key] = {
            "first": jsonable(first),
            "next": jsonable(graph.get_state(config).next),
            "resumed": jsonable(graph.invoke(None, config, durability=DURABILITY)),
            "history": history(graph, config),
        }
    return observed


def resume_after_update(api: SimpleNamespace) -> Observation:
    """An answer given when no interrupt is pending on the thread's checkpoint (an update
    came after the interrupt; a breakpoint stopped the run) goes to the next interrupt()."""
    graph = _chain(api, "pre", "ask", checkpointer=api.InMemorySaver())
    config = new_thread()
    graph.invoke({"log": []}, config, durability=DURABILITY)
    graph.update_state(config, {"log": ["edit"]})
    edited = graph.invoke(api.Command(resume="R"), config, durability=DURABILITY)
    stopped = _chain(api, "pre", "ask", checkpointer=api.InMemorySaver(), interrupt_before=["ask"])
    config = new_thread()
    graph_before = stopped.invoke({"log": []}, config, durability=DURABILITY)
    at_breakpoint = stopped.invoke(api.Command(resume="R"), config, durability=DURABILITY)
    twice = _chain(api, "ask1", "ask2", checkpointer=api.InMemorySaver())
    config = new_thread()
    twice.invoke({"log": []}, config, durability=DURABILITY)
    twice.update_state(config, {"log": ["edit"]})
    asked = twice.invoke(api.Command(resume="A"), config, durability=DURABILITY)
    answered = twice.invoke(api.Command(resume="B"), config, durability=DURABILITY)
    return {
        "after_update": jsonable(edited),
        "before_breakpoint": jsonable(graph_before),
        "at_breakpoint": jsonable(at_breakpoint),
        "history": history(stopped, config),
        "asked": jsonable(asked),
        "answered": jsonable(answered),
    }


def update_subgraph_state(api: SimpleNamespace) -> Observation:
    """update_state with a subgraph's config (a snapshot task's state) updates the subgraph,
    as its own nodes would; the parent's resume then runs the subgraph on from there."""
    builder = api.StateGraph(Log)
    builder.add_node("sub", _chain(api, "i1", "ask_i", "i2"))
    builder.add_node("o2", _say("o2"))
    builder.add_edge(api.START, "sub")
    builder.add_edge("sub", "o2")
    graph = builder.compile(checkpointer=api.InMemorySaver())
    observed: Observation = {}
    for as_node in (None, "ask_i", "i1"):
        config = new_thread()
        graph.invoke({"log": []}, config, durability=DURABILITY)
        inner = graph.get_state(config, subgraphs=True).tasks[0].state.config
        graph.update_state(inner, {"log": ["edited"]}, as_node=as_node)
        state = graph.get_state(config, subgraphs=True).tasks[0].state
        resumed = graph.invoke(api.Command(resume="Z"), config, durability=DURABILITY)
        observed[str(as_node)] = {
            "sub_values": jsonable(state.values),
            "sub_next": jsonable(state.next),
            "resumed": jsonable(resumed),
        }
    return observed


def clear_with_end(api: SimpleNamespace) -> Observation:
    """update_state(config, None, as_node=END) clears the pending tasks: the paused run does
    not go on."""
    graph = _chain(api, "a", "ask", "z", checkpointer=api.InMemorySaver())
    config = new_thread()
    graph.invoke({"log": []}, config, durability=DURABILITY)
    graph.update_state(config, None, as_node=api.END)
    state = graph.get_state(config)
    return {
        "values": jsonable(state.values),
        "next": jsonable(state.next),
        "source": state.metadata["source"],
        "history": history(graph, config),
        "resumed": jsonable(graph.invoke(None, config, durability=DURABILITY)),
        "with_values": raised(lambda: graph.update_state(config, {"log": ["x"]}, as_node=api.END)),
    }


def goto_without_edges(api: SimpleNamespace) -> Observation:
    """A node no edge leads to compiles; an unannotated Command(goto=...) reaches it."""
    builder = api.StateGraph(Log)
    builder.add_node("router", lambda state: api.Command(goto="hidden", update={"log": ["r"]}))
    builder.add_node("hidden", _say("hidden"))
    builder.add_node("never", _say("never"))
    builder.add_edge(api.START, "router")
    return observe_run(builder.compile(checkpointer=api.InMemorySaver()), {"log": []})


class Counted(TypedDict):
    log: Annotated[list[str], operator.add]
    x: int


def command_lists(api: SimpleNamespace) -> Observation:
    """A node may return a list mixing Commands and updates: each Command routes and updates,
    each other item updates; "updates" shows the items that updated."""
    returns = {
        "mixed": lambda s: [
            api.Command(update={"log": ["c"]}, goto="z"),
            {"log": ["d"]},
            api.Command(update={"x": 2}, goto="z"),
        ],
        "one_update": lambda s: [api.Command(goto="z"), None, api.Command(update={"log": ["e"]})],
        "no_update": lambda s: [api.Command(goto="z"), api.Command(goto="z")],
    }
    observed: Observation = {}
    for name, node in returns.items():
        builder = api.StateGraph(Counted)
        builder.add_node("r", node)
        builder.add_node("z", _say("z"))
        builder.add_edge(api.START, "r")
        observed[name] = observe_run(builder.compile(checkpointer=api.InMemorySaver()), {"log": []})
    return observed


def managed_values(api: SimpleNamespace) -> Observation:
    """RemainingSteps and IsLastStep: nodes read them, output, stream and checkpoints never
    show them, writes to them are ignored; a run without recursion_limit may take 10,007."""
    # The functional form: the annotations must be objects, not strings, in a local class.
    state = TypedDict(  # type: ignore[misc]  # noqa: UP013
        "Managed",
        {
            "log": Annotated[list, operator.add],
            "remaining": api.RemainingSteps,
            "last": api.IsLastStep,
        },
    )

    def node(name: str) -> Callable[[Any], dict]:
        return lambda s: {"log": [[name, s["remaining"], s["last"]]], "remaining": 99}

    builder = api.StateGraph(state)
    for name in ("a", "b", "c"):
        builder.add_node(name, node(name))
    builder.add_edge(api.START, "a")
    builder.add_edge("a", "b")
    builder.add_edge("b", "c")
    graph = builder.compile(checkpointer=api.InMemorySaver())
    limited = new_thread()
    limited["recursion_limit"] = 3
    observed = {"limited": raised(lambda: graph.invoke({"log": []}, limited))}
    observed["limited_state"] = jsonable(graph.get_state(limited).values)
    observed["run"] = observe_run(graph, {"log": [], "remaining": 5})
    count = api.StateGraph(Counted)
    count.add_node("tick", lambda s: {"x": s["x"] + 1})
    count.add_edge(api.START, "tick")
    count.add_conditional_edges("tick", lambda s: api.END if s["x"] >= 40 else "tick")
    observed["forty_steps"] = jsonable(count.compile().invoke({"log": [], "x": 0}))
    return observed


def _stream_shape(chunk: Any) -> Any:
    """A subgraphs stream chunk with namespaces as node names and interrupts as values."""
    namespace, *rest = chunk
    nodes = [part.split(":")[0] for part in namespace]

    def plain(value: Any) -> Any:
        if isinstance(value, dict) and "__interrupt__" in value:
            return {**value, "__interrupt__": [i.value for i in value["__interrupt__"]]}
        return value

    return [nodes, *[plain(item) for item in rest]]


def subgraph_pause_stream(api: SimpleNamespace) -> Observation:
    """A subgraph paused by a breakpoint is told of once, by the root's updates; one paused
    by interrupt() by the subgraph's chunks too."""
    inners = {
        "before": _chain(api, "i1", "i2", interrupt_before=["i2"]),
        "after": _chain(api, "i1", "i2", interrupt_after=["i1"]),
        "interrupt": _chain(api, "i1", "ask", "i2"),
    }
    observed: Observation = {}
    for name, inner in inners.items():
        builder = api.StateGraph(Log)
        builder.add_node("sub", inner)
        builder.add_edge(api.START, "sub")
        graph = builder.compile(checkpointer=api.InMemorySaver())
        for modes in ("updates", ["updates", "values"]):
            chunks = graph.stream({"log": []}, new_thread(), subgraphs=True, stream_mode=modes)
            observed[f"{name} {modes}"] = jsonable([_stream_shape(c) for c in chunks])
    return observed


@dataclasses.dataclass
class DataState:
    a: int
    b: str = "default"
    c: int | None = None


class ModelState(pydantic.BaseModel):
    a: int
    b: str = "default"
    c: int | None = None


def model_states(api: SimpleNamespace) -> Observation:
    """Dataclass and pydantic states: a dict input writes its own keys (validated as a whole,
    unknown keys left out); a returned object writes every field but one that is None by
    default and was left so."""
    observed: Observation = {}
    for schema in (DataState, ModelState):
        returns = {
            "dict": lambda s: {"a": s.a + 1},
            "object": lambda s, schema=schema: schema(a=5),
            "object_with_none": lambda s, schema=schema: schema(a=5, c=None),
        }
        inputs = {
            "dict": {"a": 1},
            "extra_key": {"a": 1, "zzz": 2},
            "object": schema(a=1),
            "missing_required": {"b": "x"},
        }
        for returned, node in returns.items():
            builder = api.StateGraph(schema)
            builder.add_node("n", node)
            builder.add_edge(api.START, "n")
            graph = builder.compile(checkpointer=api.InMemorySaver())
            for given, value in inputs.items():
                key = f"{schema.__name__} returns {returned}, input {given}"
                try:
                    observed[key] = observe_run(graph, value)
                except Exception as error:
                    observed[key] = type(error).__name__
    return observed


def task_reports(api: SimpleNamespace) -> Observation:
    """What tasks events and snapshots show of an entrypoint and its @task calls: the run's
    input, a call's ``{"__return__": value}``, a replayed call's start event, and the
    entrypoint's bare result in the history."""

    @api.task
    def add(x: int, y: int = 1) -> int:
        return x + y

    @api.entrypoint(checkpointer=api.InMemorySaver())
    def workflow(x: int, previous: Any = None) -> list[Any]:
        total = add(x, y=2).result()
        return [total, api.interrupt("more?"), previous]

    def events(chunks: Any) -> list[Any]:
        return jsonable(
            [
                (e["name"], "input", e["input"]) if "input" in e else (e["name"], e["result"])
                for e in chunks
            ]
        )

    config = new_thread()
    first = events(workflow.stream(1, config, stream_mode="tasks", durability=DURABILITY))
    resumed = events(
        workflow.stream(
            api.Command(resume="yes"), config, stream_mode="tasks", durability=DURABILITY
        )
    )
    return {
        "first": first,
        "resumed": resumed,
        "history_results": jsonable(
            [[t.result for t in s.tasks] for s in workflow.get_state_history(config)]
        ),
    }


def entrypoint_signatures(api: SimpleNamespace) -> Observation:
    """Which functions @entrypoint takes and what their parameters get: generators are refused,
    extra parameters keep their defaults, injected names are given whether keyword-only or
    not (``store`` is None without a store), and a mistyped ``config`` is not injected."""

    def gen(x: int) -> Any:
        yield x

    async def agen(x: int) -> Any:
        yield x

    def refused(func: Callable[..., Any]) -> str | None:
        return raised(lambda: api.entrypoint()(func))

    def extra(x: int, limit: int = 3, *, label: str = "n") -> list[Any]:
        return [x, limit, label]

    def injected(x, store, previous, *, writer):  # type: ignore[no-untyped-def]
        writer("w")
        return [x, store, previous]

    def mistyped(x: int, config: str = "default") -> list[Any]:
        return [x, config]

    def needs_two(x: int, y: int) -> int:
        return x + y

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mistyped_graph = api.entrypoint()(mistyped)
    return {
        "generator": refused(gen),
        "async_generator": refused(agen),
        "no_parameter": refused(lambda: 1),
        "extra": jsonable(api.entrypoint()(extra).invoke(1)),
        "injected": jsonable(
            list(api.entrypoint()(injected).stream(1, stream_mode=["custom", "values"]))
        ),
        "mistyped_config": jsonable(mistyped_graph.invoke(1)),
        "needs_two": raised(lambda: api.entrypoint()(needs_two).invoke(1)),
    }


def task_futures(api: SimpleNamespace) -> Observation:
    """A sync @task call's future works with concurrent.futures (as_completed, wait,
    exception, done callbacks), and an async task called in a sync run is a RuntimeError."""

    @api.task
    def square(x: int) -> int:
        return x * x

    @api.task
    def fails(x: int) -> int:
        raise ValueError(f"bad {x}")

    @api.task
    async def fetch(x: int) -> int:
        return x

    @api.entrypoint()
    def workflow(n: int) -> dict[str, Any]:
        futures = [square(i) for i in range(n)]
        called: list[int] = []
        futures[0].add_done_callback(lambda f: called.append(f.result()))
        done, not_done = concurrent.futures.wait(futures)
        failed = fails(n)
        return {
            "is_future": all(isinstance(f, concurrent.futures.Future) for f in futures),
            "as_completed": sorted(f.result() for f in concurrent.futures.as_completed(futures)),
            "wait": [len(done), len(not_done)],
            "exception": repr(failed.exception()),
            "states": [futures[0].done(), futures[0].running(), futures[0].cancelled()],
            "callback": called,
        }

    @api.entrypoint()
    def calls_async(x: int) -> int:
        return fetch(x).result()

    return {
        "futures": jsonable(workflow.invoke(3)),
        "async_in_sync": raised(lambda: calls_async.invoke(1)),
    }


def _part(part: Any) -> Any:
    """A v2 stream part as JSON: namespaces as node names, interrupts as values, objects of
    a state schema as their class name and fields, event payloads as their keys."""

    def plain(value: Any) -> Any:
        if isinstance(value, pydantic.BaseModel):
            return [type(value).__name__, jsonable(value.model_dump())]
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return [type(value).__name__, jsonable(dataclasses.asdict(value))]
        return jsonable(value)

    shaped = {key: part[key] for key in sorted(part)}
    shaped["ns"] = [segment.split(":")[0] for segment in part["ns"]]
    if "interrupts" in part:
        shaped["interrupts"] = [i.value for i in part["interrupts"]]
    if part["type"] in ("tasks", "debug", "checkpoints"):
        shaped["data"] = sorted(part["data"])
    else:
        shaped["data"] = plain(part["data"])
    return shaped


def stream_version_2(api: SimpleNamespace) -> Observation:
    """version="v2": every chunk a typed part (type, ns, data; values with interrupts apart),
    invoke a GraphOutput; states of a pydantic or dataclass schema as the schema's object."""
    inner = _chain(api, "i1", "ask_i")
    builder = api.StateGraph(Log)
    builder.add_node("sub", inner)
    builder.add_node("after", _say("after"))
    builder.add_edge(api.START, "sub")
    builder.add_edge("sub", "after")
    graph = builder.compile(checkpointer=api.InMemorySaver())
    observed: Observation = {}
    modes = ["values", "updates", "custom", "tasks", "checkpoints", "debug"]
    for subgraphs in (False, True):
        config = new_thread()
        parts = graph.stream(
            {"log": []}, config, stream_mode=modes, subgraphs=subgraphs, version="v2"
        )
        observed[f"parts subgraphs={subgraphs}"] = [_part(p) for p in parts]
        resumed = graph.stream(
            api.Command(resume="yes"), config, stream_mode="updates", version="v2"
        )
        observed[f"resumed subgraphs={subgraphs}"] = [_part(p) for p in resumed]
    config = new_thread()
    paused = graph.invoke({"log": []}, config, version="v2")
    observed["invoke paused"] = [
        type(paused).__name__,
        jsonable(paused.value),
        [i.value for i in paused.interrupts],
    ]
    done = graph.invoke(api.Command(resume="ok"), config, version="v2")
    observed["invoke done"] = [type(done).__name__, jsonable(done.value), list(done.interrupts)]
    updates = graph.invoke({"log": []}, new_thread(), stream_mode="updates", version="v2")
    observed["invoke updates"] = [_part(p) for p in updates]
    for schema in (ModelState, DataState):
        typed = api.StateGraph(schema)
        typed.add_node("n", lambda s: {"a": s.a + 1})
        typed.add_edge(api.START, "n")
        compiled = typed.compile(checkpointer=api.InMemorySaver())
        parts = compiled.stream(
            {"a": 1, "b": "x"},
            new_thread(),
            stream_mode=["values", "updates", "checkpoints"],
            version="v2",
        )
        observed[f"{schema.__name__} parts"] = [_part(p) for p in parts]
        output = compiled.invoke({"a": 1, "b": "x"}, new_thread(), version="v2")
        observed[f"{schema.__name__} invoke"] = _part(
            {"type": "values", "ns": (), "data": output.value}
        )
    return observed


def deferred_with_sends_and_updates(api: SimpleNamespace) -> Observation:
    """A deferred node fires in the step that triggers no other node, Sends pending or not,
    and after an update_state that leaves nothing else to run."""
    builder = api.StateGraph(Log)
    builder.add_node("a", _say("a"))
    builder.add_node("w", _say("w"))
    builder.add_node("x", _say("x"))
    builder.add_node("d", _say("d"), defer=True)
    builder.add_edge(api.START, "a")
    builder.add_conditional_edges("a", lambda s: [api.Send("w", s), "d"])
    builder.add_edge("w", "x")
    sends = observe_run(builder.compile(checkpointer=api.InMemorySaver()), {"log": []})
    builder = api.StateGraph(Log)
    for name in ("a", "b"):
        builder.add_node(name, _say(name))
    builder.add_node("d", _say("d"), defer=True)
    builder.add_edge(api.START, "a")
    builder.add_edge("a", "b")
    builder.add_edge("a", "d")
    graph = builder.compile(checkpointer=api.InMemorySaver(), interrupt_before=["b", "d"])
    config = new_thread()
    graph.invoke({"log": []}, config, durability=DURABILITY)
    graph.update_state(config, {"log": ["u"]}, as_node="b")
    after_update = jsonable(graph.get_state(config).next)
    resumed = jsonable(graph.invoke(None, config, durability=DURABILITY))
    kept = graph.invoke({"log": []}, new_thread(), interrupt_before=[], durability=DURABILITY)
    return {
        "sends": sends,
        "after_update": after_update,
        "resumed": resumed,
        "history": history(graph, config),
        "empty_breakpoints_keep_compiled": jsonable(kept),
    }


def task_takes_waiting_answer(api: SimpleNamespace) -> Observation:
    """A @task call asks twice; each bare resume answers the next question, and the call's
    earlier answers are kept across its pauses."""

    @api.task
    def ask_twice() -> list:
        return [api.interrupt("q1"), api.interrupt("q2")]

    @api.entrypoint(checkpointer=api.InMemorySaver())
    def flow(x: int) -> list:
        return ask_twice().result()

    def shown(output: Any) -> Any:
        if isinstance(output, dict) and "__interrupt__" in output:
            return {"asks": [i.value for i in output["__interrupt__"]]}
        return jsonable(output)

    config = new_thread()
    runs = [shown(flow.invoke(1, config))]
    for answer in ("r1", "r2", "r3"):
        runs.append(shown(flow.invoke(api.Command(resume=answer), config)))
    return {"runs": runs}


def resumed_streams_and_metadata(api: SimpleNamespace) -> Observation:
    """A resumed run first tells of the checkpoint it resumes (checkpoints, debug); an update
    that writes no state key streams None; a task's error in tasks events is the exception;
    checkpoint metadata keeps the runtime's keys first, leaves out None and the task's own
    langgraph_* keys (a subgraph's checkpoints)."""
    graph = _chain(api, "a", "ask1", "b", checkpointer=api.InMemorySaver())
    config = new_thread()
    graph.invoke({"log": []}, config, durability=DURABILITY)
    resumed = [
        [e["metadata"]["step"], e["next"], [[t["name"], len(t["interrupts"])] for t in e["tasks"]]]
        for e in graph.stream(api.Command(resume="y"), config, stream_mode="checkpoints")
    ]
    debug = [
        [e["type"], e["step"]]
        for e in graph.stream(None, config, stream_mode="debug", durability=DURABILITY)
    ]
    empty = api.StateGraph(Counted)
    empty.add_node("n", lambda s: {})
    empty.add_node("m", lambda s: {"unknown": 1})
    empty.add_node("c", lambda s: api.Command(update={"unknown": 1}))
    empty.add_edge(api.START, "n")
    empty.add_edge("n", "m")
    empty.add_edge("m", "c")
    updates = jsonable(list(empty.compile().stream({"log": []}, stream_mode="updates")))

    def boom(state: Log) -> dict:
        raise ValueError("boom")

    failing = api.StateGraph(Log)
    failing.add_node("boom", boom)
    failing.add_edge(api.START, "boom")
    errors = []
    try:
        for event in failing.compile().stream({"log": []}, stream_mode="tasks"):
            if "error" in event:
                errors.append(type(event["error"]).__name__)
    except ValueError:
        errors.append("raised")
    outer = api.StateGraph(Log)
    outer.add_node("sub", _chain(api, "i1"))
    outer.add_edge(api.START, "sub")
    compiled = outer.compile(checkpointer=api.InMemorySaver())
    config = new_thread(extra="kept", nothing=None)
    config["metadata"] = {"tag": "t", "none": None}
    compiled.invoke({"log": []}, config, durability=DURABILITY)
    inner = compiled.get_state(config, subgraphs=True)
    root_keys = [list(s.metadata) for s in compiled.get_state_history(config)]
    sub_history = []
    for snapshot in compiled.get_state_history(config):
        for task in snapshot.tasks:
            if task.state is not None:
                sub_history = [list(s.metadata) for s in compiled.get_state_history(task.state)]
    return {
        "resumed_checkpoints": jsonable(resumed),
        "debug_on_finished": debug,
        "updates": updates,
        "task_errors": errors,
        "root_metadata_keys": root_keys,
        "sub_metadata_keys": sub_history,
        "next": jsonable(inner.next),
    }


def overwrite(api: SimpleNamespace) -> Observation:
    """Overwrite replaces a reduced key's value (also as {"__overwrite__": value}); it wins
    over the step's other writes to the key; two in one step are an error."""
    cases = {
        "alone": [("a", lambda s: {"log": api.Overwrite(["b"])})],
        "dict_form": [("a", lambda s: {"log": {"__overwrite__": ["d"]}})],
        "json_form": [("a", lambda s: {"log": {"value": ["j"], "type": "__overwrite__"}})],
        "beside_a_write": [
            ("a", lambda s: {"log": api.Overwrite(["b"])}),
            ("z", lambda s: {"log": ["z"]}),
        ],
        "two": [
            ("a", lambda s: {"log": api.Overwrite(["b"])}),
            ("z", lambda s: {"log": api.Overwrite(["z"])}),
        ],
    }
    observed: Observation = {}
    for name, nodes in cases.items():
        builder = api.StateGraph(Log)
        for node, action in nodes:
            builder.add_node(node, action)
            builder.add_edge(api.START, node)
        graph = builder.compile(checkpointer=api.InMemorySaver())
        try:
            observed[name] = observe_run(graph, {"log": ["x"]})
        except Exception as error:
            observed[name] = type(error).__name__
    return observed


class Decision(pydantic.BaseModel):
    ok: bool
    note: str = ""


def response_schemas(api: SimpleNamespace) -> Observation:
    """interrupt(response_schema=...): a type is surfaced as its JSON Schema and validates the
    answer (an invalid one fails the node, marked so); a dict schema is only surfaced."""
    observed: Observation = {}
    cases: dict[str, tuple[Any, Any, Any]] = {
        "model": (Decision, [1, 2], {"ok": True}),
        "dict": ({"type": "string"}, [1, 2], "s"),
        "int": (int, "x", "7"),
    }
    for name, (schema, bad, good) in cases.items():

        def ask(state: Log, schema: Any = schema) -> dict:
            return {"log": [repr(api.interrupt("q", response_schema=schema))]}

        builder = api.StateGraph(Log)
        builder.add_node("ask", ask)
        builder.add_edge(api.START, "ask")
        graph = builder.compile(checkpointer=api.InMemorySaver())
        config = new_thread()
        asked = graph.invoke({"log": []}, config, durability=DURABILITY)["__interrupt__"][0]
        events = [
            sorted(event["interrupts"][0])
            for event in graph.stream({"log": []}, new_thread(), stream_mode="tasks")
            if event.get("interrupts")
        ]
        try:
            after_bad: Any = jsonable(graph.invoke(api.Command(resume=bad), config))
        except Exception as error:
            after_bad = [type(error).__name__, api.is_invalid_resume(error)]
        observed[name] = {
            "schema": jsonable(asked.response_schema),
            "event_keys": events,
            "bad": after_bad,
            "good": jsonable(graph.invoke(api.Command(resume=good), config)),
        }
    return observed


def node_runtime_and_config(api: SimpleNamespace) -> Observation:
    """What a node sees of its runtime (``execution_info``, retries) and config (keys,
    ``checkpoint_map``), in a graph, a subgraph and an entrypoint with a ``@task``."""
    seen: dict[str, Any] = {}

    def describe(config: dict, runtime: Any) -> Observation:
        info = runtime.execution_info
        configurable = config["configurable"]
        checkpoint_map = configurable["checkpoint_map"]
        return {
            "config_keys": sorted(k for k in config if k != "callbacks"),
            "configurable_keys": sorted(k for k in configurable if not k.startswith("__")),
            "metadata": jsonable(
                {
                    # namespaces hold task ids: their node names are kept
                    k: v.split(":")[0] if k == "checkpoint_ns" else v
                    for k, v in config["metadata"].items()
                    if k != "langgraph_checkpoint_ns"
                }
            ),
            "tags": jsonable(config.get("tags")),
            "recursion_limit": config.get("recursion_limit"),
            "checkpoint_id": configurable["checkpoint_id"],
            "map_size": len(checkpoint_map),
            "map_names_step_checkpoint": checkpoint_map[
                configurable["checkpoint_ns"].rpartition("|")[0]
            ]
            == info.checkpoint_id,
            "ns_matches": info.checkpoint_ns == configurable["checkpoint_ns"],
            "task_in_ns": configurable["checkpoint_ns"].endswith(f":{info.task_id}"),
            "thread_id": info.thread_id,
            "run_id": info.run_id,
            "attempt": info.node_attempt,
            "first_attempt_time": type(info.node_first_attempt_time).__name__,
            "store": runtime.store,
            "server_info": runtime.server_info,
            "drain_requested": runtime.drain_requested,
            "previous": jsonable(runtime.previous),
        }

    def flaky(state: Log, runtime: Any) -> dict:
        seen.setdefault("flaky", []).append(describe(api.get_config(), runtime))
        if runtime.execution_info.node_attempt < 3:
            raise ConnectionError("try again")
        return {"log": ["flaky"]}

    def inner(state: Log, runtime: Any) -> dict:
        seen["inner"] = describe(api.get_config(), runtime)
        return {"log": ["inner"]}

    sub = api.StateGraph(Log)
    sub.add_node("inner", inner)
    sub.add_edge(api.START, "inner")
    builder = api.StateGraph(Log)
    builder.add_node(
        "flaky", flaky, retry_policy=api.RetryPolicy(initial_interval=0.001, jitter=False)
    )
    builder.add_node("outer", sub.compile())
    builder.add_edge(api.START, "flaky")
    builder.add_edge("flaky", "outer")
    graph = builder.compile(checkpointer=api.InMemorySaver())
    config = new_thread(user="ann")
    config.update(run_id=uuid.UUID(int=7), tags=["mine"], metadata={"m": 1}, recursion_limit=40)
    thread_id = config["configurable"]["thread_id"]
    output = graph.invoke({"log": []}, config, durability=DURABILITY)
    seen["subgraph"] = seen.pop("inner")
    bare = api.StateGraph(Log)
    bare.add_node("inner", inner)
    bare.add_edge(api.START, "inner")
    bare.compile().invoke({"log": []})  # no checkpointer, thread, run_id or limit
    seen["bare"] = seen.pop("inner")

    @api.task
    def double(value: int) -> int:
        runtime = api.get_runtime()
        seen.setdefault("task", []).append(
            {"previous": runtime.previous, "attempt": runtime.execution_info.node_attempt}
        )
        return value * 2

    @api.entrypoint(checkpointer=api.InMemorySaver())
    def flow(value: int, runtime: Any) -> int:
        seen.setdefault("entrypoint", []).append(describe(api.get_config(), runtime))
        return double(value).result()

    flow_config = new_thread()
    flow_thread = flow_config["configurable"]["thread_id"]
    results = [flow.invoke(value, flow_config) for value in (1, 5)]

    def no_ids(value: Any) -> Any:
        return json.loads(
            json.dumps(jsonable(value)).replace(thread_id, "<thread>").replace(flow_thread, "<t>")
        )

    return {"output": jsonable(output), "results": results, "seen": no_ids(seen)}


# -- messages (stepgraph.graph.message needs langchain-core, present under both roots) ----------


def _message_module(api: SimpleNamespace) -> Any:
    root = api.StateGraph.__module__.split(".")[0]
    return importlib.import_module(f"{root}.graph.message")


def _shown_id(message_id: Any) -> Any:
    """Ids the program set are shown; generated uuid4 ids only as such."""
    try:
        return "<uuid>" if uuid.UUID(message_id).version == 4 else message_id
    except (TypeError, ValueError):
        return message_id


def shown_messages(value: Any) -> Any:
    """``value`` with every LangChain message as [class, content, id, tool_calls, extra]."""
    from langchain_core.messages import BaseMessage

    if isinstance(value, BaseMessage):
        extra = {"tool_call_id": value.tool_call_id} if hasattr(value, "tool_call_id") else {}
        return [
            type(value).__name__,
            jsonable(value.content),
            _shown_id(value.id),
            jsonable(getattr(value, "tool_calls", None)),
            jsonable(extra),
        ]
    if isinstance(value, dict):
        return {str(k): shown_messages(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [shown_messages(v) for v in value]
    return jsonable(value)


def message_state(graph: Any, config: dict) -> Observation:
    snapshot = graph.get_state(config)
    return {"values": shown_messages(snapshot.values), "next": jsonable(snapshot.next)}


def message_stream(graph: Any, input: Any) -> list[Any]:
    """The values and updates chunks of a run on a new thread (one task per step here)."""
    chunks = graph.stream(
        input, new_thread(), stream_mode=["values", "updates"], durability=DURABILITY
    )
    return [[mode, shown_messages(chunk)] for mode, chunk in chunks]


def messages(api: SimpleNamespace) -> Observation:
    """add_messages and MessagesState in graphs: ids, replacement, removal, coercion, the
    OpenAI format, a subclass with more keys, and a resume after a failing node."""
    from langchain_core.messages import AIMessage, HumanMessage, RemoveMessage, ToolMessage

    msg = _message_module(api)
    observed: Observation = {}

    class Chat(msg.MessagesState):
        turns: int

    def reply(state: Any) -> dict:
        last = state["messages"][-1]
        return {"messages": ("ai", f"re: {last.content}"), "turns": len(state["messages"])}

    builder = api.StateGraph(Chat)
    builder.add_node("reply", reply)
    builder.add_edge(api.START, "reply")
    graph = builder.compile(checkpointer=api.InMemorySaver())

    def run(input: Any, config: dict) -> Any:
        try:
            return shown_messages(graph.invoke(input, config, durability=DURABILITY))
        except Exception as error:
            return type(error).__name__

    observed["coerced"] = message_stream(
        graph, {"messages": [("user", "hi"), {"role": "system", "content": "s"}]}
    )
    config = new_thread()
    observed["turns"] = [
        run({"messages": "first"}, config),
        run({"messages": HumanMessage("second", id="h2")}, config),
        run({"messages": [HumanMessage("second, edited", id="h2")]}, config),
        run({"messages": [RemoveMessage(id="h2"), AIMessage("note", id="n")]}, config),
        run({"messages": [RemoveMessage(id="missing")]}, config),
        run({"messages": [RemoveMessage(id=msg.REMOVE_ALL_MESSAGES), ("user", "fresh")]}, config),
    ]
    observed["state"] = message_state(graph, config)
    observed["history"] = history(graph, config)

    # The functional form: a class body annotation would be a string naming a local variable.
    Formatted = TypedDict(  # noqa: UP013
        "Formatted", {"messages": Annotated[list, msg.add_messages(format="langchain-openai")]}
    )
    formatted = api.StateGraph(Formatted)
    formatted.add_node(
        "tool", lambda s: {"messages": [ToolMessage("42", tool_call_id="c1", id="t")]}
    )
    formatted.add_edge(api.START, "tool")
    tool_call = {"name": "calc", "args": {"x": 6}, "id": "c1"}
    observed["formatted"] = shown_messages(
        formatted.compile(checkpointer=api.InMemorySaver()).invoke(
            {"messages": [AIMessage("", id="a", tool_calls=[tool_call])]},
            new_thread(),
            durability=DURABILITY,
        )
    )

    failures = {"flaky": 1}
    pruned = threading.Event()

    def prune(state: Any) -> dict:
        pruned.set()
        return {"messages": [RemoveMessage(id="greeting"), AIMessage("pruned", id="p")]}

    def flaky(state: Any) -> dict:
        pruned.wait(timeout=30)  # fail only once the sibling's writes are saved
        if failures["flaky"]:
            failures["flaky"] -= 1
            raise ValueError("flaky failed")
        return {"messages": [ToolMessage("ok", tool_call_id="c", id="t")]}

    resumed = api.StateGraph(msg.MessagesState)
    resumed.add_node("greet", lambda s: {"messages": [AIMessage("hello", id="greeting")]})
    resumed.add_node("prune", prune)
    resumed.add_node("flaky", flaky)
    resumed.add_edge(api.START, "greet")
    resumed.add_edge("greet", "prune")
    resumed.add_edge("greet", "flaky")
    graph = resumed.compile(checkpointer=api.InMemorySaver())
    config = new_thread()
    observed["error"] = raised(
        lambda: graph.invoke({"messages": [("user", "hi")]}, config, durability=DURABILITY)
    )
    observed["after_error"] = message_state(graph, config)
    observed["resume"] = shown_messages(graph.invoke(None, config, durability=DURABILITY))
    observed["resumed_history"] = history(graph, config)
    return observed


def resumed_step_order(api: SimpleNamespace) -> Observation:
    """A resumed step streams the saved updates of its tasks that finished (marked cached)
    before running the others; a run plans a step's nodes by name, a snapshot lists them in
    the graph's order."""
    builder = api.StateGraph(Counted)
    builder.add_node("zed", _ask(api, "zed"))
    builder.add_node("plain", lambda s: {"log": ["plain"], "x": 1})
    builder.add_node("empty", lambda s: None)
    for name in ("zed", "plain", "empty"):
        builder.add_edge(api.START, name)
    graph = builder.compile(checkpointer=api.InMemorySaver())
    observed: Observation = {}
    for modes in ("updates", ["updates", "values"], ["updates", "tasks"]):
        config = new_thread()
        first = [  # start events only: results come in completion order
            event["name"]
            for event in graph.stream({"log": []}, config, stream_mode="tasks")
            if "result" not in event
        ]
        resumed = []
        for chunk in graph.stream(api.Command(resume="y"), config, stream_mode=modes):
            mode, payload = chunk if isinstance(chunk, tuple) else ("updates", chunk)
            if mode == "tasks":
                resumed.append(["tasks", payload["name"], "result" in payload])
            else:
                resumed.append([mode, jsonable(payload)])
        observed[str(modes)] = {"first": first, "resumed": resumed}
    config = new_thread()
    graph.invoke({"log": []}, config, durability=DURABILITY)
    observed["next"] = jsonable(graph.get_state(config).next)
    observed["history"] = history(graph, config)
    return observed


def untracked_and_any_values(api: SimpleNamespace) -> Observation:
    """UntrackedValue: read within the run, never saved (a resumed run starts without it);
    AnyValue: several writes in a step keep one, a step that writes nothing empties it."""
    state = TypedDict(  # type: ignore[misc]  # noqa: UP013
        "Channels",
        {
            "log": Annotated[list, operator.add],
            "scratch": Annotated[str, api.UntrackedValue],
            "any": Annotated[str, api.AnyValue],
        },
    )

    def first(s: Any) -> dict:
        return {"scratch": "s1", "any": "a1", "log": ["first"]}

    def second(s: Any) -> dict:
        return {"log": [f"second saw {s.get('scratch')} {s.get('any')}"], "any": "a2"}

    def twin(s: Any) -> dict:
        return {"any": "a2"}

    def ask(s: Any) -> dict:
        answer = api.interrupt("q")
        return {"log": [f"ask saw {s.get('scratch')} {s.get('any')} {answer}"]}

    builder = api.StateGraph(state)
    for name, action in (("first", first), ("second", second), ("twin", twin), ("ask", ask)):
        builder.add_node(name, action)
    builder.add_edge(api.START, "first")
    builder.add_edge("first", "second")
    builder.add_edge("first", "twin")
    builder.add_edge(["second", "twin"], "ask")
    graph = builder.compile(checkpointer=api.InMemorySaver())
    config = new_thread()
    paused = graph.invoke({"log": []}, config, durability=DURABILITY)
    values = graph.get_state(config).values
    resumed = graph.invoke(api.Command(resume="y"), config, durability=DURABILITY)
    return {
        "paused": jsonable(paused),
        "values": jsonable(values),
        "resumed": jsonable(resumed),
        "history": history(graph, config),
    }


def output_when_nothing_changed(api: SimpleNamespace) -> Observation:
    """invoke returns None for a new run that changed no output key (its stream has no values
    chunk); a resumed run returns the state."""
    observed: Observation = {}
    for name, schema, given in (
        ("reducer_empty_input", Log, {}),
        ("reducer_unknown_key", Log, {"unknown": 1}),
        ("plain_empty_input", Counted, {}),
        ("reducer_written", Log, {"log": []}),
    ):
        builder = api.StateGraph(schema)
        builder.add_node("n", lambda s: None)
        builder.add_edge(api.START, "n")
        graph = builder.compile(checkpointer=api.InMemorySaver())
        config = new_thread()
        observed[name] = {
            "invoke": jsonable(graph.invoke(given, config, durability=DURABILITY)),
            "resumed": jsonable(graph.invoke(None, config, durability=DURABILITY)),
            "values_chunks": jsonable(
                list(graph.stream(given, new_thread(), stream_mode="values"))
            ),
        }
    return observed


def graph_on_another_thread(api: SimpleNamespace) -> Observation:
    """A node runs a graph with a config naming its own thread: a run of its own there (root
    namespace, the graph's own checkpointer); without that config, a subgraph of the node."""
    observed: Observation = {}
    for own_saver, own_thread in ((True, False), (True, True), (False, True)):
        saver = api.InMemorySaver()
        inner_builder = api.StateGraph(Counted)
        inner_builder.add_node("i", lambda s: {"x": s["x"] + 1})
        inner_builder.add_edge(api.START, "i")
        inner = inner_builder.compile(checkpointer=saver if own_saver else None)
        inner_thread = str(uuid.uuid4())

        def node(
            s: Any, inner: Any = inner, own_thread: bool = own_thread, thread: str = inner_thread
        ) -> dict:
            config = {"configurable": {"thread_id": thread}} if own_thread else None
            return {"x": inner.invoke(s, config)["x"]}

        builder = api.StateGraph(Counted)
        builder.add_node("n", node)
        builder.add_edge(api.START, "n")
        graph = builder.compile(checkpointer=saver)
        outer_thread = new_thread()
        output = graph.invoke({"x": 1, "log": []}, outer_thread, durability=DURABILITY)
        outer_id = outer_thread["configurable"]["thread_id"]
        where = sorted(
            {
                (
                    "outer" if t.config["configurable"]["thread_id"] == outer_id else "inner",
                    t.config["configurable"]["checkpoint_ns"].split(":")[0],
                )
                for t in saver.list(None)
            }
        )
        observed[f"own_saver={own_saver} own_thread={own_thread}"] = {
            "output": jsonable(output),
            "saved_in": jsonable(where),
        }
    return observed


class Noted(TypedDict):
    log: Annotated[list, operator.add]
    note: str


def join_after_update(api: SimpleNamespace) -> Observation:
    """An update made while a join's node waits (a breakpoint, an interrupt, a failure) leaves
    it due; a debug checkpoint event names where a subgraph task keeps its state."""
    observed: Observation = {}
    for pause in ("breakpoint", "failure"):
        attempts: list[int] = []

        def review(state: Noted, attempts: list[int] = attempts, pause: str = pause) -> dict:
            attempts.append(1)
            if len(attempts) == 1 and state.get("note") is None and pause == "failure":
                raise ValueError("needs a note")
            return {"log": [f"review note={state.get('note')}"]}

        builder = api.StateGraph(Noted)
        builder.add_node("a", _say("a"))
        builder.add_node("b", _say("b"))
        builder.add_node("review", review)
        builder.add_edge(api.START, "a")
        builder.add_edge(api.START, "b")
        builder.add_edge(["a", "b"], "review")
        breakpoints = ["review"] if pause == "breakpoint" else []
        graph = builder.compile(checkpointer=api.InMemorySaver(), interrupt_before=breakpoints)
        config = new_thread()
        first = raised(
            lambda graph=graph, config=config: graph.invoke(
                {"log": []}, config, durability=DURABILITY
            )
        )
        graph.update_state(config, {"note": "fixed"}, as_node="a")
        observed[pause] = {
            "first": first,
            "next": jsonable(graph.get_state(config).next),
            "resumed": jsonable(graph.invoke(None, config, durability=DURABILITY)),
            "history": history(graph, config),
        }
    outer = api.StateGraph(Log)
    outer.add_node("sub", _chain(api, "x", "y"))
    outer.add_edge(api.START, "sub")
    compiled = outer.compile(checkpointer=api.InMemorySaver())
    observed["debug_task_states"] = [
        [t["name"], None if t["state"] is None else sorted(t["state"]["configurable"])]
        for event in compiled.stream({"log": []}, new_thread(), stream_mode="debug")
        if event["type"] == "checkpoint"
        for t in event["payload"]["tasks"]
    ]
    return observed


PROGRAMS: dict[str, Callable[[SimpleNamespace], Observation]] = {
    program.__name__: program
    for program in (
        linear_chain,
        conditional_path_map,
        join,
        send_map_reduce,
        reducers,
        command_goto,
        exception_resume,
        update_state_as_node,
        input_output_schemas,
        interrupt_before,
        recursion_limit,
        async_api,
        command_goto_end,
        default_stream_mode,
        write_order,
        interrupt_beside_a_finished_task,
        context_as_a_dict,
        stream_details,
        node_interrupt_and_subgraphs,
        bulk_update,
        partial_resume,
        node_streams_a_subgraph,
        deferred_node_breakpoint,
        resume_after_update,
        update_subgraph_state,
        clear_with_end,
        goto_without_edges,
        command_lists,
        managed_values,
        subgraph_pause_stream,
        model_states,
        task_reports,
        entrypoint_signatures,
        task_futures,
        stream_version_2,
        deferred_with_sends_and_updates,
        task_takes_waiting_answer,
        resumed_streams_and_metadata,
        overwrite,
        response_schemas,
        node_runtime_and_config,
        messages,
        resumed_step_order,
        untracked_and_any_values,
        output_when_nothing_changed,
        graph_on_another_thread,
        join_after_update,
    )
}


def observe(root: str, name: str) -> Observation:
    """Run program ``name`` under import root ``root``; a crash is itself an observation."""
    try:
        return PROGRAMS[name](load_api(root))
    except Exception as error:
        return {"crashed": f"{type(error).__name__}: {error}"}
