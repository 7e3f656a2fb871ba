"""The Graph API: ``StateGraph`` and the ``START``/``END`` markers."""

from stepgraph.constants import END, START
from stepgraph.graph.state import CompiledStateGraph, StateGraph

__all__ = ["END", "START", "CompiledStateGraph", "StateGraph"]
