"""Sweeps: the grid, hash-named jobs, idempotent reruns, locking, failures, and surviving SIGKILL."""

from __future__ import annotations

import dataclasses
import fcntl
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from balancemm.cli import main
from balancemm.config import resolve_config
from balancemm.errors import ConfigError
from balancemm.layout import BUSY, default_out, write_json
from balancemm.methods import METHODS, list_methods
from balancemm.schema import parse
from balancemm.sweep import Job, SweepSpec, plan_jobs, run_sweep, worker
from balancemm.sweep.launchers import Placement, RayLauncher, job_payload
from tests.conftest import TinyDataset, build_method

QUICK = ["train.epochs=1"]
TUNED = [m for m in list_methods() if METHODS.entry(m).meta.get("group") != "reference"]


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


def test_a_sweep_file_search_replaces_the_default_space_and_draws_reproducibly(tmp_path: Path) -> None:
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
    # The file's space replaces ogm_ge's default one entirely: its `ge` switch is not drawn.
    assert "ge" in METHODS.get("ogm_ge").search
    assert all(j.config.method.ge for j in jobs if j.config.run.method == "ogm_ge")  # type: ignore[attr-defined]


def _drawn(jobs: list[Job]) -> dict[str, set[str]]:
    """Each method's distinct settings, as JSON."""
    points: dict[str, set[str]] = {}
    for j in jobs:
        points.setdefault(j.config.run.method, set()).add(json.dumps(j.config.to_dict()["method"], sort_keys=True))
    return points


def test_default_spaces_give_every_tuned_method_the_same_trials_without_a_sweep_file(tmp_path: Path) -> None:
    spec = SweepSpec.from_mapping({"methods": "all", "seeds": 2, "trials": 3})
    jobs = plan_jobs(spec, tmp_path)
    trials: dict[str, set[int]] = {}
    for j in jobs:
        trials.setdefault(j.config.run.method, set()).add(j.trial)
    assert trials == {**{m: {0, 1, 2} for m in TUNED}, "baseline": {0}, "unimodal": {0}}
    assert len(jobs) == (3 * len(TUNED) + 1 + 2) * 2  # unimodal: one job per modality
    assert all(len(points) == 3 for m, points in _drawn(jobs).items() if m in TUNED)  # three distinct settings
    assert [j.out for j in plan_jobs(spec, tmp_path)] == [j.out for j in jobs]  # the same draw again
    other = plan_jobs(dataclasses.replace(spec, draw_seed=1), tmp_path)
    changed = [m for m in TUNED if _drawn(other)[m] != _drawn(jobs)[m]]
    assert len(changed) >= len(TUNED) // 2  # another draw_seed, another draw
    res = bmm("sweep", "--methods", "ogm_ge,agm", "--seeds", "2", "--trials", "2", "--root", str(tmp_path), "--dry-run")
    assert res.returncode == 0, res.stderr
    assert len(res.stdout.splitlines()) == 2 * 2 * 2


def test_adapt_starts_every_trial_from_the_adapted_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ogm = METHODS.get("ogm_ge")
    monkeypatch.setattr(ogm, "adapted", {"alpha": 0.3, "modulation_ends": "30%"})
    raw = {"methods": ["ogm_ge", "baseline"], "seeds": 1, "trials": 2, "search": {"ogm_ge": {"alpha": [0.1, 0.3]}}}
    plain = plan_jobs(SweepSpec.from_mapping(raw), tmp_path)
    adapted = plan_jobs(SweepSpec.from_mapping({**raw, "adapt": True}), tmp_path)
    assert [(j.trial, j.config.method.alpha) for j in plain if j.config.run.method == "ogm_ge"] == [(0, 0.1), (1, 0.3)]
    trial0, trial1 = (j for j in adapted if j.config.run.method == "ogm_ge")
    # Trial 0 is the adapted defaults; 0.3 is then no new point, and the plain default 0.1 is.
    expected = resolve_config("ogm_ge", "embedded", overrides={"method": {"alpha": 0.3, "modulation_ends": "30%"}})
    assert trial0.trial == 0 and trial0.config == expected
    assert (trial1.trial, trial1.config.method.alpha, trial1.config.method.modulation_ends) == (1, 0.1, "30%")
    assert trial1.hparams == 'modulation_ends="30%"'  # alpha 0.1 is the plain default
    assert [j.config for j in adapted if j.config.run.method == "baseline"] == [
        j.config for j in plain if j.config.run.method == "baseline"
    ]  # references have nothing adapted


def test_dry_runs_list_every_job_with_its_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(METHODS.get("ogm_ge"), "adapted", {"modulation_ends": "30%"})
    monkeypatch.setattr(METHODS.get("agm"), "adapted", {})
    spec = tmp_path / "sweep.yaml"
    spec.write_text("methods: [ogm_ge, agm]\nseeds: 2\ntrials: 2\nadapt: true\nsearch:\n  ogm_ge: {alpha: [0.5]}\n")
    assert main(["sweep", str(spec), "--root", str(tmp_path / "r"), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    jobs = plan_jobs(SweepSpec.from_file(spec), tmp_path / "r")
    assert len(lines) == len(jobs) == 8
    for line, job in zip(lines, jobs, strict=True):
        assert line.split() == ["todo", *job.label.split(), *job.hparams.split(), str(job.out)]
    ends, drawn = 'modulation_ends="30%"', 'alpha=0.5 modulation_ends="30%"'
    assert [j.hparams for j in jobs[:6]] == [ends, ends, drawn, drawn, "defaults", "defaults"]
    # bench: every method with the adaptation on, and --trials like a sweep's.
    assert main(["bench", "--trials", "2", "--seeds", "1", "--root", str(tmp_path / "b"), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 * len(TUNED) + 1 + 2
    ogm = [line for line in lines if line.split()[1] == "ogm_ge"]
    assert len(ogm) == 2 and all('modulation_ends="30%"' in line for line in ogm)
    assert main(["sweep", "--methods", "ogm_ge", "--seeds", "1", "--adapt", "--root", str(tmp_path), "--dry-run"]) == 0
    assert 'modulation_ends="30%"' in capsys.readouterr().out


# Set by the protocol adaptation, never searched: a trial must not undo the benchmark's schedule.
EPOCH_SCHEDULES = {
    "modulation_starts", "modulation_ends", "reinit_epoch", "halve_every", "warmup", "super_epoch",
    "epochs_per_stage", "correct_epoch", "starting_epoch",
}  # fmt: skip
# The methods whose only knobs besides their schedule are a few switches (grid points besides the defaults).
SMALL_SPACES = {"gblending": 3, "mla": 7}


@pytest.mark.parametrize("name", TUNED)
def test_every_point_of_every_default_space_is_a_valid_setting(name: str) -> None:
    cls = METHODS.get(name)
    assert 1 <= len(cls.search) <= 3 and all(cls.search.values())
    assert not set(cls.search) & (EPOCH_SCHEDULES | set(cls.adapted))
    keys = sorted(cls.search)
    points = [dict(zip(keys, values, strict=True)) for values in itertools.product(*(cls.search[k] for k in keys))]
    for point in points:
        for dataset in ("embedded", "embedded3"):
            resolve_config(name, dataset, overrides={"method": point})
        # Modality-count constraints are checked when the method is built around its model.
        for modalities in (2, 3):
            build_method(name, TinyDataset(modalities), **point)
    default = cls.HParams()
    distinct = {parse(cls.HParams, point, "method") for point in points} - {default}
    assert len(distinct) == len(points) - (default in {parse(cls.HParams, p, "method") for p in points})
    assert len(distinct) == SMALL_SPACES.get(name, len(distinct)) and (name in SMALL_SPACES or len(distinct) >= 8)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"method": ["baseline"]}, "unknown key 'method'"),
        ({"seeds": 0}, "seeds must be >= 1"),
        ({"methods": ["ogm_ge"], "trials": 2, "search": {"ogm_ge": {}}}, "no search space for ogm_ge"),
        ({"methods": ["ogm_ge"], "trials": 2, "search": {"nope": {"alpha": [0.3]}}}, "unknown method 'nope'"),
        ({"methods": ["ogm_ge"], "trials": 2, "search": {"ogm_ge": {"alpha": [-1.0]}}}, "search.ogm_ge.alpha"),
        ({"adapt": "yes"}, "adapt must be true or false"),
        ({"methods": ["ogm_ge"], "trials": 3, "search": {"ogm_ge": {"alpha": [0.1, 0.2]}}}, "has 1 points besides"),
        ({"methods": ["nope"]}, "unknown method 'nope'"),
    ],
)
def test_bad_sweeps_are_refused_with_one_clear_message(tmp_path: Path, raw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        plan_jobs(SweepSpec.from_mapping(raw), tmp_path)


def test_bench_is_every_method_three_trials_baseline_and_unimodal_with_three_seeds(tmp_path: Path) -> None:
    res = bmm("bench", "--root", str(tmp_path / "bench"), "--dry-run")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    tuned = len(list_methods()) - 2  # every method but the references (baseline, unimodal)
    expected = (tuned * 3 + 1 + 2) * 3  # 3 trials each, baseline, unimodal per modality; 3 seeds
    assert len(lines) == expected and all(line.startswith("todo") for line in lines)
    assert sum("unimodal(visual)" in line for line in lines) == 3 and sum(" agm " in line for line in lines) == 9
    # The protocol adaptation is on: relearning's period is a share of the protocol's 30 epochs.
    assert all('reinit_epoch="22%"' in line for line in lines if " relearning " in line)


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
        assert worker.main([str(tmp_path / "job.json")]) == BUSY
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


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"draw_seed": "abc"}, "sweep.draw_seed must be an integer >= 0, not 'abc'"),
        ({"draw_seed": True}, "sweep.draw_seed must be an integer >= 0, not True"),
        ({"probe": "no"}, "sweep.probe must be true or false, not 'no'"),
        ({"adapt": "false"}, "sweep.adapt must be true or false, not 'false'"),
        ({"methods": 5}, "sweep.methods must be a list of names"),
        ({"seeds": [0, True]}, "sweep.seeds must be a count or a list of integers >= 0, not [0, True]"),
        ({"seeds": [-1]}, "sweep.seeds must be a count or a list of integers >= 0"),
        ({"trials": "x" * 10_000}, "sweep.trials must be an integer >= 1, not 'xxx"),
    ],
)
def test_sweep_values_are_typed_strictly(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        SweepSpec.from_mapping(raw)
    assert str(err.value).startswith(message) and len(str(err.value)) < 500


def test_a_sweep_file_with_a_string_draw_seed_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "sweep.yaml"
    spec.write_text("methods: [baseline]\ndraw_seed: abc\nprobe: 'no'\n")
    assert main(["sweep", str(spec), "--root", str(tmp_path / "r"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "draw_seed must be an integer" in err and "Traceback" not in err


@pytest.mark.parametrize("sets", ["5", '"abc"'])
def test_a_sweep_file_whose_sets_is_not_a_list_is_one_line(
    tmp_path: Path, sets: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from balancemm.cli import main

    spec = tmp_path / "s.yaml"
    spec.write_text(f"methods: [baseline]\nsets: {sets}\n")
    assert main(["sweep", str(spec), "--root", str(tmp_path / "r"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err == f"balancemm: error: {spec}: sets must be a list of 'key=value' strings\n"
    assert not (tmp_path / "r").exists()


def test_the_worker_module_runs_without_the_runpy_warning() -> None:
    """Importing the sweep package must not import the worker: ``python -m balancemm.sweep.worker`` then
    found it in sys.modules already and runpy printed a RuntimeWarning at the top of every worker log."""
    res = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", "-m", "balancemm.sweep.worker", "/nonexistent/job.json"],
        capture_output=True,
        text=True,
    )
    assert "RuntimeWarning" not in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert res.returncode != 0 and res.stderr.startswith("balancemm: error: ")
