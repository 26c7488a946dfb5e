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

# The built-in methods and datasets as ``balancemm list`` prints them, in registration order: filling the
# registries imports every method and dataset module and with them torch (seconds), only to print a table.
# tests/test_early_validation.py holds these equal to the registries, so a new entry is added here too.
METHOD_INDEX: tuple[Entry[None], ...] = (
    Entry("agm", None, ("AGM", "AGMTrainer"), {"group": "optimization", "paper": "Li et al., ICCV 2023"}),
    Entry(
        "amco",
        None,
        ("AMCo", "AMCoTrainer"),
        {"group": "feed-forward", "paper": "Zhou et al., ICASSP 2023 (reconstruction: no code released)"},
    ),
    Entry(
        "baseline", None, ("baselineTrainer",), {"group": "reference", "paper": "concatenation fusion + cross-entropy"}
    ),
    Entry("cml", None, ("CML", "CMLTrainer"), {"group": "objective", "paper": "Ma et al., ICML 2023"}),
    Entry(
        "gblending", None, ("GBlending", "GBlendingTrainer"), {"group": "objective", "paper": "Wang et al., CVPR 2020"}
    ),
    Entry("greedy", None, ("Greedy", "GreedyTrainer"), {"group": "feed-forward", "paper": "Wu et al., ICML 2022"}),
    Entry("lfm", None, ("LFM", "LFMTrainer"), {"group": "objective", "paper": "Yang et al., NeurIPS 2024"}),
    Entry("mbsd", None, ("MBSD", "MBSDTrainer"), {"group": "objective", "paper": "Liu et al., WSDM 2023"}),
    Entry("mla", None, ("MLA", "MLATrainer"), {"group": "feed-forward", "paper": "Zhang et al., CVPR 2024 (MLA)"}),
    Entry("mmcosine", None, ("MMCosine", "MMCosineTrainer"), {"group": "objective", "paper": "Xu et al., ICASSP 2023"}),
    Entry("mmpareto", None, ("MMPareto", "MMParetoTrainer"), {"group": "objective", "paper": "Wei & Hu, ICML 2024"}),
    Entry(
        "modality_valuation",
        None,
        ("Sample", "SampleTrainer", "ModalityValuation"),
        {"group": "data", "paper": "Wei et al., CVPR 2024"},
    ),
    Entry(
        "ogm_ge",
        None,
        ("OGM", "OGM_GE", "OGMTrainer"),
        {"group": "optimization", "paper": "Peng et al., CVPR 2022 (OGM-GE)"},
    ),
    Entry("opm", None, ("OPM", "OPMTrainer"), {"group": "feed-forward", "paper": "Wei et al., TPAMI 2024 (OPM)"}),
    Entry("pmr", None, ("PMR", "PMRTrainer"), {"group": "optimization", "paper": "Fan et al., CVPR 2023"}),
    Entry(
        "reconboost",
        None,
        ("ReconBoost", "ReconBoostTrainer"),
        {"group": "optimization", "paper": "Hua et al., ICML 2024"},
    ),
    Entry(
        "relearning",
        None,
        ("ReLearning", "ReLearningTrainer", "Diagnosing"),
        {"group": "optimization", "paper": "Wei et al., ECCV 2024 (Diagnosing & Re-learning)"},
    ),
    Entry("umt", None, ("UMT", "UMTTrainer"), {"group": "objective", "paper": "Du et al., ICML 2023"}),
    Entry("unimodal", None, ("unimodalTrainer",), {"group": "reference", "paper": "one modality alone"}),
)
_TWO_FROM_FILES = {"modality_count": 2, "needs_files": True}
DATASET_INDEX: tuple[Entry[None], ...] = (
    Entry("balanced_av", None, (), {**_TWO_FROM_FILES, "description": "BalancedAV: audio + visual, 30 classes"}),
    Entry("cmu_mosei", None, ("mosei",), {"modality_count": 3, "needs_files": True, "description": "CMU-MOSEI"}),
    Entry("cremad", None, (), {**_TWO_FROM_FILES, "description": "CREMA-D: audio + visual, 6 emotions (raw release)"}),
    Entry("embedded", None, (), {"modality_count": 2, "description": "digits (visual) + synthesised tones (audio)"}),
    Entry(
        "embedded3", None, (), {"modality_count": 3, "description": "embedded + a synthetic word-vector text modality"}
    ),
    Entry(
        "food101",
        None,
        ("food",),
        {**_TWO_FROM_FILES, "description": "UPMC Food-101: image + recipe title, 101 dishes"},
    ),
    Entry(
        "kinetics_sounds",
        None,
        ("ks",),
        {**_TWO_FROM_FILES, "description": "Kinetics-Sounds: audio + visual, 31 classes"},
    ),
    Entry("ucf101", None, ("ucf",), {**_TWO_FROM_FILES, "description": "UCF-101: RGB + optical flow, 101 actions"}),
    Entry("vggsound", None, ("vgg",), {**_TWO_FROM_FILES, "description": "VGGSound: audio + visual, 309 classes"}),
)
