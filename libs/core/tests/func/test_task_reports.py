"""What tasks/debug events and state snapshots show of an entrypoint and its ``@task`` calls
(LangGraph's forms)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from stepgraph.checkpoint.memory import InMemorySaver
from stepgraph.func import entrypoint, task
from stepgraph.types import Command, interrupt


def thread() -> dict[str, Any]:
    return {"configurable": {"thread_id": str(uuid.uuid4())}}


def _events(events: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [
        (e["name"], "input", e["input"]) if "input" in e else (e["name"], "result", e["result"])
        for e in events
    ]


def test_task_events_show_the_input_and_the_call_results() -> None:
    @task
    def add(x: int, y: int = 1) -> int:
        return x + y

    @entrypoint(checkpointer=InMemorySaver())
    def workflow(x: int, previous: Any = None) -> list[Any]:
        total = add(x, y=2).result()
        return [total, interrupt("more?"), previous]

    config = thread()
    first = list(workflow.stream(1, config, stream_mode="tasks"))
    assert _events(first) == [
        ("workflow", "input", 1),  # the run's input, not the entrypoint's internal pair
        ("add", "input", ((1,), {"y": 2})),
        ("add", "result", {"__return__": 3}),
        ("workflow", "result", {}),
    ]
    # Resumed, the call is replayed from its saved result: a start event but no result event.
    second = list(workflow.stream(Command(resume="yes"), config, stream_mode="tasks"))
    assert _events(second) == [
        ("workflow", "input", 1),
        ("add", "input", ((1,), {"y": 2})),
        ("workflow", "result", {"__end__": [3, "yes", None]}),
    ]
    debug = [e["payload"] for e in workflow.stream(5, thread(), stream_mode="debug")]
    assert ("add", "result", {"__return__": 7}) in _events(
        [p for p in debug if p.get("name") == "add"]
    )


def test_snapshots_show_the_entrypoint_result_bare() -> None:
    @entrypoint(checkpointer=InMemorySaver())
    def workflow(x: int) -> int:
        if x < 0:
            raise ValueError("negative")
        return x * 2

    config = thread()
    workflow.invoke(1, config)
    results = [[t.result for t in s.tasks] for s in workflow.get_state_history(config)]
    assert results == [[], [2]]  # newest first: done, then the input with the step it ran

    config = thread()
    with pytest.raises(ValueError, match="negative"):
        workflow.invoke(-1, config)
    [failed] = workflow.get_state(config).tasks
    assert (failed.result, failed.error) == (None, "ValueError('negative')")
