"""Bad input is refused before any job trains, and the first commands a new user types are quick:
one line, a nonzero exit, nothing written."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import balancemm
from balancemm import cli
from balancemm.api import check_run_out
from balancemm.data import DATASETS
from balancemm.errors import ConfigError, DataError
from balancemm.methods import METHODS
from balancemm.registry import DATASET_OPTIONS, ENCODER_OPTIONS, FUSION_NAMES, METHOD_HPARAMS
from balancemm.sweep import SweepSpec, plan_jobs, run_sweep
from balancemm.sweep import launchers as launchers_module
from balancemm.sweep.launchers import _host_port, check_address, make_launcher, schedule
from tests.conftest import ScriptedLauncher


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("balancemm: error: "), err
    return err[0]


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """A command that gets as far as training fails the test at once, instead of training."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a job was started before the bad input was refused")

    monkeypatch.setattr("balancemm.sweep.run_sweep", refuse)
    monkeypatch.setattr(launchers_module, "RayLauncher", refuse)  # ray.init would wait minutes
    monkeypatch.setattr("balancemm.engine.trainer.Trainer", refuse)


def closed_port() -> int:
    """A local TCP port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- sweeps and bench: checked at planning time ---------------------------------------------------


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        ([], "data.root is not set: prepare the data with `balancemm data prepare cremad"),
        (["data.root=MISSING"], "is not a directory"),
    ],
)
@pytest.mark.parametrize("dry_run", [False, True])
def test_sweep_checks_the_data_root_before_any_job(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], sets: list[str], message: str, dry_run: bool
) -> None:
    root = tmp_path / "sweep"
    sets = [s.replace("MISSING", str(tmp_path / "missing")) for s in sets]
    argv = ["sweep", "--datasets", "cremad", "--methods", "baseline", "--seeds", "2", "--root", str(root), "--quiet"]
    code = cli.main([*argv, *(["--set", *sets] if sets else []), *(["--dry-run"] if dry_run else [])])
    line = one_error_line(capsys)
    assert code == 2 and message in line and line.count("balancemm: error:") == 1
    assert not root.exists()  # no .sweep, no lock


def test_run_sweep_checks_the_data_root_of_every_dataset(tmp_path: Path) -> None:
    spec = SweepSpec.from_mapping({"methods": "baseline", "datasets": "embedded,cmu_mosei", "seeds": 1})
    jobs = plan_jobs(spec, tmp_path / "sweep")
    with pytest.raises(DataError, match=r"data\.root is not set: pass --set data\.root=DIR"):
        run_sweep(jobs, tmp_path / "sweep", progress=False)
    assert not (tmp_path / "sweep").exists()


def test_a_failed_job_reason_is_not_prefixed_twice(tmp_path: Path) -> None:
    jobs = plan_jobs(SweepSpec.from_mapping({"methods": "baseline", "seeds": 1}), tmp_path)
    launcher = ScriptedLauncher(2, "balancemm: error: data.root /x is not a directory")
    ((_, reason),) = schedule(jobs, launcher, parallel=1).failed
    assert reason == "data.root /x is not a directory"


def test_bench_refuses_a_foreign_report_folder_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_training: None
) -> None:
    report = tmp_path / "notes"
    report.mkdir()
    (report / "thesis.tex").write_text("mine")
    code = cli.main(["bench", "--root", str(tmp_path / "runs"), "--report", str(report), "--quiet"])
    line = one_error_line(capsys)
    assert code == 2 and f"--report {report} exists and is not a previous report" in line
    assert not (tmp_path / "runs").exists() and [p.name for p in report.iterdir()] == ["thesis.tex"]


def test_bench_without_matplotlib_refuses_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, no_training: None
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    code = cli.main(["bench", "--root", str(tmp_path / "runs"), "--report", str(tmp_path / "rep"), "--quiet"])
    assert code == 2 and "need matplotlib: pip install 'balancemm[report]'" in one_error_line(capsys)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "rep").exists()


# -- launchers and their addresses ------------------------------------------------------------------


def test_an_address_is_refused_with_the_local_launcher(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_training: None
) -> None:
    code = cli.main(["sweep", "--methods", "baseline", "--seeds", "1", "--root", str(tmp_path), "--address", "auto"])
    assert code == 2 and "--address auto is the address of a Ray cluster; add --launcher ray" in one_error_line(capsys)
    with pytest.raises(ConfigError, match="add --launcher ray or drop --address"):
        make_launcher("local", tmp_path / "api", 1, "head:6379")
    assert not (tmp_path / "api").exists()


def test_an_unreachable_ray_address_fails_fast_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_training: None
) -> None:
    address = f"127.0.0.1:{closed_port()}"
    argv = ["sweep", "--methods", "baseline", "--seeds", "1", "--root", str(tmp_path / "r"), "--launcher", "ray"]
    assert cli.main([*argv, "--address", address]) == 2
    line = one_error_line(capsys)
    assert f"cannot reach the Ray cluster at {address} (Connection refused)" in line
    assert not (tmp_path / "r").exists()
    with pytest.raises(ConfigError, match="cannot reach the Ray cluster at ray://"):
        make_launcher("ray", tmp_path / "api", 1, f"ray://{address}")
    assert not (tmp_path / "api").exists()


def test_a_silent_ray_head_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[tuple[str, int], float]] = []

    def silent(target: tuple[str, int], timeout: float) -> None:
        seen.append((target, timeout))
        raise TimeoutError("timed out")

    monkeypatch.setattr(launchers_module.socket, "create_connection", silent)
    with pytest.raises(ConfigError, match=r"at head:6379 \(no answer in 2 s\)"):
        check_address("ray", "head:6379", timeout_s=2)
    assert seen == [(("head", 6379), 2)]


@pytest.mark.parametrize(
    ("address", "target"),
    [
        ("head:6379", ("head", 6379)),
        ("ray://10.0.0.2:10001", ("10.0.0.2", 10001)),
        ("[::1]:6379", ("::1", 6379)),
        ("auto", None),  # Ray finds the cluster itself
        ("local", None),
        ("head", None),
    ],
)
def test_which_ray_addresses_are_probed(address: str, target: tuple[str, int] | None) -> None:
    assert _host_port(address) == target


# -- train: the run directory -----------------------------------------------------------------------


def test_train_refuses_a_foreign_non_empty_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_training: None
) -> None:
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"\xff\xd8")
    code = cli.main(["train", "--method", "baseline", "--out", str(foreign), "--quiet", "--set", "train.epochs=1"])
    assert code == 2 and "holds no run (no config.json) but other files (cat.jpg); choose" in one_error_line(capsys)
    assert [p.name for p in foreign.iterdir()] == ["cat.jpg"]
    with pytest.raises(ConfigError, match="holds no run"):
        balancemm.train("baseline", out=foreign, overrides={"train": {"epochs": 1}})
    assert [p.name for p in foreign.iterdir()] == ["cat.jpg"]


def test_a_new_an_empty_or_the_runs_own_directory_is_accepted(tmp_path: Path) -> None:
    check_run_out(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    check_run_out(tmp_path / "empty")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")  # a run: the trainer resumes or refuses its config
    (tmp_path / "run" / "notes.txt").write_text("")
    check_run_out(tmp_path / "run")
    (tmp_path / "killed" / "checkpoints").mkdir(parents=True)  # killed before it wrote config.json
    (tmp_path / "killed" / ".lock").write_text("")
    check_run_out(tmp_path / "killed")
    with pytest.raises(ConfigError, match="empty path"):
        check_run_out("")


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--method", "baseline", "--out", ""],
        ["train", "--method", "baseline", "--config", " "],
        ["sweep", "--root", ""],
        ["bench", "--report", ""],
        ["report", "runs", "--out", ""],
        ["data", "prepare", "cremad", "--raw", "raw", "--out", ""],
        ["data", "check", "cremad", "--root", ""],
        ["probe", ""],
    ],
)
def test_an_empty_path_is_refused_not_read_as_the_default(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    no_training: None,
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    assert "empty path; give a file or directory name" in one_error_line(capsys)
    assert not any(tmp_path.iterdir())


def test_missing_clips_warning_names_the_splits() -> None:
    facts = {"root": "data/cremad", "missing": {"train": 0, "val": 0, "test": 3}}
    warning = cli.missing_clips_warning("cremad", facts)
    assert warning.startswith("3 listed clips have no data (test 3); `balancemm data check cremad --root data/cremad`")
    assert "\n" not in warning
    assert cli.missing_clips_warning("cremad", {"missing": {"train": 0, "test": 0}}) == ""
    assert cli.missing_clips_warning("embedded", {"sizes": {}}) == ""


# -- first contact: no torch for list and --help ------------------------------------------------------


def test_list_config_and_help_do_not_import_torch() -> None:
    code = """
import sys
from balancemm.cli import main
main(["list", "methods"])
main(["list", "methods", "--group", "objective"])
main(["list", "datasets"])
for argv in (["--help"], ["train", "--help"], ["sweep", "--help"], ["data", "prepare", "--help"],
             ["config", "--method", "ogm_ge", "--dataset", "cremad", "--set", "model.encoders.audio.width=32"]):
    try:
        main(argv)
    except SystemExit:
        pass
assert "torch" not in sys.modules, "torch was imported"
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "ogm_ge" in res.stdout and "kinetics_sounds" in res.stdout and "modulation_ends: 50" in res.stdout


def test_the_catalog_is_the_registries() -> None:
    """The config, ``list`` and ``config`` read the torch-free catalog; the implementations register under
    the same names, in the same order, with the catalogued options class (the registry checks each)."""
    from balancemm.models import ENCODERS, FUSIONS

    def rows(entries: Any) -> list[tuple[str, tuple[str, ...], dict[str, Any]]]:
        return [(e.name, e.aliases, e.meta) for e in entries]

    assert rows(METHOD_HPARAMS) == rows(METHODS)
    assert rows(DATASET_OPTIONS) == rows(DATASETS)
    assert sorted(rows(ENCODER_OPTIONS)) == sorted(rows(ENCODERS))
    assert sorted(rows(FUSION_NAMES)) == sorted(rows(FUSIONS))
    assert all(e.obj.HParams is METHOD_HPARAMS.get(e.name) for e in METHODS)


def test_each_dataset_yields_its_catalogued_modalities() -> None:
    """The catalog says which modalities a dataset yields before any file is read; the loaders must agree."""
    for name in ("embedded", "embedded3"):
        assert DATASETS.get(name)().modalities == DATASET_OPTIONS.entry(name).meta["modalities"]
    for e in DATASETS:
        declared = getattr(e.obj, "MODALITIES", None)  # the file-backed datasets declare theirs up front
        if declared is not None:
            assert tuple(declared) == e.meta["modalities"], e.name


def test_a_registration_that_disagrees_with_the_catalog_is_refused() -> None:
    class Other:
        HParams = int

    with pytest.raises(ValueError, match="must be the catalogued"):
        METHODS.register("ogm_ge")(Other)
    with pytest.raises(ValueError, match="is catalogued"):
        METHODS.register("ogm_ge", group="data")(METHODS.get("ogm_ge"))
    assert METHODS.get("ogm_ge").__name__ == "OGMGE"


def test_a_temporary_registration_is_undone_in_the_catalog_too() -> None:
    class Toy:
        HParams = int

    with METHODS.temporary():
        METHODS.register("toy_method", group="objective")(Toy)
        assert METHOD_HPARAMS.get("toy_method") is int and METHODS.get("toy_method") is Toy
    assert "toy_method" not in METHODS and "toy_method" not in METHOD_HPARAMS
