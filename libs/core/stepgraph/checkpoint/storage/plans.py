"""Plans: database work written once for a saver's sync and async twins.

A plan is a generator that yields ``Statement``s and is sent back each statement's rows; it
returns the operation's result. Which statements to run, and what to make of their rows, lives
in the plan; a driver only executes statements on a connection, with ``run_steps`` (sync) or
``arun_steps`` (async). So a sync saver and its async twin share their SQL, row mapping and
serialization, and differ only in the few lines that do I/O.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = ["Plan", "Statement", "arun_steps", "run_steps"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Statement:
    sql: str
    params: Any = ()
    """Parameters of one execution, or an iterable of them when ``many`` is true."""
    many: bool = False
    """Execute once per parameter set (``executemany``); the plan is sent no rows."""
    fetch: bool = False
    """The plan reads the statement's rows. A driver that fetches every statement's rows
    anyway (sqlite3, where that is free) may ignore it; others send back ``[]`` without it."""
    retry_when_locked: float = 0.0
    """SQLite: seconds to keep retrying while the statement fails with "database is locked",
    for statements SQLite does not wait on by itself (its busy handler is skipped for them)."""


Plan = Generator[Statement, list[Any], T]


def run_steps(plan: Plan[T], execute: Callable[[Statement], list[Any]]) -> T:
    """Run ``plan``, executing each statement with ``execute`` (which returns its rows)."""
    try:
        statement = next(plan)
        while True:
            statement = plan.send(execute(statement))
    except StopIteration as done:
        return done.value


async def arun_steps(plan: Plan[T], execute: Callable[[Statement], Awaitable[list[Any]]]) -> T:
    """``run_steps`` with an awaited ``execute``."""
    try:
        statement = next(plan)
        while True:
            statement = plan.send(await execute(statement))
    except StopIteration as done:
        return done.value
