"""One small generic registry for methods, datasets, encoders and fusions.

Registration is a decorator plus an explicit import line in the package's ``__init__``, never a scan of
file names. Keys are lower snake case; other spellings (BalanceMM's ``OGMTrainer``, ``OGM``) are aliases,
matched case-insensitively so parity scripts read naturally.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from balancemm.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """A registered object with its metadata (e.g. a method's taxonomy group and paper)."""

    name: str
    obj: T
    aliases: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)


class Registry(Generic[T]):
    """Name → object map with aliases, metadata filters and helpful errors."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}
        self._lookup: dict[str, str] = {}

    def register(self, name: str, *, aliases: tuple[str, ...] = (), **meta: Any) -> Callable[[T], T]:
        """Decorator: ``@METHODS.register("ogm_ge", group="optimization", aliases=("OGM",))``."""
        if name != name.lower() or " " in name:
            raise ValueError(f"{self.kind} keys are lower snake case, got {name!r}")

        def decorator(obj: T) -> T:
            for key in {k.lower() for k in (name, *aliases)}:
                if key in self._lookup:
                    raise ValueError(f"{self.kind} {key!r} is registered twice")
                self._lookup[key] = name
            self._entries[name] = Entry(name, obj, tuple(aliases), dict(meta))
            return obj

        return decorator

    def resolve(self, name: str) -> str:
        """Return the canonical key for ``name`` or an alias of it; unknown names list valid ones."""
        key = self._lookup.get(name.lower())
        if key is None:
            close = difflib.get_close_matches(name.lower(), list(self._lookup), n=1)
            hint = f" (did you mean {self._lookup[close[0]]!r}?)" if close else ""
            raise ConfigError(f"unknown {self.kind} {name!r}{hint}; valid: {', '.join(self.names())}")
        return key

    def entry(self, name: str) -> Entry[T]:
        return self._entries[self.resolve(name)]

    def get(self, name: str) -> T:
        return self.entry(name).obj

    def names(self, pattern: str = "*", **meta: Any) -> list[str]:
        """Canonical keys matching a wildcard and every given metadata value, in registration order."""
        return [
            e.name
            for e in self._entries.values()
            if fnmatch.fnmatch(e.name, pattern) and all(e.meta.get(k) == v for k, v in meta.items())
        ]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._lookup

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)


# The registries themselves; each layer's package __init__ fills its own with explicit imports.
METHODS: Registry[Any] = Registry("method")
#: The paper's taxonomy, in its section order, after the references; here (torch-free) so the CLI,
#: the methods package and the report share one list.
METHOD_GROUPS = ("reference", "data", "feed-forward", "objective", "optimization")
DATASETS: Registry[Any] = Registry("dataset")
ENCODERS: Registry[Any] = Registry("encoder")
FUSIONS: Registry[Any] = Registry("fusion")
