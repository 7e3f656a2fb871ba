"""The pieces of a superstep that do not depend on sync or async: nodes, tasks, task ids.

A ``PregelNode`` is what the executor knows of a node: the channels that trigger it, how to read
its input from the channels, and a callable turning that input into channel writes. Builders
(``StateGraph``, later ``@entrypoint``) produce nodes; the loop in ``_loop`` plans, runs and
applies them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from hashlib import blake2b
from typing import TYPE_CHECKING, Any

from stepgraph.config import is_default_recursion_limit
from stepgraph.constants import PREVIOUS, PUSH, TAG_HIDDEN
from stepgraph.errors import GraphInterrupt, mark_invalid_resume
from stepgraph.runtime import Runtime, task_runtime
from stepgraph.types import Interrupt, RetryPolicy

if TYPE_CHECKING:
    from stepgraph.channels.base import BaseChannel
    from stepgraph.config import RunnableConfig
    from stepgraph.pregel._loop import RunLoop

__all__ = ["PregelNode", "Task", "task_id"]

Writes = list[tuple[str, Any]]

_METADATA_FROM_CONFIGURABLE = (
    "thread_id",
    "checkpoint_id",
    "checkpoint_ns",
    "task_id",
    "run_id",
    "assistant_id",
    "graph_id",
)
"""Configurable keys LangGraph copies into a run's metadata (when set and not there yet)."""


def task_id(checkpoint_id: str, namespace: str, step: int, name: str, path: tuple) -> str:
    """A task's id: the same inputs give the same id, so a resumed step finds its saved writes.

    A 128-bit hash written like a UUID (cheaper than ``uuid5``, and just as stable).
    """
    parts = "\x1f".join((checkpoint_id, namespace, str(step), name, *map(str, path)))
    h = blake2b(parts.encode(), digest_size=16).hexdigest()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class PregelNode:
    """A node as the executor sees it.

    ``run(task, input)`` returns the task's writes; ``arun`` is its async form (``None`` when the
    node is synchronous: async runs then call ``run``). ``read(channels)`` builds the input of a
    task triggered by channels; a ``Send`` supplies the input itself.
    """

    __slots__ = (
        "arun",
        "hidden",
        "name",
        "plain",
        "read",
        "retry_policy",
        "run",
        "tags",
        "triggers",
    )

    def __init__(
        self,
        name: str,
        triggers: Sequence[str],
        read: Callable[[dict[str, BaseChannel]], Any],
        run: Callable[[Task, Any], Writes],
        arun: Callable[[Task, Any], Awaitable[Writes]] | None = None,
        *,
        retry_policy: Sequence[RetryPolicy] | RetryPolicy | None = None,
        tags: Sequence[str] = (),
        plain: bool = False,
    ) -> None:
        self.name = name
        self.triggers = tuple(triggers)
        self.read = read
        self.run = run
        self.arun = arun
        if isinstance(retry_policy, RetryPolicy):
            retry_policy = (retry_policy,)
        self.retry_policy: tuple[RetryPolicy, ...] = tuple(retry_policy or ())
        self.tags = tuple(tags)
        self.hidden = TAG_HIDDEN in self.tags
        self.plain = plain
        """The node only hands the run's input on (a graph's START with no conditional edges):
        no user code runs in it but the input schema's validation, so ``durability="sync"``
        may save the input's checkpoint with this node's step, in one transaction
        (``Persistence.on_start``)."""


class Task:
    """One node execution in one superstep.

    Cheap to create: the id and the config a node sees through ``get_config()`` are computed only
    when something asks for them.
    """

    __slots__ = (
        "_config",
        "_id",
        "_runtime",
        "answers",
        "attempt",
        "calls",
        "cancelled",
        "done",
        "error",
        "first_attempt_time",
        "input",
        "interrupts",
        "keeper",
        "loop",
        "name",
        "node",
        "path",
        "paused",
        "resume",
        "resume_used",
        "spawned",
        "subgraph_calls",
        "took_answer",
        "triggers",
        "update",
        "writes",
    )

    def __init__(
        self,
        loop: RunLoop,
        node: PregelNode,
        input: Any,
        path: tuple[Any, ...],
        triggers: tuple[str, ...],
    ) -> None:
        self.loop = loop
        self.node = node
        self.name = node.name
        self.input = input
        self.path = path
        self.triggers = triggers
        self.writes: Writes = []
        self.update: Any = None
        """The node's state update, as reported by ``stream_mode="updates"``."""
        self.done = False
        self.error: BaseException | None = None
        self.interrupts: tuple[Interrupt, ...] = ()
        """Set when the node paused with ``interrupt()``."""
        self.paused = False
        """The node paused: on ``interrupts``, or on a breakpoint of a subgraph it ran."""
        self.resume: dict[str, Any] = loop.resume_map
        """Answers to interrupts by interrupt id (this task's, and those raised inside the
        subgraphs and ``@task`` calls it runs): ids are stable, so a rerun finds its answers."""
        self.resume_used = 0
        self.answers: dict[str, Any] = {}
        """This task's own answers by interrupt id: those saved for it, and a waiting answer
        it took (``RunLoop.null_resume``)."""
        self.took_answer = False
        self.keeper: Task | None = None
        """The task whose saved writes keep this one's answers: for a ``@task`` call, the
        step's task that made it (its pause is saved; a call's is not). None: itself."""
        """It took the waiting answer: if it pauses again, its answers are saved with the
        pause, so its rerun finds that one by id."""
        self.calls = 0
        self.cancelled = False
        """The async run was cancelled while this task ran: a sync node may still run on its
        thread, but makes no more ``@task`` calls and saves nothing."""
        """``@task`` calls made so far by this attempt: the next call's index in its path."""
        self.spawned: list[Any] | None = None
        """The futures of the ``@task`` calls it made: the task ends only once they have,
        awaited or not (as in LangGraph), so none saves after its step."""
        self.subgraph_calls = 0
        """Graphs run so far by this attempt: the n-th one (from 0) keeps its checkpoints in
        the task's namespace, suffixed ``|n`` after the first."""
        self.attempt = 1
        """Which attempt of the node is running, from 1 (retries under a ``RetryPolicy``)."""
        self.first_attempt_time: float | None = None
        """When the first attempt started (``time.time()``), set by the executor."""
        self._id: str | None = None
        self._config: RunnableConfig | None = None
        self._runtime: Runtime | None = None

    @property
    def id(self) -> str:
        if self._id is None:
            loop = self.loop
            self._id = task_id(loop.checkpoint_id, loop.namespace, loop.step, self.name, self.path)
        return self._id

    @property
    def is_push(self) -> bool:
        return self.path[0] == PUSH

    @property
    def namespace(self) -> str:
        """The task's checkpoint namespace: ``<node>:<id>`` after the graph's own."""
        namespace = self.loop.namespace
        own = f"{self.name}:{self.id}"
        return f"{namespace}|{own}" if namespace else own

    @property
    def config(self) -> RunnableConfig:
        """The config a node sees, shaped as LangGraph's: the run's config with the task's
        namespace, the checkpoint each enclosing graph's step started from
        (``checkpoint_map``), ``checkpoint_id`` None (the task is not a checkpoint) and the
        per-task ``langgraph_*`` metadata. Built on first use, as few nodes ask for it."""
        if self._config is None:
            loop = self.loop
            base = loop.config
            configurable = base.get("configurable") or {}
            task_ns = self.namespace
            metadata = {**base.get("metadata", {})}
            # LangGraph's ensure_config copies these ids into metadata when the run starts.
            for key in _METADATA_FROM_CONFIGURABLE:
                if key not in metadata and (value := configurable.get(key)):
                    metadata[key] = value
            metadata["langgraph_step"] = loop.step
            metadata["langgraph_node"] = self.name
            metadata["langgraph_triggers"] = self.triggers
            metadata["langgraph_path"] = self.path
            metadata["langgraph_checkpoint_ns"] = task_ns
            config: dict[str, Any] = {
                # LangGraph hands a node neither the run_id (its callbacks consume it) nor a
                # recursion_limit the caller did not set.
                k: v
                for k, v in base.items()
                if k != "run_id" and not (k == "recursion_limit" and is_default_recursion_limit(v))
            }
            config["metadata"] = metadata
            config["configurable"] = {
                **configurable,
                "checkpoint_map": {**loop.parents, loop.namespace: loop.checkpoint_id},
                "checkpoint_id": None,
                "checkpoint_ns": task_ns,
            }
            self._config = config  # type: ignore[assignment]
        return self._config  # type: ignore[return-value]

    @property
    def runtime(self) -> Runtime:
        """What a node gets as ``runtime``: one per attempt, built on first use."""
        if self._runtime is None:
            loop = self.loop
            config = loop.config
            # A graph run inside a node inherits its parent's run_id here (the parent's run
            # metadata keeps it), but LangGraph's node config holds none, so a subgraph's
            # tasks see None, as there.
            run_id = config.get("run_id") if loop.parent_task is None else None
            self._runtime = task_runtime(
                loop.context,
                loop.custom_writer,
                self.previous,
                loop.checkpoint_id,
                self.namespace,
                self.id,
                (config.get("configurable") or {}).get("thread_id"),
                None if run_id is None else str(run_id),
                self.attempt,
                self.first_attempt_time,
            )
        return self._runtime

    @property
    def previous(self) -> Any:
        """An entrypoint's ``previous``: what the thread's last run returned or saved (None in
        a graph without one). Channels change only when the step is applied, so during the
        step they still hold it."""
        channel = self.loop.channels.get(PREVIOUS)
        return channel.get() if channel is not None and channel.is_available() else None

    def retry(self) -> None:
        """Forget what the failed attempt did and count the next one."""
        self.update = None
        self.resume_used = self.calls = self.subgraph_calls = 0
        self.attempt += 1
        self._runtime = None

    @property
    def stream_writer(self) -> Callable[[Any], None]:
        return self.loop.custom_writer

    def interrupt(self, value: Any, response_schema: Any = None) -> Any:
        """The answer to this task's next ``interrupt()`` call, or pause the run to ask for it."""
        index = self.resume_used
        self.resume_used += 1
        interrupt_id = blake2b(f"{self.id}:{index}".encode(), digest_size=16).hexdigest()
        adapter = _response_adapter(response_schema)
        if interrupt_id in self.resume:
            return _checked_answer(adapter, self.resume[interrupt_id])
        waiting = self.loop.null_resume
        try:
            answer = waiting.pop()  # atomic: parallel tasks may race for it
        except IndexError:
            schema = response_schema if adapter is None else adapter.json_schema()
            asked = Interrupt(value=value, id=interrupt_id, response_schema=schema)
            raise GraphInterrupt((asked,)) from None
        self.resume = {**self.resume, interrupt_id: answer}
        keeper = self.keeper or self
        keeper.answers = {**keeper.answers, interrupt_id: answer}
        keeper.took_answer = True
        return _checked_answer(adapter, answer)

    def __repr__(self) -> str:
        return f"Task(name={self.name!r}, path={self.path!r})"


def _response_adapter(schema: Any) -> Any:
    """A pydantic ``TypeAdapter`` for an ``interrupt()`` response schema given as a type; None
    for none, or for a JSON Schema dict (surfaced only)."""
    if schema is None or isinstance(schema, dict):
        return None
    try:
        from pydantic import TypeAdapter
    except ImportError as error:  # pydantic is not a dependency of stepgraph itself
        raise ImportError(
            "interrupt(response_schema=<a type>) validates answers with pydantic: "
            "pip install pydantic, or give the schema as a JSON Schema dict"
        ) from error
    return TypeAdapter(schema)


def _checked_answer(adapter: Any, answer: Any) -> Any:
    """``answer`` validated (and converted) by ``adapter``; a ``ValidationError`` is marked as
    an invalid answer (``errors.is_invalid_resume``)."""
    if adapter is None:
        return answer
    from pydantic import ValidationError

    try:
        return adapter.validate_python(answer)
    except ValidationError as error:
        mark_invalid_resume(error)
        raise
