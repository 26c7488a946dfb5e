"""The report's tables, built once as plain data and rendered as Markdown, LaTeX, CSV and HTML.

Tables (each a :class:`Table`):

- ``table2``: test accuracy and macro-F1 (%, mean ± std over the n seeds) per row × dataset of the
  validation-selected trials; references first, then each taxonomy group followed by its average row (only
  for groups with several methods). Per column, "best" (bold) marks the top method and every method not
  significantly worse than it (paired t-test by seed, two-sided α = 0.05). A Flags column marks methods
  whose test predictions equal baseline's (‡) or that did not act before their selected epoch (§).
- ``paired_<dataset>``: every method minus baseline on the seeds both ran: mean difference of test accuracy
  and macro-F1 in points, its 95 % confidence interval and the two-sided p-value of a paired t-test.
- ``modalities_<dataset>``: per-modality test accuracy, Shapley value φ_m and imbalance degree per row;
  rows whose per-modality heads are cross-modal are marked † and show their linear probe where one exists.
- ``table3``: training FLOPs per taxonomy group (mean over the group's methods of each method's mean
  ``flops.total_with_artifacts``) × dataset.
- ``cost_<dataset>``: per-method FLOPs, FLOPs × baseline, train time × baseline, train/wall time, peak
  memory (of the kind the runs measured), parameters; the note says whether jobs ran concurrently.
- ``trials_<dataset>_<method>``: Fig. 3's numbers: every trial's imbalance and accuracy, balance points marked.
- ``probe_<dataset>``: Fig. 2's numbers, from ``probe.json`` files (only when some selected run has one).
- ``robustness_<dataset>``: test accuracy with each modality missing, the area under each modality's
  accuracy-severity curves, relative and effective robustness, from the runs' standard ``balancemm eval``
  (only when some selected run has one).
- ``oracle_table2``: Table 2 with trials chosen on *test* accuracy; a labelled diagnostic, only on request.

FLOPs are written by :func:`eng` everywhere (``"50.8 G"``).
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from balancemm.layout import EVAL_FILE, PROBE_FILE
from balancemm.metrics.robustness import auc, effective_robustness
from balancemm.report.collect import GROUP_ORDER, Collection, Flags, Run, Stat, Trial, trial_flags
from balancemm.report.stats import PairedTest, paired_t

NA = "–"
#: Two-sided significance level of the paired t-test behind the "best" marks.
ALPHA = 0.05
CROSS = "†"
IDENTICAL = "‡"
IDLE = "§"

Getter = Callable[[dict[str, Any]], float | None]


@dataclass
class Cell:
    """One displayed value; ``mark`` is ``"best"`` (bold) or ``""``."""

    text: str
    mark: str = ""


@dataclass
class Table:
    """A table as data. ``rows[i]`` has one Cell per column; ``kinds[i]`` is ``"row"`` or ``"avg"``
    (group averages, shown in italics); ``records`` is the long-format CSV (one dict per number)."""

    key: str
    title: str
    columns: list[str]
    rows: list[list[Cell]] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    note: str = ""

    def add(self, cells: list[Cell], kind: str = "row") -> None:
        self.rows.append(cells)
        self.kinds.append(kind)


def pct(s: Stat | None, std: bool = True) -> str:
    """``Stat`` of fractions as percent: ``"65.63 ± 0.42"`` (or ``NA``)."""
    if s is None:
        return NA
    return f"{100 * s.mean:.2f} ± {100 * s.std:.2f}" if std else f"{100 * s.mean:.2f}"


_SI = ("", " k", " M", " G", " T", " P")


def eng(x: float | None) -> str:
    """``x`` with 3 significant digits and an SI prefix after a space: ``"50.8 G"``, ``"8.47 G"``,
    ``"3.00 T"``, ``"512 M"``, ``"12.0"`` (no prefix below 1000); ``NA`` for None."""
    if x is None:
        return NA
    if x == 0:
        return "0"
    sign, x = ("-" if x < 0 else ""), abs(x)
    k = min(max(math.floor(math.log10(x) / 3), 0), len(_SI) - 1)
    r = float(f"{x / 1000**k:.3g}")
    if r >= 1000 and k < len(_SI) - 1:  # rounding carried into the next prefix: 999.7 M is 1.00 G
        k += 1
        r = float(f"{r / 1000:.3g}")
    digits = max(0, 2 - math.floor(math.log10(r)))
    return f"{sign}{r:.{digits}f}{_SI[k]}"


def _points(x: float) -> str:
    """A difference of fractions in percentage points, signed: ``"+1.23"``."""
    return f"{100 * x:+.2f}"


def _pvalue(p: float) -> str:
    if p == 0:
        return "0"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def _acc(s: dict[str, Any]) -> float:
    return float(s["test"]["accuracy"])


def _f1(s: dict[str, Any]) -> float:
    return float(s["test"]["macro_f1"])


METRICS: tuple[tuple[str, Getter], ...] = (("accuracy", _acc), ("macro_f1", _f1))


def _modality_acc(m: str) -> Getter:
    return lambda s: float(s["test"]["per_modality"][m]["accuracy"])


def _by_mask(mask: str, key: str) -> Callable[[dict[str, Any]], Any]:
    """A summary's Shapley result ``key`` under masking rule ``mask``: from ``shapley_by_mask``, or for runs
    written before it existed from the top-level fields when they used that rule (``shapley_mask``, which
    collect.py fills in for such runs from their config's model.mask)."""

    def get(s: dict[str, Any]) -> Any:
        if "shapley_by_mask" in s:
            return s["shapley_by_mask"][mask][key]
        return s[key] if s.get("shapley_mask") == mask else None

    return get


def _shapley_under(mask: str, m: str) -> Getter:
    return lambda s: float(_by_mask(mask, "shapley")(s)[m])


def paired(a: Trial, b: Trial, get: Getter) -> tuple[list[int], PairedTest | None]:
    """The seeds both trials have a value on, and the paired t-test of ``a - b`` over them (None below 2)."""
    x, y = a.by_seed(get), b.by_seed(get)
    seeds = sorted(x.keys() & y.keys())
    return seeds, paired_t([x[s] for s in seeds], [y[s] for s in seeds])


def _mark_best(table: Table, col: int, entries: list[tuple[int, Trial, dict[str, Any]]], get: Getter) -> None:
    """Mark "best" in column ``col`` the top method and every method not significantly worse than it.

    ``entries`` are the method rows (row index, trial, CSV record); references and averages are never ranked.
    The test is paired by seed against the top row; fewer than two paired seeds cannot show a row worse.
    """
    if not entries:
        return
    # Ranked on the mean over seeds (the record's "mean"); max() keeps the first maximum, so a tie goes to
    # the row shown first.
    top = max(entries, key=lambda e: float(e[2]["mean"]))[1]
    for i, trial, record in entries:
        _, test = paired(trial, top, get)
        worse = test is not None and test.p < ALPHA and test.mean < 0
        record["best"] = not worse
        if not worse:
            table.rows[i][col].mark = "best"


def _flag_text(f: Flags) -> str:
    parts = []
    if f.identical:
        unknown = f", {f.n - f.compared} not recorded" if f.compared < f.n else ""
        parts.append(f"{IDENTICAL} identical to baseline on {f.identical}/{f.n} seeds{unknown}")
    if f.no_intervention:
        unknown = f", {f.n - f.intervention_known} not recorded" if f.intervention_known < f.n else ""
        parts.append(f"{IDLE} no intervention before the selected epoch on {f.no_intervention}/{f.n} seeds{unknown}")
    return "; ".join(parts)


def _flag_record(f: Flags | None) -> dict[str, Any]:
    if f is None:
        return {}
    return {
        "identical_to_baseline": f.identical,
        "predictions_compared": f.compared,
        "no_intervention_before_selected": f.no_intervention,
        "intervention_recorded": f.intervention_known,
    }


def table2(col: Collection, which: str = "selected") -> Table:
    """Table 2 analog over ``col.selected`` (or ``col.oracle`` with ``which="oracle"``)."""
    chosen = col.selected if which == "selected" else col.oracle
    datasets = col.datasets
    if which == "selected":
        t = Table("table2", "Table 2: test accuracy and macro-F1 (%), mean ± std over n seeds", ["Group", "Method"])
        notes = ["Each method's trial is chosen by its mean validation score over seeds (docs/protocol.md §4)."]
    else:
        t = Table(
            "oracle_table2",
            "DIAGNOSTIC ONLY — trials chosen on TEST accuracy (optimistic, not a fair comparison)",
            ["Group", "Method"],
        )
        notes = ["Test-selected trials overstate every method; use Table 2 for comparisons."]
    for d in datasets:
        t.columns += [f"{d} Acc", f"{d} F1", f"{d} n"]
    t.columns.append("Flags")
    rows = col.rows()
    methods_in = Counter(g for g, _ in rows)
    # Per ranked column: its metric and its method rows (row index, trial, CSV record).
    ranked: dict[int, tuple[Getter, list[tuple[int, Trial, dict[str, Any]]]]] = {}
    unrecorded = {"hash": 0, "intervention": 0, "runs": 0}
    for i, (group, row) in enumerate(rows):
        cells = [Cell(group), Cell(row)]
        flags = []
        for d in datasets:
            trial = chosen[d].get(row)
            f = trial_flags(trial, chosen[d].get("baseline")) if trial else None
            for metric, get in METRICS:
                s = trial.stat(get) if trial else None
                if trial and s:
                    rec = _record(d, group, row, metric, s, trial) | _flag_record(f)
                    t.records.append(rec)
                    if group != "reference":
                        ranked.setdefault(len(cells), (get, []))[1].append((len(t.rows), trial, rec))
                cells.append(Cell(pct(s)))
            cells.append(Cell(str(len(trial.runs)) if trial else NA))
            if f is not None:
                unrecorded["runs"] += f.n
                unrecorded["hash"] += f.n - f.compared
                unrecorded["intervention"] += f.n - f.intervention_known
                if text := _flag_text(f):
                    flags.append(f"{d}: {text}" if len(datasets) > 1 else text)
        t.add([*cells, Cell("; ".join(flags))])
        last_of_group = i + 1 == len(rows) or rows[i + 1][0] != group
        if last_of_group and group != "reference" and methods_in[group] > 1:
            t.add(_average_row(t, group, [r for g, r in rows if g == group], chosen, datasets), "avg")
    for c, (get, entries) in ranked.items():
        _mark_best(t, c, entries, get)
    notes += [
        "Cells: test mean ± sample std over the n seeds of the selected trial.",
        "Bold (best): per column, the top method and every method not significantly worse than it by a "
        f"two-sided paired Student's t-test on the per-seed values (seeds both ran), α = {ALPHA}. Methods with "
        "fewer than 2 seeds paired with the top one cannot be shown worse and are bold too. References "
        "(unimodal, baseline) and group averages are not ranked.",
        "Group averages (italics): mean of the group's methods' means; groups with one method have none.",
        f"Flags: {IDENTICAL} the method's test predictions (SHA-256 of the predicted class ids) equal "
        f"baseline's on the same seed, on that many of its n seeds: it changed nothing at test time. {IDLE} the "
        "method did not act in any epoch up to its selected epoch on that many seeds, so the selected model "
        "is plain joint training there. References are never flagged.",
    ]
    if unrecorded["hash"] or unrecorded["intervention"]:
        notes.append(
            "Not checked, for lack of the fields in the run or in baseline's run on the same seed (runs written "
            f"before they existed): predictions of {unrecorded['hash']} and interventions of "
            f"{unrecorded['intervention']} of the methods' {unrecorded['runs']} runs."
        )
    t.note = "\n".join(notes)
    return t


def _average_row(
    t: Table, group: str, members: list[str], chosen: dict[str, dict[str, Trial]], datasets: list[str]
) -> list[Cell]:
    """A group's average row (mean of its methods' means), its CSV records added to ``t``."""
    cells = [Cell(group), Cell(f"{group} avg")]
    for d in datasets:
        trials = [chosen[d][r] for r in members if r in chosen[d]]
        for metric, get in METRICS:
            s = Stat.of(m.mean for m in (tr.stat(get) for tr in trials) if m)
            cells.append(Cell(pct(s, std=False)))
            if s:
                t.records.append(
                    {
                        "dataset": d,
                        "group": group,
                        "row": f"{group} avg",
                        "metric": metric,
                        "mean": s.mean,
                        "std": None,
                        "n": s.n,
                        "hparams": None,
                        "seeds": None,
                    }
                )
        cells.append(Cell(NA))
    cells.append(Cell(""))
    return cells


def _record(d: str, group: str, row: str, metric: str, s: Stat, trial: Trial) -> dict[str, Any]:
    return {
        "dataset": d,
        "group": group,
        "row": row,
        "metric": metric,
        "mean": s.mean,
        "std": s.std,
        "n": s.n,
        "hparams": trial.hparams,
        "seeds": " ".join(map(str, trial.seeds)),
    }


def paired_table(col: Collection, dataset: str) -> Table | None:
    """Every method against baseline on ``dataset``, paired by seed; None without a baseline."""
    sel = col.selected[dataset]
    base = sel.get("baseline")
    if base is None:
        return None
    t = Table(
        f"paired_{dataset}",
        f"Each method minus baseline on {dataset}, paired by seed: test accuracy and macro-F1 (points)",
        ["Method", "Group", "n", "Δ Acc", "Acc 95 % CI", "Acc p", "Δ F1", "F1 95 % CI", "F1 p"],
    )
    too_few = False
    for group, row in col.rows():
        trial = sel.get(row)
        if trial is None or group == "reference":
            continue
        cells = [Cell(row), Cell(group)]
        for metric, get in METRICS:
            seeds, test = paired(trial, base, get)
            if len(cells) == 2:
                cells.append(Cell(str(len(seeds))))
            if test is None:
                too_few = True
                cells += [Cell(NA), Cell(NA), Cell(NA)]
            else:
                ci = f"[{_points(test.ci_low)}, {_points(test.ci_high)}]"
                cells += [Cell(_points(test.mean)), Cell(ci), Cell(_pvalue(test.p))]
            t.records.append(
                {
                    "dataset": dataset,
                    "group": group,
                    "row": row,
                    "metric": metric,
                    "n": len(seeds),
                    "seeds": " ".join(map(str, seeds)),
                    "mean_diff": test.mean if test else None,
                    "std_diff": test.std if test else None,
                    "ci_low": test.ci_low if test else None,
                    "ci_high": test.ci_high if test else None,
                    "t": test.t if test else None,
                    "df": test.df if test else None,
                    "p": test.p if test else None,
                    "hparams": trial.hparams,
                }
            )
        t.add(cells)
    notes = [
        "Δ: mean over the seeds both ran (n) of method − baseline, in percentage points; 95 % CI of that mean "
        "and two-sided p-value from a paired Student's t-test (n − 1 degrees of freedom); no correction for "
        "multiple comparisons.",
        "All differences equal (std 0): p = 0 if Δ ≠ 0 and 1 if Δ = 0, the interval has zero width.",
    ]
    if too_few:
        notes.append(f"{NA}: fewer than 2 paired seeds, no test possible.")
    t.note = "\n".join(notes)
    return t if t.rows else None


def _probe_stat(runs: list[Run], m: str) -> Stat | None:
    """Linear-probe test accuracy of modality ``m`` over the runs that have a probe.json entry for it."""
    return Stat.of((r.probe or {}).get(m, {}).get("test_accuracy") for r in runs)


def _heads(trial: Trial) -> str:
    return "cross-modal" if trial.cross_modal else "unimodal"


_CROSS_NOTE = (
    f"{CROSS} cross-modal per-modality heads (summary.per_modality_heads): the model feeds other modalities "
    "into this modality's branch (e.g. Greedy's MMTM mid-fusion), so the head's accuracy is not this "
    "modality alone."
)


def modality_table(col: Collection, dataset: str) -> Table:
    """Per-modality accuracy, Shapley values and imbalance degree of the selected trials on ``dataset``."""
    sel = col.selected[dataset]
    mods = sorted({m for t in sel.values() for r in t.runs for m in r.summary["modalities"]})
    t = Table(
        f"modalities_{dataset}",
        f"Per-modality test accuracy, Shapley value φ and imbalance degree (%) on {dataset}",
        [
            "Method",
            *(f"Acc {m}" for m in mods),
            *(f"φ {m}" for m in mods),
            "Imbalance (feature mask)",
            "Imbalance (input mask)",
            "n",
        ],
    )
    crossed = probed_any = False
    for group, row in col.rows():
        trial = sel.get(row)
        if trial is None:
            continue
        n, cross = len(trial.runs), trial.cross_modal
        cells = [Cell(row)]
        for m in mods:
            head = trial.stat(_modality_acc(m))
            if head:
                t.records.append(_record(dataset, group, row, f"acc_{m}", head, trial) | {"heads": _heads(trial)})
            probe = _probe_stat(trial.runs, m) if cross else None
            if probe:
                probed_any = True
                t.records.append(_record(dataset, group, row, f"probe_{m}", probe, trial) | {"heads": _heads(trial)})
                seeds = f", n={probe.n}" if probe.n < n else ""
                cells.append(Cell(f"{pct(probe)} (probe{seeds}) {CROSS}"))
            else:
                cells.append(Cell(f"{pct(head)} {CROSS}" if cross and head else pct(head)))
            crossed |= cross and head is not None
        rest = [(f"shapley_{m}", trial.stat(_shapley_under("feature", m))) for m in mods]
        rest.append(("imbalance", trial.stat(_by_mask("feature", "imbalance"))))
        rest.append(("imbalance_input_mask", trial.stat(_by_mask("input", "imbalance"))))
        cells += [Cell(pct(s)) for _, s in rest]
        t.add([*cells, Cell(str(n))])
        t.records += [_record(dataset, group, row, name, s, trial) for name, s in rest if s]
    notes = [
        "Acc: each modality's own head inside the multimodal model (test.per_modality); φ: Shapley value of "
        "the modality; n: seeds.",
        "φ and Imbalance (feature mask): an absent modality's pooled feature is zeroed before fusion (BalanceMM's "
        "default, one encoder pass per batch). Imbalance (input mask): its input is zeroed before the encoder, "
        "as the paper's toolkit computes it (summary.shapley_by_mask; – for runs that did not score it).",
    ]
    if crossed:
        notes.append(_CROSS_NOTE)
    if probed_any:
        notes.append(
            f"(probe): for those rows the cell shows the linear probe ({PROBE_FILE}) instead, read with the other "
            "modalities masked out of the mid-fusion: what the encoder knows on its own, though it was trained "
            "with them fed in. The head's accuracy is in the CSV (acc_<modality>)."
        )
    t.note = "\n".join(notes)
    return t


def _flops(s: dict[str, Any]) -> float | None:
    f = s["flops"]
    return f.get("total_with_artifacts") if f.get("total_with_artifacts") is not None else f.get("total")


def table3(col: Collection) -> Table:
    """Average training FLOPs (own training + artifacts it needed) per taxonomy group × dataset."""
    t = Table("table3", "Table 3: average training FLOPs per taxonomy group", ["Group", *col.datasets])
    t.note = "Per method: mean over seeds of flops.total_with_artifacts; per group: mean over its methods."
    groups = [g for g in GROUP_ORDER if any(g == gr for gr, _ in col.rows())]
    for g in groups:
        cells = [Cell("baseline" if g == "reference" else g)]  # unimodal runs are not a method's cost
        for d in col.datasets:
            members = [tr for row, tr in col.selected[d].items() if tr.group == g and not row.startswith("unimodal")]
            s = Stat.of(x.mean for x in (m.stat(_flops) for m in members) if x)
            cells.append(Cell(eng(s.mean if s else None)))
            if s:
                t.records.append({"dataset": d, "group": g, "metric": "flops", "mean": s.mean, "n_methods": s.n})
        t.add(cells)
    return t


#: ``summary.peak_memory_kind`` → what the number measures.
MEMORY_KINDS = {"process_max_rss": "process peak RSS", "cuda_max_allocated": "CUDA max allocated"}


def _memory_kind(trial: Trial) -> str:
    kinds = {r.summary.get("peak_memory_kind") for r in trial.runs}
    if len(kinds) > 1:
        return "mixed kinds"
    kind = kinds.pop()
    return MEMORY_KINDS.get(str(kind), f"kind {kind}" if kind else "kind not recorded")


def _concurrency(dataset: str, trials: list[Trial]) -> str:
    """The cost note's line on how many jobs shared the machine while the runs of ``dataset`` trained."""
    jobs = Counter(r.summary.get("concurrent_jobs") for t in trials for r in t.runs)
    if set(jobs) == {None}:
        return "Concurrency: unknown (summary.concurrent_jobs not recorded, as in runs written before it existed)."
    if len(jobs) == 1:
        (k,) = jobs
        if k == 1:
            return "One job at a time: times are not inflated by other jobs."
        return f"Jobs ran {k} at a time: time ratios include contention."
    parts = [f"{k} at a time: {c} runs" for k, c in sorted((k, c) for k, c in jobs.items() if k is not None)]
    if None in jobs:
        parts.append(f"unknown: {jobs[None]} runs")
    return f"Runs on {dataset} differ in concurrency ({', '.join(parts)}): time ratios are not comparable."


def cost_table(col: Collection, dataset: str) -> Table:
    """Per-method training cost on ``dataset`` (selected trials, means over seeds)."""
    sel = col.selected[dataset]
    shown = [(group, row, sel[row]) for group, row in col.rows() if row in sel]
    kinds = {_memory_kind(trial) for _, _, trial in shown}
    one_kind = kinds.pop() if len(kinds) == 1 else None
    t = Table(
        f"cost_{dataset}",
        f"Training cost on {dataset} (mean over n seeds)",
        [
            "Method",
            "Group",
            "n",
            "FLOPs",
            "FLOPs × baseline",
            "FLOPs own",
            "Train time × baseline",
            "Train time (s)",
            "Wall time (s)",
            f"Peak memory (MB, {one_kind})" if one_kind else "Peak memory (MB)",
            "Params",
        ],
    )
    getters: list[tuple[str, Getter]] = [
        ("flops", _flops),
        ("flops_own", lambda s: s["flops"]["total"]),
        ("train_time_s", lambda s: s["train_time_s"]),
        ("wall_time_s", lambda s: s["wall_time_s"]),
        ("peak_memory_mb", lambda s: s["peak_memory_mb"]),
        ("params", lambda s: s["params"]["total"]),
    ]
    base = sel.get("baseline")
    base_st = {name: base.stat(get) for name, get in getters} if base else {}

    def ratio(st: dict[str, Stat | None], name: str) -> float | None:
        s, b = st[name], base_st.get(name)
        return s.mean / b.mean if s and b and b.mean else None

    def fmt(s: Stat | None, f: str) -> str:
        return NA if s is None else format(s.mean, f)

    for group, row, trial in shown:
        st = {name: trial.stat(get) for name, get in getters}
        flops_x, time_x = ratio(st, "flops"), ratio(st, "train_time_s")
        kind = _memory_kind(trial)
        memory = fmt(st["peak_memory_mb"], ".0f")
        t.add(
            [
                Cell(row),
                Cell(group),
                Cell(str(len(trial.runs))),
                Cell(eng(st["flops"].mean if st["flops"] else None)),
                Cell(NA if flops_x is None else f"{flops_x:.2f}×"),
                Cell(eng(st["flops_own"].mean if st["flops_own"] else None)),
                Cell(NA if time_x is None else f"{time_x:.2f}×"),
                Cell(fmt(st["train_time_s"], ".1f")),
                Cell(fmt(st["wall_time_s"], ".1f")),
                Cell(memory if one_kind or memory == NA else f"{memory} ({kind})"),
                Cell(fmt(st["params"], ",.0f")),
            ]
        )
        jobs = sorted({j for r in trial.runs if (j := r.summary.get("concurrent_jobs")) is not None})
        t.records.append(
            {"dataset": dataset, "group": group, "row": row, "hparams": trial.hparams, "n": len(trial.runs)}
            | {name: (s.mean if s else None) for name, s in st.items()}
            | {
                "flops_x_baseline": flops_x,
                "train_time_x_baseline": time_x,
                "peak_memory_kind": kind,
                "concurrent_jobs": " ".join(map(str, jobs)) or None,
            }
        )
    t.note = "\n".join(
        [
            "× baseline: the method's mean over seeds divided by baseline's on this dataset. FLOPs include "
            "the artifacts a method needs (teachers); FLOPs own: the method's own training only.",
            _concurrency(dataset, [trial for _, _, trial in shown]),
            "Peak memory: process peak RSS = peak resident memory of the whole training process (ru_maxrss: "
            "Python, libraries, data); CUDA max allocated = peak GPU memory held by tensors "
            "(torch.cuda.max_memory_allocated, without the allocator's cache or the CUDA context).",
        ]
    )
    return t


def short_hparams(trials: list[Trial]) -> list[str]:
    """Each trial's label: only the hyper-parameters that differ between ``trials`` (``"alpha=0.1"``)."""
    dicts = [json.loads(t.hparams) for t in trials]
    keys = sorted({k for d in dicts for k in d if len({json.dumps(x.get(k)) for x in dicts}) > 1})
    return [", ".join(f"{k}={d.get(k)}" for k in keys) or "defaults" for d in dicts]


def balance_points(trials: list[Trial]) -> list[dict[str, Any]]:
    """Fig. 3's points: per trial the mean test accuracy / imbalance / validation score over seeds, with
    ``relative`` (best test accuracy) and ``absolute`` (lowest imbalance) balance points flagged;
    ``label`` names the hyper-parameters that differ between the trials."""
    pts: list[dict[str, Any]] = []
    for tr, label in zip(trials, short_hparams(trials), strict=True):
        acc, imb = tr.stat(_acc), tr.stat(lambda s: s["imbalance"])
        if acc is None or imb is None:
            continue
        pts.append(
            {
                "hparams": tr.hparams,
                "label": label,
                "accuracy": acc.mean,
                "imbalance": imb.mean,
                "val": tr.val.mean,
                "n": acc.n,
            }
        )
    if pts:
        best = max(range(len(pts)), key=lambda i: pts[i]["accuracy"])
        low = min(range(len(pts)), key=lambda i: pts[i]["imbalance"])
        for i, p in enumerate(pts):
            p["relative"], p["absolute"] = i == best, i == low
    return pts


def trials_table(col: Collection, dataset: str, row: str) -> Table:
    """Fig. 3's numbers for one method on one dataset, one line per hyper-parameter trial."""
    pts = balance_points(col.trials[dataset][row])
    chosen = col.selected[dataset][row].hparams
    t = Table(
        f"trials_{dataset}_{row}",
        f"Imbalance vs accuracy over {row}'s trials on {dataset} (Fig. 3)",
        ["Hyper-parameters", "Imbalance (%)", "Test acc (%)", "Val score (%)", "n", "Marks"],
    )
    for p in pts:
        marks = [
            m
            for m, on in (
                ("relative balance", p["relative"]),
                ("absolute balance", p["absolute"]),
                ("selected on val", p["hparams"] == chosen),
            )
            if on
        ]
        t.add(
            [
                Cell(p["label"]),
                Cell(f"{100 * p['imbalance']:.2f}"),
                Cell(f"{100 * p['accuracy']:.2f}"),
                Cell(f"{100 * p['val']:.2f}"),
                Cell(str(p["n"])),
                Cell(", ".join(marks)),
            ]
        )
        t.records.append({"dataset": dataset, "row": row, **p, "selected": p["hparams"] == chosen})
    return t


def probe_table(col: Collection, dataset: str) -> Table | None:
    """Fig. 2's numbers on ``dataset``: per modality, the modality's accuracy inside the multimodal model,
    its linear-probe counterpart (``probe.json``) and the unimodal model trained alone; None without probes."""
    sel = col.selected[dataset]
    t = Table(
        f"probe_{dataset}",
        f"Per-modality test accuracy (%) on {dataset}: in the multimodal model, linear probe, unimodal alone (Fig. 2)",
        ["Method", "Modality", "Multimodal (own head)", "Linear probe", "Unimodal alone", "n"],
    )
    crossed = False
    for group, row in col.rows():
        trial = sel.get(row)
        if trial is None or (group == "reference" and row != "baseline"):
            continue
        probed = [r for r in trial.runs if r.probe]
        if not probed:
            continue
        # Marked after the number (plots.fig2 reads each cell's leading number).
        mark = f" {CROSS}" if trial.cross_modal else ""
        crossed |= trial.cross_modal
        for m in trial.runs[0].summary["modalities"]:
            mm = trial.stat(_modality_acc(m))
            lp = _probe_stat(probed, m)
            uni = sel.get(f"unimodal ({m})")
            ua = uni.stat(_acc) if uni else None
            # Probes may cover fewer seeds than the trial (probe.json is optional per run): say so.
            lp_text = pct(lp) + (f" (n={lp.n})" if lp and lp.n < len(trial.runs) else "")
            t.add(
                [
                    Cell(row),
                    Cell(m),
                    Cell(pct(mm) + (mark if mm else "")),
                    Cell(lp_text + (mark if lp else "")),
                    Cell(pct(ua)),
                    Cell(str(len(trial.runs))),
                ]
            )
            for name, s in (("multimodal", mm), ("probe", lp), ("unimodal", ua)):
                if s:
                    t.records.append(_record(dataset, group, row, f"{name}_{m}", s, trial) | {"heads": _heads(trial)})
    notes = ["n: seeds of the multimodal trial; (n=k): only k of them were probed."]
    if crossed:
        notes.append(
            f"{_CROSS_NOTE} Its linear probe masks the other modalities out of the mid-fusion, so it reads the "
            "encoder on its own, though the encoder was trained with them fed in."
        )
    t.note = "\n".join(notes)
    return t if t.rows else None


def modality_curve(run: Run, m: str) -> tuple[list[float], list[float]] | None:
    """Modality ``m``'s mean accuracy-severity curve in ``run``'s standard evaluation: the mean, at each
    severity, over the kinds of corruption of ``m`` (missing, Gaussian noise, its own); None without one."""
    curves = [c for name, c in (run.robustness or {}).items() if name.partition(":")[0] == m]
    if not curves or any(c["severities"] != curves[0]["severities"] for c in curves):
        return None
    grid = [float(s) for s in curves[0]["severities"]]
    return grid, [sum(c["accuracy"][i] for c in curves) / len(curves) for i in range(len(grid))]


def _missing(m: str) -> Callable[[Run], float | None]:
    def get(run: Run) -> float | None:
        c = (run.robustness or {}).get(f"{m}:missing")
        return float(c["accuracy"][-1]) if c and c["severities"][-1] == 1 else None

    return get


def _area(modalities: list[str] | None = None) -> Callable[[Run], float | None]:
    """The AUC of the modalities' mean curves, averaged over them (every modality of the run by default)."""

    def get(run: Run) -> float | None:
        ms = modalities or list(run.summary["modalities"])
        curves = [modality_curve(run, m) for m in ms]
        if any(c is None for c in curves):
            return None
        return sum(auc(*c) for c in curves if c is not None) / len(curves)

    return get


def robustness_table(col: Collection, dataset: str) -> Table | None:
    """Method × corrupted modality on ``dataset``, from each run's standard evaluation under corruptions.

    Per modality m: test accuracy with m missing from every sample, and the AUC of m's curve (the mean
    over its corruptions of the accuracy over severities 0–1); then over all modalities: relative
    robustness (mean AUC / clean accuracy) and effective robustness (mean AUC minus the value of the line
    fitted across the table's methods through (clean accuracy, mean AUC)). None without evaluations.
    """
    sel = col.selected[dataset]
    entries = []
    for group, row in col.rows():
        trial = sel.get(row)
        if trial is None or row.startswith("unimodal"):
            continue
        runs = [r for r in trial.runs if r.robustness]
        if runs:
            entries.append((group, row, trial, runs))
    if not entries:
        return None
    modalities = list(entries[0][3][0].summary["modalities"])
    columns = ["Method"]
    for m in modalities:
        columns += [f"{m} missing", f"{m} AUC"]
    t = Table(
        f"robustness_{dataset}",
        f"Test accuracy (%) with a modality missing or corrupted on {dataset} (mean ± std over seeds)",
        [*columns, "Relative", "Effective", "n"],
    )
    clean = [Stat.of(float(r.summary["test"]["accuracy"]) for r in runs) for *_, runs in entries]
    areas = [Stat.of(_area()(r) for r in runs) for *_, runs in entries]
    usable = [i for i, (c, a) in enumerate(zip(clean, areas, strict=True)) if c and a]
    gaps = effective_robustness([clean[i].mean for i in usable], [areas[i].mean for i in usable])  # type: ignore[union-attr]
    effective = dict(zip(usable, gaps, strict=True))
    for i, (group, row, trial, runs) in enumerate(entries):
        cells = [Cell(row)]
        for m in modalities:
            for name, get in ((f"missing_{m}", _missing(m)), (f"auc_{m}", _area([m]))):
                s = Stat.of(get(r) for r in runs)
                cells.append(Cell(pct(s)))
                if s:
                    t.records.append(_record(dataset, group, row, name, s, trial))
            # Each modality's own relative robustness goes to the CSV (the table shows the total).
            own = Stat.of(
                a / float(r.summary["test"]["accuracy"])
                for r in runs
                if (a := _area([m])(r)) is not None and r.summary["test"]["accuracy"] > 0
            )
            if own:
                t.records.append(_record(dataset, group, row, f"relative_{m}", own, trial))
        relative = Stat.of(
            a / float(r.summary["test"]["accuracy"])
            for r in runs
            if (a := _area()(r)) is not None and r.summary["test"]["accuracy"] > 0
        )
        cells.append(Cell(NA if relative is None else f"{relative.mean:.3f} ± {relative.std:.3f}"))
        # Rounded first: a method on the fitted line shows +0.00, not a sign from the float's last bit.
        cells.append(Cell(_points(round(effective[i], 9) + 0.0) if i in effective else NA))
        cells.append(Cell(str(len(runs))))
        t.add(cells)
        if relative:
            t.records.append(_record(dataset, group, row, "relative", relative, trial))
    t.note = (
        f"From each run's standard `balancemm eval` ({EVAL_FILE}): the selected weights on the test split, every "
        "modality missing (masked as in the Shapley metric), under Gaussian noise and under its own corruption, "
        "at severities 0, 0.25, 0.5, 0.75, 1. Missing: accuracy with the modality removed from every sample. "
        "AUC: mean accuracy over severity of the modality's curve, itself the mean over its corruptions. "
        "Relative: mean AUC over modalities / clean accuracy. Effective: mean AUC minus the least-squares line "
        "across these methods through (clean accuracy, mean AUC), in points. n: seeds evaluated. The CSV also "
        "holds each modality's relative robustness (relative_<modality>: its AUC / clean accuracy)."
    )
    return t


def all_tables(col: Collection, oracle: bool = False) -> list[Table]:
    """Every table of the report, in the order the HTML page shows them."""
    out = [table2(col)]
    for d in col.datasets:
        if (p := paired_table(col, d)) is not None:
            out.append(p)
    for d in col.datasets:
        out.append(modality_table(col, d))
    out.append(table3(col))
    for d in col.datasets:
        out.append(cost_table(col, d))
    for d in col.datasets:
        for row, trials in sorted(col.trials[d].items()):
            if len(trials) > 1:
                out.append(trials_table(col, d, row))
    for d in col.datasets:
        p = probe_table(col, d)
        if p is not None:
            out.append(p)
    for d in col.datasets:
        if (r := robustness_table(col, d)) is not None:
            out.append(r)
    if oracle:
        out.append(table2(col, "oracle"))
    return out


# --- renderers ------------------------------------------------------------------------------------


def to_markdown(t: Table) -> str:
    def cell(c: Cell, kind: str) -> str:
        text = c.text
        if c.mark == "best":
            text = f"**{text}**"
        return f"*{text}*" if kind == "avg" and text not in (NA, "") else text

    lines = [f"### {t.title}", ""]
    lines.append("| " + " | ".join(t.columns) + " |")
    lines.append("|" + "|".join("---" for _ in t.columns) + "|")
    for cells, kind in zip(t.rows, t.kinds, strict=True):
        lines.append("| " + " | ".join(cell(c, kind) for c in cells) + " |")
    if t.note:
        # One paragraph per note line (a single newline would run them together).
        lines += [x for line in t.note.splitlines() for x in ("", line)]
    return "\n".join(lines) + "\n"


_TEX = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    # Non-ASCII symbols the tables use, as LaTeX that needs no extra package.
    "±": r"$\pm$",
    "×": r"$\times$",
    "φ": r"$\phi$",
    "Δ": r"$\Delta$",
    "α": r"$\alpha$",
    "–": "--",
    "—": "---",
    "−": "$-$",
    "†": r"\dag{}",
    "‡": r"\ddag{}",
    "§": r"\S{}",
    "≠": r"$\neq$",
}


def _tex(s: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in s)


def to_latex(t: Table) -> str:
    def cell(c: Cell, kind: str) -> str:
        text = _tex(c.text)
        if c.mark == "best":
            text = rf"\textbf{{{text}}}"
        return rf"\textit{{{text}}}" if kind == "avg" else text

    lines = [
        r"\begin{table}[t]",
        r"\centering",
        rf"\caption{{{_tex(t.title)}}}",
        r"\begin{tabular}{" + "l" * min(2, len(t.columns)) + "r" * max(0, len(t.columns) - 2) + "}",
        r"\toprule",
        " & ".join(_tex(c) for c in t.columns) + r" \\",
        r"\midrule",
    ]
    for i, (cells, kind) in enumerate(zip(t.rows, t.kinds, strict=True)):
        lines.append(" & ".join(cell(c, kind) for c in cells) + r" \\")
        if kind == "avg" and i + 1 < len(t.rows):
            lines.append(r"\midrule")
    lines += [r"\bottomrule", r"\end{tabular}"]
    if t.note:
        lines.append(r"\par\smallskip\footnotesize " + r"\\ ".join(_tex(line) for line in t.note.splitlines()))
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def to_csv(t: Table) -> str:
    """Long format, raw numbers (fractions, not percent): one line per ``records`` entry."""
    keys: list[str] = []
    for r in t.records:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    w.writerows(t.records)
    return buf.getvalue()


def to_html(t: Table) -> str:
    def cell(c: Cell, kind: str) -> str:
        text = html.escape(c.text)
        if c.mark == "best":
            text = f"<b>{text}</b>"
        return f"<td>{f'<i>{text}</i>' if kind == 'avg' else text}</td>"

    head = "".join(f"<th>{html.escape(c)}</th>" for c in t.columns)
    body = "\n".join(
        f'<tr class="{kind}">' + "".join(cell(c, kind) for c in cells) + "</tr>"
        for cells, kind in zip(t.rows, t.kinds, strict=True)
    )
    note = f"<p class='note'>{'<br>'.join(map(html.escape, t.note.splitlines()))}</p>" if t.note else ""
    return (
        f"<h3 id='{html.escape(t.key)}'>{html.escape(t.title)}</h3>\n"
        f"<table><thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody></table>\n{note}\n"
    )
