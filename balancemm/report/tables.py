"""The report's tables, built once as plain data and rendered as Markdown, LaTeX, CSV and HTML.

Tables (each a :class:`Table`):

- ``table2``: test accuracy and macro-F1 (%, mean ± std over seeds) per row × dataset of the
  validation-selected trials; references first, then each taxonomy group followed by its average row;
  per column the best value is bold and the second best underlined (ranked on the displayed two decimals,
  so equal displayed values share a mark; group averages are not ranked).
- ``modalities_<dataset>``: per-modality test accuracy, Shapley value φ_m and imbalance degree per row.
- ``table3``: training FLOPs per taxonomy group (mean over the group's methods of each method's mean
  ``flops.total_with_artifacts``) × dataset.
- ``cost_<dataset>``: per-method FLOPs, FLOPs × baseline, wall/train time, peak memory, parameters.
- ``trials_<dataset>_<method>``: Fig. 3's numbers: every trial's imbalance and accuracy, balance points marked.
- ``probe_<dataset>``: Fig. 2's numbers, from ``probe.json`` files (only when some selected run has one).
- ``oracle_table2``: Table 2 with trials chosen on *test* accuracy; a labelled diagnostic, only on request.
"""

from __future__ import annotations

import csv
import html
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from balancemm.report.collect import GROUP_ORDER, Collection, Stat, Trial

NA = "–"


@dataclass
class Cell:
    """One displayed value; ``mark`` is ``"best"``, ``"second"`` or ``""``."""

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


def sci(x: float | None) -> str:
    return NA if x is None else f"{x:.3g}"


def _acc(s: dict[str, Any]) -> float:
    return float(s["test"]["accuracy"])


def _f1(s: dict[str, Any]) -> float:
    return float(s["test"]["macro_f1"])


def _modality_acc(m: str) -> Callable[[dict[str, Any]], float]:
    return lambda s: float(s["test"]["per_modality"][m]["accuracy"])


def _shapley(m: str) -> Callable[[dict[str, Any]], float]:
    return lambda s: float(s["shapley"][m])


def _mark(table: Table, col: int) -> None:
    """Bold the best and underline the second-best displayed value of column ``col`` (method rows only)."""
    vals = []
    for cells, kind in zip(table.rows, table.kinds, strict=True):
        if kind == "row" and cells[col].text != NA:
            vals.append(round(float(cells[col].text.split(" ")[0]), 2))
    distinct = sorted(set(vals), reverse=True)
    for cells, kind in zip(table.rows, table.kinds, strict=True):
        if kind != "row" or cells[col].text == NA:
            continue
        v = round(float(cells[col].text.split(" ")[0]), 2)
        if v == distinct[0]:
            cells[col].mark = "best"
        elif len(distinct) > 1 and v == distinct[1]:
            cells[col].mark = "second"


def table2(col: Collection, which: str = "selected") -> Table:
    """Table 2 analog over ``col.selected`` (or ``col.oracle`` with ``which="oracle"``)."""
    chosen = col.selected if which == "selected" else col.oracle
    datasets = col.datasets
    if which == "selected":
        t = Table("table2", "Table 2: test accuracy and macro-F1 (%), mean ± std over seeds", ["Group", "Method"])
        t.note = "Each method's trial is chosen by its mean validation score over seeds (docs/protocol.md §4)."
    else:
        t = Table(
            "oracle_table2",
            "DIAGNOSTIC ONLY — trials chosen on TEST accuracy (optimistic, not a fair comparison)",
            ["Group", "Method"],
        )
        t.note = "Test-selected trials overstate every method; use Table 2 for comparisons."
    for d in datasets:
        t.columns += [f"{d} Acc", f"{d} F1"]
    rows = col.rows()
    for i, (group, row) in enumerate(rows):
        cells = [Cell(group), Cell(row)]
        for d in datasets:
            trial = chosen[d].get(row)
            for metric, get in (("accuracy", _acc), ("macro_f1", _f1)):
                s = trial.stat(get) if trial else None
                cells.append(Cell(pct(s)))
                if trial and s:
                    t.records.append(_record(d, group, row, metric, s, trial))
        t.add(cells)
        last_of_group = i + 1 == len(rows) or rows[i + 1][0] != group
        if last_of_group and group != "reference":
            avg = [Cell(group), Cell(f"{group} avg")]
            for d in datasets:
                members = [chosen[d][r] for g, r in rows if g == group and r in chosen[d]]
                for metric, get in (("accuracy", _acc), ("macro_f1", _f1)):
                    s = Stat.of(m.stat(get).mean for m in members if m.stat(get))  # type: ignore[union-attr]
                    avg.append(Cell(pct(s, std=False)))
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
            t.add(avg, "avg")
    for c in range(2, len(t.columns)):
        _mark(t, c)
    return t


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


def modality_table(col: Collection, dataset: str) -> Table:
    """Per-modality accuracy, Shapley values and imbalance degree of the selected trials on ``dataset``."""
    sel = col.selected[dataset]
    mods = sorted({m for t in sel.values() for r in t.runs for m in r.summary["modalities"]})
    t = Table(
        f"modalities_{dataset}",
        f"Per-modality test accuracy, Shapley value φ and imbalance degree (%) on {dataset}",
        ["Method", *(f"Acc {m}" for m in mods), *(f"φ {m}" for m in mods), "Imbalance"],
    )
    for group, row in col.rows():
        trial = sel.get(row)
        if trial is None:
            continue
        stats: list[tuple[str, Stat | None]] = []
        for m in mods:
            stats.append((f"acc_{m}", trial.stat(_modality_acc(m))))
        for m in mods:
            stats.append((f"shapley_{m}", trial.stat(_shapley(m))))
        stats.append(("imbalance", trial.stat(lambda s: s["imbalance"])))
        t.add([Cell(row), *(Cell(pct(s)) for _, s in stats)])
        t.records += [_record(dataset, group, row, name, s, trial) for name, s in stats if s]
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
            cells.append(Cell(sci(s.mean if s else None)))
            if s:
                t.records.append({"dataset": d, "group": g, "metric": "flops", "mean": s.mean, "n_methods": s.n})
        t.add(cells)
    return t


def cost_table(col: Collection, dataset: str) -> Table:
    """Per-method training cost on ``dataset`` (selected trials, means over seeds)."""
    sel = col.selected[dataset]
    t = Table(
        f"cost_{dataset}",
        f"Training cost on {dataset} (mean over seeds)",
        [
            "Method",
            "Group",
            "FLOPs",
            "× baseline",
            "FLOPs own",
            "Train time (s)",
            "Wall time (s)",
            "Peak memory (MB)",
            "Params",
        ],
    )
    base = sel["baseline"].stat(_flops) if "baseline" in sel else None
    getters: list[tuple[str, Callable[[dict[str, Any]], float | None]]] = [
        ("flops", _flops),
        ("flops_own", lambda s: s["flops"]["total"]),
        ("train_time_s", lambda s: s["train_time_s"]),
        ("wall_time_s", lambda s: s["wall_time_s"]),
        ("peak_memory_mb", lambda s: s["peak_memory_mb"]),
        ("params", lambda s: s["params"]["total"]),
    ]
    for group, row in col.rows():
        trial = sel.get(row)
        if trial is None:
            continue
        st = {name: trial.stat(get) for name, get in getters}
        ratio = st["flops"].mean / base.mean if st["flops"] and base and base.mean else None

        def fmt(name: str, f: str, st: dict[str, Stat | None] = st) -> str:
            s = st[name]
            return NA if s is None else format(s.mean, f)

        t.add(
            [
                Cell(row),
                Cell(group),
                Cell(fmt("flops", ".3g")),
                Cell(NA if ratio is None else f"{ratio:.2f}×"),
                Cell(fmt("flops_own", ".3g")),
                Cell(fmt("train_time_s", ".1f")),
                Cell(fmt("wall_time_s", ".1f")),
                Cell(fmt("peak_memory_mb", ".0f")),
                Cell(fmt("params", ",.0f")),
            ]
        )
        rec = {"dataset": dataset, "group": group, "row": row, "hparams": trial.hparams, "flops_x_baseline": ratio}
        t.records.append(rec | {name: (s.mean if s else None) for name, s in st.items()})
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
            {"hparams": tr.hparams, "label": label, "accuracy": acc.mean, "imbalance": imb.mean, "val": tr.val.mean}
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
        ["Hyper-parameters", "Imbalance (%)", "Test acc (%)", "Val score (%)", "Marks"],
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
        ["Method", "Modality", "Multimodal (own head)", "Linear probe", "Unimodal alone"],
    )
    for group, row in col.rows():
        trial = sel.get(row)
        if trial is None or (group == "reference" and row != "baseline"):
            continue
        probed = [r for r in trial.runs if r.probe]
        if not probed:
            continue
        for m in trial.runs[0].summary["modalities"]:
            mm = trial.stat(_modality_acc(m))
            lp = Stat.of(r.probe.get(m, {}).get("test_accuracy") for r in probed if r.probe)
            uni = sel.get(f"unimodal ({m})")
            ua = uni.stat(_acc) if uni else None
            # Probes may cover fewer seeds than the trial (probe.json is optional per run): say so.
            lp_text = pct(lp) + (f" (n={lp.n})" if lp and lp.n < len(trial.runs) else "")
            t.add([Cell(row), Cell(m), Cell(pct(mm)), Cell(lp_text), Cell(pct(ua))])
            for name, s in (("multimodal", mm), ("probe", lp), ("unimodal", ua)):
                if s:
                    t.records.append(_record(dataset, group, row, f"{name}_{m}", s, trial))
    return t if t.rows else None


def all_tables(col: Collection, oracle: bool = False) -> list[Table]:
    """Every table of the report, in the order the HTML page shows them."""
    out = [table2(col)]
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
    if oracle:
        out.append(table2(col, "oracle"))
    return out


# --- renderers ------------------------------------------------------------------------------------


def to_markdown(t: Table) -> str:
    def cell(c: Cell, kind: str) -> str:
        text = c.text
        if c.mark == "best":
            text = f"**{text}**"
        elif c.mark == "second":
            text = f"<u>{text}</u>"
        return f"*{text}*" if kind == "avg" and text != NA else text

    lines = [f"### {t.title}", ""]
    lines.append("| " + " | ".join(t.columns) + " |")
    lines.append("|" + "|".join("---" for _ in t.columns) + "|")
    for cells, kind in zip(t.rows, t.kinds, strict=True):
        lines.append("| " + " | ".join(cell(c, kind) for c in cells) + " |")
    if t.note:
        lines += ["", t.note]
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
}


def _tex(s: str) -> str:
    s = "".join(_TEX.get(ch, ch) for ch in s)
    return s.replace("±", r"$\pm$").replace("×", r"$\times$").replace("φ", r"$\phi$").replace("–", "--")


def to_latex(t: Table) -> str:
    def cell(c: Cell, kind: str) -> str:
        text = _tex(c.text)
        if c.mark == "best":
            text = rf"\textbf{{{text}}}"
        elif c.mark == "second":
            text = rf"\underline{{{text}}}"
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
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
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
        elif c.mark == "second":
            text = f"<u>{text}</u>"
        return f"<td>{f'<i>{text}</i>' if kind == 'avg' else text}</td>"

    head = "".join(f"<th>{html.escape(c)}</th>" for c in t.columns)
    body = "\n".join(
        f'<tr class="{kind}">' + "".join(cell(c, kind) for c in cells) + "</tr>"
        for cells, kind in zip(t.rows, t.kinds, strict=True)
    )
    note = f"<p class='note'>{html.escape(t.note)}</p>" if t.note else ""
    return (
        f"<h3 id='{html.escape(t.key)}'>{html.escape(t.title)}</h3>\n"
        f"<table><thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody></table>\n{note}\n"
    )
