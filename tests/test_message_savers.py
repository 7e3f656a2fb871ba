"""A thread holding LangChain messages (add_messages / MessagesState) on every saver, in every
durability mode: the stored checkpoint and pending writes read back as equal messages, and a run
that failed part-way resumes from them on a freshly opened saver."""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from typing import TYPE_CHECKING, Any

import pytest
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    HumanMessage,
    RemoveMessage,
    SystemMessage,
    ToolMessage,
)

from stepgraph.graph import START, StateGraph
from stepgraph.graph.message import MessagesState

if TYPE_CHECKING:  # conftest is not importable under --import-mode=importlib
    from conftest import Backend, Harness


class Agent(MessagesState):
    calls: int


def question() -> list[BaseMessage]:
    return [
        SystemMessage("answer with a tool", id="sys"),
        HumanMessage(
            content=[{"type": "text", "text": "weather?"}, {"type": "text", "text": "in Oslo"}],
            id="q",
            additional_kwargs={"client": {"locale": "nb", "flags": [True, None, 1.5]}},
        ),
    ]


def tool_request() -> AIMessage:
    return AIMessage(
        content="",
        id="call",
        tool_calls=[{"name": "weather", "args": {"city": "Oslo", "days": 2}, "id": "w1"}],
        response_metadata={"finish_reason": "tool_calls"},
        usage_metadata={"input_tokens": 10, "output_tokens": 5, "total_tokens": 15},
    )


def agent(calls: Counter, failures: Counter) -> StateGraph:
    """model -> (tools, trim) in parallel; tools fails ``failures["tools"]`` times once trim has
    returned, so trim's writes (a RemoveMessage) are saved as pending writes first."""
    trimmed = threading.Event()

    def model(state: Agent) -> dict[str, Any]:
        calls["model"] += 1
        return {"messages": [tool_request()], "calls": 1}

    def tools(state: Agent) -> dict[str, Any]:
        calls["tools"] += 1
        trimmed.wait(timeout=30)
        if failures["tools"]:
            failures["tools"] -= 1
            raise RuntimeError("weather service down")
        return {"messages": [ToolMessage("sunny", tool_call_id="w1", id="result")]}

    def trim(state: Agent) -> dict[str, Any]:
        calls["trim"] += 1
        trimmed.set()
        return {"messages": [RemoveMessage(id="sys"), HumanMessage("and tomorrow?", id="q")]}

    builder = StateGraph(Agent)
    builder.add_node("model", model)
    builder.add_node("tools", tools)
    builder.add_node("trim", trim)
    builder.add_edge(START, "model")
    builder.add_edge("model", "tools")
    builder.add_edge("model", "trim")
    return builder


def assert_messages(actual: list[Any], expected: list[BaseMessage]) -> None:
    assert [type(m) for m in actual] == [type(m) for m in expected]
    assert [m.id for m in actual] == [m.id for m in expected]
    assert [m.model_dump() for m in actual] == [m.model_dump() for m in expected]


async def messages_survive_a_failure(h: Harness, durability: str) -> None:
    calls: Counter = Counter()
    builder = agent(calls, Counter(tools=1))
    config = {"configurable": {"thread_id": f"thread-{uuid.uuid4()}"}}
    graph = h.compile(builder)
    with pytest.raises(RuntimeError, match="weather service down"):
        await graph.invoke({"messages": question(), "calls": 0}, config, durability=durability)

    await h.reopen()
    graph = h.compile(builder)
    saved = await h.get_tuple(config)
    assert_messages(saved.checkpoint["channel_values"]["messages"], [*question(), tool_request()])
    trim_writes = [v for _, channel, v in saved.pending_writes if channel == "messages"]
    assert trim_writes == [[RemoveMessage(id="sys"), HumanMessage("and tomorrow?", id="q")]]
    assert type(trim_writes[0][0]) is RemoveMessage

    result = await graph.invoke(None, config, durability=durability)
    assert calls == Counter(model=1, tools=2, trim=1)
    expected = [
        HumanMessage("and tomorrow?", id="q"),
        tool_request(),
        ToolMessage("sunny", tool_call_id="w1", id="result"),
    ]
    assert_messages(result["messages"], expected)
    await h.reopen()
    state = await h.compile(builder).get_state(config)
    assert state.next == ()
    assert state.values["calls"] == 1
    assert_messages(state.values["messages"], expected)
    assert state.values["messages"][1].tool_calls[0]["args"] == {"city": "Oslo", "days": 2}


def test_messages_survive_a_failure(backend: Backend, durability: str) -> None:
    backend.run(messages_survive_a_failure, durability=durability)
