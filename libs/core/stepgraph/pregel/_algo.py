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

from stepgraph.constants import PUSH, TAG_HIDDEN
from stepgraph.errors import GraphInterrupt, mark_invalid_resume
from stepgraph.runtime import Runtime
from stepgraph.types import Interrupt, RetryPolicy

if TYPE_CHECKING:
    from stepgraph.channels.base import BaseChannel
    from stepgraph.config import RunnableConfig
    from stepgraph.pregel._loop import RunLoop

__all__ = ["PregelNode", "Task", "task_id"]

Writes = list[tuple[str, Any]]


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
        "answers",
        "calls",
        "done",
        "error",
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
        """``@task`` calls made so far by this attempt: the next call's index in its path."""
        self.spawned: list[Any] | None = None
        """The futures of the ``@task`` calls it made: the task ends only once they have,
        awaited or not (as in LangGraph), so none saves after its step."""
        self.subgraph_calls = 0
        """Graphs run so far by this attempt: the n-th one (from 0) keeps its checkpoints in
        the task's namespace, suffixed ``|n`` after the first."""
        self._id: str | None = None
        self._config: RunnableConfig | None = None

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
    def config(self) -> RunnableConfig:
        """The run's config plus LangGraph's per-task metadata keys."""
        if self._config is None:
            loop = self.loop
            base = loop.config
            task_ns = f"{self.name}:{self.id}"
            if loop.namespace:
                task_ns = f"{loop.namespace}|{task_ns}"
            self._config = {
                **base,
                "metadata": {
                    **base.get("metadata", {}),
                    "langgraph_step": loop.step,
                    "langgraph_node": self.name,
                    "langgraph_triggers": self.triggers,
                    "langgraph_path": self.path,
                    "langgraph_checkpoint_ns": task_ns,
                },
                "configurable": {**base.get("configurable", {}), "checkpoint_ns": task_ns},
            }
        return self._config

    @property
    def runtime(self) -> Runtime:
        return Runtime(context=self.loop.context, stream_writer=self.stream_writer)

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
