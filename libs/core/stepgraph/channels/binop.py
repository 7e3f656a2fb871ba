from __future__ import annotations

import collections.abc
import operator as _operator
from collections.abc import Callable, Sequence
from typing import Any, Self, get_origin

from stepgraph.channels.base import MISSING, BaseChannel
from stepgraph.errors import EmptyChannelError, InvalidUpdateError
from stepgraph.types import Overwrite

__all__ = ["BinaryOperatorAggregate"]

OVERWRITE = "__overwrite__"
"""The key of LangGraph's dict form of an ``Overwrite``: ``{"__overwrite__": value}``."""

_ABSTRACT_TO_CONCRETE: dict[Any, type] = {
    collections.abc.Sequence: list,
    collections.abc.MutableSequence: list,
    collections.abc.Set: set,
    collections.abc.MutableSet: set,
    collections.abc.Mapping: dict,
    collections.abc.MutableMapping: dict,
}


def _empty_value(typ: Any) -> Any:
    """The type's empty value (``list()`` for ``list[int]``), or MISSING when it has none."""
    origin = get_origin(typ) or typ
    origin = _ABSTRACT_TO_CONCRETE.get(origin, origin)
    if isinstance(origin, type):
        try:
            return origin()
        except Exception:
            return MISSING
    return MISSING


class BinaryOperatorAggregate(BaseChannel):
    """Folds every write into the value with ``operator(value, write)`` (a reducer).

    Starts from the type's empty value when it has one, so ``Annotated[list, operator.add]``
    begins as ``[]``. With ``operator.add`` on a list, an update of list writes appends their
    items, and ``appended()`` reports them.
    """

    __slots__ = ("_appended", "_appends", "operator", "value")

    def __init__(self, typ: Any, operator: Callable[[Any, Any], Any], key: str = "") -> None:
        super().__init__(typ, key)
        self.operator = operator
        self.value: Any = _empty_value(typ)
        self._appends = operator is _operator.add or operator is list.__add__
        self._appended: list[Any] | None = None

    def from_checkpoint(self, value: Any) -> Self:
        new = self.__class__(self.typ, self.operator, self.key)
        if value is not MISSING:
            new.value = value
        return new

    def get(self) -> Any:
        if self.value is MISSING:
            raise EmptyChannelError(self.key)
        return self.value

    def checkpoint(self) -> Any:
        return self.value

    def is_available(self) -> bool:
        return self.value is not MISSING

    @property
    def can_append(self) -> bool:
        return self._appends

    def appended(self) -> list[Any] | None:
        return self._appended

    def update(self, values: Sequence[Any]) -> bool:
        if not values:
            return False
        value = self.value
        self._appended = None
        if any(_is_overwrite(item) for item in values):
            return self._overwrite(values)
        if self._appends and type(value) is list:
            # list + list appends: record what, and build the new list in one go.
            if len(values) == 1:
                added = values[0]
                lists = type(added) is list
            else:
                lists = all(type(item) is list for item in values)
                added = [x for item in values for x in item] if lists else None
            if lists:
                self.value = value + added
                self._appended = added
                return True
        start = 0
        if value is MISSING:
            value, start = values[0], 1
        operator = self.operator
        for item in values[start:]:
            value = operator(value, item)
        self.value = value
        return True

    def _overwrite(self, values: Sequence[Any]) -> bool:
        """A step's writes with an ``Overwrite``: it replaces the value, the writes before it
        are folded in first and then lost, those after it are dropped (LangGraph's rule)."""
        value = self.value
        replaced = False
        for item in values:
            if _is_overwrite(item):
                if replaced:
                    raise InvalidUpdateError(
                        f"At key '{self.key}': can receive only one Overwrite value per step"
                    )
                value, replaced = _overwritten(item), True
            elif not replaced:
                value = item if value is MISSING else self.operator(value, item)
        self.value = value
        return True


def _is_overwrite(item: Any) -> bool:
    """An ``Overwrite``, or one of its dict forms: ``{"__overwrite__": value}``, and
    ``{"value": value, "type": "__overwrite__"}`` (an ``Overwrite`` that went through JSON)."""
    if type(item) is Overwrite:
        return True
    if type(item) is not dict:
        return False
    if len(item) == 1 and OVERWRITE in item:
        return True
    return item.get("type") == OVERWRITE and "value" in item


def _overwritten(item: Any) -> Any:
    if type(item) is Overwrite:
        return item.value
    return item[OVERWRITE] if OVERWRITE in item else item["value"]
