"""Sweeps on GPUs: which GPU each worker gets, how many run at once, refused settings, Ray's GPU requests.

No GPU is needed: ``balancemm.device.visible_gpus`` is faked, and the local launcher's worker processes
are replaced by stand-ins that record the environment they were started with and finish their job.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from balancemm import cli
from balancemm import device as devices
from balancemm.errors import ConfigError
from balancemm.layout import RunFiles, write_json
from balancemm.sweep import SweepSpec, plan_jobs, run_sweep, worker
from balancemm.sweep import launchers as launchers_module
from balancemm.sweep.launchers import Placement, RayLauncher, default_parallel, job_payload, make_launcher, schedule
from balancemm.sweep.spec import Job
from tests.conftest import ScriptedLauncher

QUICK = ["train.epochs=1"]
SUMMARY = {"test": {"accuracy": 0.5}, "imbalance": None, "modalities": ["audio", "visual"]}


class FakeWorkers:
    """Stands in for ``subprocess.Popen`` in the launcher: each worker records its GPU and payload, is
    still running at its first poll and has finished its job (done marker, summary) at the second."""

    def __init__(self) -> None:
        self.gpus: list[str | None] = []  # CUDA_VISIBLE_DEVICES of every worker started, in order
        self.devices: list[str] = []  # the device each payload named
        self.running: Counter[str | None] = Counter()
        self.most: Counter[str | None] = Counter()  # the most workers that ever ran at once, per GPU

    def __call__(self, cmd: list[str], *, env: dict[str, str], **_: Any) -> FakeWorker:
        payload = json.loads(Path(cmd[-1]).read_text())
        gpu = env.get("CUDA_VISIBLE_DEVICES")
        self.gpus.append(gpu)
        self.devices.append(payload["device"])
        self.running[gpu] += 1
        self.most[gpu] = max(self.most[gpu], self.running[gpu])
        return FakeWorker(self, gpu, Path(payload["out"]))


class FakeWorker:
    def __init__(self, pool: FakeWorkers, gpu: str | None, out: Path) -> None:
        self.pool, self.gpu, self.out = pool, gpu, out
        self.polls = 0
        self.returncode: int | None = None

    def poll(self) -> int | None:
        self.polls += 1
        if self.polls >= 2 and self.returncode is None:
            run = RunFiles(self.out)
            self.out.mkdir(parents=True, exist_ok=True)
            write_json(run.summary, SUMMARY)
            run.done.touch()
            self.pool.running[self.gpu] -= 1
            self.returncode = 0
        return self.returncode


@pytest.fixture
def workers(monkeypatch: pytest.MonkeyPatch) -> FakeWorkers:
    fake = FakeWorkers()
    monkeypatch.setattr(launchers_module.subprocess, "Popen", fake)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return fake


def fake_gpus(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    monkeypatch.setattr(devices, "visible_gpus", lambda: count)


def baseline_jobs(root: Path, seeds: int) -> list[Job]:
    return plan_jobs(SweepSpec.from_mapping({"methods": ["baseline"], "seeds": seeds, "sets": QUICK}), root)


@pytest.mark.parametrize(("gpus_per_job", "per_gpu"), [(None, 1), (1.0, 1), (0.5, 2)])
def test_jobs_spread_over_the_gpus_and_never_overfill_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: FakeWorkers, gpus_per_job: float | None, per_gpu: int
) -> None:
    fake_gpus(monkeypatch, 2)
    jobs = baseline_jobs(tmp_path, 4 * per_gpu)
    outcome = run_sweep(jobs, tmp_path, gpus_per_job=gpus_per_job, progress=False)
    assert len(outcome.finished) == len(jobs) and not outcome.failed
    assert Counter(workers.gpus) == {"0": 2 * per_gpu, "1": 2 * per_gpu}
    assert workers.most == {"0": per_gpu, "1": per_gpu}  # each GPU full, never fuller
    assert set(workers.devices) == {"cuda"}  # a worker sees its one GPU as cuda


@pytest.mark.parametrize(
    ("parent", "device", "expected"),
    [
        ("5,7", "auto", {"5", "7"}),  # the parent's entries are the physical GPUs to hand out
        ("GPU-aa, GPU-bb", "cuda", {"GPU-aa", "GPU-bb"}),
        (None, "cuda:1", {"1"}),
        ("5,7", "cuda:1", {"7"}),  # cuda:1 is the parent's second GPU
    ],
)
def test_workers_get_the_physical_gpu_ids(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    workers: FakeWorkers,
    parent: str | None,
    device: str,
    expected: set[str],
) -> None:
    fake_gpus(monkeypatch, 2)
    if parent is not None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", parent)
    outcome = run_sweep(baseline_jobs(tmp_path, 2), tmp_path, device=device, progress=False)
    assert len(outcome.finished) == 2
    assert set(workers.gpus) == expected and set(workers.devices) == {"cuda"}
    assert max(workers.most.values()) == 1


@pytest.mark.parametrize(("gpus", "device"), [(2, "cpu"), (0, "auto")])
def test_cpu_sweeps_hide_the_gpus_from_their_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: FakeWorkers, gpus: int, device: str
) -> None:
    fake_gpus(monkeypatch, gpus)
    outcome = run_sweep(baseline_jobs(tmp_path, 2), tmp_path, device=device, progress=False)
    assert len(outcome.finished) == 2
    assert workers.gpus == ["", ""] and workers.devices == ["cpu", "cpu"]


@pytest.mark.parametrize(
    ("gpus", "device", "gpus_per_job", "parallel"),
    [
        (2, "auto", None, 2),
        (2, "auto", 0.5, 4),
        (2, "cuda", 0.3, 6),  # floor(1 / 0.3) = 3 jobs per GPU
        (3, "cuda:2", 0.25, 4),
        (2, "cuda:0", None, 1),
        (0, "auto", None, default_parallel()),
        (2, "cpu", None, default_parallel()),
    ],
)
def test_default_jobs_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gpus: int, device: str, gpus_per_job: float | None, parallel: int
) -> None:
    fake_gpus(monkeypatch, gpus)
    launcher = make_launcher("local", tmp_path, 1, device=device, gpus_per_job=gpus_per_job)
    assert launcher.parallel == parallel


@pytest.mark.parametrize(
    ("gpus", "args", "message"),
    [
        (0, ["--device", "cuda"], "no CUDA GPU is available"),
        (0, ["--device", "cuda:0"], "no CUDA GPU is available"),
        (2, ["--device", "cuda:2"], "cuda:0 to cuda:1"),
        (2, ["--device", "tpu"], "unknown device 'tpu'"),
        (2, ["--device", "cpu", "--gpus-per-job", "0.5"], "runs on the CPU (--device cpu)"),
        (0, ["--gpus-per-job", "1"], "runs on the CPU (no GPU is visible)"),
        (2, ["--gpus-per-job", "0"], "must be above 0 and at most 1"),
        (2, ["--gpus-per-job", "-0.5"], "must be above 0 and at most 1"),
        (2, ["--gpus-per-job", "nan"], "must be above 0 and at most 1"),
        (2, ["--gpus-per-job", "2"], "multi-GPU jobs will come with DDP"),
        (2, ["--jobs", "3"], "only 2 jobs fit at once"),
        (2, ["--jobs", "5", "--gpus-per-job", "0.5"], "only 4 jobs fit at once"),
    ],
)
def test_bad_device_settings_are_one_line_and_write_nothing(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    workers: FakeWorkers,
    gpus: int,
    args: list[str],
    message: str,
) -> None:
    fake_gpus(monkeypatch, gpus)
    root = tmp_path / "sweep"
    code = cli.main(["sweep", "--methods", "baseline", "--seeds", "1", "--root", str(root), "--quiet", *args])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("balancemm: error: ") and message in err
    assert not root.exists() and not workers.gpus


@pytest.mark.parametrize(
    ("gpus", "args", "message"),
    [(0, ["--device", "cuda"], "no CUDA GPU is available"), (0, ["--gpus-per-job", "0.5"], "runs on the CPU")],
)
def test_bench_refuses_bad_device_settings_too(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    workers: FakeWorkers,
    gpus: int,
    args: list[str],
    message: str,
) -> None:
    fake_gpus(monkeypatch, gpus)
    root = tmp_path / "bench"
    code = cli.main(["bench", "--root", str(root), "--report", str(tmp_path / "report"), "--quiet", *args])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err
    assert not root.exists() and not (tmp_path / "report").exists()


def test_the_payload_names_the_device(tmp_path: Path) -> None:
    (job,) = baseline_jobs(tmp_path, 1)
    assert job_payload(job, "cuda")["device"] == "cuda"
    assert job_payload(job, "cpu")["device"] == "cpu"


@pytest.mark.parametrize(("named", "expected"), [("cuda", "cuda"), ("cpu", "cpu"), (None, "auto")])
def test_the_worker_hands_the_device_to_the_trainer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, named: str | None, expected: str
) -> None:
    seen: list[str] = []
    sharing: list[int | None] = []

    class FakeTrainer:
        def __init__(self, cfg: Any, out: Path, *, device: str, progress: bool, concurrent_jobs: int | None) -> None:
            seen.append(device)
            sharing.append(concurrent_jobs)

        def fit(self) -> dict[str, Any]:
            return {"modalities": ["audio"]}

    monkeypatch.setattr("balancemm.engine.trainer.Trainer", FakeTrainer)
    (job,) = baseline_jobs(tmp_path, 1)
    payload = job_payload(job, "cpu", concurrent_jobs=2)
    if named is None:
        del payload["device"]
    else:
        payload["device"] = named
    write_json(tmp_path / "job.json", payload)
    assert worker.main([str(tmp_path / "job.json")]) == 0
    assert seen == [expected] and sharing == [2]  # the summary records the jobs that shared the machine


def test_ray_tasks_keep_their_gpu_and_cpu_tasks_see_none(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, str]] = []

    def fake_run(cmd: list[str], *, env: dict[str, str], **_: Any) -> subprocess.CompletedProcess[str]:
        calls.append(env)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(launchers_module.subprocess, "run", fake_run)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")  # as Ray sets it in a task that asked for a GPU
    assert launchers_module.run_worker({"device": "cuda"}, 1) == (0, "")
    assert launchers_module.run_worker({"device": "cpu"}, 1) == (0, "")
    assert [env["CUDA_VISIBLE_DEVICES"] for env in calls] == ["3", ""]


def test_a_run_directory_the_driver_cannot_see_is_a_clear_failure(tmp_path: Path) -> None:
    (job,) = baseline_jobs(tmp_path, 1)
    # Its worker succeeds but writes on another node's disk: nothing appears under the driver's root.
    outcome = schedule([job], ScriptedLauncher(0), parallel=1)
    ((failed, reason),) = outcome.failed
    assert failed == job and not outcome.finished
    assert reason.startswith("the worker finished, but its run directory") and "not visible from the driver" in reason
    assert "put --root on a filesystem every node sees" in reason


@pytest.mark.skipif(torch.cuda.is_available(), reason="fakes GPUs in Ray; a real GPU would train the job")
def test_ray_tasks_ask_for_their_gpu_share_and_see_cuda_visible_devices(tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    try:
        launcher = RayLauncher(None, 1, device="auto", gpus_per_job=0.5)
        assert launcher.placement == Placement("cuda", 0.5) and launcher.parallel is None
        assert launcher.options == {"num_cpus": 1, "num_gpus": 0.5}

        def visible() -> str | None:
            return os.environ.get("CUDA_VISIBLE_DEVICES")

        assert ray.get(ray.remote(**launcher.options)(visible).remote()) in {"0", "1"}
        assert RayLauncher(None, 1, device="cpu").options == {"num_cpus": 1, "num_gpus": 0}
        with pytest.raises(ConfigError, match="with --launcher ray use --device cuda"):
            RayLauncher(None, 1, device="cuda:1")
        # A real job: its worker is told cuda, sees Ray's (fake) GPU id and finds no real GPU behind it.
        outcome = run_sweep(baseline_jobs(tmp_path, 1), tmp_path, launcher="ray", progress=False)
        ((_, reason),) = outcome.failed
        assert "--device cuda was asked for but no CUDA GPU is available" in reason
    finally:
        ray.shutdown()
