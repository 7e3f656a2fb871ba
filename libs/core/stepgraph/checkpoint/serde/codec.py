"""msgpack extension codes and the built-in types that travel as extensions.

Every value msgpack cannot store natively (with ``strict_types=True``) becomes an extension
``ExtType(code, body)``. Built-in types get one code each and a compact body; user classes share
four codes (enum, dataclass, NamedTuple, pydantic model) whose body is
``[module, qualname, payload]`` and which are resolved only through the allowlist (see
``serializer.py``). Bodies that hold nested values are themselves msgpack, packed with the same
rules, up to ``serializer.MAX_DEPTH`` levels. Decoders check that a body is exactly what the
encoder writes (types, lengths, sizes) before any constructor sees it.

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
    "MAX_BIGINT_BYTES",
    "MAX_DECIMAL_CHARS",
    "NAMEDTUPLE",
    "PYDANTIC",
    "Decoder",
    "Encoder",
    "InvalidBodyError",
    "Pack",
    "Unpack",
]

Pack: TypeAlias = Callable[[Any], bytes]
Unpack: TypeAlias = Callable[[bytes], Any]
Encoder: TypeAlias = Callable[[Any, Pack], ExtType]
Decoder: TypeAlias = Callable[[bytes, Unpack], Any]

# Built-in types. Bodies marked "raw" are plain bytes, the others nested msgpack.
BIGINT = 0  # raw: signed big-endian two's complement, at most MAX_BIGINT_BYTES
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
DECIMAL = 12  # raw: str(value), ASCII
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

MAX_BIGINT_BYTES = 1024
"""Longest body of a big ``int`` (about 2,460 decimal digits), refused beyond on both sides."""

MAX_DECIMAL_CHARS = 1024
"""Longest text of a ``Decimal``; its exponent is also kept within the default context's."""

_DECIMAL_MAX_EXPONENT = 999_999


class InvalidBodyError(ValueError):
    """An extension body is not what the encoder writes (corrupt or crafted bytes)."""


def _expect(value: Any, kind: type, what: str) -> Any:
    # Exact types: ``bool`` is not an ``int`` here, as it is not in what the encoders write.
    if type(value) is not kind:
        raise InvalidBodyError(f"{what} must be {kind.__name__}, not {type(value).__name__}")
    return value


def _expect_list(value: Any, length: int | None, what: str) -> list[Any]:
    _expect(value, list, what)
    if length is not None and len(value) != length:
        raise InvalidBodyError(f"{what} must have {length} items, not {len(value)}")
    return value


def _expect_ints(values: list[Any], what: str) -> list[int]:
    for value in values:
        _expect(value, int, what)
    return values


def _encode_text(code: int) -> Encoder:
    return lambda obj, pack: ExtType(code, str(obj).encode("utf-8", _TEXT_ERRORS))


def _decode_text(factory: Callable[[str], Any]) -> Decoder:
    return lambda body, unpack: factory(body.decode("utf-8", _TEXT_ERRORS))


def _encode_bigint(obj: int, pack: Pack) -> ExtType:
    # Bytes for the magnitude plus a sign bit (~obj is -obj - 1: -2**n fits in n + 1 bits).
    size = (obj if obj >= 0 else ~obj).bit_length() // 8 + 1
    if size > MAX_BIGINT_BYTES:
        raise ValueError(
            f"an int of {size} bytes is larger than the {MAX_BIGINT_BYTES} bytes allowed "
            "(store it as a str or bytes instead)"
        )
    return ExtType(BIGINT, obj.to_bytes(size, "big", signed=True))


def _decode_bigint(body: bytes, unpack: Unpack) -> int:
    if len(body) > MAX_BIGINT_BYTES:
        raise InvalidBodyError(f"a stored int is longer than {MAX_BIGINT_BYTES} bytes")
    return int.from_bytes(body, "big", signed=True)


def _encode_decimal(obj: Decimal, pack: Pack) -> ExtType:
    text = str(obj)
    _check_decimal(obj, text)
    return ExtType(DECIMAL, text.encode())


def _decode_decimal(body: bytes, unpack: Unpack) -> Decimal:
    if len(body) > MAX_DECIMAL_CHARS:
        raise InvalidBodyError(f"a stored Decimal is longer than {MAX_DECIMAL_CHARS} characters")
    text = body.decode("ascii")
    value = Decimal(text)
    _check_decimal(value, text)
    return value


def _check_decimal(value: Decimal, text: str) -> None:
    if len(text) > MAX_DECIMAL_CHARS:
        raise ValueError(f"a Decimal longer than {MAX_DECIMAL_CHARS} characters is not allowed")
    exponent = value.as_tuple().exponent
    if isinstance(exponent, int) and abs(exponent) > _DECIMAL_MAX_EXPONENT:
        raise ValueError(f"a Decimal exponent beyond +-{_DECIMAL_MAX_EXPONENT} is not allowed")


def _decode_sequence(factory: Callable[[list[Any]], Any]) -> Decoder:
    def decode(body: bytes, unpack: Unpack) -> Any:
        items = unpack(body)
        if type(items) is not list:  # inlined _expect_list: tuples are common, keep them cheap
            _expect_list(items, None, "a stored sequence")
        return factory(items)

    return decode


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


def _expect_tzinfo(value: Any) -> timezone | ZoneInfo | None:
    if value is not None and type(value) is not timezone and type(value) is not ZoneInfo:
        raise InvalidBodyError(f"a stored tzinfo must be a timezone, not {type(value).__name__}")
    return value


def _decode_datetime(body: bytes, unpack: Unpack) -> datetime:
    fields = _expect_list(unpack(body), 9, "a stored datetime")
    year, month, day, hour, minute, second, microsecond, tzinfo, fold = fields
    _expect_ints([year, month, day, hour, minute, second, microsecond, fold], "a datetime field")
    return datetime(
        year, month, day, hour, minute, second, microsecond, _expect_tzinfo(tzinfo), fold=fold
    )


def _encode_time(obj: time, pack: Pack) -> ExtType:
    return ExtType(
        TIME, pack([obj.hour, obj.minute, obj.second, obj.microsecond, obj.tzinfo, obj.fold])
    )


def _decode_time(body: bytes, unpack: Unpack) -> time:
    hour, minute, second, microsecond, tzinfo, fold = _expect_list(unpack(body), 6, "a time")
    _expect_ints([hour, minute, second, microsecond, fold], "a time field")
    return time(hour, minute, second, microsecond, _expect_tzinfo(tzinfo), fold=fold)


def _decode_date(body: bytes, unpack: Unpack) -> date:
    return date.fromordinal(_expect(unpack(body), int, "a stored date"))


def _decode_timedelta(body: bytes, unpack: Unpack) -> timedelta:
    days, seconds, microseconds = _expect_ints(
        _expect_list(unpack(body), 3, "a stored timedelta"), "a timedelta field"
    )
    return timedelta(days, seconds, microseconds)


def _encode_timezone(obj: timezone, pack: Pack) -> ExtType:
    offset = obj.utcoffset(None)
    name = obj.tzname(None)
    # Store the name only if it was given explicitly, i.e. differs from the generated one.
    explicit_name = None if name == timezone(offset).tzname(None) else name
    return ExtType(TIMEZONE, pack([offset // timedelta(microseconds=1), explicit_name]))


def _decode_timezone(body: bytes, unpack: Unpack) -> timezone:
    offset_us, name = _expect_list(unpack(body), 2, "a stored timezone")
    offset = timedelta(microseconds=_expect(offset_us, int, "a timezone offset"))
    return timezone(offset) if name is None else timezone(offset, _expect(name, str, "a name"))


def _encode_zoneinfo(obj: ZoneInfo, pack: Pack) -> ExtType:
    if obj.key is None:
        raise ValueError("a ZoneInfo built from a file has no key and cannot be stored")
    return ExtType(ZONEINFO, obj.key.encode())


def _decode_deque(body: bytes, unpack: Unpack) -> deque[Any]:
    items, maxlen = _expect_list(unpack(body), 2, "a stored deque")
    if maxlen is not None:
        _expect(maxlen, int, "a deque maxlen")
    return deque(_expect_list(items, None, "deque items"), maxlen)


def _decode_fraction(body: bytes, unpack: Unpack) -> Fraction:
    numerator, denominator = _expect_ints(
        _expect_list(unpack(body), 2, "a stored Fraction"), "a Fraction term"
    )
    if denominator <= 0:
        raise InvalidBodyError("a stored Fraction has a denominator that is not positive")
    return Fraction(numerator, denominator)


def _decode_complex(body: bytes, unpack: Unpack) -> complex:
    real, imag = _expect_list(unpack(body), 2, "a stored complex")
    return complex(_expect(real, float, "a complex part"), _expect(imag, float, "a complex part"))


def _decode_uuid(body: bytes, unpack: Unpack) -> uuid.UUID:
    return uuid.UUID(bytes=body)


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
    Decimal: _encode_decimal,
    Fraction: lambda obj, pack: ExtType(FRACTION, pack([obj.numerator, obj.denominator])),
    complex: lambda obj, pack: ExtType(COMPLEX, pack([obj.real, obj.imag])),
    PurePosixPath: _encode_text(PURE_POSIX_PATH),
    PureWindowsPath: _encode_text(PURE_WINDOWS_PATH),
    PosixPath: _encode_text(POSIX_PATH),
    WindowsPath: _encode_text(WINDOWS_PATH),
}

BUILTIN_DECODERS: dict[int, Decoder] = {
    BIGINT: _decode_bigint,
    TUPLE: _decode_sequence(tuple),
    SET: _decode_sequence(set),
    FROZENSET: _decode_sequence(frozenset),
    DEQUE: _decode_deque,
    DATETIME: _decode_datetime,
    DATE: _decode_date,
    TIME: _decode_time,
    TIMEDELTA: _decode_timedelta,
    TIMEZONE: _decode_timezone,
    ZONEINFO: lambda body, unpack: ZoneInfo(body.decode()),
    UUID: _decode_uuid,
    DECIMAL: _decode_decimal,
    FRACTION: _decode_fraction,
    COMPLEX: _decode_complex,
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
