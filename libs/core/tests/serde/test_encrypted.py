"""AES-GCM encryption at rest around the msgpack serializer."""

from __future__ import annotations

import subprocess
import sys

import pytest

from stepgraph.checkpoint.serde import (
    DecryptionError,
    EncryptedSerializer,
    MsgpackSerializer,
    SerializerProtocol,
)

KEY = bytes(range(32))
VALUE = {"secret": "the launch code", "n": [1, 2, 3]}


@pytest.fixture
def serde() -> EncryptedSerializer:
    return EncryptedSerializer(MsgpackSerializer(), key=KEY)


def test_encrypted_row_is_tagged_and_unreadable(serde: EncryptedSerializer) -> None:
    tag, payload = serde.dumps_typed(VALUE)
    assert tag == "msgpack+aesgcm"
    assert b"launch" not in payload
    assert serde.loads_typed((tag, payload)) == VALUE


@pytest.mark.parametrize("value", [None, b"raw", bytearray(b"raw"), 0, "s"])
def test_every_tag_is_encrypted(serde: EncryptedSerializer, value: object) -> None:
    tag, payload = serde.dumps_typed(value)
    assert tag.endswith("+aesgcm")
    assert serde.loads_typed((tag, payload)) == value


def test_same_value_encrypts_differently_each_time(serde: EncryptedSerializer) -> None:
    assert serde.dumps_typed(VALUE)[1] != serde.dumps_typed(VALUE)[1]


def test_plain_rows_stay_readable(serde: EncryptedSerializer) -> None:
    plain = MsgpackSerializer().dumps_typed(VALUE)
    assert serde.loads_typed(plain) == VALUE


@pytest.mark.parametrize("position", [0, 12, -1])
def test_tampered_ciphertext_is_refused(serde: EncryptedSerializer, position: int) -> None:
    tag, payload = serde.dumps_typed(VALUE)
    tampered = bytearray(payload)
    tampered[position] ^= 1
    with pytest.raises(DecryptionError, match="altered"):
        serde.loads_typed((tag, bytes(tampered)))


def test_relabelled_row_is_refused(serde: EncryptedSerializer) -> None:
    _, payload = serde.dumps_typed(b"raw bytes")
    with pytest.raises(DecryptionError):
        serde.loads_typed(("msgpack+aesgcm", payload))


def test_wrong_key_is_refused(serde: EncryptedSerializer) -> None:
    stored = serde.dumps_typed(VALUE)
    with pytest.raises(DecryptionError):
        EncryptedSerializer(MsgpackSerializer(), key=b"x" * 32).loads_typed(stored)


@pytest.mark.parametrize("size", [16, 24, 32])
def test_all_aes_key_sizes(size: int) -> None:
    serde = EncryptedSerializer(key=b"k" * size)
    assert serde.loads_typed(serde.dumps_typed(VALUE)) == VALUE


@pytest.mark.parametrize("key", [b"", b"short", b"k" * 31, "k" * 32])
def test_bad_keys_are_refused(key: bytes) -> None:
    with pytest.raises(ValueError, match="16, 24 or 32"):
        EncryptedSerializer(key=key)


def test_satisfies_the_protocol(serde: EncryptedSerializer) -> None:
    assert isinstance(serde, SerializerProtocol)
    assert isinstance(MsgpackSerializer(), SerializerProtocol)


def test_importing_serde_does_not_import_cryptography() -> None:
    code = (
        "import sys; import stepgraph.checkpoint.serde; "
        "assert 'cryptography' not in sys.modules, 'eager import'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_plaintext_rows_are_read_by_default() -> None:
    # Rows written before encryption was turned on stay readable (the migration promise).
    serde = EncryptedSerializer(MsgpackSerializer(), key=KEY)
    plain = MsgpackSerializer().dumps_typed(VALUE)
    assert serde.loads_typed(plain) == VALUE


@pytest.mark.parametrize("value", [VALUE, None, b"raw", bytearray(b"raw")])
def test_require_encryption_refuses_plaintext_rows(value: object) -> None:
    serde = EncryptedSerializer(MsgpackSerializer(), key=KEY, require_encryption=True)
    forged = MsgpackSerializer().dumps_typed(value)
    with pytest.raises(DecryptionError, match="not encrypted"):
        serde.loads_typed(forged)
    # Its own rows are still read.
    assert serde.loads_typed(serde.dumps_typed(value)) == value
