"""A small name -> builder registry, the way timm and mmdetection register models.

A new router, expert, layer or backbone preset is one class plus one ``@REGISTRY.register("name")`` line.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, List, Optional, TypeVar

T = TypeVar("T")


class Registry:
    """Maps names to classes or factory functions.

    >>> ROUTERS = Registry("router")
    >>> @ROUTERS.register("uniform")
    ... class UniformRouter: ...
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: Dict[str, Any] = {}

    def register(self, name: Optional[str] = None, obj: Any = None) -> Callable[[T], T]:
        """Register ``obj`` under ``name`` (decorator form when ``obj`` is omitted)."""

        def _add(item: T) -> T:
            key = name or getattr(item, "__name__")
            if key in self._items:
                raise KeyError(f"{self.kind} {key!r} is already registered")
            self._items[key] = item
            return item

        return _add(obj) if obj is not None else _add

    def get(self, name: str) -> Any:
        if name not in self._items:
            known = ", ".join(sorted(self._items)) or "(none)"
            raise KeyError(f"unknown {self.kind} {name!r}; known: {known}")
        return self._items[name]

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.get(name)(*args, **kwargs)

    def names(self) -> List[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


ROUTERS = Registry("router")
EXPERTS = Registry("expert")
BACKBONES = Registry("backbone")
