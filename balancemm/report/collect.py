"""Read run directories, group them into trials and select one trial per (dataset, method) on validation.

Pure Python (``json`` + ``pathlib``): the report never imports torch, so it runs wherever the run
directories are copied, without the training environment.

Vocabulary:

- **run**: one directory holding ``config.json``; usable only with a ``done`` marker and ``summary.json``,
  both records readable and plausible (:func:`find_runs`).
- **row**: a line of Table 2 on one dataset: a method name, or ``unimodal (audio)`` for the unimodal
  reference trained on one modality.
- **trial**: the runs of one row that share the method's hyper-parameters (``config["method"]``), one per seed.
- **selection** (docs/protocol.md §4): per (dataset, row) the trial with the best mean validation score
  over seeds (``summary["selection"]["value"]``); ties go to the first trial in sorted hyper-parameter order.
  Its *test* numbers are reported as mean ± std over seeds.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from balancemm.errors import BalanceMMError
from balancemm.layout import (
    CONFIG_FILE,
    DONE_MARKER,
    EVAL_FILE,
    PROBE_FILE,
    SUMMARY_FILE,
    RunFiles,
    parse_json,
    standard_eval,
)
from balancemm.registry import METHOD_GROUPS

#: Table 2 order: the references first, then the taxonomy groups in the paper's section order.
GROUP_ORDER = METHOD_GROUPS
#: The config sections every method on a dataset must share (the dataset protocol + user overrides).
PROTOCOL_SECTIONS = ("train", "data", "model")
#: Notes on run directories left out because a record is damaged or implausible start with this (the
#: ones left out as unfinished start with "skipped ").
REJECTED = "rejected "
#: Dataset, method, group and modality names become parts of file names (``tables/trials_<dataset>_<row>.md``),
#: so a name read from a run file must be plain: letters, digits and ``_ . + -``, no leading symbol, no ``..``.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,99}")


@dataclass(frozen=True)
class Run:
    """One finished run directory: ``config`` is config.json's ``config`` section, ``summary`` is summary.json,
    ``probe`` is probe.json (``{modality: {"test_accuracy", "val_accuracy", "C", ...}}``) or None, and
    ``robustness`` the standard evaluation under corruptions in eval.json (``{name: {"severities",
    "accuracy", "auc", "relative"}}``, names ``<modality>:<kind>``) or None."""

    path: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    probe: dict[str, Any] | None = None
    robustness: dict[str, Any] | None = None

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

    def by_seed(self, get: Callable[[dict[str, Any]], float | None]) -> dict[int, float]:
        """``get`` applied to each run's summary, per seed (seeds where it has no value left out)."""
        return {r.seed: float(v) for r in self.runs if (v := _safe(get, r.summary)) is not None}

    @property
    def cross_modal(self) -> bool:
        """Whether some run's per-modality heads see another modality (``summary.per_modality_heads``
        ``"cross-modal"``, e.g. through mid-fusion); runs without the field count as unimodal heads."""
        return any(r.summary.get("per_modality_heads") == "cross-modal" for r in self.runs)

    @property
    def val(self) -> Stat:
        s = self.stat(lambda s: s["selection"]["value"])
        assert s is not None  # every usable summary has a selection value
        return s


@dataclass(frozen=True)
class Flags:
    """Signs that a method may not have acted, over the ``n`` seeds of its trial.

    ``identical``: seeds whose test predictions (``summary.test.predictions_sha256``) equal baseline's on the
    same seed, out of ``compared`` seeds where both runs recorded the hash. ``no_intervention``: seeds where
    the method did not act in any epoch up to its selected one (``summary.intervention.before_selected``
    false), out of ``intervention_known`` seeds that recorded it. Runs written before these fields existed
    are neither counted nor compared.
    """

    n: int
    identical: int
    compared: int
    no_intervention: int
    intervention_known: int


def _prediction_hash(run: Run) -> str | None:
    test = run.summary.get("test")
    h = test.get("predictions_sha256") if isinstance(test, dict) else None
    return h if isinstance(h, str) else None


def _before_selected(run: Run) -> bool | None:
    iv = run.summary.get("intervention")
    b = iv.get("before_selected") if isinstance(iv, dict) else None
    return b if isinstance(b, bool) else None


def trial_flags(trial: Trial, baseline: Trial | None) -> Flags | None:
    """``trial``'s :class:`Flags` against ``baseline`` on the same dataset; None for references (baseline and
    unimodal rows), which are what the methods are compared with."""
    if trial.group == "reference":
        return None
    base = {r.seed: _prediction_hash(r) for r in baseline.runs} if baseline else {}
    pairs = [(h, base.get(r.seed)) for r in trial.runs if (h := _prediction_hash(r)) is not None]
    compared = [a == b for a, b in pairs if b is not None]
    acted = [b for r in trial.runs if (b := _before_selected(r)) is not None]
    return Flags(len(trial.runs), sum(compared), len(compared), acted.count(False), len(acted))


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

    @property
    def rejected(self) -> list[str]:
        """The notes on run directories left out because a record is damaged or implausible."""
        return [n for n in self.notes if n.startswith(REJECTED)]

    def flags(self, dataset: str, row: str) -> Flags | None:
        """The selected trial's :class:`Flags` on ``dataset`` (None for references)."""
        sel = self.selected[dataset]
        return trial_flags(sel[row], sel.get("baseline"))

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


def plain_name(value: object) -> bool:
    """Whether ``value`` (read from a run file) may become part of a file name of the report."""
    return isinstance(value, str) and _NAME.fullmatch(value) is not None and ".." not in value


class _Unusable(Exception):
    """A run record the report cannot use; the message names the file and what is wrong with it."""


def printable(text: str) -> str:
    """``text`` with control characters escaped, so that a note naming a path stays one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _show(value: object) -> str:
    """``value`` for a note: its repr, cut short (a damaged record may hold anything, of any size)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


#: A field check: None when the value is acceptable, else what is wrong with it ("is 1.5, not ...").
Rule = Callable[[Any], str | None]


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _between(low: float, high: float, what: str) -> Rule:
    return lambda v: None if _number(v) and low <= v <= high else f"is {_show(v)}, not {what}"


def _or_none(rule: Rule) -> Rule:
    return lambda v: None if v is None else rule(v)


def _kind(kind: type, what: str) -> Rule:
    return lambda v: None if isinstance(v, kind) else f"is {_show(v)}, not {what}"


def _name(v: Any) -> str | None:
    if plain_name(v):
        return None
    return f"is {_show(v)}, not a plain name (letters, digits, _ . + -; no '..'): names become file names"


def _names(v: Any) -> str | None:
    if not isinstance(v, list) or not v:
        return f"is {_show(v)}, not a non-empty list of names"
    return next((f"[{i}] {why}" for i, x in enumerate(v) if (why := _name(x)) is not None), None)


def _integer(low: int, what: str) -> Rule:
    def rule(v: Any) -> str | None:
        ok = isinstance(v, int) and not isinstance(v, bool) and v >= low
        return None if ok else f"is {_show(v)}, not {what}"

    return rule


_MAPPING = _kind(dict, "a mapping")
_TEXT = _kind(str, "a string")
#: Accuracies, macro-F1 and selection values (accuracy or macro-F1) are fractions. A Shapley value is a
#: weighted mean of differences of accuracies, so it lies in [-1, 1]; the imbalance degree is a mean of
#: differences of two of them, in [0, 2]. FLOPs, times, memory and parameter counts are amounts.
_FRACTION = _between(0, 1, "a fraction in [0, 1]")
_SHAPLEY = _between(-1, 1, "a Shapley value in [-1, 1]")
_IMBALANCE = _or_none(_between(0, 2, "an imbalance degree in [0, 2]"))
_AMOUNT = _or_none(_between(0, math.inf, "a finite number >= 0"))

#: (field, rule, required) for every summary.json field the report reads; ``*`` is every key of a mapping.
#: A mapping is listed before its fields, so a field is only checked inside a mapping.
_SUMMARY: tuple[tuple[str, Rule, bool], ...] = (
    ("dataset", _name, True),
    ("method", _name, True),
    ("method_group", _or_none(_name), False),
    ("seed", _integer(0, "an integer >= 0"), True),
    ("modalities", _names, True),
    ("selection", _MAPPING, True),
    ("selection.metric", _TEXT, True),
    ("selection.value", _FRACTION, True),
    ("test", _MAPPING, True),
    ("test.accuracy", _FRACTION, True),
    ("test.macro_f1", _FRACTION, True),
    ("test.per_modality", _MAPPING, False),
    ("test.per_modality.*", _MAPPING, False),
    ("test.per_modality.*.accuracy", _FRACTION, False),
    ("test.per_modality.*.macro_f1", _FRACTION, False),
    ("shapley", _MAPPING, False),
    ("shapley.*", _SHAPLEY, False),
    ("imbalance", _IMBALANCE, False),
    ("shapley_mask", _TEXT, False),
    ("shapley_by_mask", _MAPPING, False),
    ("shapley_by_mask.*", _MAPPING, False),
    ("shapley_by_mask.*.shapley", _MAPPING, False),
    ("shapley_by_mask.*.shapley.*", _SHAPLEY, False),
    ("shapley_by_mask.*.imbalance", _IMBALANCE, False),
    ("flops", _MAPPING, False),
    ("flops.total", _AMOUNT, False),
    ("flops.total_with_artifacts", _AMOUNT, False),
    ("train_time_s", _AMOUNT, False),
    ("wall_time_s", _AMOUNT, False),
    ("peak_memory_mb", _AMOUNT, False),
    ("params", _MAPPING, False),
    ("params.total", _AMOUNT, False),
    ("peak_memory_kind", _or_none(_TEXT), False),
    ("per_modality_heads", _or_none(_TEXT), False),
    ("concurrent_jobs", _or_none(_integer(1, "an integer >= 1")), False),
)
#: The same for the ``config`` section of config.json (the unimodal row is named by method.modality).
_CONFIG: tuple[tuple[str, Rule, bool], ...] = (
    ("method", _MAPPING, False),
    ("method.modality", _or_none(_name), False),
    ("model", _or_none(_MAPPING), False),
    ("model.mask", _TEXT, False),
)
#: And for probe.json: ``{modality: {"test_accuracy", "val_accuracy", ...}}``.
_PROBE: tuple[tuple[str, Rule, bool], ...] = (
    ("*", _MAPPING, False),
    ("*.test_accuracy", _FRACTION, False),
    ("*.val_accuracy", _FRACTION, False),
)
_ABSENT = object()


def _fields(node: Any, path: list[str], where: str) -> Iterable[tuple[str, Any]]:
    """(dotted name, value) of every field ``path`` names under ``node`` (``_ABSENT`` when missing); nothing
    below a missing or non-mapping parent, which its own rule reports."""
    if not path:
        yield where, node
        return
    if not isinstance(node, dict):
        return
    head, rest = path[0], path[1:]
    keys = sorted(node, key=str) if head == "*" else [head]
    for key in keys:
        name = f"{where}.{str(key)[:60]}" if where else str(key)[:60]
        if key in node:
            yield from _fields(node[key], rest, name)
        elif not rest:
            yield name, _ABSENT


def _check(record: Any, spec: tuple[tuple[str, Rule, bool], ...], file: str) -> None:
    """Raise :class:`_Unusable` naming ``file`` and the field at the first violation of ``spec``."""
    if not isinstance(record, dict):
        raise _Unusable(f"{file}: holds {_show(record)}, not a mapping")
    for field_name, rule, required in spec:
        for where, value in _fields(record, field_name.split("."), ""):
            if value is _ABSENT:
                if required:
                    raise _Unusable(f"{file}: {where} is missing")
            elif (why := rule(value)) is not None:
                raise _Unusable(f"{file}: {where} {why}")


def _robustness(files: RunFiles, modalities: list[str]) -> dict[str, Any] | None:
    """The curves of the run's standard evaluation under corruptions, checked: every name a modality of the
    run and a plain kind, increasing severities in [0, 1] and one accuracy in [0, 1] for each."""
    entry = standard_eval(files)
    if entry is None:
        return None
    curves = entry.get("robustness", {}).get("corruptions") if isinstance(entry.get("robustness"), dict) else None
    if not isinstance(curves, dict) or not curves:
        raise _Unusable(f"{EVAL_FILE}: the standard evaluation has no corruptions")
    for name, c in curves.items():
        modality, _, kind = str(name).partition(":")
        if modality not in modalities or not _NAME.fullmatch(kind):
            raise _Unusable(f"{EVAL_FILE}: corruption {printable(str(name))!r} is not one of this run's modalities")
        grid, acc = (c.get("severities"), c.get("accuracy")) if isinstance(c, dict) else (None, None)
        if not (isinstance(grid, list) and isinstance(acc, list) and len(grid) == len(acc) > 0) or not all(
            isinstance(x, int | float) and not isinstance(x, bool) and 0 <= x <= 1 for x in [*grid, *acc]
        ):
            raise _Unusable(f"{EVAL_FILE}: {name}: severities and accuracies must be matching lists in [0, 1]")
        if any(b <= a for a, b in itertools.pairwise(grid)):
            raise _Unusable(f"{EVAL_FILE}: {name}: the severities do not increase")
    return curves


def _read(path: Path) -> Any:
    """The JSON in ``path``; :class:`_Unusable` naming the file when it cannot be read or parsed."""
    try:
        return parse_json(path)
    except OSError as exc:
        raise _Unusable(f"{path.name}: cannot be read ({exc.strerror or exc})") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError alike
        raise _Unusable(f"{path.name}: not valid JSON ({str(exc)[:100]})") from None
    except RecursionError:
        raise _Unusable(f"{path.name}: not valid JSON (nested too deeply)") from None


def _load(d: Path) -> Run:
    """The run in directory ``d``, its records checked; :class:`_Unusable` when one is damaged or implausible."""
    files = RunFiles(d)
    record = _read(files.config)
    _check(record, (("config", _MAPPING, True),), CONFIG_FILE)
    config = record["config"]
    _check(config, _CONFIG, f"{CONFIG_FILE}: config")
    summary = _read(files.summary)
    _check(summary, _SUMMARY, SUMMARY_FILE)
    if "shapley_mask" not in summary:
        # Runs written before the field existed scored Shapley values under their model.mask only.
        summary["shapley_mask"] = (config.get("model") or {}).get("mask", "feature")
    return Run(d, config, summary)


def find_runs(root: str | Path) -> tuple[list[Run], list[str]]:
    """Every usable run directory under ``root`` (recursively), each once, and one note per unusable one.

    A directory counts if it holds ``config.json``; it is usable with ``done`` and a ``summary.json``, both
    records readable and plausible (every field the report reads present where required, of its type and
    within its range: see ``_SUMMARY``). Unfinished directories are noted as skipped, the others as
    rejected with the file and field at fault; a damaged ``probe.json`` is ignored with a note (the run
    counts, without its probe).
    """
    root = Path(root)
    if not root.is_dir():
        raise BalanceMMError(f"runs directory {root} does not exist or is not a directory")
    # Resolved paths, so a run reached twice (a symlinked artifact, a nested root) is counted once.
    dirs = sorted({p.parent.resolve() for p in root.rglob(CONFIG_FILE)})
    if not dirs:
        raise BalanceMMError(f"no run directories (with {CONFIG_FILE}) under {root}")
    runs: list[Run] = []
    notes: list[str] = []
    for d in dirs:
        files = RunFiles(d)
        if not files.done.is_file() or not files.summary.is_file():
            why = "failed" if files.failed.is_file() else "not finished"
            notes.append(f"skipped {d}: {why} (no {DONE_MARKER} marker or {SUMMARY_FILE})")
            continue
        try:
            run = _load(d)
        except _Unusable as exc:
            notes.append(f"{REJECTED}{d}: {exc}")
            continue
        if files.probe.is_file():
            try:
                probe = _read(files.probe)
                _check(probe, _PROBE, PROBE_FILE)
                run = dataclasses.replace(run, probe=probe)
            except _Unusable as exc:
                notes.append(f"ignored the probe of {d}: {exc}; rerun `balancemm probe {d}`")
        if files.eval.is_file():
            try:
                run = dataclasses.replace(run, robustness=_robustness(files, run.summary["modalities"]))
            except (_Unusable, BalanceMMError) as exc:
                notes.append(
                    f"ignored the evaluation under corruptions of {d}: {exc}; delete {EVAL_FILE} and rerun "
                    f"`balancemm eval {d}`"
                )
        runs.append(run)
    if not runs:
        rejected = [n for n in notes if n.startswith(REJECTED)]
        first = f"; {printable(rejected[0])}" if rejected else ""
        raise BalanceMMError(
            f"none of the {len(dirs)} run directories under {root} is usable ({len(notes) - len(rejected)} "
            f"unfinished, {len(rejected)} rejected){first}"
        )
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
