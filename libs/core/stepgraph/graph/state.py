"""``StateGraph``: build a graph of nodes over a shared state, then compile it to a ``Pregel``.

Compilation turns the builder into channels and nodes:

* one channel per state key (last value, or a reducer from ``Annotated[T, reducer]``);
* ``__start__`` holds the run's input; the hidden ``__start__`` node maps it to state writes;
* ``branch:to:<node>`` triggers a node (written by edges, conditional edges and ``Command.goto``);
* ``join:<a>+<b>:<node>`` waits for all of ``add_edge([a, b], node)``'s sources;
* ``__pregel_tasks`` carries ``Send`` packets, each a task of the next step.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import replace
from functools import partial
from typing import Any, Literal, get_args, get_origin, get_type_hints

from stepgraph.channels.any_value import AnyValue
from stepgraph.channels.base import BaseChannel
from stepgraph.channels.binop import BinaryOperatorAggregate
from stepgraph.channels.ephemeral_value import EphemeralValue
from stepgraph.channels.last_value import LastValueAfterFinish
from stepgraph.channels.named_barrier_value import NamedBarrierValue, NamedBarrierValueAfterFinish
from stepgraph.channels.topic import Topic
from stepgraph.constants import END, RESERVED, START, TAG_HIDDEN, TASKS, branch_channel
from stepgraph.errors import InvalidUpdateError, ParentCommand
from stepgraph.graph._schema import (
    channels_for,
    check_update,
    is_model,
    make_reader,
    schema_keys,
)
from stepgraph.managed import ManagedValue
from stepgraph.pregel._algo import PregelNode, Task, Writes
from stepgraph.pregel.main import Pregel
from stepgraph.types import CachePolicy, Command, RetryPolicy, Send, StreamMode

__all__ = ["CompiledStateGraph", "StateGraph"]


class _NodeSpec:
    __slots__ = ("action", "defer", "destinations", "input_schema", "metadata", "retry_policy")

    def __init__(
        self,
        action: Callable[..., Any],
        input_schema: Any,
        retry_policy: Any,
        defer: bool,
        destinations: tuple[str, ...],
        metadata: dict[str, Any] | None,
    ) -> None:
        self.action = action
        self.input_schema = input_schema
        self.retry_policy = retry_policy
        self.defer = defer
        self.destinations = destinations
        self.metadata = metadata


class _Branch:
    """A conditional edge: ``path(state)`` names the next node(s), or returns ``Send``s."""

    __slots__ = ("call", "is_async", "path", "path_map")

    def __init__(self, path: Callable[..., Any], path_map: dict[Hashable, str] | None) -> None:
        self.path = path
        self.path_map = path_map
        self.call = _caller(path)
        self.is_async = _is_async(path)

    def routes(self, result: Any) -> list[tuple[str, Any]]:
        """The trigger writes for what ``path`` returned (``END`` routes nowhere)."""
        items = result if isinstance(result, (list, tuple)) else [result]
        found: list[str | Send] = []
        for item in items:
            if isinstance(item, Send):
                found.append(item)
            elif self.path_map is not None and item != END:
                if item not in self.path_map:
                    raise InvalidUpdateError(
                        f"Conditional edge returned {item!r}, which is not in its path_map"
                    )
                found.append(self.path_map[item])
            else:
                found.append(item)
        return [_route(target) for target in found if target != END]


class StateGraph:
    """A graph whose nodes read a shared state and return updates to it.

    ``state_schema`` is a TypedDict, dataclass or pydantic model. A key annotated
    ``Annotated[T, reducer]`` combines updates with ``reducer(current, update)``; other keys keep
    the last value written (two writes in one step are an error).
    """

    def __init__(
        self,
        state_schema: Any = None,
        context_schema: Any = None,
        *,
        input_schema: Any = None,
        output_schema: Any = None,
        **kwargs: Any,
    ) -> None:
        # LangGraph's older keyword names.
        input_schema = input_schema or kwargs.pop("input", None)
        output_schema = output_schema or kwargs.pop("output", None)
        context_schema = context_schema or kwargs.pop("config_schema", None)
        if kwargs:
            raise TypeError(f"Unexpected arguments: {sorted(kwargs)}")
        if state_schema is None and (input_schema is None or output_schema is None):
            raise ValueError("Pass a state_schema (or both input_schema and output_schema)")
        self.state_schema = state_schema
        self.context_schema = context_schema
        self.input_schema = input_schema or state_schema
        self.output_schema = output_schema or state_schema
        self.nodes: dict[str, _NodeSpec] = {}
        self.edges: set[tuple[str, str]] = set()
        self.waiting_edges: set[tuple[tuple[str, ...], str]] = set()
        self.branches: dict[str, list[_Branch]] = {}
        self.channels: dict[str, BaseChannel] = {}
        for schema in (state_schema, self.input_schema, self.output_schema):
            self._add_schema(schema)

    def _add_schema(self, schema: Any) -> None:
        if schema is None:
            return
        for key, channel in channels_for(schema).items():
            self.channels.setdefault(key, channel)

    # -- building ----------------------------------------------------------------------------

    def add_node(
        self,
        node: str | Callable[..., Any],
        action: Callable[..., Any] | None = None,
        *,
        defer: bool = False,
        metadata: dict[str, Any] | None = None,
        input_schema: Any = None,
        retry_policy: RetryPolicy | Sequence[RetryPolicy] | None = None,
        cache_policy: CachePolicy | None = None,
        destinations: dict[str, str] | tuple[str, ...] | None = None,
        **kwargs: Any,
    ) -> StateGraph:
        """Add a node; ``add_node(fn)`` names it after the function."""
        retry_policy = retry_policy or kwargs.pop("retry", None)
        input_schema = input_schema or kwargs.pop("input", None)
        if kwargs:
            raise TypeError(f"Unexpected arguments: {sorted(kwargs)}")
        if not isinstance(node, str):
            action = node
            inferred = getattr(node, "name", None) or getattr(node, "__name__", None)
            if not isinstance(inferred, str):
                raise ValueError(f"Cannot infer a node name from {action!r}: pass one")
            node = inferred
        if action is None:
            raise ValueError(f"Node '{node}' needs an action (a function or a compiled graph)")
        if node in RESERVED:
            raise ValueError(f"'{node}' is reserved and cannot be used as a node name")
        for character in ("|", ":"):
            if character in node:
                raise ValueError(f"'{character}' is reserved and cannot be used in node names")
        if node in self.nodes:
            raise ValueError(f"Node `{node}` already present.")
        if input_schema is None:
            input_schema = _first_param_schema(action)
        if input_schema is not None:
            self._add_schema(input_schema)
        declared = tuple(destinations or ()) or _command_destinations(action)
        self.nodes[node] = _NodeSpec(action, input_schema, retry_policy, defer, declared, metadata)
        return self

    def add_edge(self, start_key: str | Sequence[str], end_key: str) -> StateGraph:
        """Run ``end_key`` after ``start_key``; after all of them, for a list of sources."""
        if isinstance(start_key, str):
            if start_key == END:
                raise ValueError("END cannot be a start node")
            if end_key == START:
                raise ValueError("START cannot be an end node")
            self.edges.add((start_key, end_key))
            return self
        sources = tuple(start_key)
        for source in sources:
            if source == END:
                raise ValueError("END cannot be a start node")
        if end_key == START:
            raise ValueError("START cannot be an end node")
        if len(sources) == 1:
            self.edges.add((sources[0], end_key))
        else:
            self.waiting_edges.add((sources, end_key))
        return self

    def add_conditional_edges(
        self,
        source: str,
        path: Callable[..., Any],
        path_map: dict[Hashable, str] | list[str] | None = None,
    ) -> StateGraph:
        """After ``source``, call ``path(state)`` to choose the next node(s) or ``Send``s.

        ``path_map`` maps ``path``'s return values to node names (a list maps names to
        themselves); without it ``path`` returns node names.
        """
        if isinstance(path_map, list):
            path_map = {name: name for name in path_map}
        elif path_map is None:
            path_map = _literal_path_map(path)
        self.branches.setdefault(source, []).append(_Branch(path, path_map))
        return self

    def add_sequence(
        self, nodes: Sequence[Callable[..., Any] | tuple[str, Callable[..., Any]]]
    ) -> StateGraph:
        """Add nodes that run one after another, in the given order."""
        if not nodes:
            raise ValueError("A sequence needs at least one node")
        previous: str | None = None
        for item in nodes:
            if isinstance(item, tuple):
                name, action = item
            else:
                action = item
                name = str(getattr(item, "name", None) or getattr(item, "__name__", ""))
            self.add_node(name, action)
            if previous is not None:
                self.add_edge(previous, name)
            previous = name
        return self

    def set_entry_point(self, key: str) -> StateGraph:
        return self.add_edge(START, key)

    def set_conditional_entry_point(
        self, path: Callable[..., Any], path_map: dict[Hashable, str] | list[str] | None = None
    ) -> StateGraph:
        return self.add_conditional_edges(START, path, path_map)

    def set_finish_point(self, key: str) -> StateGraph:
        return self.add_edge(key, END)

    # -- validation --------------------------------------------------------------------------

    def validate(self, interrupt: Sequence[str] = ()) -> None:
        known = set(self.nodes)
        sources = {source for source, _ in self.edges}
        sources |= {s for group, _ in self.waiting_edges for s in group}
        sources |= set(self.branches)
        for source in sources:
            if source != START and source not in known:
                raise ValueError(f"Found edge starting at unknown node '{source}'")
        targets = {target for _, target in self.edges} | {t for _, t in self.waiting_edges}
        for branch_list in self.branches.values():
            for branch in branch_list:
                if branch.path_map is not None:
                    targets |= set(branch.path_map.values())
        for spec in self.nodes.values():
            targets |= set(spec.destinations)
        for target in targets:
            if target != END and target not in known:
                raise ValueError(f"Found edge ending at unknown node `{target}`")
        if START not in sources:
            raise ValueError(
                "Graph must have an entrypoint: add at least one edge from START to another node"
            )
        for name in interrupt:
            if name != "*" and name not in known:
                raise ValueError(f"Interrupt node `{name}` not found")

    # -- compiling ---------------------------------------------------------------------------

    def compile(
        self,
        checkpointer: Any = None,
        *,
        interrupt_before: Sequence[str] | Literal["*"] | None = None,
        interrupt_after: Sequence[str] | Literal["*"] | None = None,
        debug: bool = False,
        name: str | None = None,
    ) -> CompiledStateGraph:
        """Validate the graph and build the executable ``Pregel`` for it."""
        before = _node_list(interrupt_before, self.nodes)
        after = _node_list(interrupt_after, self.nodes)
        self.validate([*before, *after])
        if checkpointer is not None:
            allow = getattr(getattr(checkpointer, "serde", None), "allow_schema", None)
            if allow is not None:
                for schema in self._schemas():
                    allow(schema)
        return _Compiler(self).compile(
            checkpointer, before, after, debug=debug, name=name or "LangGraph"
        )

    def _schemas(self) -> list[Any]:
        found: list[Any] = []
        for schema in (
            self.state_schema,
            self.input_schema,
            self.output_schema,
            *(spec.input_schema for spec in self.nodes.values()),
        ):
            if schema is not None and schema not in found and isinstance(schema, type):
                found.append(schema)
        return found


class CompiledStateGraph(Pregel):
    """A compiled ``StateGraph``."""

    stream_mode: StreamMode = "updates"


class _Compiler:
    """Turns a validated builder into the nodes and channels of a ``Pregel``."""

    def __init__(self, builder: StateGraph) -> None:
        self.builder = builder
        # Managed values are read by nodes, never written, output or stored.
        stored = [k for k, c in builder.channels.items() if not isinstance(c, ManagedValue)]
        self.state_keys = frozenset(stored)
        self.state_keys_in_order = tuple(stored)
        self.channels: dict[str, BaseChannel] = dict(builder.channels)
        self.channels[START] = EphemeralValue(Any, key=START)
        self.channels[TASKS] = Topic(Send, key=TASKS)
        # A step that does not write an AnyValue key empties it, as an ephemeral channel.
        self.ephemeral = {START, TASKS} | {
            k for k, c in builder.channels.items() if isinstance(c, AnyValue)
        }
        self.finish_channels: list[str] = []
        self.state_reader = make_reader(builder.state_schema, schema_keys(builder.state_schema))
        self.state_reader_dict = make_reader(dict, schema_keys(builder.state_schema))
        self.triggers: dict[str, list[str]] = {name: [] for name in builder.nodes}
        self.edge_writes: dict[str, list[tuple[str, Any]]] = {START: []}
        for name, spec in builder.nodes.items():
            self.edge_writes[name] = []
            trigger = branch_channel(name)
            if spec.defer:
                self.channels[trigger] = LastValueAfterFinish(Any, key=trigger)
                self.finish_channels.append(trigger)
            else:
                self.channels[trigger] = EphemeralValue(Any, guard=False, key=trigger)
                self.ephemeral.add(trigger)
            self.triggers[name].append(trigger)
        for source, target in sorted(builder.edges):
            if target != END:
                self.edge_writes[source].append((branch_channel(target), None))
        for sources, target in sorted(builder.waiting_edges):
            channel = f"join:{'+'.join(sources)}:{target}"
            if builder.nodes[target].defer:
                self.channels[channel] = NamedBarrierValueAfterFinish(
                    str, set(sources), key=channel
                )
                self.finish_channels.append(channel)
            else:
                self.channels[channel] = NamedBarrierValue(str, set(sources), key=channel)
            self.triggers[target].append(channel)
            for source in sources:
                self.edge_writes[source].append((channel, source))

    def compile(
        self,
        checkpointer: Any,
        interrupt_before: list[str],
        interrupt_after: list[str],
        *,
        debug: bool,
        name: str,
    ) -> CompiledStateGraph:
        builder = self.builder
        keys = self.state_keys
        input_keys = frozenset(schema_keys(builder.input_schema))

        def read_input(channels: dict[str, BaseChannel]) -> Any:
            return channels[START].get()

        def input_update(value: Any) -> _Update:
            # As in LangGraph, a dict input writes its known keys as given: a dataclass or
            # pydantic state validates (and converts) them when a node reads the state, after
            # reducers ran (add_messages turns ("user", "hi") into a message first).
            return _Update(check_update(START, value, input_keys))

        # A dataclass or pydantic state is checked in START's step, as the first node will
        # read it: an invalid input then fails that step, with nothing of it in the state,
        # where LangGraph fails when the node is planned and leaves a thread whose state cannot
        # be read back. Keys with a reducer are left as they are for the check (a reducer may
        # change its value in place, and coerces what it is given: add_messages); the node's
        # own read checks them, as in LangGraph.
        state_schema = builder.state_schema if is_model(builder.state_schema) else None
        reduced = frozenset(
            k for k, c in builder.channels.items() if isinstance(c, BinaryOperatorAggregate)
        )

        def take_input(task: Task, value: Any) -> Any:
            if state_schema is not None and isinstance(value, dict):
                state = self.state_reader_dict(task.loop.channels)
                state.update(
                    (k, v) for k, v in check_update(START, value, input_keys) if k not in reduced
                )
                state_schema(**state)
            return value

        nodes = {
            START: self._pregel_node(START, read_input, take_input, False, input_update, None, True)
        }
        update_writers = {START: self._update_writer(START, input_update)}
        for node_name, spec in builder.nodes.items():
            schema = spec.input_schema or builder.state_schema
            nodes[node_name] = self._pregel_node(
                node_name,
                make_reader(schema, schema_keys(schema)),
                _caller(spec.action, schema),
                _is_async(spec.action),
                partial(self._to_update, node_name, keys=keys),
                spec.retry_policy,
                acall=(
                    _caller(spec.action, schema, use_async=True)
                    if isinstance(spec.action, Pregel)
                    else None
                ),
            )
            update_writers[node_name] = self._update_writer(
                node_name, partial(self._to_update, node_name, keys=keys)
            )
        compiled = CompiledStateGraph(
            nodes=nodes,
            channels=self.channels,
            output_channels=tuple(k for k in schema_keys(builder.output_schema) if k in keys),
            stream_channels=self.state_keys_in_order,
            update_writers=update_writers,
            ephemeral_channels=frozenset(self.ephemeral),
            finish_channels=self.finish_channels,
            checkpointer=checkpointer,
            interrupt_before=interrupt_before,
            interrupt_after=interrupt_after,
            name=name,
            debug=debug,
            builder=builder,
            state_keys=self.state_keys_in_order,
        )
        compiled.context_schema = builder.context_schema
        # version="v2" gives whole states as the schema's objects (dataclass, pydantic).
        if is_model(builder.output_schema):
            compiled.output_mapper = partial(_as_object, builder.output_schema)
        if is_model(builder.state_schema):
            compiled.state_mapper = partial(_as_object, builder.state_schema)
        for node_name, spec in builder.nodes.items():
            subgraph = _find_subgraph(spec.action)
            if subgraph is not None:
                compiled.subgraphs[node_name] = subgraph
        return compiled

    def _pregel_node(
        self,
        name: str,
        read: Callable[[dict[str, BaseChannel]], Any],
        call: Callable[[Task, Any], Any],
        call_is_async: bool,
        to_update: Callable[[Any], _Update],
        retry_policy: Any,
        hidden: bool = False,
        acall: Callable[[Task, Any], Any] | None = None,
    ) -> PregelNode:
        """The executor's node: call the action, then turn its output into writes.

        ``acall`` is the action under the async API when it differs from ``call`` (a compiled
        subgraph: ``ainvoke``, so it saves through an async checkpointer, as in LangGraph)."""
        write, awrite = self._writers(name)

        def run(task: Task, value: Any) -> Writes:
            try:
                output = call(task, value)
            except ParentCommand as bubbled:  # a subgraph this node ran addressed this graph
                output = bubbled.command
            return write(task, to_update(_not_awaitable(name, output)))

        arun = None
        if (
            call_is_async
            or acall is not None
            or any(b.is_async for b in self.builder.branches.get(name, ()))
        ):
            call_async = acall or call

            async def arun(task: Task, value: Any) -> Writes:
                try:
                    output = call_async(task, value)
                    if inspect.isawaitable(output):
                        output = await output
                except ParentCommand as bubbled:
                    output = bubbled.command
                return await awrite(task, to_update(output))

        return PregelNode(
            name,
            (START,) if name == START else self.triggers[name],
            read,
            run,
            arun,
            retry_policy=retry_policy,
            tags=(TAG_HIDDEN,) if hidden else (),
            plain=name == START and not self.builder.branches.get(START),
        )

    def _update_writer(
        self, name: str, to_update: Callable[[Any], _Update]
    ) -> Callable[[Task, Any], Writes]:
        """``update_state(values, as_node=name)``: the node's writes without running it."""
        write, _ = self._writers(name)
        return lambda task, value: write(task, to_update(value))

    @staticmethod
    def _to_update(name: str, output: Any, *, keys: frozenset[str]) -> _Update:
        """A node's return value as state writes, routing and what ``updates`` streams."""
        if output is None:
            return _Update([], None)
        if isinstance(output, Command):
            return _command_update(name, output, keys)
        if (
            isinstance(output, (list, tuple))
            and output
            and any(isinstance(item, Command) for item in output)
        ):  # as in LangGraph: each Command routes and updates, each other item updates
            merged = _Update([], None)
            streamed = []  # "updates" shows each item's update, as LangGraph's does
            for item in output:
                if isinstance(item, Command):
                    part = _command_update(name, item, keys)
                    pairs = part.writes
                    merged.goto.extend(part.goto)
                else:
                    pairs = check_update(name, item, keys) if item is not None else []
                merged.writes.extend(pairs)
                if pairs:
                    streamed.append(dict(pairs))
            merged.streamed = streamed[0] if len(streamed) == 1 else streamed or None
            return merged
        pairs = check_update(name, output, keys)
        # "updates" shows None for an update that writes no state key, as LangGraph does.
        return _Update(pairs, dict(pairs) if pairs else None)

    def _writers(
        self, name: str
    ) -> tuple[Callable[[Task, _Update], Writes], Callable[[Task, _Update], Awaitable[Writes]]]:
        """A node's writes after it returned: its state update, its static edges, its
        ``Command.goto``, then its conditional edges (evaluated on the state with the update
        applied). The async form awaits async path functions."""
        static = self.edge_writes.get(name, [])
        branches = self.builder.branches.get(name, [])
        read_fresh = self._fresh_reader()

        def unconditional(task: Task, update: _Update) -> Writes:
            task.update = update.streamed
            writes = update.writes
            writes.extend(static)
            writes.extend(_route(target) for target in update.goto)
            return writes

        def write(task: Task, update: _Update) -> Writes:
            writes = unconditional(task, update)
            if branches:
                state = read_fresh(task, writes)
                for branch in branches:
                    result = _not_awaitable(name, branch.call(task, state))
                    writes.extend(branch.routes(result))
            return writes

        async def awrite(task: Task, update: _Update) -> Writes:
            writes = unconditional(task, update)
            if branches:
                state = read_fresh(task, writes)
                for branch in branches:
                    result = branch.call(task, state)
                    if inspect.isawaitable(result):
                        result = await result
                    writes.extend(branch.routes(result))
            return writes

        return write, awrite

    def _fresh_reader(self) -> Callable[[Task, Writes], Any]:
        """Conditional edges see the state with the node's own writes applied."""
        keys = self.state_keys
        reader = self.state_reader

        def read_fresh(task: Task, writes: Writes) -> Any:
            channels = task.loop.channels
            grouped: dict[str, list[Any]] = {}
            for channel, value in writes:
                if channel in keys:
                    grouped.setdefault(channel, []).append(value)
            if not grouped:
                return reader(channels)
            local = dict(channels)
            for channel, values in grouped.items():
                local[channel] = channels[channel].copy()
                local[channel].update(values)
            return reader(local)

        return read_fresh


class _Update:
    """A node's output, decoded: state writes, routing targets, the ``updates`` chunk."""

    __slots__ = ("goto", "streamed", "writes")

    def __init__(self, writes: Writes, streamed: Any = None) -> None:
        self.writes = writes
        self.goto: list[str | Send] = []
        self.streamed = streamed


def _command_update(name: str, command: Command, keys: frozenset[str]) -> _Update:
    if command.graph == Command.PARENT:
        # The parent graph applies it, as the output of its node that runs this graph.
        raise ParentCommand(replace(command, graph=None))
    pairs = command.update_writes()
    writes = [(k, v) for k, v in pairs if k in keys]
    update = _Update(writes, dict(writes) if writes else None)
    update.goto = [target for target in command.goto_targets() if target != END]  # routes nowhere
    return update


def _route(target: str | Send) -> tuple[str, Any]:
    if isinstance(target, Send):
        return (TASKS, target)
    return (branch_channel(target), None)


def _is_async(fn: Any) -> bool:
    """Whether ``fn`` can only run under the async API (a graph: one of its nodes or branches).

    A compiled subgraph node has an ``arun`` (``ainvoke``) even when it can run sync, so a
    graph built here is judged by its builder's actions, not by its nodes."""
    if isinstance(fn, Pregel):
        builder = fn.builder
        if isinstance(builder, StateGraph):
            return any(_is_async(spec.action) for spec in builder.nodes.values()) or any(
                b.is_async for branches in builder.branches.values() for b in branches
            )
        return any(node.arun is not None for node in fn.nodes.values())
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 (callable objects)
    )


_INJECTED = {
    "config": lambda task: task.config,
    "runtime": lambda task: task.runtime,
    "writer": lambda task: task.stream_writer,
}


def _caller(fn: Any, schema: Any = None, use_async: bool = False) -> Callable[[Task, Any], Any]:
    """``fn(state)`` plus the keyword arguments it asks for (config, runtime, writer).

    With a model ``schema``, a ``Send`` argument given as a dict is turned into the model.
    ``use_async`` runs a compiled graph with ``ainvoke`` even if all its nodes are sync.
    """
    call = _plain_caller(fn, use_async)
    if not is_model(schema):
        return call

    def call_with_model(task: Task, state: Any) -> Any:
        if task.is_push and isinstance(state, dict):
            state = schema(**state)
        return call(task, state)

    return call_with_model


def _find_subgraph(action: Any) -> Pregel | None:
    """The compiled graph a node runs: the node itself, or one its function refers to."""
    if isinstance(action, Pregel):
        return action
    try:
        found = inspect.getclosurevars(action)
    except (TypeError, ValueError):
        return None
    for value in (*found.nonlocals.values(), *found.globals.values()):
        if isinstance(value, Pregel):
            return value
    return None


def _as_object(schema: Any, values: dict[str, Any]) -> Any:
    return schema(**values)


def _not_awaitable(name: str, value: Any) -> Any:
    if value is None or type(value) in (dict, str):  # the common cases, checked cheaply
        return value
    if inspect.isawaitable(value):
        close = getattr(value, "close", None)
        if close is not None:
            close()  # no "never awaited" warning
        raise TypeError(f"Node '{name}' is async: run the graph with ainvoke/astream")
    return value


def _plain_caller(fn: Any, use_async: bool = False) -> Callable[[Task, Any], Any]:
    if isinstance(fn, Pregel):
        graph = fn
        if use_async or _is_async(graph):
            return lambda task, state: graph.ainvoke(state, task.config)
        return lambda task, state: graph.invoke(state, task.config)
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return lambda task, state: fn(state)
    wanted = [(p, _INJECTED[p]) for p in params if p in _INJECTED]
    positional = [
        p
        for p in params.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in _INJECTED
    ]
    if not wanted:
        if not positional and not any(p.kind == p.VAR_POSITIONAL for p in params.values()):
            return lambda task, state: fn()
        return lambda task, state: fn(state)

    def call(task: Task, state: Any) -> Any:
        return fn(state, **{name: get(task) for name, get in wanted})

    return call


def _first_param_schema(fn: Any) -> Any:
    """A node's input schema from its first parameter's annotation, if it is a schema class."""
    try:
        target = fn if inspect.isfunction(fn) or inspect.ismethod(fn) else fn.__call__
        hints = get_type_hints(target)
        first = next(iter(inspect.signature(fn).parameters), None)
    except Exception:
        return None
    annotation = hints.get(first) if first else None
    if isinstance(annotation, type) and (
        is_model(annotation) or getattr(annotation, "__total__", None) is not None
    ):
        return annotation
    return None


def _literal_names(annotation: Any) -> tuple[str, ...]:
    if get_origin(annotation) is Literal:
        return tuple(a for a in get_args(annotation) if isinstance(a, str))
    return ()


def _literal_path_map(path: Any) -> dict[Hashable, str] | None:
    """``def route(state) -> Literal["a", "b"]`` declares its destinations."""
    try:
        annotation = get_type_hints(path).get("return")
    except Exception:
        return None
    names = _literal_names(annotation)
    return {name: name for name in names} if names else None


def _command_destinations(fn: Any) -> tuple[str, ...]:
    """``-> Command[Literal["a", "b"]]`` declares where a node's Command may go."""
    try:
        annotation = get_type_hints(fn).get("return")
    except Exception:
        return ()
    if get_origin(annotation) is Command:
        args = get_args(annotation)
        return _literal_names(args[0]) if args else ()
    return ()


def _node_list(value: Sequence[str] | str | None, nodes: dict[str, Any]) -> list[str]:
    if value is None:
        return []
    if value == "*":
        return list(nodes)
    return list(value)
