"""Sweeps: grids of methods × datasets × seeds × hyper-parameter trials, run idempotently.

``plan_jobs`` resolves the grid into jobs named by their config hash; ``run_sweep`` trains the
unfinished ones with a launcher (local worker processes, or Ray tasks on a cluster), on the CPU or on
GPUs, and reports each job as it finishes.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from balancemm.sweep.launchers import Outcome, default_parallel, is_done, make_launcher, schedule, summary_line
from balancemm.sweep.spec import Job, SweepSpec, plan_jobs

__all__ = ["Job", "Outcome", "SweepSpec", "check_data", "default_parallel", "is_done", "plan_jobs", "run_sweep"]


def check_data(jobs: Sequence[Job]) -> None:
    """Check each dataset root of the sweep once (``data.root`` set, a directory, prepared for this dataset
    and audio profile), so a bad root is one error before any job starts, not the same failure in every job.
    Listing and reading clips is left to the jobs."""
    from balancemm.data import DATASETS
    from balancemm.data.av import open_root

    seen = set()
    for job in jobs:
        dataset, options = job.config.run.dataset, job.config.data
        key = (dataset, json.dumps(job.config.to_dict()["data"], sort_keys=True))
        if key in seen:
            continue
        seen.add(key)
        cls = DATASETS.get(dataset)
        locate = getattr(cls, "locate", None)
        if locate is not None:
            locate(options)
        elif DATASETS.entry(dataset).meta.get("needs_files"):  # a dataset of files without the full check
            open_root(options.root, f"pass --set data.root=DIR (see `balancemm data prepare {dataset}`)")


def run_sweep(
    jobs: Sequence[Job],
    root: str | Path,
    *,
    parallel: int | None = None,
    threads_per_job: int = 1,
    launcher: str = "local",
    address: str | None = None,
    device: str = "auto",
    gpus_per_job: float | None = None,
    progress: bool = True,
) -> Outcome:
    """Train every unfinished job; one line per finished job and an overall bar with ETA (stderr).

    ``device`` is ``auto`` (the GPUs if there are any: this machine's for ``local``, the cluster's for
    ``ray``; else the CPU), ``cpu``, ``cuda`` or ``cuda:N`` (``local`` only: every job on GPU N). Each GPU
    job takes ``gpus_per_job`` of a GPU (default 1; 0.5 puts two jobs on each GPU).

    ``parallel`` defaults, for ``local``, to one job per CPU core, or on GPUs to GPUs × jobs per GPU;
    for ``ray`` to every job at once (the cluster's scheduler places them as CPUs and GPUs free up).
    """
    root = Path(root)
    check_data(jobs)
    runner = make_launcher(
        launcher, root, threads_per_job, address, device=device, gpus_per_job=gpus_per_job, parallel=parallel
    )
    parallel = runner.parallel or len(jobs) or 1
    todo = sum(1 for j in jobs if not is_done(j))
    say = (lambda text: tqdm.write(text, file=sys.stderr)) if progress else (lambda text: None)
    say(
        f"sweep: {len(jobs)} jobs under {root}, {len(jobs) - todo} already finished, {parallel} at a time "
        f"on {runner.placement.describe()}"
    )
    bar = tqdm(total=todo, desc="sweep", unit="job", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    count = 0

    def finished(job: Job, seconds: float) -> None:
        nonlocal count
        count += 1
        say(f"[{count}/{todo}] {job.label}: {summary_line(job)} ({seconds:.0f} s)")
        bar.update(1)

    def failed(job: Job, reason: str) -> None:
        nonlocal count
        count += 1
        say(f"[{count}/{todo}] {job.label}: FAILED: {reason}")
        bar.update(1)

    try:
        return schedule(jobs, runner, parallel=parallel, on_finish=finished, on_fail=failed)
    finally:
        bar.close()
