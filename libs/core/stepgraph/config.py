"""Run configuration: the ``config`` dict passed to ``invoke`` and handed to checkpoint savers.

The shape is LangGraph's (``{"configurable": {"thread_id": ...}}``) so ported programs keep
their configs unchanged. stepgraph has no dependency on langchain-core, so the type lives here.
"""

from __future__ import annotations

from typing import Any, TypedDict, cast

__all__ = [
    "CONFIG_KEYS",
    "DefaultRecursionLimit",
    "RunnableConfig",
    "ensure_thread_id",
    "get_config",
    "get_stream_writer",
    "is_default_recursion_limit",
    "merge_configs",
]


class RunnableConfig(TypedDict, total=False):
    configurable: dict[str, Any]
    """Keys read by the runtime and savers: ``thread_id``, ``checkpoint_ns``, ``checkpoint_id``."""
    metadata: dict[str, Any]
    """Merged into the metadata of every checkpoint the run writes."""
    tags: list[str]
    run_id: Any
    run_name: str
    recursion_limit: int
    max_concurrency: int | None
    callbacks: Any


CONFIG_KEYS = frozenset(RunnableConfig.__annotations__)


class DefaultRecursionLimit(int):
    """A ``recursion_limit`` the runtime filled in because the caller set none.

    Marked so that a node's config leaves it out, as LangGraph's does, and so that merging
    does not let it replace a limit someone did set.
    """

    __slots__ = ()


def is_default_recursion_limit(value: Any) -> bool:
    return type(value) is DefaultRecursionLimit


def ensure_thread_id(config: RunnableConfig | None) -> str:
    """Return ``config["configurable"]["thread_id"]`` as a string, or raise a clear error."""
    configurable = (config or {}).get("configurable") or {}
    thread_id = configurable.get("thread_id")
    if thread_id is None or thread_id == "":
        raise ValueError(
            'A checkpointer requires config["configurable"]["thread_id"]: pass '
            'config={"configurable": {"thread_id": "<any id for this conversation>"}}.'
        )
    return str(thread_id)


def merge_configs(*configs: RunnableConfig | None) -> RunnableConfig:
    """Merge configs left to right; ``configurable`` and ``metadata`` merge key by key, tags add."""
    merged: dict[str, Any] = {}
    for config in configs:
        if not config:
            continue
        for key, value in config.items():
            if key in ("configurable", "metadata") and value is not None:
                merged[key] = {**merged.get(key, {}), **cast(dict[str, Any], value)}
            elif key == "recursion_limit" and is_default_recursion_limit(value) and key in merged:
                continue  # a filled-in default never replaces a limit already there
            elif key == "tags" and value is not None:
                merged[key] = [*merged.get(key, []), *cast(list[str], value)]
            else:
                merged[key] = value
    return merged  # type: ignore[return-value]


def get_config() -> RunnableConfig:
    """The config of the node that is running (with LangGraph's ``langgraph_*`` metadata keys)."""
    from stepgraph.runtime import current_task

    return current_task().config


def get_stream_writer() -> Any:
    """A function that sends a chunk to ``stream_mode="custom"``; a no-op if nobody listens."""
    from stepgraph.runtime import current_task

    return current_task().stream_writer
