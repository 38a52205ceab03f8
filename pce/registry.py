"""A small name -> builder registry, the way timm and mmdetection register models.

A new router, expert, layer or backbone preset is one class plus one ``@REGISTRY.register("name")`` line.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, TypeVar

T = TypeVar("T", bound=Callable[..., Any])


class Registry:
    """A small mapping from names to classes or factory callables."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, Callable[..., Any]] = {}

    def register(self, name: str | None = None, obj: T | None = None) -> Any:
        """Register ``obj`` under ``name`` (default: ``obj.__name__``).

        Usable as ``@REG.register("name")``, ``@REG.register()`` or ``REG.register("name", obj)``.
        Registering a different object under a taken name raises ValueError.
        """

        def _add(o: T) -> T:
            key = name if name is not None else o.__name__
            if not isinstance(key, str) or not key:
                raise ValueError(f"{self.kind} registry: name must be a non-empty string, got {key!r}")
            old = self._items.get(key)
            if old is not None and old is not o and (
                getattr(old, "__module__", None),
                getattr(old, "__qualname__", None),
            ) != (getattr(o, "__module__", None), getattr(o, "__qualname__", None)):
                raise ValueError(f"{self.kind} registry: name {key!r} is already taken by {old!r}")
            self._items[key] = o
            return o

        if obj is not None:
            return _add(obj)
        return _add

    def get(self, name: str) -> Callable[..., Any]:
        """Return the object registered as ``name``; KeyError lists the known names."""
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(
                f"unknown {self.kind} {name!r}; known {self.kind} names: {', '.join(self.names()) or '(none)'}"
            ) from None

    def build(self, name: str, **kwargs: Any) -> Any:
        """Call the object registered as ``name`` with ``kwargs``."""
        return self.get(name)(**kwargs)

    def names(self) -> list[str]:
        """Sorted registered names."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, names={self.names()})"


ROUTERS = Registry("router")
EXPERTS = Registry("expert")
BACKBONES = Registry("backbone")
EXECUTIONS = Registry("execution")
#: layer kinds a backbone stage can hold (``"pce"``: :class:`~pce.models.layer.PCELayer`, ``"dense"``: its dense
#: twin); each entry has ``from_spec(channels, spec: LayerSpec)``
LAYERS = Registry("layer")
