"""``MsgpackSerializer``: strict, typed msgpack for checkpoints and writes.

``dumps_typed`` returns ``(tag, payload)``:

* ``("null", b"")`` for ``None``;
* ``("bytes", value)`` and ``("bytearray", bytes(value))``, stored raw;
* ``("msgpack", payload)`` for everything else.

In a msgpack payload, primitives (``None``, ``bool``, ``int`` within 64 bits, ``float``, ``str``,
``bytes``, ``list``, ``dict``) use msgpack's C fast path and every other value becomes an
extension (see ``codec.py``). User classes are stored by name and read back only if the name is
in the allowlist (see ``allowlist.py``); nothing named by stored bytes is imported or called
otherwise. There is no pickle fallback: a value that cannot be stored exactly fails at write time
with ``SerializationError``, a stored name that is not allowed fails at read time with
``UnknownTypeError``.

Known limit: a ``bytearray`` nested inside another value comes back as ``bytes`` (msgpack's C
packer writes both alike and offers no hook; only a top-level ``bytearray`` keeps its type).
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from enum import Enum
from typing import Any

import msgpack
from msgpack import ExtType

from stepgraph.checkpoint.serde.allowlist import (
    REGISTERED_TYPES,
    TypeAllowlist,
    TypeKey,
    type_key,
    type_name,
    unknown_type_error,
)
from stepgraph.checkpoint.serde.codec import (
    BUILTIN_DECODERS,
    BUILTIN_ENCODERS,
    DATACLASS,
    ENUM,
    NAMEDTUPLE,
    PYDANTIC,
    Encoder,
    Pack,
)
from stepgraph.checkpoint.serde.schema import is_namedtuple, is_pydantic_model, reachable_classes
from stepgraph.errors import SerializationError, UnknownTypeError

__all__ = ["MsgpackSerializer"]

Rebuild = Callable[[Any], Any]

_POOLED_PACKER_MAX_BYTES = 1 << 20

_KIND_NAMES = {ENUM: "enum", DATACLASS: "dataclass", NAMEDTUPLE: "NamedTuple", PYDANTIC: "model"}


class MsgpackSerializer:
    """Strict msgpack serializer; see the module docstring for the format and the rules.

    ``allowed_types`` (like ``allow``) adds user classes for this serializer only; classes from
    ``register_type`` and ``stepgraph.types`` are always allowed.
    """

    def __init__(self, *, allowed_types: Iterable[type] = ()) -> None:
        self._allowlist = TypeAllowlist(parent=REGISTERED_TYPES)
        self._allowlist.add(*allowed_types)
        # Encoders by exact type: built-ins, then user classes cached once found allowed.
        self._encoders: dict[type, Encoder] = dict(BUILTIN_ENCODERS)
        self._rebuilders: dict[tuple[int, str, str], Rebuild] = {}
        self._pack = self._packing(unicode_errors=None)
        # Only used after the fast path met a lone surrogate, which strict UTF-8 refuses.
        self._pack_with_surrogates = self._packing(unicode_errors="surrogatepass")

    # -- allowlist ---------------------------------------------------------------------------

    def allow(self, *types: type) -> None:
        """Allow these classes to be written and read back by this serializer."""
        self._allowlist.add(*types)

    def allow_schema(self, schema: Any) -> None:
        """Allow every user class a value of type ``schema`` can contain (see ``schema.py``)."""
        self._allowlist.add(*reachable_classes(schema))

    # -- protocol ----------------------------------------------------------------------------

    def dumps_typed(self, obj: Any) -> tuple[str, bytes]:
        if obj is None:
            return "null", b""
        kind = type(obj)
        if kind is bytes:
            return "bytes", obj
        if kind is bytearray:
            return "bytearray", bytes(obj)
        return "msgpack", self.dumps(obj)

    def loads_typed(self, data: tuple[str, bytes]) -> Any:
        tag, payload = data
        if tag == "msgpack":
            return self.loads(payload)
        if tag == "null":
            return None
        if tag == "bytes":
            return bytes(payload)
        if tag == "bytearray":
            return bytearray(payload)
        hint = " (an encrypted row: read it through EncryptedSerializer)" if "+" in tag else ""
        raise unknown_type_error(tag, f"unknown serialization tag {tag!r}{hint}")

    def dumps(self, obj: Any) -> bytes:
        """``obj`` as msgpack bytes, without a tag (``None`` and bytes included)."""
        try:
            try:
                return self._pack(obj)
            except UnicodeEncodeError:
                return self._pack_with_surrogates(obj)
        except _Unencodable as failure:
            raise _write_error(obj, failure) from failure.__cause__
        except ValueError as error:  # msgpack's limits: nesting depth, object size
            raise SerializationError(f"cannot serialize value: {error}") from error

    def loads(self, data: bytes) -> Any:
        return msgpack.unpackb(
            data,
            ext_hook=self._ext_hook,
            raw=False,
            strict_map_key=False,
            unicode_errors="surrogatepass",
        )

    # -- writing -----------------------------------------------------------------------------

    def _packing(self, unicode_errors: str | None) -> Pack:
        """A pack function for one string mode, with ``default`` encoding the other types."""
        # Packers are reused: creating one per value, or per nested extension body, costs more
        # than packing small values. A packer is popped while in use, so nesting and threads
        # never share one (list.pop/append are atomic).
        idle: list[msgpack.Packer] = []

        def default(obj: Any) -> ExtType:
            encoder = self._encoders.get(type(obj)) or self._class_encoder(obj)
            try:
                return encoder(obj, pack)
            except (_Unencodable, UnicodeEncodeError):
                raise
            except Exception as error:
                reason = f"{_describe(type(obj))} could not be encoded: {error}"
                raise _Unencodable(obj, reason) from error

        def pack(obj: Any) -> bytes:
            try:
                packer = idle.pop()
            except IndexError:
                packer = msgpack.Packer(
                    default=default,
                    strict_types=True,
                    use_bin_type=True,
                    unicode_errors=unicode_errors,
                )
            try:
                packed = packer.pack(obj)
            except BaseException:
                idle.append(packer)  # msgpack empties its buffer on failure
                raise
            # A packer keeps the buffer it grew to: let the ones that packed big values go.
            if len(packed) <= _POOLED_PACKER_MAX_BYTES:
                idle.append(packer)
            return packed

        return pack

    def _class_encoder(self, obj: Any) -> Encoder:
        cls = type(obj)
        kind = _class_kind(cls)
        if kind is None:
            reason = f"{_describe(cls)} is not supported (see docs/serialization.md)"
            raise _Unencodable(obj, reason)
        if not self._allowlist.allows(cls):
            raise _Unencodable(
                obj,
                f"{_describe(cls)} is not allowed: register it with @register_type or "
                f"serializer.allow({cls.__name__}), or use it in the graph's state schema",
            )
        encoder = _CLASS_ENCODERS[kind](cls)
        self._encoders[cls] = encoder
        return encoder

    # -- reading -----------------------------------------------------------------------------

    def _ext_hook(self, code: int, body: bytes) -> Any:
        try:
            decode = BUILTIN_DECODERS.get(code)
            if decode is not None:
                return decode(body, self.loads)
            if code in _KIND_NAMES:
                return self._decode_class(code, body)
        except SerializationError:
            raise
        except Exception as error:  # corrupt or crafted bodies
            raise SerializationError(f"cannot read stored value: {error!r}") from error
        raise UnknownTypeError(f"stored data uses unknown msgpack extension code {code}")

    def _decode_class(self, code: int, body: bytes) -> Any:
        module, qualname, payload = self.loads(body)
        rebuild = self._rebuilders.get((code, module, qualname)) or self._rebuilder(
            code, (module, qualname)
        )
        try:
            return rebuild(payload)
        except SerializationError:
            raise
        except Exception as error:
            raise SerializationError(
                f"cannot rebuild {type_name((module, qualname))!r} from stored data: {error}"
            ) from error

    def _rebuilder(self, code: int, key: TypeKey) -> Rebuild:
        cls = self._allowlist.resolve(key)
        kind = _class_kind(cls)
        if kind != code:
            actual = "not a storable class" if kind is None else f"a {_KIND_NAMES[kind]}"
            raise unknown_type_error(
                type_name(key),
                f"stored data names {type_name(key)!r} as a {_KIND_NAMES[code]}, but it is {actual}",
            )
        rebuild = _CLASS_REBUILDERS[code](cls)
        self._rebuilders[(code, *key)] = rebuild
        return rebuild


# -- user classes ----------------------------------------------------------------------------


def _class_kind(cls: type) -> int | None:
    if issubclass(cls, Enum):
        return ENUM
    if dataclasses.is_dataclass(cls):
        return DATACLASS
    if is_namedtuple(cls):
        return NAMEDTUPLE
    if is_pydantic_model(cls):
        return PYDANTIC
    return None


def _enum_encoder(cls: type) -> Encoder:
    module, qualname = type_key(cls)
    return lambda obj, pack: ExtType(ENUM, pack([module, qualname, obj.value]))


def _dataclass_encoder(cls: type) -> Encoder:
    module, qualname = type_key(cls)
    names = [field.name for field in dataclasses.fields(cls)]
    return lambda obj, pack: ExtType(
        DATACLASS, pack([module, qualname, {name: getattr(obj, name) for name in names}])
    )


def _namedtuple_encoder(cls: type) -> Encoder:
    module, qualname = type_key(cls)
    return lambda obj, pack: ExtType(NAMEDTUPLE, pack([module, qualname, list(obj)]))


def _pydantic_encoder(cls: type) -> Encoder:
    module, qualname = type_key(cls)
    names = list(cls.__pydantic_fields__)  # type: ignore[attr-defined]

    def encode(obj: Any, pack: Pack) -> ExtType:
        fields = {name: getattr(obj, name) for name in names}
        if obj.__pydantic_extra__:
            fields.update(obj.__pydantic_extra__)
        fields_set = obj.__pydantic_fields_set__
        # Which fields were set explicitly matters to ``model_dump(exclude_unset=True)``.
        stored_set = None if fields_set == fields.keys() else sorted(fields_set)
        return ExtType(PYDANTIC, pack([module, qualname, [fields, stored_set]]))

    return encode


def _enum_rebuilder(cls: type) -> Rebuild:
    return cls


def _dataclass_rebuilder(cls: type) -> Rebuild:
    fields = dataclasses.fields(cls)
    init_names = {field.name for field in fields if field.init}
    field_names = {field.name for field in fields}

    def rebuild(stored: dict[str, Any]) -> Any:
        unknown = stored.keys() - field_names
        if unknown:
            raise SerializationError(f"{sorted(unknown)} are not fields of {_describe(cls)}")
        obj = cls(**{name: value for name, value in stored.items() if name in init_names})
        for name, value in stored.items():
            if name not in init_names:  # ``init=False`` fields, set the way frozen ones allow
                object.__setattr__(obj, name, value)
        return obj

    return rebuild


def _namedtuple_rebuilder(cls: type) -> Rebuild:
    return lambda values: cls(*values)


def _pydantic_rebuilder(cls: type) -> Rebuild:
    def rebuild(stored: list[Any]) -> Any:
        fields, fields_set = stored
        # Values were valid when written: construct without re-validating (and re-coercing).
        return cls.model_construct(  # type: ignore[attr-defined]
            _fields_set=None if fields_set is None else set(fields_set), **fields
        )

    return rebuild


_CLASS_ENCODERS: dict[int, Callable[[type], Encoder]] = {
    ENUM: _enum_encoder,
    DATACLASS: _dataclass_encoder,
    NAMEDTUPLE: _namedtuple_encoder,
    PYDANTIC: _pydantic_encoder,
}
_CLASS_REBUILDERS: dict[int, Callable[[type], Rebuild]] = {
    ENUM: _enum_rebuilder,
    DATACLASS: _dataclass_rebuilder,
    NAMEDTUPLE: _namedtuple_rebuilder,
    PYDANTIC: _pydantic_rebuilder,
}


# -- write errors ----------------------------------------------------------------------------


class _Unencodable(Exception):
    """Raised inside msgpack's ``default`` hook; ``dumps`` turns it into ``SerializationError``."""

    def __init__(self, value: Any, reason: str) -> None:
        super().__init__(reason)
        self.value = value
        self.reason = reason


def _describe(cls: type) -> str:
    return f"type {type_name(type_key(cls))!r}"


def _write_error(root: Any, failure: _Unencodable) -> SerializationError:
    # Only computed when failing, so the fast path never tracks where it is.
    path = _locate(root, failure.value) or "value"
    return SerializationError(
        f"cannot serialize {path}: {failure.reason}",
        type_name=type_name(type_key(type(failure.value))),
        path=path,
    )


def _locate(root: Any, target: Any) -> str | None:
    """Where ``target`` sits in ``root``, as an expression such as ``value['items'][3]``."""
    pending: list[tuple[Any, str]] = [(root, "value")]
    seen: set[int] = set()
    while pending:
        obj, path = pending.pop()
        if obj is target:
            return path
        if id(obj) not in seen:
            seen.add(id(obj))
            pending.extend(reversed(list(_children(obj, path))))
    return None


def _children(obj: Any, path: str) -> Iterator[tuple[Any, str]]:
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield key, f"key {key!r} of {path}"
            yield value, f"{path}[{key!r}]"
    elif is_namedtuple(type(obj)):
        for name, value in zip(obj._fields, obj, strict=True):
            yield value, f"{path}.{name}"
    elif isinstance(obj, (list, tuple, deque)):
        for index, value in enumerate(obj):
            yield value, f"{path}[{index}]"
    elif isinstance(obj, (set, frozenset)):
        for value in obj:
            yield value, f"an item of {path}"
    elif isinstance(obj, Enum):
        yield obj.value, f"{path}.value"
    elif dataclasses.is_dataclass(obj):
        for field in dataclasses.fields(obj):
            yield getattr(obj, field.name, None), f"{path}.{field.name}"
    elif is_pydantic_model(type(obj)):
        for name in type(obj).__pydantic_fields__:
            yield getattr(obj, name, None), f"{path}.{name}"
    elif hasattr(obj, "tzinfo"):
        yield obj.tzinfo, f"{path}.tzinfo"
