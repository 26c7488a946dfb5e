"""The report's figures as PNG and SVG bytes (matplotlib, imported lazily: ``pip install 'balancemm[report]'``).

- ``fig3_<dataset>_<method>``: imbalance degree (x) vs test accuracy (y) over a method's hyper-parameter
  trials (means over seeds), the relative balance point (best accuracy) and the absolute balance point
  (lowest imbalance) marked, the validation-selected trial ringed and the baseline's accuracy dashed.
- ``fig2_<dataset>``: per modality, grouped bars: accuracy inside each multimodal model (own head), its
  linear probe (``probe.json``), and the unimodal model trained alone.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

from balancemm.errors import BalanceMMError
from balancemm.report.collect import Collection
from balancemm.report.tables import Table, balance_points


@dataclass
class Figure:
    """One rendered figure: ``key`` is the file stem, ``png``/``svg`` the encoded images."""

    key: str
    title: str
    png: bytes
    svg: bytes


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


def _encode(plt: Any, fig: Any, key: str, title: str) -> Figure:
    png, svg = io.BytesIO(), io.BytesIO()
    fig.savefig(png, format="png", dpi=150, bbox_inches="tight", metadata={"Software": None})
    fig.savefig(svg, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    return Figure(key, title, png.getvalue(), svg.getvalue())


def fig3(col: Collection, dataset: str, row: str) -> Figure:
    plt = _pyplot()
    pts = balance_points(col.trials[dataset][row])
    chosen = col.selected[dataset][row].hparams
    fig, ax = plt.subplots(figsize=(5, 3.6))
    xs = [100 * p["imbalance"] for p in pts]
    ys = [100 * p["accuracy"] for p in pts]
    ax.scatter(xs, ys, color="#4878a8", zorder=2, label="trial")
    for p, x, y in zip(pts, xs, ys, strict=True):
        if p["relative"]:
            ax.scatter([x], [y], marker="*", s=220, color="#d1495b", zorder=3, label="relative balance (best acc)")
        if p["absolute"]:
            ax.scatter([x], [y], marker="D", s=80, color="#edae49", zorder=3, label="absolute balance (lowest I)")
        ax.annotate(p["label"], (x, y), fontsize=6, xytext=(4, -9), textcoords="offset points")
        if p["hparams"] == chosen:
            ax.scatter([x], [y], s=260, facecolors="none", edgecolors="black", zorder=4, label="selected on val")
    base = col.selected[dataset].get("baseline")
    acc = base.stat(lambda s: s["test"]["accuracy"]) if base else None
    if acc is not None:
        ax.axhline(100 * acc.mean, ls="--", color="grey", lw=1, label="baseline")
    ax.set_xlabel("imbalance degree I (%)")
    ax.set_ylabel("test accuracy (%)")
    title = f"{row} on {dataset}: imbalance vs accuracy"
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    return _encode(plt, fig, f"fig3_{dataset}_{row}", title)


def fig2(probe: Table, dataset: str) -> Figure:
    """Grouped bars from ``tables.probe_table``'s rows (one group per method × modality)."""
    plt = _pyplot()
    labels = [f"{r[0].text}\n{r[1].text}" for r in probe.rows]
    series = [("multimodal (own head)", 2, "#4878a8"), ("linear probe", 3, "#edae49"), ("unimodal alone", 4, "#66a182")]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(labels) + 1), 3.6))
    width = 0.26
    for k, (name, col, color) in enumerate(series):
        vals = [float(r[col].text.split(" ")[0]) if r[col].text[:1].isdigit() else 0.0 for r in probe.rows]
        ax.bar([i + (k - 1) * width for i in range(len(labels))], vals, width, label=name, color=color)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("test accuracy (%)")
    title = f"{dataset}: each modality inside the multimodal model vs probe vs alone"
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    return _encode(plt, fig, f"fig2_{dataset}", title)


def all_figures(col: Collection, tables: list[Table]) -> list[Figure]:
    """Fig. 3 for every (dataset, method) with more than one trial; Fig. 2 for every dataset with probes."""
    out = [
        fig3(col, d, row)
        for d in col.datasets
        for row, trials in sorted(col.trials[d].items())
        if len(trials) > 1 and len(balance_points(trials)) > 1
    ]
    for t in tables:
        if t.key.startswith("probe_"):
            out.append(fig2(t, t.key.removeprefix("probe_")))
    return out
