"""The report's figures at real scale: Fig. 2 with 18+ methods, Fig. 3's references and key, and the HTML page
in a real browser at 1400 px (every figure decoded, none wider than the page, no horizontal scroll).

Runs are ``tests.test_report.make_run`` directories, relabelled as the registry's real methods (make_run only
knows a few) and given per-modality accuracies, ``per_modality_heads`` and ``probe.json`` where a test needs them.
"""

from __future__ import annotations

import html
import json
import re
import struct
import subprocess
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.container import BarContainer
from matplotlib.text import Annotation

from balancemm.report import collect, plots, write_report
from balancemm.report.plots import fig2, fig3
from tests.test_report import _chromium, make_run

#: The registry's methods and their taxonomy groups (balancemm/methods/*.py).
METHODS = {
    "modality_valuation": "data", "amco": "feed-forward", "greedy": "feed-forward", "mla": "feed-forward",
    "opm": "feed-forward", "cml": "objective", "gblending": "objective", "lfm": "objective", "mbsd": "objective",
    "mmcosine": "objective", "mmpareto": "objective", "umt": "objective", "agm": "optimization",
    "ogm_ge": "optimization", "pmr": "optimization", "reconboost": "optimization", "relearning": "optimization",
}  # fmt: skip
SEEDS = (0, 1, 2)
MODS = ("audio", "visual")


def _run(root: Path, method: str, group: str, seed: int, hp: dict[str, Any], k: float, probe: bool, **kw: Any) -> None:
    """One run of ``method`` whose accuracies vary with ``k`` (a per-trial offset) and the seed."""
    name = f"{method}-{'-'.join(f'{a}{b}' for a, b in hp.items())}-s{seed}"
    acc = 0.55 + k + 0.01 * seed
    base = "unimodal" if method == "unimodal" else "baseline"
    d = make_run(root, name, base, seed, val=0.5 + k, acc=acc, hparams=hp, imbalance=0.3 - k + 0.01 * seed)
    summary = json.loads((d / "summary.json").read_text())
    summary |= {"method": method, "method_group": group, **kw}
    for i, m in enumerate(summary["modalities"]):
        summary["test"]["per_modality"][m]["accuracy"] = acc - 0.1 - 0.15 * i + 0.005 * seed
    (d / "summary.json").write_text(json.dumps(summary))
    if probe:
        mods = {m: {"test_accuracy": acc - 0.05 - 0.1 * i, "val_accuracy": acc, "C": 1.0} for i, m in enumerate(MODS)}
        (d / "probe.json").write_text(json.dumps(mods))


def many_runs(root: Path, methods: dict[str, str], trials: int = 2, seeds: tuple[int, ...] = SEEDS) -> Path:
    """Unimodal audio/visual, baseline and ``methods`` (name → group) over ``seeds``, ``trials`` trials each.

    Every method but the last two has probes on all seeds, the second-to-last on one seed only, the last
    none; greedy (when present) is cross-modal.
    """
    for s in seeds:
        for i, m in enumerate(MODS):
            _run(root, "unimodal", "reference", s, {"modality": m}, -0.05 - 0.2 * i, False)
        _run(root, "baseline", "reference", s, {}, 0.0, True)
    names = sorted(methods)
    for n, method in enumerate(names):
        extra = {"per_modality_heads": "cross-modal"} if method == "greedy" else {}
        for t in range(trials):
            for s in seeds:
                probe = n < len(names) - 2 or (n == len(names) - 2 and s == 0)
                k = 0.01 * n - 0.02 * t
                _run(root, method, methods[method], s, {"alpha": round(0.1 * (t + 1), 1)}, k, probe, **extra)
    return root


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    runs = many_runs(tmp_path_factory.mktemp("runs"), METHODS)
    out = tmp_path_factory.mktemp("rep") / "report"
    write_report(runs, out)
    return out


@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The matplotlib figures that plots.py encodes during a test, kept for their artists' geometry."""
    figs: list[Any] = []
    real = plots._encode

    def keep(plt: Any, fig: Any, *args: Any) -> plots.Figure:
        figs.append(fig)
        return real(plt, fig, *args)

    monkeypatch.setattr(plots, "_encode", keep)
    return figs


def _svg_px(svg: bytes) -> tuple[float, float]:
    """Natural size in CSS px, as a browser reads the root element's width/height (pt)."""
    root = re.search(rb"<svg[^>]*>", svg)
    assert root is not None
    w, h = (re.search(rf'{a}="([0-9.]+)pt"'.encode(), root.group()) for a in ("width", "height"))
    assert w is not None and h is not None
    return float(w.group(1)) * 96 / 72, float(h.group(1)) * 96 / 72


def _png_px(png: bytes) -> tuple[int, int]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    w, h = struct.unpack(">II", png[16:24])
    return w, h


def _texts(svg: bytes) -> list[str]:
    # With svg.fonttype "path" matplotlib draws glyphs and writes each text line as a comment beside them.
    return re.findall(r"<!-- (.*?) -->", svg.decode())


def _no_overlap(boxes: list[Any]) -> bool:
    ys = sorted((b.y0, b.y1) for b in boxes)
    return all(lo >= prev_hi for (_, prev_hi), (lo, _) in pairwise(ys))


def test_fig2_with_25_methods_stays_page_sized_with_error_bars_and_a_reference_line(
    tmp_path: Path, drawn: list[Any]
) -> None:
    methods = METHODS | {f"extra_method_{i}": "objective" for i in range(8)}
    col = collect(many_runs(tmp_path, methods, trials=1))
    fig = fig2(col, "embedded")
    rows = len(methods) + 1  # and the baseline
    # The old figure grew sideways with the methods (4819 px for 18); now only the height grows, by a bounded
    # amount per method and modality, and the width stays well inside a 1400 px page's 1336 px content box.
    w, h = _svg_px(fig.svg)
    assert w <= 800 and h <= 96 * (0.35 * rows * len(MODS) + 3), (w, h)
    pw, ph = _png_px(fig.png)
    assert pw <= 150 * 8.5 and ph <= 150 * (0.35 * rows * len(MODS) + 3), (pw, ph)
    texts = _texts(fig.svg)
    assert "inside the multimodal model (its own head)" in texts and "unimodal model trained alone (± std)" in texts
    assert "embedded: each modality inside the multimodal model vs its linear probe vs" in texts  # the title
    assert texts.count("greedy †") == 2 and texts.count("agm") == 2 and "agm †" not in texts
    assert "umt  (no probe)" in texts and "relearning  (probe n=1/3)" in texts
    assert "cross-modal" in fig.note and any("cross-modal" in t for t in texts)

    (mpl,) = drawn
    renderer = FigureCanvasAgg(mpl).get_renderer()
    for ax, m in zip(mpl.axes, MODS, strict=True):
        labels = [t for t in ax.get_yticklabels() if t.get_text()]
        assert len(labels) == rows and _no_overlap([t.get_window_extent(renderer) for t in labels])
        bars = [c for c in ax.containers if isinstance(c, BarContainer)]
        assert len(bars) == 2 * rows - 1  # no probe bar for the method without probes
        assert all(c.errorbar is not None for c in bars)
        # The baseline's own-head accuracy varies by 1.5 points over the seeds: a ±1.5 error bar.
        (seg,) = bars[0].errorbar.lines[2][0].get_segments()
        assert seg[1][0] - seg[0][0] == pytest.approx(2 * 1.5)
        # The unimodal model alone (mean 51 % audio / 31 % visual, std 1) is a line, not a bar per method.
        alone = 51.0 if m == "audio" else 31.0
        assert any(list(line.get_xdata()) == pytest.approx([alone, alone]) for line in ax.lines)


@pytest.mark.parametrize("seeds", [SEEDS, (0,)], ids=["3 seeds", "1 seed"])
def test_fig3_error_bars_baseline_references_and_labels_inside_the_frame(
    tmp_path: Path, drawn: list[Any], seeds: tuple[int, ...]
) -> None:
    col = collect(many_runs(tmp_path, {"greedy": "feed-forward", "agm": "optimization"}, trials=3, seeds=seeds))
    fig = fig3(col, "embedded", "greedy")
    w, _ = _svg_px(fig.svg)
    assert w <= 600  # two abreast on the page
    texts = _texts(fig.svg)
    for label in ("selected on val", "relative balance (best acc)", "baseline accuracy (± std)", "baseline imbalance"):
        assert label in texts
    assert "1  alpha=0.1  (★, ◇, val)" in texts and "3  alpha=0.3" in texts

    (mpl,) = drawn
    ax = mpl.axes[0]
    bars = [c for c in ax.containers if c.has_xerr and c.has_yerr]
    assert len(bars) == 3
    std = 1.0 if len(seeds) > 1 else 0.0  # imbalance and accuracy each vary by one point a seed
    for c in bars:
        (xseg,), (yseg,) = (lines.get_segments() for lines in c.lines[2])
        assert xseg[1][0] - xseg[0][0] == pytest.approx(2 * std) and yseg[1][1] - yseg[0][1] == pytest.approx(2 * std)
    # Baseline: accuracy 55 % + the mean seed (horizontal), imbalance 30 % + the mean seed (vertical).
    acc, imb = 55 + sum(seeds) / len(seeds), 30 + sum(seeds) / len(seeds)
    assert any(list(line.get_ydata()) == pytest.approx([acc, acc]) for line in ax.lines)
    assert any(list(line.get_xdata()) == pytest.approx([imb, imb]) for line in ax.lines)
    renderer = FigureCanvasAgg(mpl).get_renderer()
    # Inside the axes, not merely inside the image: a label across the frame is as unreadable as a clipped one.
    frame = ax.get_window_extent(renderer)
    numbers = [t for t in ax.texts if isinstance(t, Annotation)]
    assert [t.get_text() for t in numbers] == ["1", "2", "3"]
    for t in numbers:
        box = t.get_window_extent(renderer)
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1


def test_figures_are_byte_identical_across_renders(tmp_path: Path) -> None:
    col = collect(many_runs(tmp_path, {"greedy": "feed-forward", "agm": "optimization"}))
    a, b = fig2(col, "embedded"), fig2(col, "embedded")
    assert a.svg == b.svg and a.png == b.png
    assert fig3(col, "embedded", "agm").svg == fig3(col, "embedded", "agm").svg


def test_no_marker_without_cross_modal_heads(tmp_path: Path) -> None:
    col = collect(many_runs(tmp_path, {"pmr": "optimization", "agm": "optimization"}))
    fig = fig2(col, "embedded")
    assert "cross-modal" not in fig.note and not any("†" in t for t in _texts(fig.svg))


@pytest.mark.skipif(_chromium() is None, reason="no Chromium binary on this machine (apt-get install chromium)")
def test_page_fits_1400_px_in_headless_chromium(report: Path, tmp_path: Path) -> None:
    browser = _chromium()
    assert browser is not None
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--virtual-time-budget=5000"]
    # Measured in a copy: the report itself carries no script. Widths are of the body's content box.
    probe = """<script>window.onload = () => {
      const b = document.body, cs = getComputedStyle(b), de = document.documentElement;
      const content = b.clientWidth - parseFloat(cs.paddingLeft) - parseFloat(cs.paddingRight);
      const imgs = [...document.images].map(i => ({
        alt: i.alt, natural: i.naturalWidth, shown: i.getBoundingClientRect().width}));
      document.title = JSON.stringify({content, imgs, scroll: de.scrollWidth, client: de.clientWidth});
    };</script></body>"""
    page = tmp_path / "page.html"
    page.write_text((report / "report.html").read_text().replace("</body>", probe))
    cmd = [browser, *flags, "--window-size=1400,1000", "--dump-dom", page.as_uri()]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    title = re.search(r"<title>(\{.*\})</title>", res.stdout)
    assert title is not None, res.stderr[-500:]
    got = json.loads(html.unescape(title.group(1)))
    imgs, content = got["imgs"], got["content"]
    assert len(imgs) == 1 + len(METHODS)  # Fig. 2 and one Fig. 3 per method
    assert 1300 <= content <= 1400 and got["scroll"] <= got["client"], got
    for img in imgs:
        assert img["natural"] > 0, f"not decoded: {img['alt']}"
        assert img["shown"] <= content and img["natural"] <= content, img
        # Shown unscaled, so the figures' 8 pt text is 10.7 CSS px on screen.
        assert img["shown"] == pytest.approx(img["natural"], abs=1), img
