"""One self-contained HTML page: every table inline, every figure as a base64 ``data:`` SVG image.

No external ``src``/``href`` (no CDN, no stylesheet, no script), so the file opens from disk without a
server and can be mailed as one attachment. SVGs go in as ``data:`` images rather than inline ``<svg>``
so that the element ids matplotlib writes into each figure can never collide between figures.
"""

from __future__ import annotations

import base64
import html

from balancemm.report.collect import Collection
from balancemm.report.plots import Figure
from balancemm.report.tables import Table, to_html

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; white-space: nowrap; }
th:first-child, td:first-child, td:nth-child(2) { text-align: left; }
tr.avg td { background: #f4f4f4; }
.warn { background: #fde8e8; border: 1px solid #d1495b; padding: 0.5em 1em; }
.note { color: #555; font-size: 12px; }
figure { display: inline-block; margin: 0 1em 1em 0; }
"""


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
    parts += [to_html(t) for t in tables]
    if figures:
        parts.append("<h2>Figures</h2>")
    for f in figures:
        data = base64.b64encode(f.svg).decode()
        parts.append(
            f"<figure><img alt='{html.escape(f.title)}' src='data:image/svg+xml;base64,{data}'>"
            f"<figcaption>{html.escape(f.title)}</figcaption></figure>"
        )
    if col.notes or missing:
        items = "".join(f"<li>{html.escape(n)}</li>" for n in [*missing, *col.notes])
        parts.append(f"<h2>Notes</h2><ul class='note'>{items}</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
