"""``stepgraph.runtime``'s classes have LangGraph 1.2.22's fields and helpers."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from stepgraph.runtime import ExecutionInfo, RunControl, Runtime, ServerInfo, task_runtime

# -- Runtime as a class --------------------------------------------------------------------------


def test_runtime_is_a_frozen_keyword_only_dataclass_with_langgraphs_fields() -> None:
    assert [f.name for f in dataclasses.fields(Runtime)] == [
        "context",
        "store",
        "stream_writer",
        "heartbeat",
        "previous",
        "execution_info",
        "server_info",
        "control",
    ]
    assert [f.name for f in dataclasses.fields(ExecutionInfo)] == [
        "checkpoint_id",
        "checkpoint_ns",
        "task_id",
        "thread_id",
        "run_id",
        "node_attempt",
        "node_first_attempt_time",
    ]
    with pytest.raises(TypeError):
        Runtime(1)  # type: ignore[misc]
    runtime: Runtime[Any] = Runtime(context=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        runtime.context = 2  # type: ignore[misc]
    assert runtime.heartbeat() is None
    assert runtime.stream_writer("ignored") is None
    assert runtime.drain_requested is False and runtime.drain_reason is None


def test_runtime_helpers_merge_override_and_patch_execution_info() -> None:
    def writer(_: Any) -> None:
        return None

    base: Runtime[Any] = Runtime(context="ctx", previous=0, stream_writer=writer)
    merged = base.merge(Runtime(previous=5))
    assert (merged.context, merged.previous, merged.stream_writer) == ("ctx", 5, writer)
    assert base.merge(Runtime()).previous == 0  # None in ``other`` keeps ours
    assert base.override(context="other").context == "other"
    assert base.context == "ctx"

    with pytest.raises(RuntimeError, match="before it has been set"):
        base.patch_execution_info(node_attempt=2)
    info = ExecutionInfo(checkpoint_id="c", checkpoint_ns="n:1", task_id="1")
    assert (info.thread_id, info.run_id, info.node_attempt) == (None, None, 1)
    patched = base.override(execution_info=info).patch_execution_info(node_attempt=3)
    assert patched.execution_info == dataclasses.replace(info, node_attempt=3)
    assert info.node_attempt == 1

    control = RunControl()
    drained = base.override(control=control)
    control.request_drain()
    assert drained.drain_requested and drained.drain_reason == "shutdown"
    assert ServerInfo(assistant_id="a", graph_id="g").user is None


def test_task_runtime_builds_the_same_object_as_the_constructor() -> None:
    """The executor's fast constructor must stay in step with the dataclasses' fields."""

    def writer(_: Any) -> None:
        return None

    fast = task_runtime("ctx", writer, 7, "cid", "node:1", "1", "thread", "run", 2, 12.5)
    assert fast == Runtime(
        context="ctx",
        stream_writer=writer,
        previous=7,
        execution_info=ExecutionInfo(
            checkpoint_id="cid",
            checkpoint_ns="node:1",
            task_id="1",
            thread_id="thread",
            run_id="run",
            node_attempt=2,
            node_first_attempt_time=12.5,
        ),
    )
    assert fast.store is None and fast.server_info is None and fast.control is None
    assert fast.heartbeat() is None
