"""``EncryptedSerializer``: AES-GCM encryption at rest around another serializer.

An encrypted row is tagged ``"<inner tag>+aesgcm"`` (e.g. ``"msgpack+aesgcm"``) and its payload
is a random 12-byte nonce followed by the ciphertext and the 16-byte GCM tag. The inner tag is
authenticated too, so a row cannot be relabelled. Rows without the suffix, e.g. written before
encryption was turned on, are read through the inner serializer as they are, unless
``require_encryption=True``: then they are refused, so whoever can write the table cannot inject
plaintext values. Turn it on once old rows are migrated.

The associated data is only the tag: an encrypted row can still be copied to another location
(thread, checkpoint, channel) encrypted with the same key and will decrypt there.

Needs the optional ``cryptography`` package (``pip install 'stepgraph[crypto]'``).
"""

from __future__ import annotations

import os
from typing import Any

from stepgraph.checkpoint.serde.base import SerializerProtocol

__all__ = ["ENCRYPTED_SUFFIX", "DecryptionError", "EncryptedSerializer"]

ENCRYPTED_SUFFIX = "+aesgcm"
_NONCE_SIZE = 12


class DecryptionError(ValueError):
    """An encrypted row cannot be decrypted: wrong key, or the stored data was altered."""


class EncryptedSerializer:
    """Encrypts what ``inner`` (default ``MsgpackSerializer()``) produces, with AES-GCM.

    ``key`` is the raw AES key: 16, 24 or 32 bytes (AES-128/192/256). Keep it outside the
    database, e.g. in a secret manager. Each row gets a fresh random nonce.

    ``require_encryption`` refuses rows that are not encrypted (``DecryptionError``). It is off
    by default so rows written before encryption was turned on stay readable; turn it on once
    they are migrated, since until then anyone who can write the table can plant plaintext rows.
    """

    def __init__(
        self,
        inner: SerializerProtocol | None = None,
        *,
        key: bytes,
        require_encryption: bool = False,
    ) -> None:
        if not isinstance(key, bytes) or len(key) not in (16, 24, 32):
            raise ValueError("the AES key must be 16, 24 or 32 bytes")
        try:
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        except ImportError as error:
            raise ImportError(
                "EncryptedSerializer needs the 'cryptography' package: "
                "pip install 'stepgraph[crypto]'"
            ) from error
        if inner is None:
            from stepgraph.checkpoint.serde.serializer import MsgpackSerializer

            inner = MsgpackSerializer()
        self.inner = inner
        self.require_encryption = require_encryption
        self._cipher = AESGCM(key)

    def allow(self, *types: type) -> None:
        """Allow user classes on the inner serializer (see ``MsgpackSerializer.allow``)."""
        self.inner.allow(*types)  # type: ignore[attr-defined]

    def allow_schema(self, schema: Any) -> None:
        allow_schema = getattr(self.inner, "allow_schema", None)
        if allow_schema is not None:
            allow_schema(schema)

    def dumps_typed(self, obj: Any) -> tuple[str, bytes]:
        tag, plaintext = self.inner.dumps_typed(obj)
        nonce = os.urandom(_NONCE_SIZE)
        ciphertext = self._cipher.encrypt(nonce, plaintext, tag.encode())
        return tag + ENCRYPTED_SUFFIX, nonce + ciphertext

    def loads_typed(self, data: tuple[str, bytes]) -> Any:
        tag, payload = data
        if not tag.endswith(ENCRYPTED_SUFFIX):
            if self.require_encryption:
                raise DecryptionError(
                    f"refusing a {tag!r} row that is not encrypted (require_encryption=True)"
                )
            return self.inner.loads_typed(data)
        from cryptography.exceptions import InvalidTag

        inner_tag = tag.removesuffix(ENCRYPTED_SUFFIX)
        payload = bytes(payload)
        try:
            plaintext = self._cipher.decrypt(
                payload[:_NONCE_SIZE], payload[_NONCE_SIZE:], inner_tag.encode()
            )
        except InvalidTag:
            raise DecryptionError(
                f"cannot decrypt a {tag!r} row: the key is wrong or the data was altered"
            ) from None
        return self.inner.loads_typed((inner_tag, plaintext))
