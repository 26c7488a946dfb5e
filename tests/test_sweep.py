"""Sweeps: the grid, hash-named jobs, idempotent reruns, locking, failures, and surviving SIGKILL."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from balancemm.api import default_out
from balancemm.config import resolve_config
from balancemm.engine.rundir import write_json
from balancemm.errors import ConfigError
from balancemm.methods import list_methods
from balancemm.sweep import SweepSpec, plan_jobs, run_sweep, worker
from balancemm.sweep.launchers import Placement, RayLauncher, job_payload

QUICK = ["train.epochs=1"]


def bmm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "balancemm", *args], capture_output=True, text=True)


def test_grid_expands_methods_modalities_seeds_and_names_jobs_by_config_hash(tmp_path: Path) -> None:
    spec = SweepSpec.from_mapping({"methods": "baseline,unimodal", "seeds": [0, 3], "sets": QUICK})
    jobs = plan_jobs(spec, tmp_path)
    labels = [j.label for j in jobs]
    assert labels == [
        "baseline embedded seed 0",
        "baseline embedded seed 3",
        "unimodal(audio) embedded seed 0",
        "unimodal(audio) embedded seed 3",
        "unimodal(visual) embedded seed 0",
        "unimodal(visual) embedded seed 3",
    ]
    expected = resolve_config("baseline", "embedded", sets=QUICK, seed=3)
    assert jobs[1].out == default_out(expected, tmp_path)  # the directory `balancemm train` would use


def test_trials_draw_the_same_number_per_method_reproducibly(tmp_path: Path) -> None:
    raw = {
        "methods": ["ogm_ge", "mmcosine", "baseline"],
        "seeds": 2,
        "trials": 3,
        "search": {"ogm_ge": {"alpha": [0.1, 0.3, 0.5, 0.8]}, "mmcosine": {"scale": [5.0, 10.0, 20.0]}},
    }
    jobs = plan_jobs(SweepSpec.from_mapping(raw), tmp_path)
    per_method: dict[str, set[int]] = {}
    for j in jobs:
        per_method.setdefault(j.config.run.method, set()).add(j.trial)
    assert per_method == {"ogm_ge": {0, 1, 2}, "mmcosine": {0, 1, 2}, "baseline": {0}}  # references: defaults only
    assert len(jobs) == (3 + 3 + 1) * 2
    again = plan_jobs(SweepSpec.from_mapping(raw), tmp_path)
    assert [j.out for j in again] == [j.out for j in jobs]
    alphas = {j.config.method.alpha for j in jobs if j.config.run.method == "ogm_ge"}  # type: ignore[attr-defined]
    assert len(alphas) == 3 and 0.1 in alphas  # the default plus two distinct draws
    scales = {j.config.method.scale for j in jobs if j.config.run.method == "mmcosine"}  # type: ignore[attr-defined]
    assert scales == {5.0, 10.0, 20.0}  # 10 is the default, so the draws come from the other points


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"method": ["baseline"]}, "unknown key 'method'"),
        ({"seeds": 0}, "seeds must be >= 1"),
        ({"methods": ["ogm_ge"], "trials": 2}, "no search space for ogm_ge"),
        ({"methods": ["ogm_ge"], "trials": 3, "search": {"ogm_ge": {"alpha": [0.1, 0.2]}}}, "has 1 points besides"),
        ({"methods": ["nope"]}, "unknown method 'nope'"),
    ],
)
def test_bad_sweeps_are_refused_with_one_clear_message(tmp_path: Path, raw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        plan_jobs(SweepSpec.from_mapping(raw), tmp_path)


def test_bench_is_every_method_baseline_and_unimodal_with_three_seeds(tmp_path: Path) -> None:
    res = bmm("bench", "--root", str(tmp_path / "bench"), "--dry-run")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    expected = (len(list_methods()) - 1 + 2) * 3  # every method but unimodal, plus unimodal per modality
    assert len(lines) == expected and all(line.startswith("todo") for line in lines)
    assert sum("unimodal(visual)" in line for line in lines) == 3 and sum(" agm " in line for line in lines) == 3


def test_cli_reads_a_sweep_file_and_checks_its_keys(tmp_path: Path) -> None:
    spec = tmp_path / "sweep.yaml"
    spec.write_text("methods: [baseline, ogm_ge]\nseeds: 2\ntrials: 2\nsearch:\n  ogm_ge: {alpha: [0.3, 0.5]}\n")
    res = bmm("sweep", str(spec), "--root", str(tmp_path / "r"), "--dry-run")
    assert res.returncode == 0, res.stderr
    assert len(res.stdout.splitlines()) == 2 + 2 * 2  # baseline × 2 seeds, ogm_ge × 2 trials × 2 seeds
    spec.write_text("methods: [baseline]\nepochs: 3\n")
    res = bmm("sweep", str(spec), "--root", str(tmp_path / "r"))
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "unknown key 'epochs'" in res.stderr


def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "sweep"
    res = bmm("sweep", "--methods", "baseline,nope", "--root", str(root))
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "unknown method 'nope'" in res.stderr
    assert not root.exists()


def test_an_unwritable_root_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    res = bmm("sweep", "--methods", "baseline", "--seeds", "1", "--root", str(blocker / "sweep"), "--quiet")
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "cannot write the sweep under" in res.stderr


def test_rerun_skips_finished_jobs_and_counts_each_once(tmp_path: Path) -> None:
    jobs = plan_jobs(SweepSpec.from_mapping({"methods": ["baseline"], "seeds": 2, "sets": QUICK}), tmp_path)
    first = run_sweep(jobs, tmp_path, parallel=2, progress=False)
    assert len(first.finished) == 2 and first.skipped == 0 and not first.failed
    second = run_sweep(jobs, tmp_path, parallel=2, progress=False)
    assert not second.finished and second.skipped == 2
    dirs = sorted(p.name for p in tmp_path.iterdir() if (p / "config.json").is_file())
    assert dirs == sorted(j.out.name for j in jobs)


def test_probes_are_written_for_multimodal_runs_when_asked(tmp_path: Path) -> None:
    spec = SweepSpec.from_mapping({"methods": ["baseline", "unimodal"], "seeds": 1, "sets": QUICK, "probe": True})
    jobs = plan_jobs(spec, tmp_path)
    run_sweep(jobs, tmp_path, parallel=2, progress=False)
    probed = {j.label: json.loads((j.out / "probe.json").read_text()) for j in jobs if (j.out / "probe.json").exists()}
    assert list(probed) == ["baseline embedded seed 0"]
    assert set(probed["baseline embedded seed 0"]) == {"audio", "visual"}
    assert 0 <= probed["baseline embedded seed 0"]["visual"]["test_accuracy"] <= 1


def test_failed_jobs_are_reported_and_the_cli_exits_nonzero(tmp_path: Path) -> None:
    root = tmp_path / "sweep"
    res = bmm(
        "sweep", "--methods", "baseline", "--seeds", "1", "--root", str(root), "--quiet",
        "--set", "train.epochs=1", "train.optimizer.lr=1e12",
    )  # fmt: skip
    assert res.returncode == 1
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith("balancemm: error: 1 of 1 jobs failed") and "loss term 'ce' became" in line


def test_a_locked_job_is_left_to_the_process_holding_it(tmp_path: Path) -> None:
    (job,) = plan_jobs(SweepSpec.from_mapping({"methods": ["baseline"], "seeds": 1, "sets": QUICK}), tmp_path)
    lock = os.open(job.out.parent / f".{job.out.name}.lock", os.O_CREAT | os.O_RDWR)
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        write_json(tmp_path / "job.json", job_payload(job, "cpu"))
        assert worker.main([str(tmp_path / "job.json")]) == worker.BUSY
        assert not job.out.exists()
    finally:
        os.close(lock)


def _records(run: Path) -> list[tuple[str, int]]:
    lines = (run / "results.jsonl").read_text().splitlines()
    return [(r["split"], r["epoch"]) for r in map(json.loads, lines)]


def test_sweep_killed_with_sigkill_and_restarted_finishes_every_job_exactly_once(tmp_path: Path) -> None:
    root = tmp_path / "sweep"
    args = ["sweep", "--methods", "baseline,ogm_ge", "--seeds", "2", "--root", str(root), "--jobs", "2", "--quiet"]
    args += ["--set", "train.epochs=3"]
    proc = subprocess.Popen([sys.executable, "-m", "balancemm", *args], start_new_session=True)
    deadline = time.monotonic() + 120
    while not any(root.glob("*/done")) and time.monotonic() < deadline:
        time.sleep(0.2)
    while not any(root.glob("*/checkpoints/last.pt")) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its workers, mid-run
    proc.wait()
    finished_before = {p.parent.name for p in root.glob("*/done")}
    assert 1 <= len(finished_before) < 4
    res = bmm(*args)
    assert res.returncode == 0, res.stderr
    assert f"{4 - len(finished_before)} trained, {len(finished_before)} already finished" in res.stdout
    runs = [p.parent for p in root.glob("*/config.json")]
    assert len(runs) == 4
    for run in runs:
        assert (run / "done").is_file() and (run / "summary.json").is_file()
        assert _records(run) == [
            ("val", 0),
            ("val", 1),
            ("val", 2),
            ("test", json.loads((run / "summary.json").read_text())["selected_epoch"]),
        ]


def test_ray_launcher_runs_the_sweep_on_a_real_local_ray_instance(tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    jobs = plan_jobs(SweepSpec.from_mapping({"methods": ["baseline"], "seeds": 2, "sets": QUICK}), tmp_path)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        first = run_sweep(jobs, tmp_path, launcher="ray", progress=False)
        assert len(first.finished) == 2 and not first.failed
        assert all((j.out / "done").is_file() for j in jobs)
        again = run_sweep(jobs, tmp_path, launcher="ray", progress=False)
        assert again.skipped == 2 and not again.finished
        # Without GPUs in the cluster, auto means the CPU, and asking for GPUs is refused in one line.
        assert RayLauncher(None, 1).placement == Placement()
        with pytest.raises(ConfigError, match="the Ray cluster has no GPU"):
            RayLauncher(None, 1, device="cuda")
        with pytest.raises(ConfigError, match=r"runs on the CPU \(the Ray cluster has no GPU\)"):
            RayLauncher(None, 1, gpus_per_job=0.5)
    finally:
        ray.shutdown()
