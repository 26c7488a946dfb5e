"""One self-contained HTML page: every table inline, every figure as a base64 ``data:`` SVG image.

No external ``src``/``href`` (no CDN, no stylesheet, no script), so the file opens from disk without a
server and can be mailed as one attachment. SVGs go in as ``data:`` images rather than inline ``<svg>``
so that the element ids matplotlib writes into each figure can never collide between figures.

The page fits a 1400 px window without horizontal scrolling: every figure is shown at its natural size
(width and height taken from the SVG, which plots.py keeps narrower than the page), so 8 pt figure text
stays about 11 px; ``max-width`` only guards narrower windows. Tables wider than the page scroll inside
their own box, and long paths break, so neither widens the page.
"""

from __future__ import annotations

import base64
import html
import re
from itertools import groupby

from balancemm.report.collect import Collection
from balancemm.report.plots import Figure
from balancemm.report.tables import Table, to_html

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
p, li, figcaption, .warn { overflow-wrap: anywhere; }
.table { overflow-x: auto; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; white-space: nowrap; }
th:first-child, td:first-child, td:nth-child(2) { text-align: left; }
tr.avg td { background: #f4f4f4; }
.warn { background: #fde8e8; border: 1px solid #d1495b; padding: 0.5em 1em; }
.note { color: #555; font-size: 12px; }
figure { display: inline-block; vertical-align: top; margin: 0 1em 1.5em 0; max-width: 100%; }
figure img { max-width: 100%; height: auto; }
figcaption { font-size: 13px; }
"""

_SECTIONS = {
    "fig2": "Fig. 2: each modality inside the multimodal model, its linear probe, and the modality alone",
    "fig3": "Fig. 3: imbalance vs accuracy over each method's hyper-parameter trials",
}

#: CSS px per SVG pt (CSS fixes 96 px and 72 pt to the inch).
_PX_PER_PT = 96 / 72


def _size_px(svg: bytes) -> tuple[int, int]:
    """The SVG's natural width and height in CSS px, from the root element's ``width``/``height`` (pt)."""
    head = svg[: svg.index(b">", svg.index(b"<svg")) + 1].decode()
    w, h = (re.search(rf'{a}="([0-9.]+)pt"', head) for a in ("width", "height"))
    if w is None or h is None:
        raise ValueError("figure SVG without width/height in pt")
    return round(float(w.group(1)) * _PX_PER_PT), round(float(h.group(1)) * _PX_PER_PT)


def _figure(f: Figure) -> str:
    w, h = _size_px(f.svg)
    data = base64.b64encode(f.svg).decode()
    caption = html.escape(f.title) + (f"<br><span class='note'>{html.escape(f.note)}</span>" if f.note else "")
    # The figure is as wide as its image, so a long caption wraps under it instead of widening it.
    return (
        f"<figure id='{html.escape(f.key)}' style='width: {w}px'>"
        f"<img alt='{html.escape(f.title)}' width='{w}' height='{h}' src='data:image/svg+xml;base64,{data}'>"
        f"<figcaption>{caption}</figcaption></figure>"
    )


def render(col: Collection, tables: list[Table], figures: list[Figure], missing: list[str]) -> str:
    """The page: header with inputs and fairness lines, the tables, the figures, and what is missing."""
    parts = [
        "<!DOCTYPE html>",
        "<html lang='en'><head><meta charset='utf-8'><title>BalanceMM report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>BalanceMM report</h1>",
        f"<p>{len(col.runs)} finished runs under <code>{html.escape(str(col.root))}</code>; "
        f"datasets: {html.escape(', '.join(col.datasets))}.</p>",
    ]
    if col.unfair:
        items = "".join(f"<li>{html.escape(u)}</li>" for u in col.unfair)
        parts.append(f"<div class='warn'><b>Unfair comparison</b> (report forced):<ul>{items}</ul></div>")
    parts += [f"<div class='table'>{to_html(t)}</div>" for t in tables]
    if figures:
        parts.append("<h2>Figures</h2>")
    # One heading per kind of figure: a block between the big Fig. 2 and the Fig. 3s, which sit two abreast.
    for kind, figs in groupby(figures, key=lambda f: f.key.split("_")[0]):
        parts.append(f"<h3>{html.escape(_SECTIONS.get(kind, kind))}</h3>")
        parts += [_figure(f) for f in figs]
    if col.notes or missing:
        items = "".join(f"<li>{html.escape(n)}</li>" for n in [*missing, *col.notes])
        parts.append(f"<h2>Notes</h2><ul class='note'>{items}</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
