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
from typing import TYPE_CHECKING

from stepgraph.checkpoint.base import RunInfo
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


def _check(max_attempts: int) -> None:
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be at least 1, not {max_attempts}")


def _config(graph: Pregel, run: RunInfo, config: RunnableConfig | None) -> RunnableConfig:
    merged = merge_configs(graph.config, config, {"configurable": {"thread_id": run.thread_id}})
    merged["configurable"]["multitask_strategy"] = "reject"
    merged["configurable"].pop("checkpoint_id", None)
    return merged


def _abandon_reason(run: RunInfo) -> str:
    return f"recovery gave up: {run.attempts} attempt(s) started and none finished"


def recover(
    graph: Pregel,
    *,
    max_attempts: int = 3,
    limit: int | None = None,
    config: RunnableConfig | None = None,
    durability: Durability | None = None,
) -> RecoveryReport:
    _check(max_attempts)
    saver = graph._saver()
    report = RecoveryReport()
    for run in saver.list_incomplete(limit=limit):
        run_config = _config(graph, run, config)
        try:
            if run.attempts >= max_attempts:
                lease = saver.acquire_lease(run.thread_id, str(uuid.uuid4()), ttl=saver.lease_ttl)
                saver.release_lease(lease, "abandoned", _abandon_reason(run))
                report.abandoned.append(run.thread_id)
                continue
            saved = saver.get_tuple(
                {"configurable": {"thread_id": run.thread_id, "checkpoint_ns": ""}}
            )
            graph.invoke(run.input if saved is None else None, run_config, durability=durability)
            report.resumed.append(run.thread_id)
        except ThreadBusyError:
            report.busy.append(run.thread_id)
        except Exception as error:
            report.failed[run.thread_id] = f"{type(error).__name__}: {error}"
    return report


async def arecover(
    graph: Pregel,
    *,
    max_attempts: int = 3,
    limit: int | None = None,
    config: RunnableConfig | None = None,
    durability: Durability | None = None,
) -> RecoveryReport:
    _check(max_attempts)
    saver = graph._saver()
    report = RecoveryReport()
    for run in await saver.alist_incomplete(limit=limit):
        run_config = _config(graph, run, config)
        try:
            if run.attempts >= max_attempts:
                lease = await saver.aacquire_lease(
                    run.thread_id, str(uuid.uuid4()), ttl=saver.lease_ttl
                )
                await saver.arelease_lease(lease, "abandoned", _abandon_reason(run))
                report.abandoned.append(run.thread_id)
                continue
            saved = await saver.aget_tuple(
                {"configurable": {"thread_id": run.thread_id, "checkpoint_ns": ""}}
            )
            await graph.ainvoke(
                run.input if saved is None else None, run_config, durability=durability
            )
            report.resumed.append(run.thread_id)
        except ThreadBusyError:
            report.busy.append(run.thread_id)
        except Exception as error:
            report.failed[run.thread_id] = f"{type(error).__name__}: {error}"
    return report
