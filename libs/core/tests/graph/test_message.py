"""add_messages and MessagesState: the reducer's rules, graphs using them, and threads holding
LangChain messages saved and read back through real savers (including a resume)."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Annotated, Any, TypedDict, get_type_hints

import pytest
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    AnyMessage,
    BaseMessage,
    HumanMessage,
    RemoveMessage,
    SystemMessage,
    ToolMessage,
)
from pydantic import BaseModel

import stepgraph.graph
from stepgraph.checkpoint.serde.schema import reachable_classes
from stepgraph.checkpoint.serde.serializer import MsgpackSerializer
from stepgraph.graph import END, START, StateGraph
from stepgraph.graph.message import (
    REMOVE_ALL_MESSAGES,
    MessagesState,
    _merge,
    add_messages,
)


def ids(messages: list[BaseMessage]) -> list[str | None]:
    return [message.id for message in messages]


def contents(messages: list[BaseMessage]) -> list[Any]:
    return [message.content for message in messages]


# -- the reducer ---------------------------------------------------------------------------------


def test_new_messages_are_appended_in_order() -> None:
    left = [HumanMessage("hi", id="1")]
    merged = add_messages(left, [AIMessage("hello", id="2"), HumanMessage("bye", id="3")])
    assert ids(merged) == ["1", "2", "3"]
    assert left == [HumanMessage("hi", id="1")]  # the old list is left as it was


def test_a_message_with_a_known_id_replaces_it_in_place() -> None:
    left = [HumanMessage("a", id="1"), AIMessage("b", id="2"), HumanMessage("c", id="3")]
    merged = add_messages(left, [AIMessage("b2", id="2"), HumanMessage("d", id="4")])
    assert ids(merged) == ["1", "2", "3", "4"]
    assert contents(merged) == ["a", "b2", "c", "d"]
    assert type(merged[1]) is AIMessage


def test_messages_without_an_id_get_a_fresh_one() -> None:
    first, second = HumanMessage("a"), AIMessage("b")
    merged = add_messages([first], [second])
    assert all(isinstance(message.id, str) and len(message.id) == 36 for message in merged)
    assert first.id != second.id
    # As in LangGraph, the ids are set on the message objects themselves.
    assert merged[0] is first and merged[1] is second


def test_remove_message_deletes_by_id() -> None:
    left = [HumanMessage("a", id="1"), AIMessage("b", id="2"), HumanMessage("c", id="3")]
    assert ids(add_messages(left, [RemoveMessage(id="2")])) == ["1", "3"]
    assert ids(add_messages(left, RemoveMessage(id="1"))) == ["2", "3"]


def test_removing_an_unknown_id_is_an_error() -> None:
    with pytest.raises(ValueError, match="'9'"):
        add_messages([HumanMessage("a", id="1")], [RemoveMessage(id="9")])


def test_removal_and_a_new_message_with_that_id_in_one_update() -> None:
    left = [HumanMessage("a", id="1"), AIMessage("b", id="2")]
    # A later message with the id undoes the removal (it keeps the old place) ...
    readded = add_messages(left, [RemoveMessage(id="1"), HumanMessage("z", id="1")])
    assert contents(readded) == ["z", "b"]
    # ... and a later removal wins over an earlier replacement.
    assert ids(add_messages(left, [HumanMessage("z", id="1"), RemoveMessage(id="1")])) == ["2"]
    # A message added by the update can be removed by the same update.
    assert ids(add_messages(left, [HumanMessage("n", id="5"), RemoveMessage(id="5")])) == [
        "1",
        "2",
    ]


def test_remove_all_keeps_only_what_follows_it() -> None:
    left = [HumanMessage("a", id="1"), AIMessage("b", id="2")]
    merged = add_messages(
        left,
        [
            HumanMessage("dropped", id="0"),
            RemoveMessage(id=REMOVE_ALL_MESSAGES),
            SystemMessage("s", id="s"),
            HumanMessage("kept"),
        ],
    )
    assert contents(merged) == ["s", "kept"]
    assert merged[1].id is not None
    assert add_messages(left, [RemoveMessage(id=REMOVE_ALL_MESSAGES)]) == []


def test_message_likes_are_coerced() -> None:
    merged = add_messages(
        [("user", "q")],
        [
            "plain text",
            ("ai", "tuple"),
            {"role": "system", "content": "dict", "id": "d"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"name": "f", "args": {}, "id": "c"}],
            },
        ],
    )
    assert [type(message) for message in merged] == [
        HumanMessage,
        HumanMessage,
        AIMessage,
        SystemMessage,
        AIMessage,
    ]
    assert contents(merged)[:4] == ["q", "plain text", "tuple", "dict"]
    assert merged[3].id == "d"
    assert merged[4].tool_calls[0]["name"] == "f"  # type: ignore[attr-defined]


def test_single_values_on_either_side() -> None:
    assert contents(add_messages(HumanMessage("a", id="1"), AIMessage("b", id="2"))) == ["a", "b"]
    assert contents(add_messages([], "hello")) == ["hello"]
    assert type(add_messages([], ("ai", "hi"))[0]) is AIMessage


def test_chunks_become_messages() -> None:
    merged = add_messages([], [AIMessageChunk("part", id="c")])
    assert type(merged[0]) is AIMessage
    assert (merged[0].content, merged[0].id) == ("part", "c")


def test_both_sides_are_required() -> None:
    with pytest.raises(ValueError, match="'right'"):
        add_messages([], None)
    with pytest.raises(ValueError, match="'left'"):
        add_messages(None, [])


def test_format_langchain_openai() -> None:
    reducer = add_messages(format="langchain-openai")
    merged = reducer(
        [],
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "look", "cache_control": {"type": "ephemeral"}},
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/jpeg", "data": "1234"},
                    },
                ],
            }
        ],
    )
    assert type(merged[0]) is HumanMessage
    assert merged[0].content == [
        {"type": "text", "text": "look"},
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,1234"}},
    ]


def test_an_unknown_format_is_an_error() -> None:
    with pytest.raises(ValueError, match="format"):
        add_messages(format="xml")([], [AIMessage("a")])  # type: ignore[call-overload]


def test_merge_tells_a_pure_append() -> None:
    left = [HumanMessage("a", id="1")]
    merged, appended = _merge(left, [AIMessage("b", id="2")])
    assert appended and merged[: len(left)] == left
    assert _merge(left, [AIMessage("b", id="1")])[1] is False  # a replacement
    assert _merge(left, [RemoveMessage(id="1")])[1] is False
    assert _merge([HumanMessage("no id")], [AIMessage("b")])[1] is False  # left changed
    assert _merge(left, [RemoveMessage(id=REMOVE_ALL_MESSAGES)])[1] is False


# -- MessagesState and the stepgraph.graph exports ------------------------------------------------


def test_messages_state_is_a_typed_dict_with_the_reducer() -> None:
    hints = get_type_hints(MessagesState, include_extras=True)
    assert set(hints) == {"messages"}
    assert hints["messages"] == Annotated[list[AnyMessage], add_messages]
    assert MessagesState.__required_keys__ == frozenset({"messages"})


def test_stepgraph_graph_exports_them() -> None:
    from stepgraph.graph import MessagesState as exported_state
    from stepgraph.graph import add_messages as exported_reducer

    assert exported_state is MessagesState and exported_reducer is add_messages
    assert {"MessagesState", "add_messages"} <= set(dir(stepgraph.graph))
    with pytest.raises(AttributeError):
        _ = stepgraph.graph.MessageGraph  # type: ignore[attr-defined]


def test_without_langchain_core_the_error_names_the_extra() -> None:
    # A fresh interpreter in which langchain_core cannot be imported.
    program = """
import sys
sys.modules["langchain_core"] = None
from stepgraph.graph import END, START, StateGraph  # works without the extra
try:
    from stepgraph.graph import add_messages
except ImportError as error:
    print(error)
else:
    raise SystemExit("imported without langchain-core")
"""
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=True
    )
    assert 'pip install "stepgraph[messages]"' in done.stdout


def chat_graph(state_schema: Any = MessagesState) -> StateGraph:
    def chat(state: Any) -> dict[str, Any]:
        said = state["messages"][-1].content
        return {"messages": [("ai", f"you said {said}")]}

    builder = StateGraph(state_schema)
    builder.add_node("chat", chat)
    builder.add_edge(START, "chat")
    builder.add_edge("chat", END)
    return builder


def test_a_graph_on_messages_state() -> None:
    out = chat_graph().compile().invoke({"messages": "hi"})
    assert [type(m) for m in out["messages"]] == [HumanMessage, AIMessage]
    assert contents(out["messages"]) == ["hi", "you said hi"]
    assert all(message.id for message in out["messages"])


class Conversation(MessagesState):
    turns: int
    notes: Annotated[list[str], lambda a, b: a + b]


def test_messages_state_subclass_with_more_keys() -> None:
    def count(state: Conversation) -> dict[str, Any]:
        return {"turns": len(state["messages"]), "notes": ["counted"]}

    builder = chat_graph(Conversation)
    builder.add_node("count", count)
    builder.add_edge("chat", "count")
    out = builder.compile().invoke({"messages": [("user", "x")], "turns": 0, "notes": []})
    assert out["turns"] == 2 and out["notes"] == ["counted"]
    assert contents(out["messages"]) == ["x", "you said x"]


def test_a_list_annotated_with_add_messages_and_a_format() -> None:
    class State(TypedDict):
        messages: Annotated[list, add_messages(format="langchain-openai")]

    out = chat_graph(State).compile().invoke({"messages": [{"role": "user", "content": "q"}]})
    assert [type(m) for m in out["messages"]] == [HumanMessage, AIMessage]


class ChatModel(BaseModel):
    messages: Annotated[list[AnyMessage], add_messages]


def pydantic_chat() -> Any:
    def chat(state: ChatModel) -> dict[str, Any]:
        return {"messages": [("ai", f"you said {state.messages[-1].content}")]}

    builder = StateGraph(ChatModel)
    builder.add_node("chat", chat)
    builder.add_edge(START, "chat")
    return builder.compile()


def test_a_pydantic_state_with_messages() -> None:
    # Nodes may return any message-like value: the reducer coerces it before a node reads it.
    out = pydantic_chat().invoke({"messages": [HumanMessage("hi")]})
    assert contents(out["messages"]) == ["hi", "you said hi"]
    assert [type(m) for m in out["messages"]] == [HumanMessage, AIMessage]


def test_a_pydantic_state_takes_message_likes_as_input() -> None:
    out = pydantic_chat().invoke({"messages": [("user", "hi")]})
    assert contents(out["messages"]) == ["hi", "you said hi"]


# -- serialization -------------------------------------------------------------------------------


def rich_messages() -> list[BaseMessage]:
    """Messages with every kind of nested field a chat model fills in."""
    return [
        SystemMessage("be brief", id="sys"),
        HumanMessage(
            content=[
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            ],
            id="human",
            name="ann",
        ),
        AIMessage(
            content="",
            id="ai",
            tool_calls=[{"name": "lookup", "args": {"q": "x", "n": [1, 2]}, "id": "call-1"}],
            additional_kwargs={"refusal": None, "nested": {"depth": [{"a": 1.5}]}},
            response_metadata={"model_name": "m", "finish_reason": "tool_calls"},
            usage_metadata={"input_tokens": 3, "output_tokens": 4, "total_tokens": 7},
        ),
        ToolMessage("found", tool_call_id="call-1", id="tool", artifact={"rows": [1, 2]}),
    ]


def assert_same_messages(actual: list[Any], expected: list[BaseMessage]) -> None:
    assert [type(m) for m in actual] == [type(m) for m in expected]
    assert actual == expected
    for got, want in zip(actual, expected, strict=True):
        assert got.model_dump() == want.model_dump()
        assert got.model_fields_set == want.model_fields_set
    ai = next(m for m in actual if isinstance(m, AIMessage))
    assert ai.tool_calls == [
        {"name": "lookup", "args": {"q": "x", "n": [1, 2]}, "id": "call-1", "type": "tool_call"}
    ]


def test_the_schema_reaches_every_message_class() -> None:
    reached = set(reachable_classes(MessagesState))
    assert {AIMessage, HumanMessage, SystemMessage, ToolMessage, AIMessageChunk} <= reached


def test_every_message_class_round_trips_through_a_fresh_serializer() -> None:
    serde = MsgpackSerializer()  # importing stepgraph.graph.message registered the classes
    values = [*rich_messages(), RemoveMessage(id="ai"), AIMessageChunk("par", id="chunk")]
    back = serde.loads_typed(serde.dumps_typed(values))
    assert [type(m) for m in back] == [type(m) for m in values]
    assert back == values


# -- persistence through savers -----------------------------------------------------------------


def test_thread_with_messages_saves_and_reads_back(reopen_store: Callable[[], Any]) -> None:
    expected = rich_messages()

    def answer(state: MessagesState) -> dict[str, Any]:
        return {"messages": [AIMessage("done", id="final")]}

    builder = StateGraph(MessagesState)
    builder.add_node("answer", answer)
    builder.add_edge(START, "answer")
    config = {"configurable": {"thread_id": "t"}}
    builder.compile(checkpointer=reopen_store()).invoke({"messages": expected}, config)

    graph = builder.compile(checkpointer=reopen_store())  # as a new process would
    snapshot = graph.get_state(config)
    assert_same_messages(snapshot.values["messages"][:-1], rich_messages())
    assert snapshot.values["messages"][-1] == AIMessage("done", id="final")
    # Every checkpoint of the thread reads back, the input one included.
    history = list(graph.get_state_history(config))
    assert [len(s.values.get("messages", [])) for s in history] == [5, 4, 0]

    # The next turn continues from the stored messages, replacing one by id.
    graph.invoke({"messages": [HumanMessage("edited", id="human")]}, config)
    final = builder.compile(checkpointer=reopen_store()).get_state(config).values["messages"]
    assert ids(final) == ["sys", "human", "ai", "tool", "final"]
    assert final[1] == HumanMessage("edited", id="human")


def test_resume_after_an_exception_keeps_messages(reopen_store: Callable[[], Any]) -> None:
    """A step of two nodes: one prunes and appends messages, the other fails once. The resumed
    run reads the finished node's saved writes (a RemoveMessage among them) back from the store
    instead of running it again."""
    runs = {"prune": 0, "flaky": 0}
    pruned = threading.Event()

    def greet(state: MessagesState) -> dict[str, Any]:
        return {"messages": [AIMessage("hello", id="greeting")]}

    def prune(state: MessagesState) -> dict[str, Any]:
        runs["prune"] += 1
        pruned.set()
        return {"messages": [RemoveMessage(id="greeting"), AIMessage("pruned", id="p")]}

    def flaky(state: MessagesState) -> dict[str, Any]:
        runs["flaky"] += 1
        pruned.wait(timeout=30)  # the sibling's writes are saved before the failure
        if runs["flaky"] == 1:
            raise RuntimeError("tool went away")
        return {"messages": [ToolMessage("ok", tool_call_id="c", id="t")]}

    builder = StateGraph(MessagesState)
    builder.add_node("greet", greet)
    builder.add_node("prune", prune)
    builder.add_node("flaky", flaky)
    builder.add_edge(START, "greet")
    builder.add_edge("greet", "prune")
    builder.add_edge("greet", "flaky")
    config = {"configurable": {"thread_id": "resume"}}

    with pytest.raises(RuntimeError, match="tool went away"):
        builder.compile(checkpointer=reopen_store()).invoke({"messages": [("user", "hi")]}, config)
    graph = builder.compile(checkpointer=reopen_store())
    paused = graph.get_state(config)
    assert paused.next == ("flaky",)  # prune finished: its writes are saved
    # The state shown applies the finished task's saved writes: its RemoveMessage was read back.
    assert contents(paused.values["messages"]) == ["hi", "pruned"]

    out = graph.invoke(None, config)
    assert runs == {"prune": 1, "flaky": 2}
    # A step's writes are applied in node-name order, as in LangGraph: flaky's, then prune's.
    assert contents(out["messages"]) == ["hi", "ok", "pruned"]
    assert [type(m) for m in out["messages"]] == [HumanMessage, ToolMessage, AIMessage]
    stored = builder.compile(checkpointer=reopen_store()).get_state(config)
    assert stored.values["messages"] == out["messages"] and stored.next == ()
