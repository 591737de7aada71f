"""A tiny name -> class registry: extension points are registries of small classes, not `if name ==` chains.

    SCHEDULES = Registry("noise schedule")
    @SCHEDULES.register("linear")
    class Linear(NoiseSchedule): ...
    SCHEDULES.build("linear", eps=1e-3)
    PROCESSES = Registry("forward process", plugins=("dlm.processes.sedd",))   # imported on the first lookup
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """`plugins`: modules whose classes register here, imported on the first lookup (not at import time), so the
    module that owns the registry never imports its plugins and no import cycle arises. `name_attr`: an attribute
    set on each registered class to the name it is registered under."""

    def __init__(self, kind: str, plugins: tuple[str, ...] = (), name_attr: str | None = None) -> None:
        self.kind = kind
        self._name_attr = name_attr  # set on each registered class: its registry name (e.g. Sampler.name)
        self._items: dict[str, T] = {}
        self._plugins = plugins
        self._loaded = not plugins

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            import importlib

            for module in self._plugins:
                importlib.import_module(module)

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            if self._name_attr is not None:
                setattr(obj, self._name_attr, name)
            return obj

        return deco

    def get(self, name: str) -> T:
        self._load()
        if name not in self._items:
            raise ValueError(f"unknown {self.kind} {name!r}; choose one of {sorted(self._items)}")
        return self._items[name]

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.get(name)(*args, **kwargs)  # type: ignore[operator]

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._items
