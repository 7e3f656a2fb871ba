"""The Graph API: ``StateGraph``, the ``START``/``END`` markers, and (with the ``messages``
extra) ``add_messages`` and ``MessagesState``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from stepgraph.constants import END, START
from stepgraph.graph.state import CompiledStateGraph, StateGraph

if TYPE_CHECKING:
    from stepgraph.graph.message import MessagesState as MessagesState
    from stepgraph.graph.message import add_messages as add_messages

# add_messages and MessagesState stay out of __all__: they need langchain-core (an optional
# dependency), and a star import must work without it.
__all__ = ["END", "START", "CompiledStateGraph", "StateGraph"]

_MESSAGE_NAMES = frozenset({"MessagesState", "add_messages"})


def __getattr__(name: str) -> Any:
    # Imported on first use, so `import stepgraph.graph` works without langchain-core and
    # `from stepgraph.graph import add_messages` raises the message module's ImportError.
    if name in _MESSAGE_NAMES:
        from stepgraph.graph import message

        return getattr(message, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_MESSAGE_NAMES})
