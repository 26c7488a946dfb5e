"""Read run directories, group them into trials and select one trial per (dataset, method) on validation.

Pure Python (``json`` + ``pathlib``): the report never imports torch, so it runs wherever the run
directories are copied, without the training environment.

Vocabulary:

- **run**: one directory holding ``config.json``; usable only with a ``done`` marker and ``summary.json``.
- **row**: a line of Table 2 on one dataset: a method name, or ``unimodal (audio)`` for the unimodal
  reference trained on one modality.
- **trial**: the runs of one row that share the method's hyper-parameters (``config["method"]``), one per seed.
- **selection** (docs/protocol.md §4): per (dataset, row) the trial with the best mean validation score
  over seeds (``summary["selection"]["value"]``); ties go to the first trial in sorted hyper-parameter order.
  Its *test* numbers are reported as mean ± std over seeds.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from balancemm.errors import BalanceMMError
from balancemm.registry import METHOD_GROUPS

#: Table 2 order: the references first, then the taxonomy groups in the paper's section order.
GROUP_ORDER = METHOD_GROUPS
#: The config sections every method on a dataset must share (the dataset protocol + user overrides).
PROTOCOL_SECTIONS = ("train", "data", "model")


@dataclass(frozen=True)
class Run:
    """One finished run directory: ``config`` is config.json's ``config`` section, ``summary`` is summary.json,
    ``probe`` is probe.json (``{modality: {"test_accuracy", "val_accuracy", "C", ...}}``) or None."""

    path: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    probe: dict[str, Any] | None = None

    @property
    def dataset(self) -> str:
        return str(self.summary["dataset"])

    @property
    def method(self) -> str:
        return str(self.summary["method"])

    @property
    def seed(self) -> int:
        return int(self.summary["seed"])

    @property
    def group(self) -> str:
        return str(self.summary.get("method_group") or "unknown")

    @property
    def row(self) -> str:
        """Table 2 row name: the method, or ``unimodal (<modality>)``."""
        if self.method == "unimodal":
            return f"unimodal ({self.config.get('method', {}).get('modality') or self.summary['modalities'][0]})"
        return self.method

    @property
    def hparams(self) -> str:
        """The trial's identity within its row: the method section as canonical JSON."""
        return json.dumps(self.config.get("method", {}), sort_keys=True)


@dataclass
class Stat:
    """Mean and sample standard deviation (ddof = 1; 0 for one value) of ``n`` values; None-free."""

    mean: float
    std: float
    n: int

    @staticmethod
    def of(values: Iterable[float | None]) -> Stat | None:
        xs = [float(v) for v in values if v is not None]
        if not xs:
            return None
        mean = sum(xs) / len(xs)
        var = sum((x - mean) ** 2 for x in xs) / (len(xs) - 1) if len(xs) > 1 else 0.0
        return Stat(mean, math.sqrt(var), len(xs))


@dataclass
class Trial:
    """The runs (one per seed, sorted by seed) of one (dataset, row, hyper-parameters)."""

    dataset: str
    row: str
    method: str
    group: str
    hparams: str
    runs: list[Run]

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.runs]

    def stat(self, get: Callable[[dict[str, Any]], float | None]) -> Stat | None:
        """``get`` applied to each run's summary, aggregated over seeds."""
        return Stat.of(_safe(get, r.summary) for r in self.runs)

    @property
    def val(self) -> Stat:
        s = self.stat(lambda s: s["selection"]["value"])
        assert s is not None  # every usable summary has a selection value
        return s


@dataclass
class Collection:
    """Everything the report shows: selected trials per dataset and the problems found on the way.

    ``trials[dataset][row]`` lists every trial of that row (sorted by hyper-parameters);
    ``selected[dataset][row]`` is the validation-selected one; ``oracle`` the test-selected one (diagnostic);
    ``unfair`` holds one line per fairness violation, ``notes`` one line per skipped or duplicate run.
    """

    root: Path
    runs: list[Run]
    trials: dict[str, dict[str, list[Trial]]]
    selected: dict[str, dict[str, Trial]]
    oracle: dict[str, dict[str, Trial]]
    unfair: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def datasets(self) -> list[str]:
        return sorted(self.selected)

    def rows(self) -> list[tuple[str, str]]:
        """(group, row) over all datasets in Table 2 order: unimodal rows, baseline, then groups A–Z by method."""
        seen: dict[str, str] = {}
        for per in self.selected.values():
            for row, t in per.items():
                seen.setdefault(row, t.group)

        def key(item: tuple[str, str]) -> tuple[int, int, str]:
            row, group = item
            g = GROUP_ORDER.index(group) if group in GROUP_ORDER else len(GROUP_ORDER)
            return (g, 0 if row.startswith("unimodal") else 1, row)

        return [(g, r) for r, g in sorted(seen.items(), key=key)]


def _safe(get: Callable[[dict[str, Any]], float | None], summary: dict[str, Any]) -> float | None:
    try:
        return get(summary)
    except (KeyError, TypeError):
        return None


def _read(path: Path) -> Any:
    return json.loads(path.read_text())


def find_runs(root: str | Path) -> tuple[list[Run], list[str]]:
    """Every usable run directory under ``root`` (recursively), each once, and one note per unusable one.

    A directory counts if it holds ``config.json``; it is usable with ``done`` and a readable ``summary.json``.
    """
    root = Path(root)
    if not root.is_dir():
        raise BalanceMMError(f"runs directory {root} does not exist or is not a directory")
    # Resolved paths, so a run reached twice (a symlinked artifact, a nested root) is counted once.
    dirs = sorted({p.parent.resolve() for p in root.rglob("config.json")})
    if not dirs:
        raise BalanceMMError(f"no run directories (with config.json) under {root}")
    runs: list[Run] = []
    notes: list[str] = []
    for d in dirs:
        if not (d / "done").is_file() or not (d / "summary.json").is_file():
            why = "failed" if (d / "failed").is_file() else "not finished"
            notes.append(f"skipped {d}: {why} (no done marker or summary.json)")
            continue
        try:
            config = _read(d / "config.json")["config"]
            summary = _read(d / "summary.json")
            probe = _read(d / "probe.json") if (d / "probe.json").is_file() else None
        except (OSError, ValueError, KeyError) as exc:
            notes.append(f"skipped {d}: unreadable record ({exc})")
            continue
        runs.append(Run(d, config, summary, probe))
    if not runs:
        raise BalanceMMError(f"none of the {len(dirs)} run directories under {root} is finished (no done marker)")
    return runs, notes


def _group_trials(runs: list[Run], notes: list[str]) -> dict[str, dict[str, list[Trial]]]:
    by_key: dict[tuple[str, str, str], dict[int, Run]] = defaultdict(dict)
    for r in sorted(runs, key=lambda r: str(r.path)):
        seeds = by_key[(r.dataset, r.row, r.hparams)]
        if r.seed in seeds:
            # Same trial and seed twice (a copied directory): the first by path is kept, deterministically.
            notes.append(f"duplicate of {seeds[r.seed].path} ignored: {r.path}")
            continue
        seeds[r.seed] = r
    trials: dict[str, dict[str, list[Trial]]] = defaultdict(lambda: defaultdict(list))
    for (dataset, row, hp), seeds in sorted(by_key.items()):
        rs = [seeds[s] for s in sorted(seeds)]
        trials[dataset][row].append(Trial(dataset, row, rs[0].method, rs[0].group, hp, rs))
    return {d: dict(rows) for d, rows in trials.items()}


def _check_fairness(trials: dict[str, dict[str, list[Trial]]]) -> list[str]:
    """One line per violation of docs/protocol.md on each dataset (empty when the comparison is fair)."""
    problems: list[str] = []
    for dataset, rows in sorted(trials.items()):
        runs = [r for ts in rows.values() for t in ts for r in t.runs]
        for section in PROTOCOL_SECTIONS:
            variants: dict[str, list[str]] = defaultdict(list)
            for r in runs:
                variants[json.dumps(r.config.get(section), sort_keys=True)].append(r.row)
            if len(variants) > 1:
                # Name the smallest variant's rows: usually the odd one out.
                odd = sorted(variants.values(), key=len)[0]
                problems.append(
                    f"{dataset}: the '{section}' config section differs between runs "
                    f"({len(variants)} variants; e.g. {', '.join(sorted(set(odd)))} differ from the rest)"
                )
        counts = {row: len(ts) for row, ts in rows.items() if ts[0].group != "reference"}
        if len(set(counts.values())) > 1:
            detail = ", ".join(f"{row} {n}" for row, n in sorted(counts.items()))
            problems.append(f"{dataset}: methods have different numbers of trials ({detail})")
        refs = [row for row, ts in rows.items() if ts[0].group == "reference" and len(ts) > 1]
        if refs:
            problems.append(f"{dataset}: references with more than one configuration: {', '.join(sorted(refs))}")
        seed_sets = {tuple(t.seeds) for ts in rows.values() for t in ts}
        if len(seed_sets) > 1:
            problems.append(f"{dataset}: trials ran different seeds ({' vs '.join(str(list(s)) for s in seed_sets)})")
        metrics = {r.summary["selection"].get("metric") for r in runs}
        if len(metrics) > 1:
            problems.append(f"{dataset}: runs selected epochs on different metrics ({', '.join(sorted(metrics))})")
    return problems


def _best(trials: list[Trial], score: Callable[[Trial], float]) -> Trial:
    # max() keeps the first maximum: trials are sorted by hyper-parameters, so ties resolve deterministically.
    return max(trials, key=score)


def collect(root: str | Path) -> Collection:
    """Read, group, check and select (see the module docstring); raises BalanceMMError for an unusable root."""
    runs, notes = find_runs(root)
    trials = _group_trials(runs, notes)
    selected = {d: {row: _best(ts, lambda t: t.val.mean) for row, ts in rows.items()} for d, rows in trials.items()}
    oracle = {
        d: {
            row: _best(ts, lambda t: (t.stat(lambda s: s["test"]["accuracy"]) or Stat(0, 0, 0)).mean)
            for row, ts in rows.items()
        }
        for d, rows in trials.items()
    }
    return Collection(Path(root), runs, trials, selected, oracle, _check_fairness(trials), notes)
