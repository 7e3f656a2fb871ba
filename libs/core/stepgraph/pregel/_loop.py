"""The state of one run between supersteps, and the logic that plans and applies a step.

Everything here is shared by the sync and the async drivers (``_run``): they differ only in how
they execute tasks and talk to the checkpointer. A superstep is:

1. ``plan()``: the tasks triggered by channels that changed in the previous step (plus one task
   per pending ``Send``), with writes restored for tasks that already finished in an earlier
   attempt of this step;
2. the driver runs the tasks (nodes read the state as it was at the start of the step);
3. ``apply(tasks)``: their writes reach the channels in plan order, versions move on, and the
   step's checkpoint becomes current (``checkpoint()`` builds it when someone needs it).
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from stepgraph.channels.base import MISSING, BaseChannel
from stepgraph.checkpoint.base import (
    LATEST_VERSION,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
    PendingWrite,
    RunStatus,
    TaskWrites,
    get_checkpoint_metadata,
)
from stepgraph.checkpoint.base.id import uuid6_str
from stepgraph.checkpoint.base.runs import with_fence
from stepgraph.constants import (
    ERROR,
    INTERRUPT,
    NO_WRITES,
    NULL_TASK_ID,
    PULL,
    PUSH,
    RESUME,
    RETURN,
    START,
    TASKS,
)
from stepgraph.errors import EmptyInputError, GraphRecursionError, InvalidUpdateError
from stepgraph.pregel._algo import PregelNode, Task
from stepgraph.types import Command, Interrupt, PregelTask, Send

if TYPE_CHECKING:
    from stepgraph.config import RunnableConfig
    from stepgraph.pregel.main import Pregel

__all__ = ["OneChannel", "RunLoop", "StepSave", "read_channels", "with_interrupts"]

_SPECIAL_CHANNELS = frozenset({ERROR, INTERRUPT, RESUME, NO_WRITES})
_CACHED = {"cached": True}
# Pending writes that are not a task's results: a task with any other write has finished.
_NOT_RESULTS = frozenset({ERROR, INTERRUPT, RESUME})


def _next_int_version(current: Any, channel: Any = None) -> int:
    """Versions without a checkpointer: plain counters (nothing else ever reads them)."""
    return current + 1 if current else 1


_INTERRUPT_ID = re.compile(r"[0-9a-f]{32}")


def _is_resume_map(resume: Any) -> bool:
    """Whether a ``Command(resume=...)`` answers interrupts by id: a dict whose keys all look
    like interrupt ids (as LangGraph tells them apart)."""
    return type(resume) is dict and all(
        type(key) is str and _INTERRUPT_ID.fullmatch(key) for key in resume
    )


def _input_node(name: str) -> PregelNode:
    def no_run(task: Task, input: Any) -> list[tuple[str, Any]]:
        return []

    return PregelNode(name, (), lambda channels: None, no_run)


_INPUT_NODE = _input_node("__input__")


class StepSave:
    """What one save hands to the checkpointer: writes of tasks and, optionally, a checkpoint."""

    __slots__ = ("before", "checkpoint", "config", "metadata", "new_versions", "release", "writes")

    def __init__(
        self,
        config: RunnableConfig,
        writes: list[TaskWrites],
        checkpoint: Checkpoint | None = None,
        metadata: CheckpointMetadata | None = None,
        new_versions: dict[str, Any] | None = None,
    ) -> None:
        self.config = config
        """Names the checkpoint the writes belong to, which is the new checkpoint's parent."""
        self.writes = writes
        self.checkpoint = checkpoint
        self.metadata = metadata
        self.new_versions = new_versions
        self.release: tuple[Any, RunStatus] | None = None
        """When this save ends the run: the run's lease (``_lease.Holding``) and the status
        the saver lets go of it with, in the same transaction (``put_step_and_release``)."""
        self.before: StepSave | None = None
        """A checkpoint's save held back to be made with this one (this one's config names its
        checkpoint): the run's input, saved with its first step (``put_steps``)."""


class RunLoop:
    """One run of a compiled graph: channels, versions, the current step and its output."""

    def __init__(
        self,
        graph: Pregel,
        config: RunnableConfig,
        *,
        checkpointer: Any,
        stream_modes: frozenset[str],
        context: Any = None,
    ) -> None:
        self.graph = graph
        self.config = config
        self.checkpointer = checkpointer
        self.context = context
        self.stream_modes = stream_modes
        configurable = config.get("configurable") or {}
        self.namespace: str = configurable.get("checkpoint_ns", "")
        self.output: deque[tuple[str, Any]] = deque()
        """``(mode, chunk)`` pairs waiting for the stream to hand them out."""
        self.printed_modes: frozenset[str] = frozenset()
        """Modes the caller did not ask for but ``debug=True`` prints."""
        self.values_keys: tuple[str, ...] = graph.stream_channels
        """Channels shown in ``values`` chunks and checkpoint events."""
        self.output_keys: tuple[str, ...] | None = None
        """Channels ``invoke`` returns, when the caller chose them."""
        self.output_changed = False
        """This run changed an output channel: a new run that changed none returns None
        (LangGraph's ``invoke`` returns its last ``values`` chunk, and there was none)."""
        self.on_output: Callable[[], Any] | None = None
        self.event_loop: Any = None
        """The event loop of an async run (``_arun``): sync code run on a thread may call an
        async ``@task`` there, as in LangGraph."""
        """Called after a custom chunk is added, when a stream hands chunks out live."""
        self.custom_writer: Callable[[Any], None] = (
            self._write_custom if "custom" in stream_modes else _discard
        )
        self.next_version = checkpointer.get_next_version if checkpointer else _next_int_version
        # Checkpoints are built only if something reads them.
        self.keeps_checkpoints = checkpointer is not None or bool(
            stream_modes & {"checkpoints", "debug"}
        )
        self.channels: dict[str, BaseChannel] = {}
        self.channel_values: dict[str, Any] = {}
        """What ``checkpoint()`` stores per channel, kept up to date as channels change."""
        self.channel_versions: dict[str, Any] = {}
        self.max_version: Any = None
        # Inner dicts are replaced, never mutated, so a checkpoint can share them.
        self.versions_seen: dict[str, dict[str, Any]] = {}
        self.step = -1
        """Step number of the checkpoint the running step will produce."""
        self.stop = 0
        self.source = "input"
        """Source of the current checkpoint (``input``, ``loop``, ``fork``, ``update``)."""
        self._checkpoint_id: str | None = None
        self.checkpoint_ts: str | None = None
        self.updated_channels: set[str] | None = None
        """Channels changed by the step that produced the current checkpoint (None: unknown)."""
        self.unsaved_channels: set[str] = set()
        """Channels changed since the last checkpoint handed to the checkpointer."""
        self.unsaved_seen: set[str] = set()
        """Nodes (keys of ``versions_seen``) whose entry changed since then."""
        self.appendable: frozenset[str] = (
            frozenset(k for k, ch in graph.channels.items() if ch.can_append)
            if checkpointer is not None
            else frozenset()
        )
        """List channels that report what they append, so saves can store just that."""
        self.append_bases: dict[str, tuple[Any, int, list[Any]]] = {}
        """Per appendable channel: the version last handed to (or loaded from) the
        checkpointer, the list's length then, and the items appended since."""
        self.live_ephemeral: set[str] = set()
        self.pending_writes: list[PendingWrite] = []
        """Writes saved against the current checkpoint by an earlier attempt of this step."""
        self.planned: list[Task] | None = None
        """The next step's tasks, when ``ends_after_step`` planned them already."""
        self.saved_config: RunnableConfig | None = None
        """Names the last checkpoint handed to the checkpointer: the next one's parent."""
        self.saved_metadata: CheckpointMetadata = {}
        self._parent_config: RunnableConfig | None = None
        self._parent_id: str | None = None
        """Id of the checkpoint before the current one, when the run made the current one (its
        config is built only if read)."""
        self.checkpoint_is_saved = False
        self.start_writes: list[TaskWrites] = []
        """Writes the input made against the current checkpoint (``Command`` answers)."""
        self.interrupts: tuple[Interrupt, ...] = ()
        self.paused = False
        """The run stopped on interrupts or a breakpoint (not at the end of the graph)."""
        self.interrupt_before: tuple[str, ...] = ()
        self.interrupt_after: tuple[str, ...] = ()
        """What the run paused on, if it paused inside a node."""
        self.parent_task: Task | None = None
        """The task that runs this graph as a subgraph (None for a root run)."""
        self.continues_saved = False
        """A subgraph run that has a checkpoint continues it, whatever its input."""
        self.resume_map: dict[str, Any] = {}
        """Answers to interrupts, by id, handed down by the parent task (subgraphs)."""
        self.null_resume: list[Any] = []
        """An answer given when no interrupt was pending here (the run stopped at a breakpoint,
        or the state was updated since): the next ``interrupt()`` call without an answer of
        its own takes it (once), in this run or in a subgraph it runs."""
        self.resuming = False
        """The run continues a thread (input ``None`` or a ``Command``) instead of new input."""
        self.durability: Any = None
        self.forward_to: deque[Any] | None = None
        """The root stream's queue, when it streams subgraphs (``subgraphs=True``)."""
        self.forward_modes: frozenset[str] = frozenset()
        """The modes the root streams, for ``forward_to``."""
        self.save_task_writes: Callable[[TaskWrites], None] | None = None
        """Saves the outcome of a ``@task`` call as soon as it finishes (set by the driver)."""
        self.asave_calls: Callable[[], Awaitable[None]] | None = None
        """Async runs: saves the outcomes ``save_task_writes`` queued (from a coroutine)."""
        self.parents: dict[str, str] = {}
        """Checkpoint id of the running step of each enclosing graph, by namespace."""
        self.fence: int | None = None
        """The epoch of the run's lease on its thread, carried by every save (fencing)."""
        self.holding: Any = None
        """The root run's lease (``_lease.Holding``): a run stops when a renewal found it lost."""
        self.user_metadata = get_checkpoint_metadata(config, {}) if checkpointer else {}
        run_id = config.get("run_id")
        if run_id is not None and checkpointer is not None:
            self.user_metadata["run_id"] = str(run_id)  # lets delete_for_runs find the run

    # -- identity of the current checkpoint ------------------------------------------------

    @property
    def checkpoint_id(self) -> str:
        if self._checkpoint_id is None:
            self._checkpoint_id = uuid6_str()
        return self._checkpoint_id

    @property
    def parent_config(self) -> RunnableConfig | None:
        """Names the checkpoint before the current one."""
        if self._parent_config is None and self._parent_id is not None:
            self._parent_config = self._config_of(self._parent_id)
        return self._parent_config

    def checkpoint_config(self) -> RunnableConfig:
        return self._config_of(self.checkpoint_id)

    def save_target(self) -> RunnableConfig:
        """The config writes of the current step are saved against, with the run's fence."""
        return with_fence(self._config_of(self.checkpoint_id), self.fence)

    def _config_of(self, checkpoint_id: str) -> RunnableConfig:
        configurable = self.config.get("configurable") or {}
        return {
            "configurable": {
                "thread_id": configurable.get("thread_id"),
                "checkpoint_ns": self.namespace,
                "checkpoint_id": checkpoint_id,
            }
        }

    # -- starting a run ----------------------------------------------------------------------

    def load(self, saved: CheckpointTuple | None) -> None:
        """Restore channels and versions from ``saved`` (or start empty)."""
        prototypes = self.graph.channels
        if saved is None:
            self.channels = {k: ch.from_checkpoint(MISSING) for k, ch in prototypes.items()}
            self.channel_values = {
                k: v for k, ch in self.channels.items() if (v := ch.checkpoint()) is not MISSING
            }
            self.step = -1
            self._bind_managed()
            return
        checkpoint = saved.checkpoint
        values = checkpoint["channel_values"]
        self.channels = {
            k: ch.from_checkpoint(values.get(k, MISSING)) for k, ch in prototypes.items()
        }
        self._bind_managed()
        self.channel_values = {
            k: v for k, ch in self.channels.items() if (v := ch.checkpoint()) is not MISSING
        }
        self.channel_versions = dict(checkpoint["channel_versions"])
        self.max_version = max(self.channel_versions.values(), default=None)
        self.versions_seen = dict(checkpoint["versions_seen"])
        self._checkpoint_id = checkpoint["id"]
        self.checkpoint_ts = checkpoint["ts"]
        self.saved_metadata = saved.metadata or {}
        self.step = self.saved_metadata.get("step", -1) + 1
        self.source = self.saved_metadata.get("source", "loop")
        updated = checkpoint.get("updated_channels")
        self.updated_channels = set(updated) if updated is not None else None
        self.pending_writes = list(saved.pending_writes or ())
        self.saved_config = saved.config
        self._parent_config = saved.parent_config
        self._parent_id = None
        self.checkpoint_is_saved = True
        ephemeral = self.graph.ephemeral_channels
        self.live_ephemeral = {k for k in ephemeral if self.channels[k].is_available()}
        self._new_append_bases(self.appendable & self.channel_versions.keys())

    def _bind_managed(self) -> None:
        """Managed values (``RemainingSteps``...) read this run's progress."""
        for key in self.graph.managed_keys:
            self.channels[key] = self.channels[key].bound(self)  # type: ignore[attr-defined]

    def start(self, input: Any, *, addressed: bool, limit: int) -> bool:
        """Apply the run's input; True if that made a checkpoint to save (input or fork).

        ``input=None`` resumes the thread: tasks that finished before keep their saved writes.
        With ``addressed`` (the config named a checkpoint) it replays from there instead, on a
        new branch that starts with a ``fork`` checkpoint. A ``Command`` resumes too, after
        answering interrupts (``resume``) and applying ``update``/``goto``; the writes that
        records are left in ``start_writes`` for the caller to save.
        """
        made_checkpoint = False
        self.stop = self.step + limit + 1
        if self.continues_saved and self.checkpoint_is_saved:
            input = None  # the parent task runs again: continue where this subgraph stopped
        self.resuming = input is None or isinstance(input, Command)
        if self.resuming:
            if not self.checkpoint_is_saved:
                raise EmptyInputError(
                    "Received no input: pass an input, or a thread_id that has a checkpoint."
                )
            if addressed and self.saved_metadata.get("source") not in ("update", "fork"):
                self.pending_writes = []
                self.unsaved_channels.update(self.channel_versions)
                self._new_checkpoint("fork")
                made_checkpoint = True
            if isinstance(input, Command):
                self._record_command(input)
            null_writes = [(c, v) for t, c, v in self.pending_writes if t == NULL_TASK_ID]
            if own := [v for c, v in null_writes if c == RESUME and v is not None][-1:]:
                self.null_resume = own  # a subgraph's own, else the parent's (``_nest``)
            if null_writes:
                self.apply([self._pseudo_task(null_writes)], new_checkpoint=False)
            # Interrupts before/after nodes fire again only once channels change again.
            self.versions_seen[INTERRUPT] = dict(self.channel_versions)
            self.unsaved_seen.add(INTERRUPT)
            if "values" in self.stream_modes:
                self.emit_values()
        else:
            discarded = self.plan(restore=False) if self.checkpoint_is_saved else []
            writes = [(START, input)]
            self.apply([*discarded, self._pseudo_task(writes)], source="input")
            made_checkpoint = True
        return made_checkpoint

    def _record_command(self, command: Command) -> None:
        """Turn a ``Command`` input into pending writes of the current checkpoint."""
        null_resume: list[tuple[str, Any]] = []
        if command.resume is not None:
            interrupted: dict[str, list[str]] = {}
            answered: dict[str, dict[str, Any]] = {}
            finished = {t for t, c, _ in self.pending_writes if c not in _NOT_RESULTS}
            for task_id, channel, value in self.pending_writes:
                if task_id in finished:
                    continue  # its interrupts were answered and it ran to its end
                if channel == INTERRUPT:
                    interrupted[task_id] = [i.id for i in value]
                elif channel == RESUME:
                    answered[task_id] = value
            resume = command.resume
            known = {i for ids in interrupted.values() for i in ids}
            waiting = None
            if _is_resume_map(resume):  # ids no interrupt pending here has are ignored
                answers = {
                    task_id: {i: resume[i] for i in ids if i in resume}
                    for task_id, ids in interrupted.items()
                }
            elif len(known) > 1:
                raise RuntimeError(
                    "When there are multiple pending interrupts, you must specify the interrupt "
                    "id when resuming: Command(resume={interrupt_id: value, ...})."
                )
            else:
                # As in LangGraph, the answer waits for the next interrupt() call that has no
                # answer of its own, wherever it is: the pending one, or, if none is pending
                # here (a breakpoint; an update since), the first one the run reaches. It also
                # reaches a subgraph whose checkpoint an update replaced (new interrupt ids).
                answers, waiting = {}, resume
            # A new answer replaces a waiting one; an answer by id voids it (None).
            if waiting is not None or any(
                t == NULL_TASK_ID and c == RESUME for t, c, _ in self.pending_writes
            ):
                null_resume = [(RESUME, waiting)]
            for task_id, new in answers.items():
                if new:
                    self._add_start_writes(
                        task_id, [(RESUME, {**answered.get(task_id, {}), **new})]
                    )
        writes = self.graph.command_writes(command)
        previous = [(c, v) for t, c, v in self.pending_writes if t == NULL_TASK_ID]
        if null_resume:
            previous = [(c, v) for c, v in previous if c != RESUME]
        if writes or null_resume:
            self._add_start_writes(NULL_TASK_ID, previous + null_resume + writes)

    def _add_start_writes(self, task_id: str, writes: list[tuple[str, Any]]) -> None:
        """Record writes against the current checkpoint (replacing the task's earlier ones)."""
        self.pending_writes = [
            w
            for w in self.pending_writes
            if w[0] != task_id or (task_id != NULL_TASK_ID and w[1] != RESUME)
        ]
        self.pending_writes.extend((task_id, c, v) for c, v in writes)
        self.start_writes.append(TaskWrites(task_id, writes))

    def _pseudo_task(self, writes: list[tuple[str, Any]]) -> Task:
        task = Task(self, _INPUT_NODE, None, ("__input__",), ())
        task.writes = writes
        return task

    # -- a superstep -------------------------------------------------------------------------

    def plan(self, *, restore: bool = True) -> list[Task]:
        """The tasks of the next step, in a deterministic order: ``Send`` tasks, then nodes."""
        if restore and (planned := self.planned) is not None:
            self.planned = None
            return planned
        graph = self.graph
        channels = self.channels
        tasks: list[Task] = []
        send_channel = channels.get(TASKS)
        if send_channel is not None and send_channel.is_available():
            nodes = graph.nodes
            for index, packet in enumerate(send_channel.get()):
                if not isinstance(packet, Send):
                    raise InvalidUpdateError(f"Expected a Send, got {packet!r}")
                node = nodes.get(packet.node)
                if node is None:
                    raise InvalidUpdateError(f"Send to unknown node '{packet.node}'")
                tasks.append(Task(self, node, packet.arg, (PUSH, index), (PUSH,)))
        updated = self.updated_channels
        if updated is None:
            candidates: Sequence[str] = graph.node_names
        else:
            candidates = graph.nodes_triggered_by(updated)
        versions = self.channel_versions
        versions_seen = self.versions_seen
        for name in candidates:
            node = graph.nodes[name]
            seen = versions_seen.get(name, {})
            for trigger in node.triggers:
                version = versions.get(trigger)
                if (
                    version is not None
                    and seen.get(trigger) != version
                    and channels[trigger].is_available()
                ):
                    tasks.append(Task(self, node, node.read(channels), (PULL, name), node.triggers))
                    break
        if restore and self.pending_writes:
            self._restore_finished(tasks)
        return tasks

    def _restore_finished(self, tasks: list[Task]) -> None:
        """Give tasks that finished in an earlier attempt their saved writes back."""
        by_task: dict[str, list[tuple[str, Any]]] = {}
        for task_id, channel, value in self.pending_writes:
            by_task.setdefault(task_id, []).append((channel, value))
        for task in tasks:
            saved = by_task.get(task.id)
            if not saved:
                continue
            for channel, value in saved:
                if channel == RESUME:
                    task.resume = {**self.resume_map, **value}
                    task.answers = value
            # Only a success leaves regular writes (or the no-writes marker); errors and
            # interrupts of earlier attempts do not make a task finished.
            if any(c not in (ERROR, INTERRUPT, RESUME) for c, _ in saved):
                task.writes = [(c, v) for c, v in saved if c not in _SPECIAL_CHANNELS]
                task.done = True

    def ends_after_step(self, tasks: Sequence[Task]) -> RunStatus | None:
        """How the run ends right after the step of ``tasks``, just applied: ``"done"`` (nothing
        is left to run) or ``"interrupted"`` (a breakpoint stops it); None if it goes on, or
        may (a deferred node to fire; the recursion limit, which fails it). Plans the next
        step to know (``plan`` hands those tasks out next). Mirrors the order of ``_run``'s
        checks."""
        if self.should_interrupt(self.interrupt_after, tasks):
            return "interrupted"
        if self.step > self.stop or self.graph.finish_channels:
            return None
        try:
            self.planned = self.plan()
        except Exception:  # a bad Send, an input that fails validation: the loop's own plan()
            return None  # raises it again, once this step is saved
        if not self.planned:
            return "done"
        return "interrupted" if self.should_interrupt(self.interrupt_before, self.planned) else None

    def finish(self) -> bool:
        """Nothing is left to run: let deferred nodes' channels fire. True if any did."""
        updated = {k for k in self.graph.finish_channels if self.channels[k].finish()}
        if not updated:
            return False
        self._bump(updated)
        self.updated_channels = updated
        return True

    def check_recursion(self) -> None:
        if self.step > self.stop:
            limit = self.config.get("recursion_limit")
            raise GraphRecursionError(
                f"Recursion limit of {limit} reached without hitting a stop condition. You can "
                "increase the limit by setting the `recursion_limit` config key."
            )

    def apply(
        self, tasks: Sequence[Task], *, source: str = "loop", new_checkpoint: bool = True
    ) -> set[str]:
        """Apply the step's writes in ``_apply_order``, then make the step's checkpoint current."""
        channels = self.channels
        versions = self.channel_versions
        versions_seen = self.versions_seen
        updated: set[str] = set()
        writes_by_channel: dict[str, list[Any]] = {}
        if len(tasks) > 1:
            tasks = sorted(tasks, key=_apply_order)
        for task in tasks:
            if task.path[0] == PULL:
                seen = dict(versions_seen.get(task.name, ()))
                for trigger in task.triggers:
                    if trigger in versions:
                        seen[trigger] = versions[trigger]
                versions_seen[task.name] = seen
                self.unsaved_seen.add(task.name)
                for trigger in task.triggers:
                    if channels[trigger].consume():
                        updated.add(trigger)
            for channel, value in task.writes:
                if channel in channels:
                    writes_by_channel.setdefault(channel, []).append(value)
                elif channel not in _SPECIAL_CHANNELS:
                    raise InvalidUpdateError(f"Write to unknown channel '{channel}'")
        for channel, values in writes_by_channel.items():
            if channels[channel].update(values):
                updated.add(channel)
        ephemeral = self.graph.ephemeral_channels
        written_ephemeral = {c for c in writes_by_channel if c in ephemeral}
        if new_checkpoint:
            # Ephemeral channels live for one step: clear the ones nobody wrote again.
            for channel in self.live_ephemeral:
                if channel not in writes_by_channel and channels[channel].update(()):
                    updated.add(channel)
            self.live_ephemeral = written_ephemeral
        else:
            self.live_ephemeral |= written_ephemeral
        if new_checkpoint and self.graph.finish_channels:
            self._finish_if_idle(updated)
        self._bump(updated, writes_by_channel)
        if new_checkpoint:
            # An update leaves the step it was made at pending: the next plan looks at every
            # node (a join whose sources ran is still due), not only at what the update wrote.
            self.updated_channels = None if source == "update" else updated
            self._new_checkpoint(source)
        elif self.updated_channels is not None:
            self.updated_channels |= updated
        return updated

    def _finish_if_idle(self, updated: set[str]) -> None:
        """When the step's writes (or an update's) trigger no node, let deferred nodes'
        channels fire in this step, as LangGraph does: its checkpoint then names the deferred
        nodes as next, so a breakpoint before one stops there and a resume runs it. Pending
        ``Send``s do not hold them back (LangGraph's rule): they run in the same step."""
        channels = self.channels
        triggers = self.graph.trigger_to_nodes
        if any(c in triggers and channels[c].is_available() for c in updated):
            return
        updated.update(c for c in self.graph.finish_channels if channels[c].finish())

    def _bump(self, channels: set[str], written: Collection[str] = ()) -> None:
        """Give changed channels the next version after every version so far (as LangGraph
        does), so versions order writes across channels too. ``written``: channels that
        changed by their writes (``update``)."""
        if not channels:
            return
        if not self.output_changed:
            output = self.output_keys or self.graph.output_channels
            self.output_changed = not channels.isdisjoint(output)
        if self.append_bases:
            self._record_appends(channels, written)
        version = self.max_version = self.next_version(self.max_version)
        versions = self.channel_versions
        for channel in channels:
            versions[channel] = version
        if self.keeps_checkpoints:
            self.unsaved_channels |= channels
            values = self.channel_values
            all_channels = self.channels
            for channel in channels:
                value = all_channels[channel].checkpoint()
                if value is MISSING:
                    values.pop(channel, None)
                else:
                    values[channel] = value

    def _record_appends(self, changed: set[str], written: Collection[str]) -> None:
        """Add what changed list channels appended to ``append_bases``; a channel that changed
        in another way loses its base (its next save stores the whole value)."""
        bases = self.append_bases
        for channel in changed & bases.keys():
            added = self.channels[channel].appended() if channel in written else None
            if added is None:
                del bases[channel]
            else:
                bases[channel][2].extend(added)

    def _new_append_bases(self, channels: Collection[str]) -> None:
        """``channels`` now have a stored version: appends are counted from it."""
        bases = self.append_bases
        values = self.channel_values
        versions = self.channel_versions
        for channel in channels:
            value = values.get(channel)
            if type(value) is list:
                bases[channel] = (versions[channel], len(value), [])
            else:
                bases.pop(channel, None)

    def _take_appends(self, new_versions: dict[str, Any]) -> dict[str, tuple[Any, list[Any]]]:
        """``channel_appends`` for a checkpoint saving ``new_versions``; counts restart there."""
        channels = self.appendable.intersection(new_versions)
        if not channels:
            return {}
        appends = {}
        values = self.channel_values
        for channel in channels:
            base = self.append_bases.get(channel)
            # The length check catches a list mutated in place instead of through writes.
            if (
                base is not None
                and base[0] != new_versions[channel]
                and len(values.get(channel, ())) == base[1] + len(base[2])
            ):
                appends[channel] = (base[0], base[2])
        self._new_append_bases(channels)
        return appends

    def _new_checkpoint(self, source: str) -> None:
        self._parent_config = None
        self._parent_id = self._checkpoint_id or None
        self.source = source
        self._checkpoint_id = uuid6_str() if self.keeps_checkpoints else None
        self.checkpoint_ts = None
        self.pending_writes = []
        self.checkpoint_is_saved = False
        self.step += 1

    # -- checkpoints -------------------------------------------------------------------------

    def checkpoint(self) -> Checkpoint:
        """The current checkpoint, built from the channels."""
        if self.checkpoint_ts is None:
            self.checkpoint_ts = datetime.now(UTC).isoformat()
        return Checkpoint(
            v=LATEST_VERSION,
            id=self.checkpoint_id,
            ts=self.checkpoint_ts,
            channel_values=dict(self.channel_values),
            channel_versions=dict(self.channel_versions),
            versions_seen=dict(self.versions_seen),
            updated_channels=sorted(self.updated_channels) if self.updated_channels else None,
        )

    def metadata(self) -> CheckpointMetadata:
        metadata: dict[str, Any] = {
            "source": self.source,
            "step": self.step - 1,
            "parents": self.parents,
        }
        for key, value in self.user_metadata.items():  # after the runtime's own, as LangGraph
            metadata.setdefault(key, value)
        return metadata  # type: ignore[return-value]

    def save_checkpoint(self, writes: list[TaskWrites]) -> StepSave:
        """The save that makes the current checkpoint durable, with ``writes`` of its parent."""
        parent = self.saved_config or {
            "configurable": {
                "thread_id": (self.config.get("configurable") or {}).get("thread_id"),
                "checkpoint_ns": self.namespace,
            }
        }
        parent = with_fence(parent, self.fence)
        new_versions = {c: self.channel_versions[c] for c in self.unsaved_channels}
        self.unsaved_channels = set()
        checkpoint = self.checkpoint()
        # new_versions and these are everything that changed since the parent checkpoint.
        checkpoint["versions_seen_changes"] = list(self.unsaved_seen)
        self.unsaved_seen = set()
        if appends := self._take_appends(new_versions):
            checkpoint["channel_appends"] = appends
        save = StepSave(parent, writes, checkpoint, self.metadata(), new_versions)
        self.saved_config = self.checkpoint_config()
        self.checkpoint_is_saved = True
        return save

    def task_writes(self, task: Task) -> TaskWrites:
        """A finished task's writes as saved: a failure as ``__error__``, nothing as a marker."""
        if task.error is not None:
            writes: list[tuple[str, Any]] = [(ERROR, _describe_error(task.error))]
        elif task.paused:
            writes = [(INTERRUPT, list(task.interrupts))]
            if task.took_answer:
                writes.insert(0, (RESUME, task.answers))
        elif task.writes:
            writes = task.writes
        else:
            writes = [(NO_WRITES, None)]
        return TaskWrites(task.id, writes, _task_path(task))

    # -- interrupts --------------------------------------------------------------------------

    def should_interrupt(self, nodes: Sequence[str], tasks: Sequence[Task]) -> bool:
        """A breakpoint (``interrupt_before``/``after``) applies to these tasks: one of them is
        named in ``nodes`` and channels changed since the run last stopped or resumed."""
        if not nodes:
            return False
        every = "*" in nodes
        if not any((every and not t.node.hidden) or t.name in nodes for t in tasks):
            return False
        seen = self.versions_seen.get(INTERRUPT, {})
        return any(seen.get(c) != v for c, v in self.channel_versions.items())

    def stop_for_interrupts(self, interrupts: tuple[Interrupt, ...]) -> None:
        """The run pauses: tell the stream (``()`` for a breakpoint)."""
        self.interrupts = interrupts
        self.paused = True
        # Interrupts were told task by task as they paused (``emit_task_result``); a breakpoint
        # is told here, and a subgraph's only by the root (as LangGraph does).
        if not interrupts and "updates" in self.stream_modes and self.parent_task is None:
            self.output.append(("updates", {INTERRUPT: interrupts}))

    def _tell_interrupts(self, interrupts: tuple[Interrupt, ...]) -> None:
        """Stream a paused task's interrupts: an ``updates`` chunk, and the state with them."""
        if "updates" in self.stream_modes:
            self.output.append(("updates", {INTERRUPT: interrupts}))
        if "values" in self.stream_modes:
            self.output.append(("values", with_interrupts(self.emitted_values(), interrupts)))

    def show_finished_writes(self, tasks: Sequence[Task]) -> None:
        """A top-level run paused on interrupts and saved all it had to: apply, in memory
        only, the writes of the step's tasks that finished (they are saved as pending writes
        of the checkpoint, which stays as it was), so the run's output and a last ``values``
        chunk show them, as LangGraph's do."""
        finished = [task for task in tasks if not task.paused and task.error is None]
        if not any(task.writes for task in finished):
            return
        updated = self.apply(finished, new_checkpoint=False)
        if "values" in self.stream_modes and not updated.isdisjoint(self.values_keys):
            self.emit_values()

    # -- output ------------------------------------------------------------------------------

    def _write_custom(self, chunk: Any) -> None:
        self.output.append(("custom", chunk))
        if self.on_output is not None:
            self.on_output()

    def emitted_values(self) -> Any:
        return read_channels(self.channels, self.values_keys)

    def emit_values(self) -> None:
        self.output.append(("values", self.emitted_values()))

    def emit_step(self, tasks: Sequence[Task], updated: set[str]) -> None:
        """Output for a finished step: values (if the output changed), checkpoint events (only
        with a checkpointer: without one there is no checkpoint, as in LangGraph)."""
        modes = self.stream_modes
        if "values" in modes and not updated.isdisjoint(self.values_keys):
            self.emit_values()
        if modes & {"checkpoints", "debug"} and self.checkpointer is not None:
            self.emit_checkpoint()

    def emit_checkpoint(self) -> None:
        next_tasks = self.plan(restore=False)
        config = self.checkpoint_config()
        payload = {
            "config": config,
            "parent_config": self.parent_config,
            "values": read_channels(self.channels, self.values_keys),
            "metadata": self.metadata(),
            "next": [t.name for t in next_tasks],
            "tasks": [
                {"id": t.id, "name": t.name, "interrupts": (), "state": self._state_of(config, t)}
                for t in next_tasks
            ],
        }
        self._emit_event("checkpoints", "checkpoint", payload)

    def _state_of(self, config: RunnableConfig, task: Task) -> RunnableConfig | None:
        """Where a subgraph a task runs keeps its checkpoints (a snapshot task's ``state``)."""
        graph = self.graph
        if task.name not in graph.subgraphs:
            return None
        return graph._subgraph_state_config(config, task)  # type: ignore[arg-type]

    def emit_resumed(self) -> None:
        """A run that resumes a saved checkpoint tells of it first, as LangGraph does: its
        next tasks, with the interrupts they paused on (``checkpoints``, ``debug``)."""
        if not self.stream_modes & {"checkpoints", "debug"} or self.checkpointer is None:
            return
        asked: dict[str, list[Interrupt]] = {}
        for task_id, channel, value in self.pending_writes:
            if channel == INTERRUPT:
                asked[task_id] = list(value)
        next_tasks = self.plan(restore=False)
        payload = {
            "config": self.checkpoint_config(),
            "parent_config": self.parent_config,
            "values": read_channels(self.channels, self.values_keys),
            "metadata": dict(self.saved_metadata),
            "next": [t.name for t in next_tasks],
            "tasks": [
                {
                    "id": t.id,
                    "name": t.name,
                    "interrupts": tuple(_interrupt_payload(i) for i in asked.get(t.id, ())),
                    "state": self._state_of(self.checkpoint_config(), t),
                }
                for t in next_tasks
            ],
        }
        self._emit_event("checkpoints", "checkpoint", payload)

    def emit_task_starts(self, tasks: Sequence[Task]) -> None:
        if not self.stream_modes & {"tasks", "debug"}:
            return
        for task in tasks:
            if task.node.hidden:
                continue
            payload: dict[str, Any] = {
                "id": task.id,
                "name": task.name,
                "input": task.input,
                "triggers": task.triggers,
            }
            self._emit_event("tasks", "task", payload)

    def emit_cached(self, tasks: Sequence[Task]) -> None:
        """A resumed step's tasks that finished in an earlier attempt do not run again; their
        saved updates are streamed, marked cached, as LangGraph does."""
        if "updates" not in self.stream_modes:
            return
        keys = self.values_keys
        for task in tasks:
            if task.done and not task.node.hidden:
                update = {k: v for k, v in task.writes if k in keys} or None
                self.output.append(("updates", {task.name: update, "__metadata__": _CACHED}))

    def emit_task_result(self, task: Task) -> None:
        """Output for a task that finished (or failed)."""
        if task.node.hidden:
            return
        modes = self.stream_modes
        if "updates" in modes and task.error is None and not task.paused:
            self.output.append(("updates", {task.name: task.update}))
        if task.paused and task.interrupts:
            self._tell_interrupts(task.interrupts)  # as it pauses, as LangGraph does
        if modes & {"tasks", "debug"}:
            output_channels = self.values_keys
            payload: dict[str, Any] = {
                "id": task.id,
                "name": task.name,
                "error": task.error,  # the exception itself, as LangGraph gives it
                # A @task call's result is its return value, under RETURN (as in LangGraph).
                "result": _result(task.writes, (*output_channels, RETURN)),
                "interrupts": [_interrupt_payload(i) for i in task.interrupts],
            }
            self._emit_event("tasks", "task_result", payload)

    def _emit_event(self, mode: str, kind: str, payload: dict[str, Any]) -> None:
        if mode in self.stream_modes:
            self.output.append((mode, payload))
        if "debug" in self.stream_modes:
            step = self.step - 1 if kind == "checkpoint" else self.step
            event = {
                "step": step,
                "timestamp": datetime.now(UTC).isoformat(),
                "type": kind,
                "payload": payload,
            }
            self.output.append(("debug", event))

    # -- reporting ---------------------------------------------------------------------------

    def pending_state(self, live: bool) -> tuple[tuple[PregelTask, ...], tuple[str, ...]]:
        """For ``get_state``: the next step's tasks, with the errors, interrupts and results
        saved for them so far, and the names of the next nodes.

        ``live`` (the thread's current state, as LangGraph's ``get_state`` without a checkpoint
        id) shows progress: the channels then include the writes of tasks that finished, and only
        unfinished tasks count as next. Otherwise the checkpoint is shown as a record of its step.
        """
        saved: dict[str, list[tuple[str, Any]]] = {}
        for task_id, channel, value in self.pending_writes:
            saved.setdefault(task_id, []).append((channel, value))
        tasks = self.plan(restore=live)
        # A snapshot lists a step's nodes in the graph's order (a run plans them by name), as
        # LangGraph's do; Send tasks first.
        index = self.graph.node_index
        tasks.sort(
            key=lambda t: (t.path[0] == PULL, index.get(t.name, 0) if t.path[0] == PULL else 0)
        )
        finished: list[Task] = [task for task in tasks if task.done]
        if NULL_TASK_ID in saved:  # a Command's update: applied first, on its own, as a run does
            self.apply([self._pseudo_task(saved[NULL_TASK_ID])], new_checkpoint=False)
        if finished:
            self.apply(finished, new_checkpoint=False)
        report = []
        output_channels = self.values_keys
        for task in tasks:
            writes = saved.get(task.id, [])
            error = next((v for c, v in writes if c == ERROR), None)
            interrupts = tuple(i for c, v in writes if c == INTERRUPT for i in v)
            result = None
            if any(c not in _NOT_RESULTS for c, _ in writes):
                # Finished after an error or an answered interrupt: as in LangGraph, the record
                # keeps both (a checkpoint's history shows what happened in its step), and the
                # live state no longer counts its interrupts as pending.
                result = _snapshot_result(writes, output_channels)
                if live:
                    interrupts = ()
            report.append(
                PregelTask(
                    task.id,
                    task.name,
                    task.path,
                    error=error,
                    interrupts=interrupts,
                    result=result,
                )
            )
        return tuple(report), tuple(task.name for task in tasks if not task.done)


class OneChannel(tuple[str, ...]):
    """Output keys of a graph whose output is one channel's bare value (an entrypoint's)."""

    __slots__ = ()


def read_channels(channels: dict[str, BaseChannel], keys: Sequence[str]) -> Any:
    """The values of ``keys`` that channels hold (for ``OneChannel``, the bare value or None)."""
    if type(keys) is OneChannel:
        channel = channels[keys[0]]
        return channel.get() if channel.is_available() else None
    values: dict[str, Any] = {}
    for key in keys:
        channel = channels[key]
        if channel.is_available():
            values[key] = channel.get()
    return values


def with_interrupts(values: Any, interrupts: Sequence[Interrupt]) -> Any:
    """State values plus ``__interrupt__`` (alone, when the output is not a dict)."""
    if isinstance(values, dict):
        return {**values, INTERRUPT: interrupts}
    return {INTERRUPT: interrupts}


def _result(writes: list[tuple[str, Any]], channels: Sequence[str]) -> dict[str, Any]:
    """A task's writes by channel; a channel written several times shows ``{"$writes": [...]}``."""
    result: dict[str, Any] = {}
    for channel, value in writes:
        if channel not in channels:
            continue
        if channel in result:
            previous = result[channel]
            if isinstance(previous, dict) and "$writes" in previous:
                previous["$writes"].append(value)
            else:
                result[channel] = {"$writes": [previous, value]}
        else:
            result[channel] = value
    return result


def _snapshot_result(writes: list[tuple[str, Any]], channels: Sequence[str]) -> Any:
    """A finished task's result as ``get_state`` shows it (LangGraph's): a @task call's return
    value, a one-channel graph's (an entrypoint's) bare value, else the writes by channel."""
    for channel, value in writes:
        if channel == RETURN:
            return value
    result = _result(writes, channels)
    if type(channels) is OneChannel:
        return result.get(channels[0])
    return result


def _discard(chunk: Any) -> None:
    return None


def _task_path(task: Task) -> str:
    return "~".join(map(str, task.path))


def _apply_order(task: Task) -> tuple[str, ...]:
    """LangGraph's order for applying a step's writes (a reducer sees them in it): nodes by
    name, then ``Send`` tasks in the order they were sent."""
    return tuple(f"{part:010d}" if isinstance(part, int) else str(part) for part in task.path[:3])


def _describe_error(error: BaseException) -> str:
    """How a task's error is saved and reported (LangGraph's ``repr`` form)."""
    return repr(error)


def _interrupt_payload(interrupt: Interrupt) -> dict[str, Any]:
    """An interrupt as ``tasks``/``debug``/``checkpoints`` events show it (as LangGraph's)."""
    return {
        "value": interrupt.value,
        "id": interrupt.id,
        "response_schema": interrupt.response_schema,
    }
