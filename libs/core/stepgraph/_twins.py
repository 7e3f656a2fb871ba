"""Sync and async twins written once, as one coroutine.

A routine that has both a sync and an async form is written as a coroutine whose I/O goes
through ``call``: over the sync API every call returns at once, so the coroutine never really
suspends and ``drive`` runs it to its end without an event loop; over the async API the same
coroutine awaits the async twins on the caller's loop.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["call", "drive"]

T = TypeVar("T")


def drive(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never suspends (a routine over the sync API) to its result."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    coroutine.close()
    raise RuntimeError("a routine over the sync API awaited something that suspends")


async def call(target: Any, name: str, use_async: bool, *args: Any, **kwargs: Any) -> Any:
    """``target.<name>(...)``, or its async twin ``target.a<name>(...)`` awaited."""
    if use_async:
        return await getattr(target, f"a{name}")(*args, **kwargs)
    return getattr(target, name)(*args, **kwargs)
