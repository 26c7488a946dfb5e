"""``balancemm report``: the paper's tables and figures from finished run directories, without torch.

``write_report(runs_dir, out)`` reads every run directory under ``runs_dir`` (collect.py), selects one
trial per (dataset, method) on validation, and writes into ``out``::

    report.html            everything on one self-contained page (tables + inline figures)
    report.md              every Markdown table, figures linked from figures/
    report.json            which trial (hyper-parameters, seeds, run directories) each row reports
    tables/<key>.{md,tex,csv}
    figures/<key>.{png,svg}

The whole directory is built under a temporary name beside ``out`` and renamed into place, so a crash
never leaves a half-written report; an existing ``out`` is replaced only if it is a previous report.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from balancemm.errors import BalanceMMError
from balancemm.report.collect import Collection, collect

__all__ = ["Collection", "ReportResult", "collect", "write_report"]


@dataclass
class ReportResult:
    """What was written: the output directory, the collection it came from, and every file (relative)."""

    out: Path
    collection: Collection
    files: list[str]
    missing: list[str]


def _manifest(col: Collection) -> dict[str, object]:
    return {
        "runs_dir": str(col.root),
        "num_runs": len(col.runs),
        "unfair": col.unfair,
        "notes": col.notes,
        "selection": "best mean validation score over seeds (summary.selection.value)",
        "selected": {
            d: {
                row: {
                    "method": t.method,
                    "group": t.group,
                    "hparams": json.loads(t.hparams),
                    "seeds": t.seeds,
                    "val_mean": t.val.mean,
                    "trials": len(col.trials[d][row]),
                    "runs": [str(r.path) for r in t.runs],
                    # Same predictions as baseline / no intervention before the selected epoch, per seed.
                    "flags": dataclasses.asdict(f) if (f := col.flags(d, row)) else None,
                }
                for row, t in sorted(rows.items())
            }
            for d, rows in sorted(col.selected.items())
        },
    }


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise BalanceMMError(f"--out {out} is a file; give a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "report.json").is_file():
        raise BalanceMMError(f"--out {out} exists and is not a previous report; refusing to overwrite it")


def write_report(
    runs_dir: str | Path,
    out: str | Path,
    *,
    oracle: bool = False,
    allow_unfair: bool = False,
    plots: bool = True,
) -> ReportResult:
    """Collect, check, select and write the report (see the module docstring). Raises BalanceMMError, with
    nothing written, for a missing/empty ``runs_dir``, an unfair comparison (unless ``allow_unfair``), or an
    ``out`` that exists and is not a report."""
    from balancemm.report import html as html_page
    from balancemm.report import tables as tb

    out = Path(out)
    _check_out(out)
    col = collect(runs_dir)
    if col.unfair and not allow_unfair:
        more = f" (and {len(col.unfair) - 1} more)" if len(col.unfair) > 1 else ""
        raise BalanceMMError(f"unfair comparison: {col.unfair[0]}{more}; fix the runs or pass --allow-unfair")
    tables = tb.all_tables(col, oracle=oracle)
    figures = []
    missing: list[str] = []
    if plots:
        from balancemm.report.plots import all_figures

        figures = all_figures(col, tables)
    else:
        missing.append("figures: not drawn (--no-plots)")
    if not any(t.key.startswith("trials_") for t in tables):
        missing.append("Fig. 3: no method has more than one hyper-parameter trial on any dataset")
    if not any(t.key.startswith("probe_") for t in tables):
        missing.append("Fig. 2: no selected run has probe.json (run `balancemm probe RUN_DIR` or `sweep --probe`)")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    files: dict[str, bytes] = {}
    for t in tables:
        files[f"tables/{t.key}.md"] = tb.to_markdown(t).encode()
        files[f"tables/{t.key}.tex"] = tb.to_latex(t).encode()
        files[f"tables/{t.key}.csv"] = tb.to_csv(t).encode()
    for f in figures:
        files[f"figures/{f.key}.png"] = f.png
        files[f"figures/{f.key}.svg"] = f.svg
    md = ["# BalanceMM report", "", f"{len(col.runs)} finished runs under `{col.root}`.", ""]
    md += [f"**Unfair comparison (forced):** {u}\n" for u in col.unfair]
    md += [tb.to_markdown(t) for t in tables]
    md += [f"![{f.title}](figures/{f.key}.png)\n" + (f"\n{f.note}\n" if f.note else "") for f in figures]
    md += [f"- {n}" for n in [*missing, *col.notes]]
    files["report.md"] = ("\n".join(md) + "\n").encode()
    files["report.html"] = html_page.render(col, tables, figures, missing).encode()
    files["report.json"] = (json.dumps(_manifest(col) | {"missing": missing}, indent=2) + "\n").encode()
    try:
        for rel, data in files.items():
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        # Swap: the old report (if any) moves aside, the new one takes its name, the old one goes.
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise BalanceMMError(f"cannot write the report to {out} ({exc.strerror or exc})") from None
    return ReportResult(out, col, sorted(files), missing)
