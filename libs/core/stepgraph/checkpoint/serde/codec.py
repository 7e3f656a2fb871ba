"""msgpack extension codes and the built-in types that travel as extensions.

Every value msgpack cannot store natively (with ``strict_types=True``) becomes an extension
``ExtType(code, body)``. Built-in types get one code each and a compact body; user classes share
four codes (enum, dataclass, NamedTuple, pydantic model) whose body is
``[module, qualname, payload]`` and which are resolved only through the allowlist (see
``serializer.py``). Bodies that hold nested values are themselves msgpack, packed with the same
rules, so nesting is unlimited.

Codes are part of the storage format: never renumber them, only add new ones.
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Callable
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from fractions import Fraction
from pathlib import Path, PosixPath, PurePath, PurePosixPath, PureWindowsPath, WindowsPath
from typing import Any, TypeAlias
from zoneinfo import ZoneInfo

from msgpack import ExtType

__all__ = [
    "BUILTIN_DECODERS",
    "BUILTIN_ENCODERS",
    "BUILTIN_TYPES",
    "DATACLASS",
    "ENUM",
    "NAMEDTUPLE",
    "PYDANTIC",
    "Decoder",
    "Encoder",
    "Pack",
    "Unpack",
]

Pack: TypeAlias = Callable[[Any], bytes]
Unpack: TypeAlias = Callable[[bytes], Any]
Encoder: TypeAlias = Callable[[Any, Pack], ExtType]
Decoder: TypeAlias = Callable[[bytes, Unpack], Any]

# Built-in types. Bodies marked "raw" are plain bytes, the others nested msgpack.
BIGINT = 0  # raw: signed big-endian two's complement (ints msgpack cannot hold in 64 bits)
TUPLE = 1
SET = 2
FROZENSET = 3
DEQUE = 4  # [items, maxlen]
DATETIME = 5  # [year, month, day, hour, minute, second, microsecond, tzinfo, fold]
DATE = 6  # proleptic Gregorian ordinal
TIME = 7  # [hour, minute, second, microsecond, tzinfo, fold]
TIMEDELTA = 8  # [days, seconds, microseconds]
TIMEZONE = 9  # [offset in microseconds, explicit name or None]
ZONEINFO = 10  # raw: IANA key
UUID = 11  # raw: the 16 bytes
DECIMAL = 12  # raw: str(value)
FRACTION = 13  # [numerator, denominator]
COMPLEX = 14  # [real, imag]
PURE_POSIX_PATH = 15  # raw: the path string (all four path codes)
PURE_WINDOWS_PATH = 16
POSIX_PATH = 17
WINDOWS_PATH = 18

# User classes, resolved by name through the allowlist: body is [module, qualname, payload].
ENUM = 32  # payload: the member's value
DATACLASS = 33  # payload: {field name: value}
NAMEDTUPLE = 34  # payload: [values]
PYDANTIC = 35  # payload: [{field name: value}, fields_set or None when all fields were set]

# Lone surrogates (e.g. from ``os.fsdecode``) must survive raw string bodies.
_TEXT_ERRORS = "surrogatepass"


def _encode_text(code: int) -> Encoder:
    return lambda obj, pack: ExtType(code, str(obj).encode("utf-8", _TEXT_ERRORS))


def _decode_text(factory: Callable[[str], Any]) -> Decoder:
    return lambda body, unpack: factory(body.decode("utf-8", _TEXT_ERRORS))


def _encode_bigint(obj: int, pack: Pack) -> ExtType:
    return ExtType(BIGINT, obj.to_bytes(obj.bit_length() // 8 + 1, "big", signed=True))


def _encode_datetime(obj: datetime, pack: Pack) -> ExtType:
    return ExtType(
        DATETIME,
        pack(
            [
                obj.year,
                obj.month,
                obj.day,
                obj.hour,
                obj.minute,
                obj.second,
                obj.microsecond,
                obj.tzinfo,
                obj.fold,
            ]
        ),
    )


def _decode_datetime(body: bytes, unpack: Unpack) -> datetime:
    year, month, day, hour, minute, second, microsecond, tzinfo, fold = unpack(body)
    return datetime(year, month, day, hour, minute, second, microsecond, tzinfo, fold=fold)


def _encode_time(obj: time, pack: Pack) -> ExtType:
    return ExtType(
        TIME, pack([obj.hour, obj.minute, obj.second, obj.microsecond, obj.tzinfo, obj.fold])
    )


def _decode_time(body: bytes, unpack: Unpack) -> time:
    hour, minute, second, microsecond, tzinfo, fold = unpack(body)
    return time(hour, minute, second, microsecond, tzinfo, fold=fold)


def _encode_timezone(obj: timezone, pack: Pack) -> ExtType:
    offset = obj.utcoffset(None)
    name = obj.tzname(None)
    # Store the name only if it was given explicitly, i.e. differs from the generated one.
    explicit_name = None if name == timezone(offset).tzname(None) else name
    return ExtType(TIMEZONE, pack([offset // timedelta(microseconds=1), explicit_name]))


def _decode_timezone(body: bytes, unpack: Unpack) -> timezone:
    offset_us, name = unpack(body)
    offset = timedelta(microseconds=offset_us)
    return timezone(offset) if name is None else timezone(offset, name)


def _encode_zoneinfo(obj: ZoneInfo, pack: Pack) -> ExtType:
    if obj.key is None:
        raise ValueError("a ZoneInfo built from a file has no key and cannot be stored")
    return ExtType(ZONEINFO, obj.key.encode())


def _decode_deque(body: bytes, unpack: Unpack) -> deque[Any]:
    items, maxlen = unpack(body)
    return deque(items, maxlen)


def _decode_pair(factory: Callable[[Any, Any], Any]) -> Decoder:
    def decode(body: bytes, unpack: Unpack) -> Any:
        first, second = unpack(body)
        return factory(first, second)

    return decode


BUILTIN_ENCODERS: dict[type, Encoder] = {
    int: _encode_bigint,
    tuple: lambda obj, pack: ExtType(TUPLE, pack(list(obj))),
    set: lambda obj, pack: ExtType(SET, pack(list(obj))),
    frozenset: lambda obj, pack: ExtType(FROZENSET, pack(list(obj))),
    deque: lambda obj, pack: ExtType(DEQUE, pack([list(obj), obj.maxlen])),
    datetime: _encode_datetime,
    date: lambda obj, pack: ExtType(DATE, pack(obj.toordinal())),
    time: _encode_time,
    timedelta: lambda obj, pack: ExtType(
        TIMEDELTA, pack([obj.days, obj.seconds, obj.microseconds])
    ),
    timezone: _encode_timezone,
    ZoneInfo: _encode_zoneinfo,
    uuid.UUID: lambda obj, pack: ExtType(UUID, obj.bytes),
    Decimal: _encode_text(DECIMAL),
    Fraction: lambda obj, pack: ExtType(FRACTION, pack([obj.numerator, obj.denominator])),
    complex: lambda obj, pack: ExtType(COMPLEX, pack([obj.real, obj.imag])),
    PurePosixPath: _encode_text(PURE_POSIX_PATH),
    PureWindowsPath: _encode_text(PURE_WINDOWS_PATH),
    PosixPath: _encode_text(POSIX_PATH),
    WindowsPath: _encode_text(WINDOWS_PATH),
}

BUILTIN_DECODERS: dict[int, Decoder] = {
    BIGINT: lambda body, unpack: int.from_bytes(body, "big", signed=True),
    TUPLE: lambda body, unpack: tuple(unpack(body)),
    SET: lambda body, unpack: set(unpack(body)),
    FROZENSET: lambda body, unpack: frozenset(unpack(body)),
    DEQUE: _decode_deque,
    DATETIME: _decode_datetime,
    DATE: lambda body, unpack: date.fromordinal(unpack(body)),
    TIME: _decode_time,
    TIMEDELTA: lambda body, unpack: timedelta(*unpack(body)),
    TIMEZONE: _decode_timezone,
    ZONEINFO: lambda body, unpack: ZoneInfo(body.decode()),
    UUID: lambda body, unpack: uuid.UUID(bytes=body),
    DECIMAL: _decode_text(Decimal),
    FRACTION: _decode_pair(Fraction),
    COMPLEX: _decode_pair(complex),
    PURE_POSIX_PATH: _decode_text(PurePosixPath),
    PURE_WINDOWS_PATH: _decode_text(PureWindowsPath),
    # A concrete path of the other platform cannot be created here: that fails loudly.
    POSIX_PATH: _decode_text(PosixPath),
    WINDOWS_PATH: _decode_text(WindowsPath),
}

# Types with a built-in encoding: a schema that mentions them needs no allowlist entry.
BUILTIN_TYPES: frozenset[type] = frozenset(BUILTIN_ENCODERS) | {
    type(None),
    bool,
    float,
    str,
    bytes,
    bytearray,
    list,
    dict,
    PurePath,
    Path,
    object,  # as an annotation: anything
}
