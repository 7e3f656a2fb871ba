"""Bytes on disk of a conversation kept in a `MessagesState` thread, stepgraph against LangGraph.

    .venv-bench/bin/python bench/messages_storage.py [--turns N]

Each turn adds a user message (the input) and an AI reply (the node), with durability "sync",
into a fresh SQLite file per library; the file's size is read after folding the WAL into it.
stepgraph is also run with its append tracking off (`add_messages.appending = None`): every
checkpoint that changes the list then stores it whole, as LangGraph's does.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sqlite3
import tempfile
from typing import Any


def conversation_bytes(root: str, turns: int, *, whole_lists: bool = False) -> int:
    graph_module = importlib.import_module(f"{root}.graph")
    message_module = importlib.import_module(f"{root}.graph.message")
    sqlite_module = importlib.import_module(f"{root}.checkpoint.sqlite")
    from langchain_core.messages import AIMessage

    if whole_lists:
        message_module.add_messages.appending = None  # type: ignore[attr-defined]

    def reply(state: Any) -> dict[str, Any]:
        return {"messages": [AIMessage(content="reply " * 20)]}

    builder = graph_module.StateGraph(message_module.MessagesState)
    builder.add_node("reply", reply)
    builder.add_edge(graph_module.START, "reply")
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "conversation.sqlite")
        with sqlite_module.SqliteSaver.from_conn_string(path) as saver:
            graph = builder.compile(checkpointer=saver)
            config = {"configurable": {"thread_id": "chat"}}
            for turn in range(turns):
                graph.invoke(
                    {"messages": [("user", f"question {turn}")]}, config, durability="sync"
                )
        with sqlite3.connect(path) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return os.path.getsize(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=200)
    turns = parser.parse_args().turns
    stepgraph = conversation_bytes("stepgraph", turns)
    whole = conversation_bytes("stepgraph", turns, whole_lists=True)
    langgraph = conversation_bytes("langgraph", turns)
    print(f"{turns} turns, MessagesState, SqliteSaver, durability sync: bytes on disk")
    print(f"  stepgraph (new messages per turn): {stepgraph:>12,}")
    print(f"  stepgraph (whole list per turn):   {whole:>12,}")
    print(f"  LangGraph 1.2.22:                  {langgraph:>12,}")
    print(f"  LangGraph / stepgraph: {langgraph / stepgraph:.1f}x")


if __name__ == "__main__":
    main()
