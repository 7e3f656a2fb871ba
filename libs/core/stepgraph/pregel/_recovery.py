"""Recovery: finish the runs that died, the way a workflow engine recovers pending work.

A run that crashed (its process was killed, its host lost) is still ``running`` in the
saver's run registry with a lease that ran out; ``saver.list_incomplete()`` finds it. A worker
recovers it by running the thread on from its last checkpoint (``invoke(None, config)``), or,
when the thread has no checkpoint at all (it died before its first save), by running it again
with the input the registry kept. Every recovery is one more attempt; a run whose attempts
reached ``max_attempts`` is marked ``abandoned`` and reported instead of being retried forever.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from stepgraph._twins import call, drive
from stepgraph.checkpoint.base import RunInfo
from stepgraph.checkpoint.base.runs import RECOVER_EPOCH_KEY
from stepgraph.config import RunnableConfig, merge_configs
from stepgraph.errors import ThreadBusyError
from stepgraph.types import Durability

if TYPE_CHECKING:
    from stepgraph.pregel.main import Pregel

__all__ = ["RecoveryReport", "arecover", "recover"]


@dataclass
class RecoveryReport:
    """What one ``recover()`` pass did, by thread id."""

    resumed: list[str] = field(default_factory=list)
    """Run on to an end (finished, or paused for a human)."""
    failed: dict[str, str] = field(default_factory=dict)
    """Raised an error when run on (their status is now ``error``, like any failed run)."""
    abandoned: list[str] = field(default_factory=list)
    """Gave up: ``max_attempts`` reached. Their status is now ``abandoned``."""
    busy: list[str] = field(default_factory=list)
    """Another worker took them over first."""

    def __str__(self) -> str:
        return (
            f"recovery: {len(self.resumed)} resumed, {len(self.failed)} failed, "
            f"{len(self.abandoned)} abandoned, {len(self.busy)} busy"
        )


def _config(graph: Pregel, run: RunInfo, config: RunnableConfig | None) -> RunnableConfig:
    merged = merge_configs(graph.config, config, {"configurable": {"thread_id": run.thread_id}})
    merged["configurable"]["multitask_strategy"] = "reject"
    # Take the thread over only from the dead run listed: not from a run that another worker
    # recovered meanwhile (it may be paused for a human now).
    merged["configurable"][RECOVER_EPOCH_KEY] = run.epoch
    merged["configurable"].pop("checkpoint_id", None)
    return merged


def _gave_up(run: RunInfo) -> str:
    return f"recovery gave up: {run.attempts} attempt(s) started and none finished"


async def _recover(
    graph: Pregel,
    max_attempts: int,
    limit: int | None,
    config: RunnableConfig | None,
    durability: Durability | None,
    context: Any,
    use_async: bool,
) -> RecoveryReport:
    """One recovery pass, over the sync or the async API (``stepgraph._twins``)."""
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be at least 1, not {max_attempts}")
    saver = graph._saver()
    report = RecoveryReport()
    for run in await call(saver, "list_incomplete", use_async, limit=limit):
        try:
            if run.attempts >= max_attempts:
                owner = str(uuid.uuid4())
                lease = await call(
                    saver,
                    "acquire_lease",
                    use_async,
                    run.thread_id,
                    owner,
                    ttl=saver.lease_ttl,
                    expect_epoch=run.epoch,
                )
                await call(saver, "release_lease", use_async, lease, "abandoned", _gave_up(run))
                report.abandoned.append(run.thread_id)
                continue
            root = {"configurable": {"thread_id": run.thread_id, "checkpoint_ns": ""}}
            saved = await call(saver, "get_tuple", use_async, root)
            head = None if saved is None else saved.config["configurable"]["checkpoint_id"]
            request = run.input if isinstance(run.input, dict) else {}
            # A run that died before its first save (the head is where it was when the run
            # started) starts again from its input; one that saved steps goes on from them.
            # Either way with the call's own durability, breakpoints and recursion limit.
            input = request.get("input") if head == run.head else None
            run_config = _config(graph, run, config)
            if "recursion_limit" in request and "recursion_limit" not in run_config:
                run_config["recursion_limit"] = request["recursion_limit"]
            await call(
                graph,
                "invoke",
                use_async,
                input,
                run_config,
                durability=durability or request.get("durability"),
                interrupt_before=request.get("interrupt_before"),
                interrupt_after=request.get("interrupt_after"),
                context=context,
            )
            report.resumed.append(run.thread_id)
        except ThreadBusyError:
            report.busy.append(run.thread_id)
        except Exception as error:
            report.failed[run.thread_id] = f"{type(error).__name__}: {error}"
    return report


def recover(
    graph: Pregel,
    *,
    max_attempts: int = 3,
    limit: int | None = None,
    config: RunnableConfig | None = None,
    durability: Durability | None = None,
    context: Any = None,
) -> RecoveryReport:
    return drive(_recover(graph, max_attempts, limit, config, durability, context, use_async=False))


async def arecover(
    graph: Pregel,
    *,
    max_attempts: int = 3,
    limit: int | None = None,
    config: RunnableConfig | None = None,
    durability: Durability | None = None,
    context: Any = None,
) -> RecoveryReport:
    return await _recover(graph, max_attempts, limit, config, durability, context, use_async=True)
