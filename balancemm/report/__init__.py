"""``balancemm report``: the paper's tables and figures from finished run directories, without torch.

``write_report(runs_dir, out)`` reads every run directory under ``runs_dir`` (collect.py), selects one
trial per (dataset, method) on validation, and writes into ``out``::

    report.html            everything on one self-contained page (tables + inline figures)
    report.md              every Markdown table, figures linked from figures/
    report.json            which trial (hyper-parameters, seeds, run directories) each row reports
    tables/<key>.{md,tex,csv}
    figures/<key>.{png,svg}

The whole directory is built under a temporary name beside ``out`` (``.<name>.tmp-<pid>``) and renamed into
place, so a crash never leaves a half-written report; an existing ``out`` is replaced only if it is a
previous report, which is moved aside (``.<name>.old-<pid>``) for the instant of the swap. A process killed
in between leaves those folders behind: the next ``write_report`` to the same ``out`` puts the previous
report back if ``out`` is missing and deletes the leftovers of processes that no longer run.

Every file name is built from names read from run files (dataset, method, modality), which collect.py
admits only when plain; as a second guard, nothing is written whose path resolves outside ``out``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from balancemm.errors import BalanceMMError
from balancemm.layout import PROBE_FILE
from balancemm.report.collect import REJECTED, Collection, collect, printable

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


def _running(pid: int) -> bool:
    """Whether process ``pid`` may still be writing its report (then its folders are left alone)."""
    if pid == os.getpid():
        return False  # an earlier process with this id is gone; this one has not started its own yet
    if os.name != "posix":
        return True  # os.kill(pid, 0) would terminate it on Windows: never clean up there
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # another user's process: alive
    return True


def _recover(out: Path) -> None:
    """Undo what a killed ``write_report`` to ``out`` left beside it: if ``out`` is missing (killed between
    the two renames of the swap), the previous report moves back from ``.<name>.old-<pid>``; then the
    temporary and set-aside folders of processes that no longer run are deleted."""
    if not out.parent.is_dir():
        return
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(tmp|old)-([0-9]+)")
    try:
        stale = [
            (m[1], p)
            for p in out.parent.iterdir()
            if (m := pattern.fullmatch(p.name)) and p.is_dir() and not p.is_symlink() and not _running(int(m[2]))
        ]
        previous = [p for kind, p in stale if kind == "old" and (p / "report.json").is_file()]
        if previous and not out.exists() and not out.is_symlink():
            os.replace(max(previous, key=lambda p: p.stat().st_mtime), out)
    except OSError as exc:
        raise BalanceMMError(
            f"cannot check {out.parent} for what an interrupted report left behind ({exc.strerror or exc}); "
            f"if {out} is missing, move the newest .{out.name}.old-* folder there by hand"
        ) from None
    for _, p in stale:
        shutil.rmtree(p, ignore_errors=True)


def _inside(files: dict[str, bytes], tmp: Path, out: Path) -> None:
    """Refuse, before anything is written, a file whose path would resolve outside the report."""
    top = tmp.resolve()
    for rel in files:
        if not (tmp / rel).resolve().is_relative_to(top):
            raise BalanceMMError(f"refusing to write {rel[:100]!r}: the path resolves outside --out {out}")


def _rejected_line(col: Collection) -> str:
    """One line on the run directories left out as damaged or implausible (empty when none)."""
    if not col.rejected:
        return ""
    first = printable(col.rejected[0][len(REJECTED) :])  # printed as one line, whatever the path holds
    more = f" (and {len(col.rejected) - 1} more, listed in the report's notes)" if len(col.rejected) > 1 else ""
    return f"{len(col.rejected)} run directories left out as damaged or implausible (fix or remove them): {first}{more}"


def write_report(
    runs_dir: str | Path,
    out: str | Path,
    *,
    oracle: bool = False,
    allow_unfair: bool = False,
    plots: bool = True,
) -> ReportResult:
    """Collect, check, select and write the report (see the module docstring). Raises BalanceMMError, with
    nothing written, for a missing/empty ``runs_dir``, an unfair comparison (unless ``allow_unfair``), an
    ``out`` that exists and is not a report, or a file name that would resolve outside ``out``."""
    from balancemm.report import html as html_page
    from balancemm.report import tables as tb

    out = Path(out)
    _recover(out)
    _check_out(out)
    col = collect(runs_dir)
    rejected = _rejected_line(col)
    if col.unfair and not allow_unfair:
        more = f" (and {len(col.unfair) - 1} more)" if len(col.unfair) > 1 else ""
        # A rejected run is a common cause (a seed or a trial missing): say so on the same line.
        why = f"; {rejected}" if rejected else ""
        raise BalanceMMError(f"unfair comparison: {col.unfair[0]}{more}{why}; fix the runs or pass --allow-unfair")
    tables = tb.all_tables(col, oracle=oracle)
    figures = []
    missing: list[str] = [rejected] if rejected else []
    if plots:
        from balancemm.report.plots import all_figures

        figures = all_figures(col, tables)
    else:
        missing.append("figures: not drawn (--no-plots)")
    if not any(t.key.startswith("trials_") for t in tables):
        missing.append("Fig. 3: no method has more than one hyper-parameter trial on any dataset")
    if not any(t.key.startswith("probe_") for t in tables):
        missing.append(f"Fig. 2: no selected run has {PROBE_FILE} (run `balancemm probe RUN_DIR` or `sweep --probe`)")

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
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    _inside(files, tmp, out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        for rel, data in files.items():
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        # Swap: the old report (if any) moves aside, the new one takes its name, the old one goes. Should the
        # second rename fail or be interrupted, the old report goes back (a kill: see _recover).
        if out.exists():
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            if old.exists() and not out.exists():
                os.replace(old, out)
            raise
    except OSError as exc:
        raise BalanceMMError(f"cannot write the report to {out} ({exc.strerror or exc})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    return ReportResult(out, col, sorted(files), missing)
