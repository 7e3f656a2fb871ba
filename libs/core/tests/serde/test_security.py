"""Stored bytes never make the reader import or call anything that is not allowed."""

from __future__ import annotations

import contextlib
import os
import re
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stepgraph.checkpoint.serde import MsgpackSerializer
from stepgraph.checkpoint.serde.codec import DATACLASS, ENUM, NAMEDTUPLE, PYDANTIC
from stepgraph.errors import UnknownTypeError

CLASS_CODES = [ENUM, DATACLASS, NAMEDTUPLE, PYDANTIC]


def crafted(code: int, module: str, qualname: str, payload: Any) -> bytes:
    """A msgpack payload naming ``module.qualname`` the way a stored user class would."""
    body = msgpack.packb([module, qualname, payload], use_bin_type=True)
    return msgpack.packb({"value": msgpack.ExtType(code, body)}, use_bin_type=True)


@pytest.fixture
def booby_trapped_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An importable module that leaves a marker file behind if it is ever imported."""
    marker = tmp_path / "imported.marker"
    (tmp_path / "stepgraph_trap_module.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('imported')\n"
        "class Payload:\n"
        "    def __init__(self, *args, **kwargs):\n"
        f"        Path({str(marker)!r}).write_text('called')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "stepgraph_trap_module", raising=False)
    return marker


@pytest.mark.parametrize("code", CLASS_CODES)
def test_unlisted_module_is_never_imported(booby_trapped_module: Path, code: int) -> None:
    payload = crafted(code, "stepgraph_trap_module", "Payload", {"a": 1})

    with pytest.raises(UnknownTypeError, match=r"stepgraph_trap_module\.Payload") as caught:
        MsgpackSerializer().loads_typed(("msgpack", payload))

    assert caught.value.type_name == "stepgraph_trap_module.Payload"  # type: ignore[attr-defined]
    assert not booby_trapped_module.exists()
    assert "stepgraph_trap_module" not in sys.modules


@pytest.mark.parametrize("code", CLASS_CODES)
@pytest.mark.parametrize(
    ("module", "qualname"),
    [
        ("os", "system"),
        ("builtins", "eval"),
        ("subprocess", "Popen"),
        ("posix", "system"),
        ("builtins", "object"),
    ],
)
def test_dangerous_callables_are_refused(
    monkeypatch: pytest.MonkeyPatch, code: int, module: str, qualname: str
) -> None:
    calls: list[Any] = []
    monkeypatch.setattr(os, "system", lambda *args: calls.append(args))
    payload = crafted(code, module, qualname, "touch /tmp/stepgraph-pwned")

    with pytest.raises(UnknownTypeError, match=f"{module}.{qualname}"):
        MsgpackSerializer().loads(payload)

    assert calls == []


@pytest.mark.parametrize(
    "qualname",
    [
        "random.Random",  # a class reachable through an attribute, not defined there
        "random.getrandbits",
        "RetryPolicy.should_retry",
        "default_retry_on",
        "NoSuchType",
    ],
)
def test_library_prefix_only_resolves_classes_defined_there(qualname: str) -> None:
    with pytest.raises(UnknownTypeError):
        MsgpackSerializer().loads(crafted(DATACLASS, "stepgraph.types", qualname, {}))


def test_library_submodule_that_does_not_exist_is_refused() -> None:
    with pytest.raises(UnknownTypeError):
        MsgpackSerializer().loads(crafted(DATACLASS, "stepgraph.types.os", "system", {}))


def test_library_type_under_the_wrong_kind_is_refused() -> None:
    # ``Send`` is a dataclass; a payload claiming it is a pydantic model must not reach
    # ``model_construct`` or any other attribute it does not have.
    with pytest.raises(UnknownTypeError, match="dataclass"):
        MsgpackSerializer().loads(crafted(PYDANTIC, "stepgraph.types", "Send", [{}, None]))


@dataclass
class Allowed:
    value: int


def test_allowed_class_under_a_different_name_is_refused() -> None:
    serde = MsgpackSerializer(allowed_types=[Allowed])
    payload = crafted(DATACLASS, Allowed.__module__, "Allowed.__init__", {"value": 1})
    with pytest.raises(UnknownTypeError):
        serde.loads(payload)


def test_unknown_extension_code_is_refused() -> None:
    payload = msgpack.packb(msgpack.ExtType(99, b"\x00"))
    with pytest.raises(UnknownTypeError, match="99"):
        MsgpackSerializer().loads(payload)


def test_unknown_tag_is_refused() -> None:
    with pytest.raises(UnknownTypeError, match="pickle"):
        MsgpackSerializer().loads_typed(("pickle", b"cos\nsystem\n."))


def test_encrypted_row_read_without_key_says_so() -> None:
    with pytest.raises(UnknownTypeError, match="EncryptedSerializer"):
        MsgpackSerializer().loads_typed(("msgpack+aesgcm", b"\x00" * 40))


def test_no_pickle_anywhere() -> None:
    import stepgraph.checkpoint.serde as serde_package

    package_dir = Path(serde_package.__file__).parent
    uses_pickle = re.compile(r"\b(import|from)\s+(c?pickle|dill|cloudpickle)\b|\bpickle\.")
    for source in package_dir.glob("*.py"):
        assert not uses_pickle.search(source.read_text()), source


@given(data=st.binary(max_size=64))
@settings(max_examples=300, deadline=None)
def test_arbitrary_bytes_fail_cleanly(data: bytes) -> None:
    modules_before = set(sys.modules)
    # msgpack's format errors are ValueErrors; SerializationError is a TypeError.
    with contextlib.suppress(ValueError, TypeError):
        MsgpackSerializer().loads(data)
    assert set(sys.modules) == modules_before


@given(position=st.integers(min_value=0), bit=st.integers(min_value=0, max_value=7))
@settings(max_examples=300, deadline=None)
def test_flipped_bits_in_a_stored_value_fail_cleanly(position: int, bit: int) -> None:
    serde = MsgpackSerializer(allowed_types=[Allowed])
    value = {"items": [Allowed(1), (2, 3)], "when": datetime(2020, 1, 1), "n": 2**80}
    payload = bytearray(serde.dumps(value))
    payload[position % len(payload)] ^= 1 << bit
    modules_before = set(sys.modules)
    with contextlib.suppress(ValueError, TypeError):
        serde.loads(bytes(payload))
    assert set(sys.modules) == modules_before
