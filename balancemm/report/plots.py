"""The report's figures as PNG and SVG bytes (matplotlib, imported lazily: ``pip install 'balancemm[report]'``).

- ``fig2_<dataset>``: one panel per modality, one pair of horizontal bars per method (baseline first): the
  modality's accuracy inside the multimodal model (its own head) and its linear probe (``probe.json``),
  mean ± std over seeds; the unimodal model trained alone is a vertical reference line with its ± std band.
  Methods whose per-modality head sees the other modality (``summary["per_modality_heads"] ==
  "cross-modal"``) are marked ``†`` and explained under the figure.
- ``fig3_<dataset>_<method>``: imbalance degree (x) vs test accuracy (y) over a method's hyper-parameter
  trials, mean ± std over seeds in both directions; the relative balance point (best accuracy) and the
  absolute balance point (lowest imbalance) marked, the validation-selected trial ringed, the baseline's
  accuracy (± std band) and imbalance as reference lines. Points carry numbers, keyed to their
  hyper-parameters beneath the plot, so that no label, however long, reaches the frame.
- ``robustness_<dataset>``: one panel per corrupted modality, stacked: test accuracy (y) against severity (x)
  of the modality's mean corruption curve (``balancemm eval``), a line per method (colour by taxonomy group,
  line style and marker within it) with a band of ± std over seeds.

Methods are stacked down the page, never spread across it: Fig. 2 grows in height with the number of
methods and every figure is drawn at most ``MAX_WIDTH_IN`` wide, so the HTML page shows each at its natural
size, where 8 pt text is about 11 CSS px.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from balancemm.errors import BalanceMMError
from balancemm.layout import PROBE_FILE
from balancemm.report.collect import Collection, Stat, Trial
from balancemm.report.tables import Table, balance_points, modality_curve

#: Fig. 2's width in inches (``bbox_inches="tight"`` then adds the footnote's few points at most): 7.5 in is
#: 720 CSS px in an SVG, about half the content width of a 1400 px window, so it shows unscaled.
MAX_WIDTH_IN = 7.5
#: Fig. 3's axes and labels before the legend and key beneath are added (about 480 CSS px wide in the end,
#: so two sit abreast on the page).
FIG3_SIZE_IN = (5.2, 3.4)
#: Height of one method in a Fig. 2 panel: an 8 pt tick label is about 0.13 in tall, so neighbouring labels
#: keep a gap larger than themselves whatever the number of methods.
ROW_IN = 0.3
FONT = 8  # pt: every label, tick and legend; titles are a little larger

MULTIMODAL, PROBE, ALONE, BASE = "#4878a8", "#edae49", "#66a182", "#777777"
RELATIVE, ABSOLUTE = "#d1495b", "#e08a00"
CROSS_MODAL = "†"


@dataclass
class Figure:
    """One rendered figure: ``key`` is the file stem, ``png``/``svg`` the encoded images, ``note`` what a
    caption must add to the title (footnotes also drawn inside the image), or ``""``."""

    key: str
    title: str
    png: bytes
    svg: bytes
    note: str = ""


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise BalanceMMError(
            "the report's plots need matplotlib: pip install 'balancemm[report]' (or --no-plots)"
        ) from None
    matplotlib.use("Agg")  # no display; also keeps a GUI backend from starting in notebooks' subprocesses
    # Deterministic SVG: fixed element ids and no creation date, so identical runs give identical files.
    matplotlib.rcParams["svg.hashsalt"] = "balancemm"
    import matplotlib.pyplot as plt

    return plt


def _encode(plt: Any, fig: Any, key: str, title: str, note: str = "") -> Figure:
    png, svg = io.BytesIO(), io.BytesIO()
    # "tight" grows the canvas to take in text placed outside the axes (legends, footnotes, the key of
    # Fig. 3), so nothing is clipped at the image's edge.
    fig.savefig(png, format="png", dpi=150, bbox_inches="tight", pad_inches=0.1, metadata={"Software": None})
    fig.savefig(svg, format="svg", bbox_inches="tight", pad_inches=0.1, metadata={"Date": None})
    plt.close(fig)
    return Figure(key, title, png.getvalue(), svg.getvalue(), note)


def _acc(s: dict[str, Any]) -> float:
    return float(s["test"]["accuracy"])


def _imbalance(s: dict[str, Any]) -> float:
    return float(s["imbalance"])


def _modality_acc(m: str) -> Callable[[dict[str, Any]], float]:
    return lambda s: float(s["test"]["per_modality"][m]["accuracy"])


def _pct(s: Stat) -> tuple[float, float]:
    return 100 * s.mean, 100 * s.std


def _wrap(text: str, width: int) -> str:
    return "\n".join(textwrap.wrap(text, width, break_on_hyphens=False))


# --- Fig. 3 ---------------------------------------------------------------------------------------


def fig3(col: Collection, dataset: str, row: str) -> Figure:
    """Imbalance vs accuracy over ``row``'s trials on ``dataset`` (see the module docstring)."""
    plt = _pyplot()
    trials = {t.hparams: t for t in col.trials[dataset][row]}
    pts = balance_points(list(trials.values()))
    chosen = col.selected[dataset][row].hparams
    fig, ax = plt.subplots(figsize=FIG3_SIZE_IN)
    for i, p in enumerate(pts, 1):
        tr = trials[p["hparams"]]
        imb, acc = tr.stat(_imbalance), tr.stat(_acc)
        assert imb is not None and acc is not None  # balance_points keeps only trials that have both
        (x, dx), (y, dy) = _pct(imb), _pct(acc)
        ax.errorbar(x, y, xerr=dx, yerr=dy, fmt="o", ms=5, color=MULTIMODAL, elinewidth=0.9, capsize=2.5, zorder=3)
        if p["relative"]:
            ax.scatter([x], [y], marker="*", s=200, color=RELATIVE, zorder=4)
        if p["absolute"]:
            # Hollow, so that a star under it (one trial being both balance points) still shows.
            ax.scatter([x], [y], marker="D", s=120, facecolors="none", edgecolors=ABSOLUTE, linewidths=1.6, zorder=5)
        if p["hparams"] == chosen:
            ax.scatter([x], [y], s=320, facecolors="none", edgecolors="black", linewidths=1.2, zorder=6)
        # Numbers instead of hyper-parameter strings: short enough never to reach the frame; the key says
        # what each one is. The offset clears the selection ring (about 9 pt in radius).
        ax.annotate(str(i), (x, y), xytext=(9, 6), textcoords="offset points", fontsize=FONT, weight="bold")
    handles, labels = _baseline_references(ax, col, dataset)
    ax.margins(0.15)
    ax.set_xlabel("imbalance degree I (%)", fontsize=FONT)
    ax.set_ylabel("test accuracy (%)", fontsize=FONT)
    ax.tick_params(labelsize=FONT)
    ax.grid(alpha=0.3)
    title = f"{row} on {dataset}: imbalance vs accuracy"
    ax.set_title(title, fontsize=FONT + 2)
    # Legend and key sit side by side under the x-axis label, outside the axes, where they hide no point.
    ax.legend(
        handles,
        labels,
        fontsize=FONT,
        loc="upper left",
        bbox_to_anchor=(-0.15, -0.16),
        borderaxespad=0,
        frameon=False,
    )
    key = []
    for i, p in enumerate(pts, 1):
        marks = [m for m, on in (("★", p["relative"]), ("◇", p["absolute"]), ("val", p["hparams"] == chosen)) if on]
        line = f"{i}  {p['label']}" + (f"  ({', '.join(marks)})" if marks else "")
        # 34 characters of 8 pt text fit the right half beneath the axes, beside the legend.
        key.append(textwrap.fill(line, 34, subsequent_indent="   ", break_on_hyphens=False))
    ax.text(
        0.55,
        -0.16,
        "trials (mean ± std over seeds)\n" + "\n".join(key),
        transform=ax.transAxes,
        fontsize=FONT,
        va="top",
        ha="left",
        linespacing=1.5,
    )
    return _encode(plt, fig, f"fig3_{dataset}_{row}", title)


def _baseline_references(ax: Any, col: Collection, dataset: str) -> tuple[list[Any], list[str]]:
    """Draws the baseline's accuracy (± std band) and imbalance as reference lines; returns the legend's
    handles and labels, markers first."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles: list[Any] = [
        Line2D([], [], marker="o", ls="", color=MULTIMODAL),
        Line2D([], [], marker="*", ms=11, ls="", color=RELATIVE),
        Line2D([], [], marker="D", ms=8, ls="", mfc="none", mec=ABSOLUTE, mew=1.6),
        Line2D([], [], marker="o", ms=13, ls="", mfc="none", mec="black"),
    ]
    labels = ["trial", "relative balance (best acc)", "absolute balance (lowest I)", "selected on val"]
    base = col.selected[dataset].get("baseline")
    acc = base.stat(_acc) if base else None
    if acc is not None:
        y, dy = _pct(acc)
        ax.axhline(y, ls="--", color=BASE, lw=1, zorder=1)
        ax.axhspan(y - dy, y + dy, color=BASE, alpha=0.15, lw=0, zorder=0)
        handles.append((Patch(color=BASE, alpha=0.15, lw=0), Line2D([], [], ls="--", color=BASE, lw=1)))
        labels.append("baseline accuracy (± std)")
    imb = base.stat(_imbalance) if base else None
    if imb is not None:
        ax.axvline(100 * imb.mean, ls=":", color=BASE, lw=1.2, zorder=1)
        handles.append(Line2D([], [], ls=":", color=BASE, lw=1.2))
        labels.append("baseline imbalance")
    return handles, labels


# --- Fig. 2 ---------------------------------------------------------------------------------------


def _cross_modal(trial: Trial) -> bool:
    # Written by methods whose per-modality head is fed by the other modality; absent means unimodal heads.
    return any(r.summary.get("per_modality_heads") == "cross-modal" for r in trial.runs)


def _probe(trial: Trial, m: str) -> Stat | None:
    return Stat.of(r.probe.get(m, {}).get("test_accuracy") for r in trial.runs if r.probe)


def _fig2_rows(col: Collection, dataset: str) -> list[str]:
    """Fig. 2's methods, top to bottom: baseline, then every selected method in Table 2 order."""
    sel = col.selected[dataset]
    return [row for group, row in col.rows() if row in sel and (group != "reference" or row == "baseline")]


def fig2(col: Collection, dataset: str) -> Figure:
    """Per-modality accuracy inside each multimodal model vs its linear probe vs the modality alone."""
    plt = _pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    sel = col.selected[dataset]
    rows = _fig2_rows(col, dataset)
    mods = list(dict.fromkeys(m for row in rows for r in sel[row].runs for m in r.summary["modalities"]))
    cross = [_cross_modal(sel[row]) for row in rows]
    panel_in = ROW_IN * len(rows) + 0.5
    height = panel_in * len(mods) + 1.2  # + the title and legend on top, the x-axis label below
    fig, axes = plt.subplots(
        len(mods), 1, figsize=(MAX_WIDTH_IN, height), sharex=True, squeeze=False, layout="constrained"
    )
    fewer = False
    top = 0.0
    for ax, m in zip(axes[:, 0], mods, strict=True):
        labels = []
        for i, row in enumerate(rows):
            trial = sel[row]
            mm, lp = trial.stat(_modality_acc(m)), _probe(trial, m)
            for s, dy, color in ((mm, -0.2, MULTIMODAL), (lp, 0.2, PROBE)):
                if s is not None:
                    x, dx = _pct(s)
                    ax.barh(i + dy, x, 0.38, xerr=dx, color=color, error_kw={"elinewidth": 0.9, "capsize": 2})
                    top = max(top, x + dx)
            label = f"{row} {CROSS_MODAL}" if cross[i] else row
            if lp is None:
                label += "  (no probe)"
            elif lp.n < len(trial.runs):
                label += f"  (probe n={lp.n}/{len(trial.runs)})"
                fewer = True
            labels.append(label)
        uni = sel.get(f"unimodal ({m})")
        alone = uni.stat(_acc) if uni else None
        if alone is not None:
            x, dx = _pct(alone)
            ax.axvline(x, color=ALONE, lw=1.6, zorder=3)
            ax.axvspan(x - dx, x + dx, color=ALONE, alpha=0.2, lw=0, zorder=0)
            top = max(top, x + dx)
        ax.set_yticks(range(len(rows)), labels, fontsize=FONT)
        ax.set_ylim(len(rows) - 0.5, -0.5)  # first row on top
        ax.tick_params(axis="x", labelsize=FONT)
        ax.grid(axis="x", alpha=0.3)
        ax.set_title(f"modality: {m}" + ("" if alone else " (no unimodal run)"), fontsize=FONT + 1, loc="left")
    axes[-1, 0].set_xlim(0, 1.05 * top if top else 1)
    axes[-1, 0].set_xlabel("test accuracy (%), mean ± std over seeds", fontsize=FONT)
    title = f"{dataset}: each modality inside the multimodal model vs its linear probe vs trained alone"
    handles = [
        Patch(color=MULTIMODAL),
        Patch(color=PROBE),
        (Patch(color=ALONE, alpha=0.2, lw=0), Line2D([], [], color=ALONE, lw=1.6)),
    ]
    labels = [
        "inside the multimodal model (its own head)",
        "linear probe on the model's encoder",
        "unimodal model trained alone (± std)",
    ]
    # The title heads the legend: a suptitle and an "outside" legend both claim the top and can overlap.
    fig.legend(
        handles,
        labels,
        loc="outside upper center",
        ncols=2,
        fontsize=FONT,
        frameon=False,
        title=_wrap(title, 80),
        title_fontproperties={"size": FONT + 2},
    )
    notes = []
    if any(cross):
        notes.append(
            f"{CROSS_MODAL} per-modality head is cross-modal: the method feeds the other modality into each branch "
            "(e.g. Greedy's MMTM mid-fusion), so its bar is not that modality on its own."
        )
    if fewer:
        notes.append(f"probe n=k/N: only k of the trial's N seeds have {PROBE_FILE}; the probe bar averages those.")
    note = " ".join(notes)
    if note:
        # Under the figure (outside it: "tight" saving takes it in), wrapped to the figure's width.
        fig.text(0.01, 0, "\n".join(_wrap(n, 110) for n in notes), fontsize=FONT, va="top", ha="left")
    return _encode(plt, fig, f"fig2_{dataset}", title, note)


# --- robustness -------------------------------------------------------------------------------------

#: One colour per taxonomy group, and a line style + marker per method within a group, so that ~25 lines
#: stay tellable apart in print as well as on screen.
GROUP_COLOURS = {
    "reference": "#333333",
    "data": "#8c564b",
    "feed-forward": "#1f77b4",
    "objective": "#2ca02c",
    "optimization": "#d62728",
}
STYLES = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"), ("-", "v"), ("--", "P"), (":", "X"), ("-.", "*")]
PANEL_IN = (MAX_WIDTH_IN - 2.2, 2.6)  # each modality's axes; the legend takes the rest of the width


def robustness_figure(col: Collection, dataset: str) -> Figure:
    """Accuracy against severity per corrupted modality on ``dataset`` (see the module docstring)."""
    plt = _pyplot()
    sel = col.selected[dataset]
    lines: list[tuple[str, str, str, list[float], list[Stat]]] = []
    modalities: list[str] = []
    for group, row in col.rows():
        trial = sel.get(row)
        if trial is None or row.startswith("unimodal"):
            continue
        runs = [r for r in trial.runs if r.robustness]
        if not runs:
            continue
        modalities = modalities or list(runs[0].summary["modalities"])
        for m in modalities:
            curves = [c for r in runs if (c := modality_curve(r, m)) is not None]
            if not curves or any(c[0] != curves[0][0] for c in curves):
                continue
            grid = curves[0][0]
            stats = [s for i in range(len(grid)) if (s := Stat.of(c[1][i] for c in curves)) is not None]
            lines.append((group, row, m, grid, stats))
    fig, axes = plt.subplots(
        len(modalities), 1, figsize=(PANEL_IN[0], PANEL_IN[1] * len(modalities)), sharex=True, squeeze=False
    )
    seen: dict[str, int] = {}
    styles: dict[str, tuple[str, str, str]] = {}
    for group, row, m, grid, stats in lines:
        if row not in styles:
            k = seen.get(group, 0)
            seen[group] = k + 1
            styles[row] = (GROUP_COLOURS.get(group, "#777777"), *STYLES[k % len(STYLES)])
        colour, style, marker = styles[row]
        ax = axes[modalities.index(m)][0]
        mean = [100 * s.mean for s in stats]
        low = [100 * (s.mean - s.std) for s in stats]
        high = [100 * (s.mean + s.std) for s in stats]
        base = row == "baseline"  # the reference every method is read against: drawn thicker, on top
        ax.plot(
            grid, mean, style, color=colour, marker=marker, markersize=3, linewidth=2.2 if base else 1,
            zorder=3 if base else 2, label=row,
        )  # fmt: skip
        ax.fill_between(grid, low, high, color=colour, alpha=0.08, linewidth=0)
    for m, (ax,) in zip(modalities, axes, strict=True):
        ax.set_title(f"{m} corrupted", fontsize=FONT + 1)
        ax.set_ylabel("test accuracy (%)", fontsize=FONT)
        ax.tick_params(labelsize=FONT)
        ax.grid(alpha=0.3, linewidth=0.5)
    axes[-1][0].set_xlabel("severity (0 clean … 1 modality gone)", fontsize=FONT)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=FONT - 1, frameon=False)
    fig.tight_layout()
    title = f"Accuracy against corruption severity per modality on {dataset}"
    note = (
        "Each line is a method's mean over seeds (band: ± std) of the modality's corruption curve, itself the "
        "mean of its kinds (missing, Gaussian noise, its own corruption) at each severity."
    )
    return _encode(plt, fig, f"robustness_{dataset}", title, note)


def all_figures(col: Collection, tables: list[Table]) -> list[Figure]:
    """Fig. 2 for every dataset with a ``probe_`` table, then Fig. 3 for every (dataset, method) with a
    ``trials_`` table and more than one plottable trial. Following the tables keeps figures and the report's
    "missing" lines in agreement."""
    keys = {t.key for t in tables}
    out = [fig2(col, d) for d in col.datasets if f"probe_{d}" in keys]
    out += [
        fig3(col, d, row)
        for d in col.datasets
        for row, trials in sorted(col.trials[d].items())
        if f"trials_{d}_{row}" in keys and len(balance_points(trials)) > 1
    ]
    out += [robustness_figure(col, d) for d in col.datasets if f"robustness_{d}" in keys]
    return out
