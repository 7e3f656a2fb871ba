"""Channels: how each slot of a graph's state combines the writes of a superstep."""

from stepgraph.channels.any_value import AnyValue
from stepgraph.channels.base import BaseChannel
from stepgraph.channels.binop import BinaryOperatorAggregate
from stepgraph.channels.ephemeral_value import EphemeralValue
from stepgraph.channels.last_value import LastValue, LastValueAfterFinish
from stepgraph.channels.named_barrier_value import NamedBarrierValue, NamedBarrierValueAfterFinish
from stepgraph.channels.topic import Topic
from stepgraph.channels.untracked_value import UntrackedValue

__all__ = [
    "AnyValue",
    "BaseChannel",
    "BinaryOperatorAggregate",
    "EphemeralValue",
    "LastValue",
    "LastValueAfterFinish",
    "NamedBarrierValue",
    "NamedBarrierValueAfterFinish",
    "Topic",
    "UntrackedValue",
]
