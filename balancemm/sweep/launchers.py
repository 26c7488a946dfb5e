"""Launchers run sweep jobs; one scheduler decides what runs, what is retried and what failed.

A job is always trained by the worker process ``python -m balancemm.sweep.worker JOB.json``, which
holds the job's lock while it trains. A launcher only decides where that process runs:

* ``local``: worker processes on this machine, N at a time; on GPUs each worker is handed one GPU
  through its own ``CUDA_VISIBLE_DEVICES`` (several workers share a GPU when a job asks for a fraction);
* ``ray``: one Ray task per job on a Ray cluster (``ray.init(address=...)``), each running the same
  worker command on whichever node Ray picks, with the job's GPU share as a Ray resource (Ray then sets
  ``CUDA_VISIBLE_DEVICES`` itself). The sweep root must then be on a filesystem every node sees (the run
  directories are written there and the driver reads them); the job description travels with the task.

Workers of a CPU sweep see no GPU at all (``CUDA_VISIBLE_DEVICES=""``), so ``--device cpu`` never
touches one, whatever the machine has.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from balancemm import device as devices
from balancemm.errors import ConfigError
from balancemm.layout import BUSY, RunFiles, read_json, standard_eval, write_json
from balancemm.sweep.spec import Job

# How long a Ray head given as host:port may take to accept a TCP connection. ray.init itself retries an
# unreachable address for minutes, printing its log lines meanwhile.
CONNECT_TIMEOUT_S = 5.0
ERROR_PREFIX = "balancemm: error: "  # how a worker prints a user error (see balancemm.sweep.worker)


def default_parallel(threads_per_job: int = 1) -> int:
    """Jobs at once: one per available CPU core divided by the torch threads each job uses."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(threads_per_job, 1))


def is_done(job: Job) -> bool:
    run = RunFiles(job.out)
    finished = run.done.is_file() and run.summary.is_file()
    if not finished or not (job.probe or job.robustness):
        return finished
    # Probes and evaluations under corruptions are asked for multimodal runs only (see the worker).
    if len(read_json(run.summary)["modalities"]) == 1:
        return True
    return (not job.probe or run.probe.is_file()) and (not job.robustness or standard_eval(run) is not None)


@dataclass
class Outcome:
    """How a sweep went: jobs found finished, jobs finished now, jobs that failed (with the reason)."""

    total: int
    skipped: int = 0
    finished: list[Job] = field(default_factory=list)
    failed: list[tuple[Job, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Placement:
    """Where a sweep's jobs train.

    ``device`` is what each worker tells its trainer: ``cpu``, or ``cuda`` (the one GPU its
    ``CUDA_VISIBLE_DEVICES`` names). ``per_job`` is the share of a GPU each job takes (0 on the CPU);
    ``gpus`` are the physical GPU ids the local launcher hands out (Ray hands out its own).
    """

    device: str = "cpu"
    per_job: float = 0.0
    gpus: tuple[str, ...] = ()

    @property
    def jobs_per_gpu(self) -> int:
        """How many jobs share one GPU (0 on the CPU)."""
        return math.floor(1 / self.per_job) if self.per_job else 0

    def describe(self) -> str:
        """Where the jobs train, for the sweep's first line."""
        if self.device == "cpu":
            return "the CPU"
        where = f"GPU {','.join(self.gpus)}" if self.gpus else "the cluster's GPUs"
        return f"{where}, {self.per_job:g} GPU per job"


def _gpu_share(gpus_per_job: float | None, on_gpu: bool, why_cpu: str) -> float:
    """The GPU share of each job: ``--gpus-per-job`` checked, 1 by default on GPUs, 0 on the CPU."""
    if gpus_per_job is not None and gpus_per_job > 1:
        raise ConfigError(
            f"--gpus-per-job {gpus_per_job:g}: a job trains on one GPU, so at most 1 for now (multi-GPU jobs "
            "will come with DDP training); a fraction shares a GPU, e.g. 0.5 = two jobs per GPU"
        )
    if gpus_per_job is not None and not gpus_per_job > 0:
        raise ConfigError(f"--gpus-per-job must be above 0 and at most 1 (0.5: two jobs per GPU), not {gpus_per_job:g}")
    if not on_gpu:
        if gpus_per_job is not None:
            raise ConfigError(f"--gpus-per-job is for jobs on GPUs, but this sweep runs on the CPU ({why_cpu})")
        return 0.0
    return 1.0 if gpus_per_job is None else gpus_per_job


def _physical_gpus(count: int) -> tuple[str, ...]:
    # The parent's CUDA_VISIBLE_DEVICES already renumbers its GPUs from 0: a worker must be handed the
    # parent's entry (a physical index or a UUID), not the renumbered index, to land on that GPU.
    parent = os.environ.get("CUDA_VISIBLE_DEVICES")
    if parent is None:
        return tuple(str(i) for i in range(count))
    return tuple(entry.strip() for entry in parent.split(",") if entry.strip())[:count]


def local_placement(device: str, gpus_per_job: float | None) -> Placement:
    """Placement on this machine: ``auto`` is every visible GPU (else the CPU), ``cuda:N`` GPU N alone."""
    dev = devices.resolve_device(device)
    why_cpu = "--device cpu" if device.strip().lower() == "cpu" else "no GPU is visible"
    share = _gpu_share(gpus_per_job, dev.type == "cuda", why_cpu)
    if dev.type == "cpu":
        return Placement()
    gpus = _physical_gpus(devices.visible_gpus())
    return Placement("cuda", share, gpus if dev.index is None else (gpus[dev.index],))


def ray_placement(device: str, gpus_per_job: float | None, cluster_gpus: float) -> Placement:
    """Placement on a Ray cluster: ``auto`` uses GPUs when the cluster has any, whatever the driver has."""
    name = device.strip().lower()
    if name.startswith("cuda:"):
        raise ConfigError(
            f"--device {device} names a GPU of one machine; with --launcher ray use --device cuda (Ray picks the GPUs)"
        )
    if name not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"unknown device {device!r}; use auto, cpu or cuda with --launcher ray")
    if name == "cuda" and not cluster_gpus:
        raise ConfigError("--device cuda was asked for but the Ray cluster has no GPU; use --device cpu or auto")
    on_gpu = name == "cuda" or (name == "auto" and cluster_gpus > 0)
    share = _gpu_share(gpus_per_job, on_gpu, "--device cpu" if name == "cpu" else "the Ray cluster has no GPU")
    return Placement("cuda", share) if on_gpu else Placement()


def _host_port(address: str) -> tuple[str, int] | None:
    """The host and port of a Ray address (``host:port``, ``[v6]:port`` or ``ray://host:port``), or None for
    the addresses Ray resolves itself (``auto``, ``local``, a bare host)."""
    rest = address.strip().removeprefix("ray://")
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def check_address(launcher: str, address: str | None, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Refuse an address the launcher would ignore (``local``) or cannot reach: a ``host:port`` Ray address
    must accept a TCP connection within ``timeout_s``."""
    if address is None:
        return
    if launcher != "ray":
        raise ConfigError(f"--address {address} is the address of a Ray cluster; add --launcher ray or drop --address")
    target = _host_port(address)
    if target is None:
        return
    try:
        with socket.create_connection(target, timeout=timeout_s):
            pass
    except OSError as exc:
        reason = f"no answer in {timeout_s:g} s" if isinstance(exc, TimeoutError) else exc.strerror or str(exc)
        raise ConfigError(
            f"cannot reach the Ray cluster at {address} ({reason}); check the head node's address and port, "
            "and that the cluster is up (`ray status` on the head)"
        ) from None


def job_payload(job: Job, device: str, concurrent_jobs: int | None = None) -> dict[str, Any]:
    """What a worker needs: the resolved config, the run directory, whether to probe, the device to train on,
    and how many jobs may share its machine (recorded with its times; None where a cluster decides)."""
    return {
        "config": job.config.to_dict(),
        "out": str(job.out),
        "probe": job.probe,
        "robustness": job.robustness,
        "device": device,
        "concurrent_jobs": concurrent_jobs,
    }


def _worker_env(threads: int, gpus: str | None) -> dict[str, str]:
    """The worker's environment; ``gpus`` becomes its ``CUDA_VISIBLE_DEVICES`` (None: keep the inherited one)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpus
    return env


def run_worker(payload: dict[str, Any], threads: int) -> tuple[int, str]:
    """Run one worker process to the end; its exit code and the last line it printed.

    A GPU job keeps the ``CUDA_VISIBLE_DEVICES`` Ray set for this task; a CPU job gets none, since Ray
    leaves the variable alone for tasks that ask for no GPU.
    """
    gpus = None if payload["device"] == "cuda" else ""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "job.json"
        write_json(path, payload)
        cmd = [sys.executable, "-m", "balancemm.sweep.worker", str(path)]
        res = subprocess.run(cmd, capture_output=True, text=True, env=_worker_env(threads, gpus))
    lines = (res.stderr or res.stdout).strip().splitlines()
    return res.returncode, lines[-1] if lines else ""


class Launcher(Protocol):
    parallel: int | None  # jobs at once; None: every job (the launcher queues them itself)
    placement: Placement

    def start(self, job: Job) -> None: ...
    def wait(self) -> list[tuple[Job, int, str]]: ...  # jobs that ended: exit code, last output line
    def stop(self) -> None: ...


class LocalLauncher:
    """Worker processes on this machine; their output goes to ``<root>/.sweep/logs``.

    On GPUs each GPU takes ``floor(1 / per_job)`` jobs at once and every worker is handed the GPU that
    runs the fewest, so ``parallel`` defaults to GPUs × jobs per GPU and may not exceed it. On the CPU
    it defaults to one job per core.
    """

    def __init__(
        self, root: Path, threads: int, placement: Placement, parallel: int | None = None, poll_s: float = 0.2
    ) -> None:
        self.root, self.threads, self.placement, self.poll_s = root, threads, placement, poll_s
        self.logs = root / ".sweep" / "logs"
        self.load = dict.fromkeys(placement.gpus, 0)  # jobs running on each GPU
        fit = len(placement.gpus) * placement.jobs_per_gpu
        if placement.gpus and parallel is not None and parallel > fit:
            raise ConfigError(
                f"--jobs {parallel}, but only {fit} jobs fit at once ({len(placement.gpus)} GPU(s) × "
                f"{placement.jobs_per_gpu} per GPU at --gpus-per-job {placement.per_job:g}); lower --gpus-per-job "
                "to put more jobs on each GPU"
            )
        self.parallel: int | None = parallel or (fit if placement.gpus else default_parallel(threads))
        self.running: dict[subprocess.Popen[bytes], tuple[Job, Path, str | None]] = {}

    def start(self, job: Job) -> None:
        name = job.config.digest()[:16]
        path = self.root / ".sweep" / "jobs" / f"{name}.json"
        write_json(path, job_payload(job, self.placement.device, self.parallel))
        log = self.logs / f"{name}.log"
        gpu = min(self.load, key=self.load.__getitem__) if self.load else None
        with open(log, "wb") as fh:
            cmd = [sys.executable, "-m", "balancemm.sweep.worker", str(path)]
            env = _worker_env(self.threads, "" if gpu is None else gpu)
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        if gpu is not None:
            self.load[gpu] += 1
        self.running[proc] = (job, log, gpu)

    def wait(self) -> list[tuple[Job, int, str]]:
        time.sleep(self.poll_s)
        ended = []
        for proc in [p for p in self.running if p.poll() is not None]:
            job, log, gpu = self.running.pop(proc)
            if gpu is not None:
                self.load[gpu] -= 1
            lines = log.read_text(errors="replace").strip().splitlines()
            ended.append((job, proc.returncode, lines[-1] if lines else ""))
        return ended

    def stop(self) -> None:
        for proc in self.running:
            proc.send_signal(signal.SIGINT)  # the trainer stops and leaves its run resumable
        for proc in self.running:
            proc.wait()


class RayLauncher:
    """One Ray task per job (``num_cpus`` = the job's threads, ``num_gpus`` = its GPU share), on the
    cluster at ``address``."""

    def __init__(
        self,
        address: str | None,
        threads: int,
        device: str = "auto",
        gpus_per_job: float | None = None,
        parallel: int | None = None,
    ) -> None:
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
        self.placement = ray_placement(device, gpus_per_job, float(ray.cluster_resources().get("GPU", 0)))
        self.options: dict[str, Any] = {"num_cpus": threads, "num_gpus": self.placement.per_job}
        self.task = ray.remote(**self.options)(run_worker)
        self.threads, self.parallel = threads, parallel
        self.running: dict[Any, Job] = {}

    def start(self, job: Job) -> None:
        self.running[self.task.remote(job_payload(job, self.placement.device, None), self.threads)] = job

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
                    run = RunFiles(job.out)
                    if code == 0:
                        # The worker only exits 0 after writing the done marker: it wrote it where the
                        # driver cannot see it, i.e. on a node whose --root is a different filesystem.
                        reason = (
                            f"the worker finished, but its run directory {job.out} is not visible from the driver: "
                            "put --root on a filesystem every node sees (NFS, Lustre, …)"
                        )
                    elif run.failed.is_file():
                        reason = run.failed.read_text().strip()
                    else:
                        # The worker's own one-line error, without its prefix: the sweep adds its own.
                        reason = line.removeprefix(ERROR_PREFIX) or f"exit code {code}"
                    outcome.failed.append((job, reason))
                    if on_fail is not None:
                        on_fail(job, reason)
    except KeyboardInterrupt:
        launcher.stop()
        raise
    return outcome


def make_launcher(
    name: str,
    root: Path,
    threads: int,
    address: str | None = None,
    *,
    device: str = "auto",
    gpus_per_job: float | None = None,
    parallel: int | None = None,
) -> Launcher:
    """The launcher called ``name`` (local or ray), its jobs placed on ``device``.

    A bad launcher, device, GPU share or number of jobs at once, an address the launcher would ignore or
    cannot reach, or an unwritable root, is one clear error; nothing is written before the launcher is known
    to be usable.
    """
    if name not in ("local", "ray"):
        raise ConfigError(f"unknown launcher {name!r}; valid: local, ray")
    check_address(name, address)
    launcher: Launcher
    if name == "local":
        launcher = LocalLauncher(root, threads, local_placement(device, gpus_per_job), parallel)
    else:
        launcher = RayLauncher(address, threads, device, gpus_per_job, parallel)
    try:
        # The job descriptions and worker logs of the local launcher; created only once the launcher
        # is usable (an unreachable Ray cluster or a refused device leaves nothing behind).
        (root / ".sweep" / "logs").mkdir(parents=True, exist_ok=True)
        (root / ".sweep" / "jobs").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = exc.strerror or exc
        raise ConfigError(f"cannot write the sweep under {root} ({reason}); choose another --root") from None
    return launcher


def summary_line(job: Job) -> str:
    """A one-line result of a finished job, from its summary."""
    s = read_json(RunFiles(job.out).summary)
    imbalance = "—" if s.get("imbalance") is None else f"{100 * s['imbalance']:.1f}"
    return f"test acc {100 * s['test']['accuracy']:.2f}  imbalance {imbalance}  → {job.out}"
