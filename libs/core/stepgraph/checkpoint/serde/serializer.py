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

Stored bytes cannot crash the reader: extension values nest at most ``MAX_DEPTH`` deep (refused
when writing and when reading), nested bodies are read with heap-allocated unpackers, and
extension bodies are type-checked and size-capped (see ``codec.py`` and docs/serialization.md).

Known limit: a ``bytearray`` nested inside another value comes back as ``bytes`` (msgpack's C
packer writes both alike and offers no hook; only a top-level ``bytearray`` keeps its type).
"""

from __future__ import annotations

import dataclasses
import functools
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
    Unpack,
)
from stepgraph.checkpoint.serde.schema import is_namedtuple, is_pydantic_model, reachable_classes
from stepgraph.errors import SerializationError, UnknownTypeError

__all__ = ["MsgpackSerializer"]

Rebuild = Callable[[Any], Any]
ExtHook = Callable[[int, bytes], Any]

_POOLED_BUFFER_MAX_BYTES = 1 << 20

MAX_DEPTH = 200
"""How many extension values (tuples, sets, dataclasses, models, ...) may nest in one another.

Refused when writing (``SerializationError`` naming where) and when reading (crafted bytes):
every level costs C stack and Python frames on both sides, and this many stay far from either
limit. msgpack's own lists and dicts do not count; msgpack caps those itself.
"""

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
        self._ext_hooks = self._reading()

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
        except RecursionError as error:  # the caller was already deep in the Python stack
            raise SerializationError(f"cannot serialize value: {error}") from error

    def loads(self, data: bytes) -> Any:
        return msgpack.unpackb(
            data,
            ext_hook=self._ext_hooks[0],
            raw=False,
            strict_map_key=False,
            unicode_errors="surrogatepass",
        )

    # -- writing -----------------------------------------------------------------------------

    def _packing(self, unicode_errors: str | None) -> Pack:
        """The top-level pack function for one string mode.

        Extension bodies are packed by nested packers, one level per extension depth: a packer
        at depth ``d`` has a ``default`` that packs the bodies it creates at depth ``d + 1``, so
        the depth is known without any bookkeeping on the fast path, and a value nested more
        than ``MAX_DEPTH`` extensions deep is refused (reading it back would otherwise need
        an unbounded C stack).
        """
        # Built from the deepest level up, so each level holds the next one's pack directly.
        pack: Pack | None = None
        for depth in reversed(range(MAX_DEPTH + 1)):
            pack = self._pack_at(depth, unicode_errors, pack)
        assert pack is not None
        return pack

    def _pack_at(self, depth: int, unicode_errors: str | None, pack_next: Pack | None) -> Pack:
        # Packers are reused: creating one per value, or per nested extension body, costs more
        # than packing small values. A packer is popped while in use, so threads never share
        # one (list.pop/append are atomic).
        idle: list[msgpack.Packer] = []
        checked = depth >= _CHECKED_DEPTH

        def default(obj: Any) -> ExtType:
            encoder = self._encoders.get(type(obj)) or self._class_encoder(obj)
            if pack_next is None:
                raise _Unencodable(
                    obj, f"it is nested more than {MAX_DEPTH} levels deep (tuples, sets, classes)"
                )
            if checked:
                _check_native_depth(obj)
            try:
                return encoder(obj, pack_next)
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
            if len(packed) <= _POOLED_BUFFER_MAX_BYTES:
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

    def _reading(self) -> list[ExtHook]:
        """``ext_hook`` functions by depth; the one at depth ``d`` reads bodies at ``d + 1``.

        A nested body is read by a ``msgpack.Unpacker``, whose unpack context lives on the heap:
        ``msgpack.unpackb`` keeps its (about 40 KB) context on the C stack, so calling it once
        per nesting level overflows the stack after a few hundred levels. The depth is capped
        at ``MAX_DEPTH`` like on the write side, so crafted bytes fail with an error instead.
        """
        # Built from the deepest level up, so each hook holds the next level's unpack directly.
        hooks: list[ExtHook] = []
        unpack: Unpack | None = None
        for depth in reversed(range(MAX_DEPTH + 1)):
            hook = self._ext_hook_at(unpack)
            hooks.append(hook)
            # A few shallow levels use unpackb, which is quicker for the small bodies (tuples,
            # dataclasses) that are common there; its stack use is bounded by their number.
            unpack = (_unpackb_with if depth <= _UNPACKB_DEPTH else _unpack_with)(hook)
        hooks.reverse()
        return hooks

    def _ext_hook_at(self, unpack_next: Unpack | None) -> ExtHook:
        def ext_hook(code: int, body: bytes) -> Any:
            unpack = unpack_next
            if unpack is None:
                raise SerializationError(
                    f"cannot read stored value: it is nested more than {MAX_DEPTH} levels deep"
                )
            try:
                decode = BUILTIN_DECODERS.get(code)
                if decode is not None:
                    return decode(body, unpack)
                if code in _KIND_NAMES:
                    return self._decode_class(code, body, unpack)
            except SerializationError:
                raise
            except Exception as error:  # corrupt or crafted bodies
                raise SerializationError(f"cannot read stored value: {error!r}") from error
            raise UnknownTypeError(f"stored data uses unknown msgpack extension code {code}")

        return ext_hook

    def _decode_class(self, code: int, body: bytes, unpack: Unpack) -> Any:
        module, qualname, payload = unpack(body)
        if type(module) is not str or type(qualname) is not str:
            raise SerializationError("cannot read stored value: a class name is not a string")
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


_CHECKED_DEPTH = 4
_DEEP_NATIVE_MAX = 8


def _check_native_depth(obj: Any) -> None:
    """Refuse lists and dicts nested deeply inside an extension that is itself deep.

    msgpack packs each list and dict level with a recursive C call (up to 511 deep per packer),
    and every extension level starts a new packer: unchecked, both together could overflow the
    C stack while writing. Only extensions at least ``_CHECKED_DEPTH`` deep are walked (rare),
    so the C stack a write can use stays bounded.
    """
    pending = [(child, 1) for child, _ in _children(obj, "value")]
    while pending:
        value, depth = pending.pop()
        kind = type(value)
        if kind is list or kind is dict:
            if depth > _DEEP_NATIVE_MAX:
                raise _Unencodable(
                    value,
                    f"lists and dicts nest more than {_DEEP_NATIVE_MAX} levels deep inside a "
                    f"value that is itself {_CHECKED_DEPTH} or more levels deep",
                )
            items = value if kind is list else [*value.keys(), *value.values()]
            pending.extend((item, depth + 1) for item in items)


def _unpackb_with(ext_hook: ExtHook) -> Unpack:
    """A function reading one whole msgpack body with ``msgpack.unpackb`` (C stack context)."""

    def unpack(body: bytes) -> Any:
        return msgpack.unpackb(
            body,
            ext_hook=ext_hook,
            raw=False,
            strict_map_key=False,
            unicode_errors="surrogatepass",
        )

    return unpack


def _unpack_with(ext_hook: ExtHook) -> Unpack:
    """A function reading one whole msgpack body with pooled heap-allocated unpackers."""
    idle: list[msgpack.Unpacker] = []

    def unpack(body: bytes) -> Any:
        try:
            unpacker = idle.pop()
        except IndexError:
            unpacker = msgpack.Unpacker(
                ext_hook=ext_hook,
                raw=False,
                strict_map_key=False,
                unicode_errors="surrogatepass",
                read_size=_UNPACKER_READ_SIZE,
                max_buffer_size=_UNPACKER_MAX_BUFFER,
            )
        start = unpacker.tell()
        unpacker.feed(body)
        try:
            value = unpacker.unpack()
        except msgpack.OutOfData:
            raise SerializationError(
                "cannot read stored value: a nested body is truncated"
            ) from None
        # On failure the unpacker is dropped, with whatever it had buffered.
        if unpacker.tell() - start != len(body):
            raise SerializationError("cannot read stored value: extra data in a nested body")
        if len(body) <= _POOLED_BUFFER_MAX_BYTES:
            idle.append(unpacker)
        return value

    return unpack


_UNPACKB_DEPTH = 3
_UNPACKER_READ_SIZE = 1 << 14
_UNPACKER_MAX_BUFFER = (1 << 31) - 1


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
    count = len(names)
    # A ``cached_property`` stores its value in the instance dict; it is computed again on read.
    cached = {
        name
        for klass in cls.__mro__
        for name, attribute in vars(klass).items()
        if isinstance(attribute, functools.cached_property)
    }

    def encode(obj: Any, pack: Pack) -> ExtType:
        fields = {name: getattr(obj, name) for name in names}
        attributes = getattr(obj, "__dict__", None)
        # Reading sets the fields only: other instance attributes would be lost.
        if attributes is not None and len(attributes) > count:
            extra = sorted(str(name) for name in attributes.keys() - fields.keys() - cached)
            if extra:
                raise ValueError(
                    f"it has instance attributes that are not fields ({', '.join(extra)}), "
                    "which would be lost: make them fields, e.g. field(init=False)"
                )
        return ExtType(DATACLASS, pack([module, qualname, fields]))

    return encode


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
        private = obj.__pydantic_private__
        payload = [fields, stored_set, private] if private else [fields, stored_set]
        return ExtType(PYDANTIC, pack([module, qualname, payload]))

    return encode


def _enum_rebuilder(cls: type) -> Rebuild:
    return cls


def _constant(value: Any) -> Callable[[], Any]:
    return lambda: value


def _dataclass_rebuilder(cls: type) -> Rebuild:
    fields = dataclasses.fields(cls)
    names = [field.name for field in fields]
    field_names = set(names)
    # Fields missing from stored data (added to the class since) get their defaults.
    defaults: dict[str, Callable[[], Any]] = {}
    for field in fields:
        if field.default is not dataclasses.MISSING:
            defaults[field.name] = _constant(field.default)
        elif field.default_factory is not dataclasses.MISSING:
            defaults[field.name] = field.default_factory
    new: Callable[[type], Any] = cls.__new__  # type: ignore[assignment]

    def rebuild(stored: Any) -> Any:
        if type(stored) is not dict:
            raise SerializationError(f"stored fields of {_describe(cls)} are not a dict")
        unknown = stored.keys() - field_names
        if unknown:
            raise SerializationError(
                f"{sorted(map(repr, unknown))} are not fields of {_describe(cls)}"
            )
        # Rebuilt as stored, without ``__init__``: ``__post_init__`` already ran when the value
        # was created, and ``InitVar`` arguments are not stored. Frozen classes allow this too.
        obj = new(cls)
        for name in names:
            if name in stored:
                value = stored[name]
            elif name in defaults:
                value = defaults[name]()
            else:
                raise SerializationError(
                    f"stored {_describe(cls)} has no value for field {name!r}, which has no default"
                )
            object.__setattr__(obj, name, value)
        return obj

    return rebuild


def _namedtuple_rebuilder(cls: type) -> Rebuild:
    def rebuild(stored: Any) -> Any:
        if type(stored) is not list:
            raise SerializationError(f"stored values of {_describe(cls)} are not a list")
        return cls(*stored)

    return rebuild


def _pydantic_rebuilder(cls: type) -> Rebuild:
    private_names = set(getattr(cls, "__private_attributes__", {}))

    def rebuild(stored: Any) -> Any:
        if type(stored) is not list or len(stored) not in (2, 3) or type(stored[0]) is not dict:
            raise SerializationError(f"stored data of {_describe(cls)} is malformed")
        fields, fields_set = stored[0], stored[1]
        if fields_set is not None and type(fields_set) is not list:
            raise SerializationError(f"stored fields set of {_describe(cls)} is malformed")
        # Values were valid when written: construct without re-validating (and re-coercing).
        obj = cls.model_construct(  # type: ignore[attr-defined]
            _fields_set=None if fields_set is None else set(fields_set), **fields
        )
        if len(stored) == 3:
            private = stored[2]
            if type(private) is not dict or not private.keys() <= private_names:
                raise SerializationError(
                    f"stored private attributes of {_describe(cls)} do not match the class"
                )
            current = obj.__pydantic_private__ or {}
            object.__setattr__(obj, "__pydantic_private__", {**current, **private})
        return obj

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
        for extras in (obj.__pydantic_extra__, obj.__pydantic_private__):
            for name, value in (extras or {}).items():
                yield value, f"{path}.{name}"
    elif hasattr(obj, "tzinfo"):
        yield obj.tzinfo, f"{path}.tzinfo"
