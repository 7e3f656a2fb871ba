"""Reserved names shared by the graph builder and the executor."""

from __future__ import annotations

from stepgraph.checkpoint.base import ERROR, INTERRUPT, RESUME, SCHEDULED

__all__ = [
    "END",
    "ERROR",
    "INTERRUPT",
    "NO_WRITES",
    "NULL_TASK_ID",
    "PREVIOUS",
    "PULL",
    "PUSH",
    "RESERVED",
    "RESUME",
    "RETURN",
    "SCHEDULED",
    "START",
    "TAG_HIDDEN",
    "TASKS",
    "branch_channel",
]

START = "__start__"
"""The first node: receives the run's input."""
END = "__end__"
"""The last node: an edge to it ends that branch of the run."""
TASKS = "__pregel_tasks"
"""Channel of ``Send`` packets, each of which becomes a task in the next step."""
NO_WRITES = "__no_writes__"
"""Pending-write marker of a task that succeeded without writing anything."""
RETURN = "__return__"
"""Pending-write channel of a ``@task`` call's result."""
PREVIOUS = "__previous__"
"""Channel of the value an ``@entrypoint`` saved for the next run on its thread."""
PUSH = "__pregel_push"
PULL = "__pregel_pull"
NULL_TASK_ID = "00000000-0000-0000-0000-000000000000"
"""Task id of writes that belong to no task (``update_state`` on a fresh thread, input)."""
TAG_HIDDEN = "langsmith:hidden"
"""Tag of nodes left out of the ``updates`` and ``tasks`` streams (the input node)."""


def branch_channel(node: str) -> str:
    """The channel that triggers ``node`` in the next step."""
    return f"branch:to:{node}"


RESERVED = frozenset(
    {START, END, TASKS, NO_WRITES, ERROR, INTERRUPT, RESUME, SCHEDULED, RETURN, PREVIOUS}
)
