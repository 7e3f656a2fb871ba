"""Serializers for checkpoints and writes: strict typed msgpack, optionally encrypted.

See ``docs/serialization.md`` for what round-trips, how to allow user types, and encryption.
"""

from stepgraph.checkpoint.serde.allowlist import register_type
from stepgraph.checkpoint.serde.base import SerializerProtocol
from stepgraph.checkpoint.serde.encrypted import DecryptionError, EncryptedSerializer
from stepgraph.checkpoint.serde.serializer import MsgpackSerializer

__all__ = [
    "DecryptionError",
    "EncryptedSerializer",
    "MsgpackSerializer",
    "SerializerProtocol",
    "register_type",
]
