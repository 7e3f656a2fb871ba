"""Checkpoint ids: time-ordered, and distinct across processes forked from one another."""

from __future__ import annotations

import os
import sys
from uuid import UUID

import pytest

from stepgraph.checkpoint.base import uuid6


def test_ids_are_version_6_and_strictly_increasing() -> None:
    ids = [uuid6() for _ in range(10_000)]
    assert all(found.version == 6 and found.variant == "specified in RFC 4122" for found in ids)
    texts = [str(found) for found in ids]
    assert texts == sorted(texts) and len(set(texts)) == len(texts)


@pytest.mark.skipif(sys.platform == "win32", reason="os.fork")
def test_a_forked_child_draws_its_own_random_bits() -> None:
    # Parent and child share the clock and the last timestamp: what keeps their ids apart is
    # the node and the clock sequence, which the child must not inherit.
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(read)
        os.write(write, b",".join(str(uuid6()).encode() for _ in range(3)))
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        child = [UUID(text.decode()) for text in pipe.read().split(b",")]
    os.waitpid(pid, 0)
    parent = [uuid6() for _ in range(3)]
    assert {found.node for found in child}.isdisjoint({found.node for found in parent})
    assert len({found.node for found in child}) == 1  # one node per process
