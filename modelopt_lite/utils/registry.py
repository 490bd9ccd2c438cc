"""The one registry mechanism: a named map from keys to classes or functions."""

from __future__ import annotations

from typing import Any, Dict, Generic, Hashable, Iterator, Optional, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps keys to registered objects; `register` works as a decorator.

    Lookup errors list what is registered, so a typo says what to use instead.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: Dict[Hashable, T] = {}

    def register(self, key: Hashable, obj: Optional[T] = None, *, overwrite: bool = False):
        def add(o: T) -> T:
            if key in self._items and not overwrite and self._items[key] is not o:
                raise KeyError(f"{self.kind} {self._name(key)!r} is already registered")
            self._items[key] = o
            return o

        return add(obj) if obj is not None else add

    def unregister(self, key: Hashable) -> None:
        self._items.pop(key, None)

    def get(self, key: Hashable, default: Any = ...) -> T:
        if key in self._items:
            return self._items[key]
        if default is not ...:
            return default
        known = ", ".join(sorted(self._name(k) for k in self._items)) or "none"
        raise KeyError(f"unknown {self.kind} {self._name(key)!r}; registered: {known}")

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._items)

    def items(self):
        return self._items.items()

    def __len__(self) -> int:
        return len(self._items)

    @staticmethod
    def _name(key: Hashable) -> str:
        return getattr(key, "__qualname__", None) or str(key)

    def __repr__(self) -> str:
        return f"Registry({self.kind}: {len(self)} entries)"
