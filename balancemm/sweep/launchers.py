"""Launchers run sweep jobs; one scheduler decides what runs, what is retried and what failed.

A job is always trained by the worker process ``python -m balancemm.sweep.worker JOB.json``, which
holds the job's lock while it trains. A launcher only decides where that process runs:

* ``local``: worker processes on this machine, N at a time;
* ``ray``: one Ray task per job on a Ray cluster (``ray.init(address=...)``), each running the same
  worker command on whichever node Ray picks. The sweep root must then be on a filesystem every node
  sees (the run directories are written there); the job description travels with the task.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

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
    finished = run.done.is_file() and run.summary.is_file()
    if finished and job.probe:
        # Probes are asked for multimodal runs only (see the worker).
        return (run.path / "probe.json").is_file() or len(read_json(run.summary)["modalities"]) == 1
    return finished


@dataclass
class Outcome:
    """How a sweep went: jobs found finished, jobs finished now, jobs that failed (with the reason)."""

    total: int
    skipped: int = 0
    finished: list[Job] = field(default_factory=list)
    failed: list[tuple[Job, str]] = field(default_factory=list)


def job_payload(job: Job) -> dict[str, Any]:
    """What a worker needs: the resolved config, the run directory, whether to probe the encoders."""
    return {"config": job.config.to_dict(), "out": str(job.out), "probe": job.probe}


def _worker_env(threads: int) -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))


def run_worker(payload: dict[str, Any], threads: int) -> tuple[int, str]:
    """Run one worker process to the end; its exit code and the last line it printed."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "job.json"
        write_json(path, payload)
        cmd = [sys.executable, "-m", "balancemm.sweep.worker", str(path)]
        res = subprocess.run(cmd, capture_output=True, text=True, env=_worker_env(threads))
    lines = (res.stderr or res.stdout).strip().splitlines()
    return res.returncode, lines[-1] if lines else ""


class Launcher(Protocol):
    def start(self, job: Job) -> None: ...
    def wait(self) -> list[tuple[Job, int, str]]: ...  # jobs that ended: exit code, last output line
    def stop(self) -> None: ...


class LocalLauncher:
    """Worker processes on this machine; their output goes to ``<root>/.sweep/logs``."""

    def __init__(self, root: Path, threads: int, poll_s: float = 0.2) -> None:
        self.root, self.threads, self.poll_s = root, threads, poll_s
        self.logs = root / ".sweep" / "logs"
        self.running: dict[subprocess.Popen[bytes], tuple[Job, Path]] = {}

    def start(self, job: Job) -> None:
        name = job.config.digest()[:16]
        path = self.root / ".sweep" / "jobs" / f"{name}.json"
        write_json(path, job_payload(job))
        log = self.logs / f"{name}.log"
        with open(log, "wb") as fh:
            cmd = [sys.executable, "-m", "balancemm.sweep.worker", str(path)]
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=_worker_env(self.threads))
        self.running[proc] = (job, log)

    def wait(self) -> list[tuple[Job, int, str]]:
        time.sleep(self.poll_s)
        ended = []
        for proc in [p for p in self.running if p.poll() is not None]:
            job, log = self.running.pop(proc)
            lines = log.read_text(errors="replace").strip().splitlines()
            ended.append((job, proc.returncode, lines[-1] if lines else ""))
        return ended

    def stop(self) -> None:
        for proc in self.running:
            proc.send_signal(2)  # SIGINT: the trainer stops and leaves its run resumable
        for proc in self.running:
            proc.wait()


class RayLauncher:
    """One Ray task per job (``num_cpus`` = the job's threads), on the cluster at ``address``."""

    def __init__(self, address: str | None, threads: int) -> None:
        try:
            import ray
        except ImportError:
            raise ConfigError("--launcher ray needs Ray: pip install 'balancemm[ray]'") from None
        self.ray = ray
        if not ray.is_initialized():
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise ConfigError(f"cannot connect to the Ray cluster at {address!r} ({exc})") from None
        self.task = ray.remote(num_cpus=threads)(run_worker)
        self.threads = threads
        self.running: dict[Any, Job] = {}

    def start(self, job: Job) -> None:
        self.running[self.task.remote(job_payload(job), self.threads)] = job

    def wait(self) -> list[tuple[Job, int, str]]:
        ready, _ = self.ray.wait(list(self.running), num_returns=1, timeout=1.0)
        ended = []
        for ref in ready:
            job = self.running.pop(ref)
            code, line = self.ray.get(ref)
            ended.append((job, code, line))
        return ended

    def stop(self) -> None:
        for ref in self.running:
            self.ray.cancel(ref)


def schedule(
    jobs: Sequence[Job],
    launcher: Launcher,
    *,
    parallel: int,
    on_finish: Callable[[Job, float], None] | None = None,
    on_fail: Callable[[Job, str], None] | None = None,
) -> Outcome:
    """Train every job not finished yet, at most ``parallel`` at a time.

    A job whose worker finds it locked (another live process trains it, e.g. a worker left by a killed
    sweep) goes back to the queue and is retried until that process is done. Interrupting (Ctrl-C)
    stops the workers, which leave their runs resumable, and re-raises.
    """
    outcome = Outcome(total=len(jobs))
    queue = deque(j for j in jobs if not is_done(j))
    outcome.skipped = len(jobs) - len(queue)
    started: dict[Path, float] = {}
    try:
        while queue or started:
            while queue and len(started) < parallel:
                job = queue.popleft()
                launcher.start(job)
                started[job.out] = time.perf_counter()
            for job, code, line in launcher.wait():
                seconds = time.perf_counter() - started.pop(job.out)
                if code == 0 and is_done(job):
                    outcome.finished.append(job)
                    if on_finish is not None:
                        on_finish(job, seconds)
                elif code == BUSY:
                    queue.append(job)  # trained by another live process; look again later
                    time.sleep(0.5)
                else:
                    run = RunDir(job.out)
                    reason = run.failed.read_text().strip() if run.failed.is_file() else line or f"exit code {code}"
                    outcome.failed.append((job, reason))
                    if on_fail is not None:
                        on_fail(job, reason)
    except KeyboardInterrupt:
        launcher.stop()
        raise
    return outcome


def make_launcher(name: str, root: Path, threads: int, address: str | None = None) -> Launcher:
    """The launcher called ``name`` (local or ray); a bad launcher or an unwritable root is one clear error."""
    if name not in ("local", "ray"):
        raise ConfigError(f"unknown launcher {name!r}; valid: local, ray")
    launcher: Launcher = LocalLauncher(root, threads) if name == "local" else RayLauncher(address, threads)
    try:
        # The job descriptions and worker logs of the local launcher; created only once the launcher
        # is usable (an unreachable Ray cluster leaves nothing behind).
        (root / ".sweep" / "logs").mkdir(parents=True, exist_ok=True)
        (root / ".sweep" / "jobs").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = exc.strerror or exc
        raise ConfigError(f"cannot write the sweep under {root} ({reason}); choose another --root") from None
    return launcher


def summary_line(job: Job) -> str:
    """A one-line result of a finished job, from its summary."""
    s = read_json(RunDir(job.out).summary)
    imbalance = "—" if s.get("imbalance") is None else f"{100 * s['imbalance']:.1f}"
    return f"test acc {100 * s['test']['accuracy']:.2f}  imbalance {imbalance}  → {job.out}"
