"""What a sweep runs: methods × datasets × seeds × hyper-parameter trials, as resolved run configs.

A sweep is described by a YAML file or the same keys on the command line::

    methods: [baseline, ogm_ge, unimodal]   # or "all": every registered method
    datasets: [embedded]
    seeds: 3                                # or an explicit list [0, 1, 2]
    trials: 1                               # hyper-parameter trials per method (the same for every method)
    search:                                 # replaces a method's default space (its ``search``)
      ogm_ge: {alpha: [0.1, 0.3, 0.5]}      # trial 0 is always the defaults
    adapt: false                            # start every job from the method's ``adapted`` values
    sets: ["train.epochs=10"]               # protocol overrides, applied to every job alike
    probe: false                            # linear-probe each multimodal run's encoders (Fig. 2)
    robustness: false                       # evaluate each multimodal run with modalities missing/corrupted

``unimodal`` expands to one job per modality of each dataset; the reference methods (``baseline``,
``unimodal``) have nothing to tune and run with their defaults only. Each job's directory is named by the
hash of its resolved config (``<method>-<dataset>-seed<N>-<hash8>``, as ``balancemm train`` names it),
so a sweep finds its own finished jobs again and two sweeps over the same configs share them.

Fairness (docs/protocol.md): every method on a dataset gets the same protocol (only ``method.*`` keys
vary between jobs) and the same number of trials; trials beyond the defaults are drawn without
replacement from the method's search grid with a seed fixed by the sweep, so the draw is reproducible.
With ``adapt`` every job starts from the method's protocol adaptation (relative epoch schedules), so
trial 0 is the adapted defaults and the draws are applied on top of them.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from balancemm.config import RunConfig, load_yaml, resolve_config
from balancemm.errors import ConfigError
from balancemm.schema import parse, show, to_dict


@dataclass(frozen=True)
class Job:
    """One training run of the sweep."""

    config: RunConfig
    out: Path
    trial: int  # 0 = the method's defaults
    probe: bool = False  # linear-probe the trained encoders afterwards (Fig. 2's counterparts)
    robustness: bool = False  # evaluate the selected weights under corruptions afterwards (balancemm eval)

    @property
    def label(self) -> str:
        run = self.config.run
        hp = self.config.to_dict()["method"]
        extra = f" trial {self.trial}" if self.trial else ""
        modality = f"({hp['modality']})" if run.method == "unimodal" else ""
        return f"{run.method}{modality} {run.dataset} seed {run.seed}{extra}"

    @property
    def hparams(self) -> str:
        """The method's settings that differ from its plain defaults (trial draws and adaptations alike),
        as ``key=value`` in ``--set`` syntax, or ``defaults``."""
        from balancemm.methods import METHODS

        plain = to_dict(METHODS.get(self.config.run.method).HParams())
        changed = {k: v for k, v in self.config.to_dict()["method"].items() if plain.get(k) != v}
        return " ".join(f"{k}={json.dumps(v)}" for k, v in changed.items()) or "defaults"


@dataclass(frozen=True)
class SweepSpec:
    methods: tuple[str, ...] = ("all",)
    datasets: tuple[str, ...] = ("embedded",)
    seeds: tuple[int, ...] = (0, 1, 2)
    trials: int = 1
    search: Mapping[str, Mapping[str, Sequence[Any]]] = field(default_factory=dict)
    sets: tuple[str, ...] = ()
    draw_seed: int = 0  # seeds the draw of hyper-parameter trials
    probe: bool = False  # linear-probe every multimodal run's encoders when it finishes
    adapt: bool = False  # every job starts from its method's ``adapted`` values (the benchmark's protocol)
    robustness: bool = False  # evaluate every multimodal run under corruptions when it finishes

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], where: str = "sweep") -> SweepSpec:
        known = {
            "methods",
            "datasets",
            "seeds",
            "trials",
            "search",
            "sets",
            "draw_seed",
            "probe",
            "adapt",
            "robustness",
        }
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r}; valid: {', '.join(sorted(known))}")

        def names(key: str, default: tuple[str, ...]) -> tuple[str, ...]:
            value = raw.get(key, default)
            items = value.split(",") if isinstance(value, str) else value
            if (
                not isinstance(items, list | tuple)
                or not items
                or not all(isinstance(v, str) and v.strip() for v in items)
            ):
                raise ConfigError(f"{where}.{key} must be a list of names (or a comma-separated string)")
            return tuple(v.strip() for v in items)

        def integer(v: Any) -> bool:
            # YAML's true/false are bools, which Python counts as integers: a seed of true is a typo.
            return isinstance(v, int) and not isinstance(v, bool)

        def flag(key: str) -> bool:
            # Strict: the string 'no' (or 'false') would otherwise count as true.
            value = raw.get(key, False)
            if not isinstance(value, bool):
                raise ConfigError(f"{where}.{key} must be true or false, not {show(value)}")
            return value

        seeds = raw.get("seeds", 3)
        if integer(seeds):
            if seeds < 1:
                raise ConfigError(f"{where}.seeds must be >= 1 (a count) or a list of seeds")
            seed_list = tuple(range(seeds))
        elif isinstance(seeds, list) and seeds and all(integer(s) and s >= 0 for s in seeds):
            seed_list = tuple(seeds)
        else:
            raise ConfigError(f"{where}.seeds must be a count or a list of integers >= 0, not {show(seeds)}")
        trials = raw.get("trials", 1)
        if not integer(trials) or trials < 1:
            raise ConfigError(f"{where}.trials must be an integer >= 1, not {show(trials)}")
        draw_seed = raw.get("draw_seed", 0)
        if not integer(draw_seed) or draw_seed < 0:
            raise ConfigError(f"{where}.draw_seed must be an integer >= 0, not {show(draw_seed)}")
        search = raw.get("search", {}) or {}
        if not isinstance(search, Mapping) or not all(
            isinstance(space, Mapping) and all(isinstance(v, list) and v for v in space.values())
            for space in search.values()
        ):
            raise ConfigError(f"{where}.search must map method → parameter → non-empty list of values")
        sets = raw.get("sets", [])
        if not isinstance(sets, list) or not all(isinstance(s, str) for s in sets):
            raise ConfigError(f"{where}.sets must be a list of 'key=value' strings")
        return cls(
            names("methods", ("all",)),
            names("datasets", ("embedded",)),
            seed_list,
            trials,
            {str(k): dict(v) for k, v in search.items()},
            tuple(sets),
            draw_seed,
            flag("probe"),
            flag("adapt"),
            flag("robustness"),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> SweepSpec:
        return cls.from_mapping(load_yaml(path, sections=None), where=str(path))


def _trials(method: str, spec: SweepSpec) -> list[dict[str, Any]]:
    """``method.*`` overrides of one method's trials: its starting point (the defaults, or with ``adapt``
    the adapted defaults), then ``trials − 1`` distinct draws from its search grid on top of it."""
    from balancemm.methods import METHODS

    cls = METHODS.get(method)
    base = dict(cls.adapted) if spec.adapt else {}
    if spec.trials == 1:
        return [base]
    # Keys may be aliases (search.OGM); an unknown name is refused rather than silently left unused.
    given = {METHODS.resolve(name): space for name, space in spec.search.items()}
    space = given.get(method, cls.search)
    if not space:
        raise ConfigError(
            f"trials={spec.trials} but no search space for {method}: add search.{method} or use trials 1 "
            "(every method gets the same number of trials)"
        )
    # Points are compared as parsed settings, so 1 and 1.0 (or a list and a tuple) are the same point;
    # one equal to the starting point would repeat trial 0 (same config, same job): not a new trial.
    start = parse(cls.HParams, base, "method")
    keys = sorted(space)
    grid: list[dict[str, Any]] = []
    seen = [start]
    for values in itertools.product(*(space[k] for k in keys)):
        point = dict(zip(keys, values, strict=True))
        hp = parse(cls.HParams, {**base, **point}, f"search.{method}")
        if hp not in seen:
            seen.append(hp)
            grid.append(point)
    if len(grid) < spec.trials - 1:
        raise ConfigError(
            f"the search space of {method} has {len(grid)} points besides the defaults, fewer than the "
            f"{spec.trials - 1} trials to draw; give search.{method} more points or use fewer trials"
        )
    draw = random.Random(f"{spec.draw_seed}:{method}").sample(grid, spec.trials - 1)
    return [base, *({**base, **point} for point in draw)]


def plan_jobs(spec: SweepSpec, root: str | Path) -> list[Job]:
    """Every job of the sweep, resolved and validated, in a stable order; duplicates removed."""
    from balancemm.data import DATASETS
    from balancemm.layout import default_out
    from balancemm.methods import METHODS

    methods = [m for m in METHODS.names() if m != "unimodal"] + ["unimodal"] if "all" in spec.methods else spec.methods
    jobs: dict[str, Job] = {}
    for dataset in spec.datasets:
        for name in methods:
            method = METHODS.resolve(name)
            # References (baseline, unimodal) have nothing to tune: they run once per seed.
            settings: list[tuple[int, dict[str, Any]]]
            if METHODS.entry(method).meta.get("group") == "reference":
                settings = [(0, {})]
            else:
                settings = list(enumerate(_trials(method, spec)))
            if method == "unimodal":
                # Known from the options alone: planning must not load a real dataset.
                modalities = DATASETS.entry(dataset).meta["modalities"]
                settings = [(0, {"modality": m}) for m in modalities]
            for trial, hp in settings:
                for seed in spec.seeds:
                    cfg = resolve_config(method, dataset, sets=spec.sets, overrides={"method": hp}, seed=seed)
                    jobs.setdefault(cfg.digest(), Job(cfg, default_out(cfg, root), trial, spec.probe, spec.robustness))
    return list(jobs.values())
