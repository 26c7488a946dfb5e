"""Run sweep jobs as local worker processes, N at a time, with a progress line per finished job."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from balancemm.engine.rundir import RunDir, read_json, write_json
from balancemm.errors import ConfigError
from balancemm.sweep.spec import Job
from balancemm.sweep.worker import BUSY


def default_parallel(threads_per_job: int = 1) -> int:
    """Jobs at once: one per available CPU core divided by the torch threads each job uses."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(threads_per_job, 1))


def is_done(job: Job) -> bool:
    run = RunDir(job.out)
    return run.done.is_file() and run.summary.is_file()


@dataclass
class Outcome:
    """How a sweep went: jobs found finished, jobs finished now, jobs that failed (with the reason)."""

    total: int
    skipped: int = 0
    finished: list[Job] = field(default_factory=list)
    failed: list[tuple[Job, str]] = field(default_factory=list)


def job_file(job: Job, root: Path) -> Path:
    """The job's description for its worker (written atomically, named by the config hash)."""
    path = root / ".sweep" / "jobs" / f"{job.config.digest()[:16]}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"config": job.config.to_dict(), "out": str(job.out)})
    return path


def _reason(job: Job, log: Path) -> str:
    run = RunDir(job.out)
    if run.failed.is_file():
        return run.failed.read_text().strip()
    lines = log.read_text(errors="replace").strip().splitlines() if log.is_file() else []
    return lines[-1] if lines else "the worker exited without a reason"


def run_local(
    jobs: Sequence[Job],
    root: Path,
    *,
    parallel: int,
    threads_per_job: int = 1,
    on_finish: Callable[[Job, float], None] | None = None,
    on_fail: Callable[[Job, str], None] | None = None,
    poll_s: float = 0.2,
) -> Outcome:
    """Train every job not finished yet, ``parallel`` worker processes at a time.

    A job whose worker reports it locked (another live process trains it, e.g. a worker left by a
    killed sweep) goes back to the queue and is retried until that process is done. Interrupting
    (Ctrl-C) stops the workers, which leave their runs resumable, and re-raises.
    """
    outcome = Outcome(total=len(jobs))
    queue = deque(j for j in jobs if not is_done(j))
    outcome.skipped = len(jobs) - len(queue)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads_per_job), MKL_NUM_THREADS=str(threads_per_job))
    logs = root / ".sweep" / "logs"
    try:
        logs.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = exc.strerror or exc
        raise ConfigError(f"cannot write the sweep under {root} ({reason}); choose another --root") from None
    running: dict[subprocess.Popen[bytes], tuple[Job, float, Path]] = {}
    try:
        while queue or running:
            while queue and len(running) < parallel:
                job = queue.popleft()
                log = logs / f"{job.config.digest()[:16]}.log"
                with open(log, "wb") as fh:
                    cmd = [sys.executable, "-m", "balancemm.sweep.worker", str(job_file(job, root))]
                    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
                running[proc] = (job, time.perf_counter(), log)
            time.sleep(poll_s)
            for proc in [p for p in running if p.poll() is not None]:
                job, started, log = running.pop(proc)
                if proc.returncode == 0 and is_done(job):
                    outcome.finished.append(job)
                    if on_finish is not None:
                        on_finish(job, time.perf_counter() - started)
                elif proc.returncode == BUSY:
                    queue.append(job)  # trained by another live process; look again later
                    time.sleep(poll_s)
                else:
                    reason = _reason(job, log)
                    outcome.failed.append((job, reason))
                    if on_fail is not None:
                        on_fail(job, reason)
    except KeyboardInterrupt:
        for proc in running:
            proc.send_signal(2)  # SIGINT: the trainer stops and leaves its run resumable
        for proc in running:
            proc.wait()
        raise
    return outcome


def summary_line(job: Job) -> str:
    """A one-line result of a finished job, from its summary."""
    s = read_json(RunDir(job.out).summary)
    imbalance = "—" if s.get("imbalance") is None else f"{100 * s['imbalance']:.1f}"
    return f"test acc {100 * s['test']['accuracy']:.2f}  imbalance {imbalance}  → {job.out}"
