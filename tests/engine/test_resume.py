"""A run interrupted at any point and restarted ends with the same numbers as an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import balancemm
from balancemm.methods.base import Method
from tests.conftest import interrupted_at

# OGM-GE draws Gaussian noise from the run generator every step, so resume must restore it exactly.
SETS = ["train.epochs=5", "train.scheduler.step_size=2"]
SAME = ("test", "shapley", "coalition_values", "imbalance", "selected_epoch", "selection", "flops")


def _same_weights(a: Path, b: Path) -> bool:
    wa = torch.load(a / "checkpoints/best.pt", weights_only=True)["method"]
    wb = torch.load(b / "checkpoints/best.pt", weights_only=True)["method"]
    return all(torch.equal(wa[k], wb[k]) for k in wa)


def _val_lines(run: Path) -> list[dict[str, Any]]:
    recs = [json.loads(x) for x in (run / "results.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in ("epoch", "accuracy", "loss", "shapley")} for r in recs if r["split"] == "val"]


@pytest.mark.parametrize("stop_at", [(0, 3), (2, 40), (4, 80)])  # (epoch, step): early, middle, last epoch
def test_interrupt_then_resume_equals_uninterrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stop_at: tuple[int, int]
) -> None:
    whole = balancemm.train("ogm_ge", out=tmp_path / "whole", sets=SETS)
    real = Method.training_step

    def crashing(self: Method, batch: Any) -> Any:
        if (self.ctx.epoch, self.ctx.step) == stop_at:
            raise KeyboardInterrupt
        return real(self, batch)

    monkeypatch.setattr(Method, "training_step", crashing)
    with pytest.raises(KeyboardInterrupt):
        balancemm.train("ogm_ge", out=tmp_path / "cut", sets=SETS)
    assert not (tmp_path / "cut/done").exists() and not (tmp_path / "cut/failed").exists()
    monkeypatch.setattr(Method, "training_step", real)
    resumed = balancemm.train("ogm_ge", out=tmp_path / "cut", sets=SETS)
    for key in SAME:
        assert resumed[key] == whole[key], key
    assert _same_weights(tmp_path / "whole", tmp_path / "cut")
    assert _val_lines(tmp_path / "cut") == _val_lines(tmp_path / "whole")  # each epoch recorded exactly once


def test_sigkill_then_same_command_resumes(tmp_path: Path) -> None:
    out = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "balancemm",
        "train",
        "--method",
        "ogm_ge",
        "--quiet",
        "--out",
        str(out),
        "--set",
        "train.epochs=8",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:
        results = out / "results.jsonl"
        if results.is_file() and len(results.read_text().splitlines()) >= 3:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "done").exists()
    subprocess.run(cmd, check=True, capture_output=True)
    whole = balancemm.train("ogm_ge", out=tmp_path / "whole", sets=["train.epochs=8"])
    resumed = json.loads((out / "summary.json").read_text())
    for key in SAME:
        assert resumed[key] == whole[key], key
    assert _val_lines(out) == _val_lines(tmp_path / "whole")


# Methods whose own state lives across epochs: running score averages (AGM), prototypes (PMR), initial
# weights and the re-initialisation count (Relearning), ensemble members and boost rate (ReconBoost),
# speed sums, curation window and MMTM gate averages (Greedy).
STATEFUL = {
    "agm": {},
    "greedy": {"starting_epoch": 0},
    "pmr": {},
    "relearning": {"reinit_epoch": 1},
    "reconboost": {"pretrained": False, "epochs_per_stage": 1, "correct_epoch": 1},
}


@pytest.mark.parametrize("name", sorted(STATEFUL))
def test_method_state_survives_an_interrupt_between_epochs(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sets = ["train.epochs=3"]
    whole = balancemm.train(name, out=tmp_path / "whole", sets=sets, progress=False, **STATEFUL[name])
    with interrupted_at(monkeypatch, 2), pytest.raises(KeyboardInterrupt):
        balancemm.train(name, out=tmp_path / "cut", sets=sets, progress=False, **STATEFUL[name])
    resumed = balancemm.train(name, out=tmp_path / "cut", sets=sets, progress=False, **STATEFUL[name])
    for key in SAME:
        assert resumed[key] == whole[key], key
    assert _same_weights(tmp_path / "whole", tmp_path / "cut")


def test_a_kill_before_the_first_checkpoint_leaves_no_duplicate_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from balancemm.engine.rundir import RunDir

    sets = ["train.epochs=2"]
    real = RunDir.save

    def killed(self: RunDir, path: Path, state: dict[str, Any]) -> None:
        if path == self.last:  # epoch 0's validation record and best.pt are written, last.pt is not
            raise KeyboardInterrupt
        real(self, path, state)

    monkeypatch.setattr(RunDir, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        balancemm.train("baseline", out=tmp_path / "cut", sets=sets)
    assert not (tmp_path / "cut/checkpoints/last.pt").exists() and len(_val_lines(tmp_path / "cut")) == 1
    monkeypatch.setattr(RunDir, "save", real)
    balancemm.train("baseline", out=tmp_path / "cut", sets=sets)
    whole = balancemm.train("baseline", out=tmp_path / "whole", sets=sets)
    assert _val_lines(tmp_path / "cut") == _val_lines(tmp_path / "whole")  # epoch 0 recorded once
    assert json.loads((tmp_path / "cut/summary.json").read_text())["test"] == whole["test"]
