"""``balancemm data check``: what a dataset root holds against its split lists, and whether results
on it can be set beside published numbers."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from balancemm.data.base import SPLITS
from balancemm.errors import BalanceMMError, DataError

SHOWN = 5  # clip ids named per problem; the rest are counted


def check(name: str, root: str, options: Mapping[str, Any] | None = None, progress: bool = True) -> dict[str, Any]:
    """Build dataset ``name`` on ``root`` (plus data ``options``) and read every clip once.

    Returns ``{"splits": {split: {"listed", "present", "missing", "unreadable"}}, "comparable": bool,
    "why": str, "describe": {...}}``; ``missing`` / ``unreadable`` map clip ids to reasons (for a missing
    clip of prepared data, the reason ``data prepare`` recorded: a file it could not decode, an orphan file).
    """
    from tqdm import tqdm

    from balancemm.data import create_dataset

    data = create_dataset(name, None, **{**(options or {}), "root": root})
    comparability = getattr(data, "comparability", None)
    if comparability is None:
        raise DataError(f"dataset {name} has no files to check")
    listed: dict[str, int] = getattr(data, "listed", {})
    why_missing = getattr(data, "why_missing", lambda clip_id: "no files")
    report: dict[str, Any] = {"splits": {}, "describe": {"name": data.name, **data.describe()}}
    for split_name in SPLITS:
        split = data.split(split_name)
        ids = [c.id for c in split.clips] if hasattr(split, "clips") else [str(i) for i in range(len(split))]
        unreadable: dict[str, str] = {}
        for i in tqdm(range(len(split)), desc=f"check {split_name}", disable=not progress, file=sys.stderr):
            try:
                split.load(i, None)
            except BalanceMMError as exc:
                unreadable[ids[i]] = str(exc)
        report["splits"][split_name] = {
            "listed": listed.get(split_name, len(split)),
            "carved": bool(listed) and split_name not in listed,  # validation carved from train
            "present": len(split) - len(unreadable),
            "missing": {c: why_missing(c) for c in getattr(data, "missing", {}).get(split_name, [])},
            "unreadable": unreadable,
        }
    comparable, why = comparability()
    bad = sum(len(s["unreadable"]) for s in report["splits"].values())
    if bad:
        comparable, why = False, f"{bad} clips are unreadable; prepare them again" + ("" if comparable else f"; {why}")
    report.update(comparable=comparable, why=why)
    return report


def format_check(report: Mapping[str, Any]) -> str:
    """The lines ``balancemm data check`` prints."""
    info = report["describe"]
    lines = [
        f"{info['name']} at {info['root']} ({info['layout']} layout, "
        f"profile {info['profile'].get('name')}, {info['num_classes']} classes)",
        f"split: {info['split_source']}",
    ]
    splits = report["splits"]
    for split, s in splits.items():
        if s["carved"]:
            where = "carved from train"
        elif split == "train" and splits["val"]["carved"]:
            where = f"of {s['listed']:,} listed, {splits['val']['listed']:,} of them carved into val"
        else:
            where = f"of {s['listed']:,} listed"
        lines.append(
            f"  {split:5s} {s['present']:>7,} usable ({where}), {len(s['missing']):,} missing, "
            f"{len(s['unreadable']):,} unreadable"
        )
        for what in ("missing", "unreadable"):
            items = list(s[what])
            for clip in items[:SHOWN]:
                lines.append(f"        {what} {clip}: {s[what][clip]}")
            if len(items) > SHOWN:
                lines.append(f"        … and {len(items) - SHOWN:,} more {what}")
    verdict = "comparable with published numbers" if report["comparable"] else "NOT comparable with published numbers"
    lines.append(f"{verdict}: {report['why']}")
    return "\n".join(lines)
