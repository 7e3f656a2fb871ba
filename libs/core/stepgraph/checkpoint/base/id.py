"""Time-ordered checkpoint ids.

Checkpoint ids must sort in creation order as plain strings, in every backend, so "latest
checkpoint" and `before=` are simple string comparisons and index range scans. We use UUID
version 6 (RFC 9562): the timestamp is stored most-significant first, so the canonical hex form
sorts chronologically. Ids from one process are strictly increasing even when the clock does
not move or steps backwards.
"""

from __future__ import annotations

import os
import random
import threading
import time
from uuid import UUID

__all__ = ["uuid6", "uuid6_str"]

# 100-ns intervals between the Gregorian epoch (1582-10-15) and the Unix epoch.
_GREGORIAN_OFFSET = 0x01B21DD213814000

_lock = threading.Lock()
_last_timestamp = 0
# The random bits come from a generator seeded once from the OS, not from os.urandom per id:
# on virtual machines urandom is a system call of ~10 µs, a sixth of a saved step's cost. The
# ids need to be unique, not unpredictable. A forked child reseeds and takes a node of its own,
# so parent and child never share a sequence.
_random = random.Random()
_node = 0


def _reseed() -> None:
    global _node
    _random.seed()
    _node = _random.getrandbits(48) | 0x010000000000  # random node, multicast bit set


_reseed()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reseed)


def uuid6() -> UUID:
    """Return a new UUIDv6 that sorts after every id this process returned before."""
    return UUID(int=_uuid6_int())


def uuid6_str() -> str:
    """``str(uuid6())``, made without a ``UUID`` object (a checkpoint id at every step)."""
    h = f"{_uuid6_int():032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _uuid6_int() -> int:
    global _last_timestamp
    with _lock:
        timestamp = time.time_ns() // 100 + _GREGORIAN_OFFSET
        if timestamp <= _last_timestamp:
            timestamp = _last_timestamp + 1
        _last_timestamp = timestamp
    clock_seq = _random.getrandbits(14)
    time_high_and_mid = (timestamp >> 12) & 0xFFFF_FFFF_FFFF
    time_low = timestamp & 0x0FFF
    value = (time_high_and_mid << 80) | (0x6 << 76) | (time_low << 64)
    return value | (0b10 << 62) | (clock_seq << 48) | _node
