"""Channel semantics, and a property: failing anywhere and resuming gives the same result."""

from __future__ import annotations

import operator
from typing import Annotated, Any, TypedDict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stepgraph.channels import (
    BinaryOperatorAggregate,
    EphemeralValue,
    LastValue,
    NamedBarrierValue,
    Topic,
)
from stepgraph.channels.base import MISSING
from stepgraph.checkpoint.memory import InMemorySaver
from stepgraph.errors import EmptyChannelError, InvalidUpdateError
from stepgraph.graph import START, StateGraph


def test_last_value() -> None:
    channel = LastValue(int, key="k")
    assert not channel.is_available()
    with pytest.raises(EmptyChannelError):
        channel.get()
    assert channel.update([1])
    assert channel.get() == 1
    assert not channel.update([])
    with pytest.raises(InvalidUpdateError, match="'k'"):
        channel.update([1, 2])
    assert channel.from_checkpoint(channel.checkpoint()).get() == 1


def test_binary_operator_aggregate_starts_from_the_empty_value() -> None:
    channel = BinaryOperatorAggregate(list[int], operator.add, key="k")
    assert channel.get() == []
    before = channel.get()
    channel.update([[1], [2, 3]])
    assert channel.get() == [1, 2, 3]
    assert before == []  # a new value, not mutated in place
    counter = BinaryOperatorAggregate(int, operator.add)
    counter.update([2, 3])
    assert counter.get() == 5


def test_topic_and_ephemeral_value() -> None:
    topic = Topic(int)
    topic.update([1, [2, 3]])
    assert topic.get() == [1, 2, 3]
    assert topic.update([])  # cleared by a step that does not write it
    assert not topic.is_available()
    assert topic.checkpoint() is MISSING
    accumulating = Topic(int, accumulate=True)
    accumulating.update([1])
    accumulating.update([2])
    assert accumulating.get() == [1, 2]

    ephemeral = EphemeralValue(int)
    ephemeral.update([5])
    assert ephemeral.get() == 5
    assert ephemeral.update([])
    assert not ephemeral.is_available()
    with pytest.raises(InvalidUpdateError):
        ephemeral.update([1, 2])


def test_named_barrier() -> None:
    barrier = NamedBarrierValue(str, {"a", "b"}, key="join")
    barrier.update(["a"])
    assert not barrier.is_available()
    restored = barrier.from_checkpoint(barrier.checkpoint())
    restored.update(["b"])
    assert restored.is_available()
    assert restored.consume()
    assert not restored.is_available()
    with pytest.raises(InvalidUpdateError):
        restored.update(["c"])


class State(TypedDict):
    log: Annotated[list[str], operator.add]


def graph_with_failure(saver: Any, fail: dict[str, Any]) -> Any:
    """START -> (a, b) -> c -> d, with a join; ``fail["at"]`` makes that node raise once."""

    def node(name: str):
        def run(state: State) -> dict[str, Any]:
            if fail.get("at") == name:
                fail["at"] = None
                raise RuntimeError(f"{name} failed")
            return {"log": [name]}

        return run

    builder = StateGraph(State)
    for name in ("a", "b", "c", "d"):
        builder.add_node(name, node(name))
    builder.add_edge(START, "a")
    builder.add_edge(START, "b")
    builder.add_edge(["a", "b"], "c")
    builder.add_edge("c", "d")
    return builder.compile(checkpointer=saver)


@settings(max_examples=25, deadline=None)
@given(
    at=st.sampled_from(["a", "b", "c", "d"]),
    mode=st.sampled_from(["sync", "async", "exit"]),
)
def test_failing_anywhere_then_resuming_gives_the_uninterrupted_result(at: str, mode: str) -> None:
    expected = graph_with_failure(InMemorySaver(), {}).invoke(
        {"log": []}, {"configurable": {"thread_id": "x"}}
    )
    graph = graph_with_failure(InMemorySaver(), {"at": at})
    config = {"configurable": {"thread_id": "t"}}
    with pytest.raises(RuntimeError, match=f"{at} failed"):
        graph.invoke({"log": []}, config, durability=mode)
    assert graph.invoke(None, config, durability=mode) == expected
    assert graph.get_state(config).next == ()
