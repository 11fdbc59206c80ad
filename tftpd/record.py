"""Immutable value classes without ``dataclasses``.

``@dataclass`` costs every inetd start its import (with ``inspect``, ``ast``,
``dis`` and ``tokenize``: about 8 ms).  A subclass of ``Frozen`` names its
fields in ``__slots__`` (in order), declares their types, and sets them once
with ``self._init(...)`` in a typed ``__init__`` that takes the fields in that
order; it gets what a frozen dataclass gave: equality and hashing by field
values (and class), a ``repr`` with the field names, no assignment
afterwards, and copying and pickling.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, Tuple

__all__ = ["Frozen"]

_set = object.__setattr__


class Frozen:
    __slots__: Tuple[str, ...] = ()

    def _init(self, *values: object) -> None:
        if len(values) != len(self.__slots__):
            raise TypeError(f"{type(self).__name__} takes {len(self.__slots__)} values")
        for name, value in zip(self.__slots__, values):
            _set(self, name, value)

    def _fields(self) -> Tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def _asdict(self) -> Dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, Frozen)
        return self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__qualname__}({fields})"

    def __reduce__(self) -> Tuple[Any, Tuple[Any, ...]]:
        return (type(self), self._fields())

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field '{name}' of {type(self).__name__}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field '{name}' of {type(self).__name__}")
