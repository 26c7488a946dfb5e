"""One small generic registry for methods, datasets, encoders and fusions.

Registration is a decorator plus an explicit import line in the package's ``__init__``, never a scan of
file names. Keys are lower snake case; other spellings (BalanceMM's ``OGMTrainer``, ``OGM``) are aliases,
matched case-insensitively so parity scripts read naturally.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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

    def __init__(self, kind: str, *, catalog: Registry[Any] | None = None, schema: str | None = None) -> None:
        """``catalog``: the torch-free registry that holds this kind's names, aliases, metadata and
        ``schema`` (the class attribute naming its options dataclass, e.g. ``"HParams"``); see
        :meth:`register`."""
        self.kind = kind
        self.catalog, self.schema = catalog, schema
        self._entries: dict[str, Entry[T]] = {}
        self._lookup: dict[str, str] = {}

    def register(self, name: str, *, aliases: tuple[str, ...] = (), **meta: Any) -> Callable[[T], T]:
        """Decorator: ``@METHODS.register("ogm_ge", group="optimization", aliases=("OGM",))``.

        In a registry with a catalog, a name the catalog already holds (every built-in) is registered
        with the catalog's aliases and metadata, and its schema attribute must be the catalogued class;
        any other name (a plugin, a test double) is entered into the catalog too, so the config sees it.
        """
        if name != name.lower() or " " in name:
            raise ValueError(f"{self.kind} keys are lower snake case, got {name!r}")

        def decorator(obj: T) -> T:
            nonlocal aliases, meta
            if self.catalog is not None:
                schema = getattr(obj, self.schema) if self.schema else None
                listed = self.catalog._entries.get(name)
                if listed is None:
                    self.catalog.register(name, aliases=aliases, **meta)(schema)
                elif aliases or meta:
                    raise ValueError(f"{self.kind} {name!r} is catalogued: its aliases and metadata are the catalog's")
                elif listed.obj is not schema:
                    raise ValueError(f"{self.kind} {name!r}: {self.schema} must be the catalogued {listed.obj!r}")
                else:
                    aliases, meta = listed.aliases, listed.meta
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

    @contextmanager
    def temporary(self) -> Iterator[Registry[T]]:
        """Registrations made inside the ``with`` block (here and in the catalog) are undone when it
        ends: ``with METHODS.temporary(): METHODS.register("toy")(Toy)``, for tests and notebooks."""
        saved = [(r, dict(r._entries), dict(r._lookup)) for r in (self, self.catalog) if r is not None]
        try:
            yield self
        finally:
            for registry, entries, lookup in saved:
                registry._entries, registry._lookup = entries, lookup


# The torch-free catalog: every method's hyper-parameters (``HParams``), every dataset's and encoder's
# options and every fusion's name, with aliases and metadata. ``balancemm.catalog`` fills it with the
# built-ins; the config, ``balancemm list`` and ``balancemm config`` read it without importing torch.
METHOD_HPARAMS: Registry[type] = Registry("method")
DATASET_OPTIONS: Registry[type] = Registry("dataset")  # meta: modalities, needs_files, description
ENCODER_OPTIONS: Registry[type] = Registry("encoder")
FUSION_NAMES: Registry[None] = Registry("fusion")

# The implementations; each layer's package __init__ fills its own with explicit imports.
METHODS: Registry[Any] = Registry("method", catalog=METHOD_HPARAMS, schema="HParams")
DATASETS: Registry[Any] = Registry("dataset", catalog=DATASET_OPTIONS, schema="Options")
ENCODERS: Registry[Any] = Registry("encoder", catalog=ENCODER_OPTIONS, schema="Options")
FUSIONS: Registry[Any] = Registry("fusion", catalog=FUSION_NAMES)

#: The paper's taxonomy, in its section order, after the references; here (torch-free) so the CLI,
#: the methods package and the report share one list.
METHOD_GROUPS = ("reference", "data", "feed-forward", "objective", "optimization")
