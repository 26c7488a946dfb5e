"""The command line: happy paths, and one clear line for every kind of bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from balancemm.cli import main
from balancemm.config import resolve_config
from balancemm.methods import METHODS, Needs
from balancemm.methods.baseline import Baseline


def bmm(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "balancemm", *args], capture_output=True, text=True, cwd=cwd)


def test_train_prints_the_summary_table_and_probe_reads_the_run(tmp_path: Path) -> None:
    run = tmp_path / "r"
    res = bmm(
        "train", "--method", "OGM", "--out", str(run), "--set", "train.epochs=2", "method.alpha=0.3", "--seed", "1"
    )
    assert res.returncode == 0, res.stderr
    for text in (
        "ogm_ge on embedded (seed 1)",
        "selected epoch",
        "fused",
        "audio",
        "visual",
        "Shapley",
        "imbalance degree",
        "v(∅)",
        "training FLOPs",
        "peak memory",
    ):
        assert text in res.stdout, text
    assert "epochs" in res.stderr  # progress bar
    probe = bmm("probe", str(run))
    assert probe.returncode == 0 and "linear-probe test accuracy" in probe.stdout
    assert set(json.loads((run / "probe.json").read_text())) == {"audio", "visual"}  # saved for reports


def test_default_run_directory_is_derived_from_the_config(tmp_path: Path) -> None:
    res = bmm("train", "--method", "baseline", "--set", "train.epochs=1", "--quiet", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("baseline-embedded-seed0-") and (run / "done").is_file()


def test_list_shows_groups_and_papers() -> None:
    res = bmm("list", "methods")
    assert res.returncode == 0
    lines = res.stdout.splitlines()
    assert lines[0].split()[:3] == ["group", "method", "paper"]
    assert any(line.split()[:2] == ["optimization", "ogm_ge"] and "CVPR 2022" in line for line in lines)
    assert any(line.split()[:2] == ["objective", "mmpareto"] for line in lines)
    assert "embedded3" in bmm("list", "datasets").stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "nope"], "unknown method 'nope'; valid: "),
        (
            ["--method", "baseline", "--dataset", "nope"],
            "unknown dataset 'nope'; valid: balanced_av, cmu_mosei, cremad, embedded",
        ),
        (
            ["--method", "baseline", "--dataset", "cremad"],
            "data.root is not set: prepare the data with `balancemm data",
        ),
        (["--method", "baseline", "--dataset", "ks", "--set", "data.root=MISSING"], "is not a directory"),
        (["--method", "unimodal"], "unimodal needs method.modality, one of audio, visual"),
        (
            ["--method", "baseline", "--set", "train.epoch=2"],
            "unknown config key train.epoch (did you mean train.epochs?)",
        ),
        (["--method", "baseline", "--set", "train.epochs=two"], "train.epochs: expected an integer"),
        (["--method", "ogm_ge", "--set", "method.alpha=-1"], "method.alpha: -1.0 is out of range"),
        (["--method", "baseline", "--config", "MISSING"], "does not exist"),
        (["--method", "baseline", "--config", "BAD"], "is not valid YAML at line 3"),
        (["--method", "baseline", "--set", "model.fusion=nope"], "unknown fusion 'nope'"),
        (["--method", "baseline", "--seed", "x"], "invalid int value"),
        (["--method", "baseline", "--device", "tpu"], "unknown device 'tpu'"),
        (["--dataset", "embedded"], "no method given; use --method NAME, one of "),
    ],
)
def test_bad_input_is_one_line_nonzero_no_traceback_no_run_dir(tmp_path: Path, args: list[str], message: str) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: [1\n")
    args = [str(bad) if a == "BAD" else str(tmp_path / "missing.yaml") if a == "MISSING" else a for a in args]
    out = tmp_path / "run"
    res = bmm("train", *args, "--out", str(out), "--quiet")
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("balancemm: error:"), res.stderr
    assert "Traceback" not in res.stderr
    assert not out.exists()


def test_unsupported_modality_count_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    class TwoOnly(Baseline):
        needs = Needs(max_modalities=2)

    out = tmp_path / "run"
    with METHODS.temporary():
        METHODS.register("two_only", group="reference")(TwoOnly)
        assert main(["train", "--method", "two_only", "--dataset", "embedded3", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["balancemm: error: method two_only supports 2 to 2 modalities, but dataset embedded3 has 3"]
    assert not out.exists()


def test_missing_run_directory_for_probe_is_one_line(tmp_path: Path) -> None:
    res = bmm("probe", str(tmp_path / "nowhere"))
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "has no checkpoints/best.pt" in res.stderr


def test_diverging_run_is_marked_failed(tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = bmm("train", "--method", "baseline", "--out", str(out), "--quiet", "--set", "train.optimizer.lr=1e12")
    assert res.returncode == 3
    (line,) = res.stderr.strip().splitlines()
    assert "loss term 'ce' became" in line and "at epoch 0, step" in line
    assert (out / "failed").is_file() and not (out / "done").exists() and not (out / "summary.json").exists()


def test_config_prints_yaml_that_round_trips_as_a_config_file(tmp_path: Path) -> None:
    res = bmm("config", "--method", "OGM", "--dataset", "embedded3", "--set", "method.alpha=0", "--seed", "4")
    assert res.returncode == 0, res.stderr
    saved = tmp_path / "c.yaml"
    saved.write_text(res.stdout)
    original = resolve_config("ogm_ge", "embedded3", sets=["method.alpha=0"], seed=4)
    again = resolve_config(config_file=saved)
    assert again == original and res.stdout.startswith("# balancemm") and original.digest()[:12] in res.stdout


def test_unwritable_paths_are_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    res = bmm("train", "--method", "baseline", "--out", str(blocker / "run"), "--quiet", "--set", "train.epochs=1")
    assert res.returncode == 2 and res.stderr.startswith("balancemm: error: cannot create the run directory")
    env = {**os.environ, "BALANCEMM_CACHE": str(blocker / "cache")}
    out = tmp_path / "run"
    res = subprocess.run(
        [sys.executable, "-m", "balancemm", "train", "--method", "baseline", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert res.returncode == 2 and "set BALANCEMM_CACHE to a writable directory" in res.stderr
    assert res.stderr.count("\n") == 1 and not out.exists()


def test_a_run_locked_by_another_process_is_refused_until_that_process_dies(tmp_path: Path) -> None:
    from balancemm.engine.rundir import RunDir

    run, sets = tmp_path / "run", ["train.epochs=1"]
    cfg = resolve_config("baseline", sets=sets)
    RunDir(run).create({"config": cfg.to_dict(), "config_hash": cfg.digest()})  # as a training process would
    hold = "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
    hold += (
        "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, str(os.getpid()).encode()); print(flush=True); time.sleep(600)"
    )
    holder = subprocess.Popen([sys.executable, "-c", hold, str(run / ".lock")], stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"\n"  # it holds the lock
        res = bmm("train", "--method", "baseline", "--quiet", "--out", str(run), "--set", *sets)
    finally:
        holder.kill()
        holder.wait()
    assert res.returncode == 75, res.stderr
    assert res.stderr == (
        f"balancemm: error: {run} is in use by another balancemm process (pid {holder.pid}) training or probing it; "
        "wait for it to finish, then run the command again\n"
    )
    assert not (run / "results.jsonl").exists()
    res = bmm("train", "--method", "baseline", "--quiet", "--out", str(run), "--set", *sets)
    assert res.returncode == 0 and (run / "done").is_file(), res.stderr  # the kernel released the lock
