"""The step executor: bulk-synchronous supersteps over channels, with durable checkpoints."""

from stepgraph.pregel._algo import PregelNode
from stepgraph.pregel.main import Pregel
from stepgraph.types import RetryPolicy

__all__ = ["Pregel", "PregelNode", "RetryPolicy"]
