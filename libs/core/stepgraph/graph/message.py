"""Chat messages in graph state: the ``add_messages`` reducer and ``MessagesState``.

Messages are LangChain message objects (``langchain_core.messages``), as in LangGraph, so a
ported program keeps its message classes. langchain-core is an optional dependency of
stepgraph: install it with ``pip install "stepgraph[messages]"``.

Importing this module also allows LangChain's message classes in every serializer of the
process (``register_type``): a node may write a ``RemoveMessage`` or a message chunk, which a
state schema rarely names, and a ``list`` annotated with ``add_messages`` names none.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from functools import partial
from typing import Annotated, Any, Literal, TypeAlias, cast, overload

# typing_extensions' TypedDict: pydantic refuses typing's on Python < 3.12.
from typing_extensions import TypedDict

try:
    from langchain_core.messages import (
        AIMessage,
        AIMessageChunk,
        AnyMessage,
        BaseMessage,
        BaseMessageChunk,
        ChatMessage,
        ChatMessageChunk,
        FunctionMessage,
        FunctionMessageChunk,
        HumanMessage,
        HumanMessageChunk,
        MessageLikeRepresentation,
        RemoveMessage,
        SystemMessage,
        SystemMessageChunk,
        ToolMessage,
        ToolMessageChunk,
        convert_to_messages,
        convert_to_openai_messages,
        message_chunk_to_message,
    )
except ImportError as error:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "stepgraph.graph.message (add_messages, MessagesState) needs langchain-core, which is "
        'an optional dependency: install it with pip install "stepgraph[messages]"',
        name=error.name,
    ) from error

from stepgraph.checkpoint.serde.allowlist import register_type

__all__ = ["REMOVE_ALL_MESSAGES", "AnyMessage", "Messages", "MessagesState", "add_messages"]

Messages: TypeAlias = list[MessageLikeRepresentation] | MessageLikeRepresentation
"""What ``add_messages`` merges: one message-like value or a list of them."""

REMOVE_ALL_MESSAGES = "__remove_all__"
"""The id of a ``RemoveMessage`` that clears the list: only the messages after it are kept."""

Format: TypeAlias = Literal["langchain-openai"]

_FORMATS = ("langchain-openai",)

_MESSAGE_CLASSES: tuple[type[BaseMessage], ...] = (
    AIMessage,
    AIMessageChunk,
    ChatMessage,
    ChatMessageChunk,
    FunctionMessage,
    FunctionMessageChunk,
    HumanMessage,
    HumanMessageChunk,
    RemoveMessage,
    SystemMessage,
    SystemMessageChunk,
    ToolMessage,
    ToolMessageChunk,
)
for _cls in _MESSAGE_CLASSES:
    register_type(_cls)


@overload
def add_messages(
    left: Messages, right: Messages, *, format: Format | None = None
) -> list[BaseMessage]: ...


@overload
def add_messages(
    left: None = None, right: None = None, *, format: Format | None = None
) -> Callable[[Messages, Messages], list[BaseMessage]]: ...


def add_messages(
    left: Messages | None = None,
    right: Messages | None = None,
    *,
    format: Format | None = None,
) -> list[BaseMessage] | Callable[[Messages, Messages], list[BaseMessage]]:
    """Merge the messages ``right`` into ``left`` by id, as LangGraph's reducer does.

    A message of ``right`` whose id is in ``left`` replaces that message in place; the others
    are appended in order. Messages without an id get a new uuid4 id (set on the message
    objects themselves). ``RemoveMessage(id=...)`` deletes the message with that id (a
    ``ValueError`` if there is none); ``RemoveMessage(id=REMOVE_ALL_MESSAGES)`` drops everything
    before it, and the result is just the messages of ``right`` that follow it. Dicts,
    ``(role, content)`` tuples, strings (human messages) and chunks are turned into messages,
    and either side may be a single message instead of a list.

    ``format="langchain-openai"`` returns the merged messages rebuilt from their OpenAI form
    (``convert_to_openai_messages``); as in LangGraph that form has no ids, so the rebuilt
    messages get new ids when they are next merged.

    Called with neither ``left`` nor ``right`` (``add_messages(format=...)``), returns the
    reducer with that format, to annotate a state key with.
    """
    if left is None and right is None:
        return partial(_reduce, format=format)
    if left is None or right is None:
        missing = "left" if left is None else "right"
        raise ValueError(f"add_messages needs both 'left' and 'right'; '{missing}' is None")
    return _reduce(left, right, format=format)


def _reduce(left: Messages, right: Messages, *, format: Format | None = None) -> list[BaseMessage]:
    merged = _merge(left, right)[0]
    if format is None:
        return merged
    if format not in _FORMATS:
        raise ValueError(f"Unknown add_messages format {format!r}: expected one of {_FORMATS}")
    return convert_to_messages(convert_to_openai_messages(merged))


def _merge(left: Messages, right: Messages) -> tuple[list[BaseMessage], bool]:
    """``add_messages(left, right)`` without formatting, and whether the result is ``left``
    with new messages appended and nothing else changed (left's own list, messages and ids).

    One pass over each side plus one dict of left's ids: O(len(left) + len(right)).
    """
    current = _as_messages(left)
    incoming = _as_messages(right)
    # Assigning an id changes a message of left, so the merge is then no pure append.
    pure_append = current is left
    for message in current:
        if message.id is None:
            message.id = str(uuid.uuid4())
            pure_append = False
    clear_at: int | None = None
    for at, message in enumerate(incoming):
        if message.id is None:
            message.id = str(uuid.uuid4())
        elif message.id == REMOVE_ALL_MESSAGES and isinstance(message, RemoveMessage):
            clear_at = at
    if clear_at is not None:
        return incoming[clear_at + 1 :], False

    merged = list(current)
    position = {message.id: index for index, message in enumerate(merged)}
    removed: set[str] = set()
    for message in incoming:
        message_id = cast(str, message.id)
        found = position.get(message_id)
        if found is None:
            if isinstance(message, RemoveMessage):
                raise ValueError(
                    f"RemoveMessage names id {message_id!r}, which no message in the list has"
                )
            position[message_id] = len(merged)
            merged.append(message)
            continue
        pure_append = False
        if isinstance(message, RemoveMessage):
            removed.add(message_id)
        else:
            # A removal earlier in the same update is undone by a later message with the id.
            removed.discard(message_id)
            merged[found] = message
    if removed:
        merged = [message for message in merged if message.id not in removed]
    return merged, pure_append


def _as_messages(value: Messages) -> list[BaseMessage]:
    """``value`` as a list of (non-chunk) messages; the list itself when it already is one."""
    items: list[Any] = value if isinstance(value, list) else [value]
    # A long history holds a few message classes: check those, not every item's conversion.
    if all(_is_plain_message(kind) for kind in {type(item) for item in items}):
        return items
    return [message_chunk_to_message(message) for message in convert_to_messages(items)]


def _is_plain_message(kind: type) -> bool:
    return issubclass(kind, BaseMessage) and not issubclass(kind, BaseMessageChunk)


class MessagesState(TypedDict):
    """A state with one key, ``messages``, merged with ``add_messages``; subclass it to add
    keys."""

    messages: Annotated[list[AnyMessage], add_messages]
