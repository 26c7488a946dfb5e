"""The training loop: selection on validation, one test evaluation, records, determinism, failures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import balancemm
from balancemm.errors import ConfigError, NonFiniteLossError
from balancemm.methods.baseline import Baseline

EPOCHS = ["train.epochs=4"]


def _records(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]


def test_run_directory_selection_and_single_test_evaluation(tmp_path: Path) -> None:
    run = tmp_path / "r"
    s = balancemm.train("ogm_ge", out=run, sets=EPOCHS)
    for name in ("config.json", "results.jsonl", "summary.json", "done", "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (run / name).is_file(), name
    assert any((run / "tb").iterdir())
    assert not (run / "failed").exists()
    recs = _records(run)
    val = [r for r in recs if r["split"] == "val"]
    test = [r for r in recs if r["split"] == "test"]
    assert [r["epoch"] for r in val] == [0, 1, 2, 3] and len(test) == 1
    best = max(val, key=lambda r: r["accuracy"])  # first maximum wins (strict improvement)
    assert s["selected_epoch"] == best["epoch"] == test[0]["epoch"]
    assert s["selection"]["value"] == best["accuracy"]
    assert s["test"]["accuracy"] == test[0]["accuracy"] and s["test"]["num_samples"] == 360  # no dropped batch
    assert s["imbalance"] == pytest.approx(abs(s["shapley"]["audio"] - s["shapley"]["visual"]))
    assert sum(s["shapley"].values()) == pytest.approx(
        s["coalition_values"]["audio+visual"] - s["coalition_values"]["empty"]
    )
    assert s["flops"]["total"] == sum(s["flops"]["by_phase"].values()) > 0
    assert {"forward", "backward"} <= set(s["flops"]["by_phase"])
    assert val[-1]["flops_cumulative"] == s["flops"]["total"]
    assert all(k in val[0]["train"] for k in ("loss/ce", "ogm/k_audio", "train_accuracy"))
    saved = json.loads((run / "config.json").read_text())
    assert saved["config_hash"] == s["config_hash"] and saved["config"]["method"]["alpha"] == 0.1
    for key in ("wall_time_s", "train_time_s", "peak_memory_mb", "params", "environment", "method_group"):
        assert s[key] is not None, key


def test_same_seed_same_numbers_different_seed_different(tmp_path: Path) -> None:
    a = balancemm.train("ogm_ge", out=tmp_path / "a", sets=EPOCHS)
    b = balancemm.train("ogm_ge", out=tmp_path / "b", sets=EPOCHS)
    c = balancemm.train("ogm_ge", out=tmp_path / "c", sets=EPOCHS, seed=1)
    for key in ("test", "shapley", "imbalance", "selected_epoch", "flops"):
        assert a[key] == b[key], key
    assert a["test"] != c["test"]


def test_finished_run_is_not_trained_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = balancemm.train("baseline", out=tmp_path / "r", sets=["train.epochs=1"])
    monkeypatch.setattr(Baseline, "training_step", lambda *a: pytest.fail("trained again"))
    assert balancemm.train("baseline", out=tmp_path / "r", sets=["train.epochs=1"]) == first


def test_other_config_in_the_same_directory_is_refused(tmp_path: Path) -> None:
    balancemm.train("baseline", out=tmp_path / "r", sets=["train.epochs=1"])
    with pytest.raises(ConfigError, match="holds a run with a different config"):
        balancemm.train("baseline", out=tmp_path / "r", sets=["train.epochs=2"])


def test_nan_loss_stops_the_run_naming_epoch_step_and_term(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def losses(self: Baseline, out: Any, batch: Any) -> dict[str, torch.Tensor]:
        terms = Baseline.__base__.losses(self, out, batch)  # type: ignore[attr-defined]
        if self.ctx.epoch == 1 and self.ctx.step == 20:
            terms["aux"] = torch.tensor(float("nan"))
        return terms

    monkeypatch.setattr(Baseline, "losses", losses)
    run = tmp_path / "r"
    with pytest.raises(NonFiniteLossError, match=r"loss term 'aux' became nan at epoch 1, step 20"):
        balancemm.train("baseline", out=run, sets=EPOCHS)
    assert (run / "failed").read_text().startswith("loss term 'aux'")
    assert not (run / "done").exists() and not (run / "summary.json").exists()


def test_bad_input_leaves_no_run_directory(tmp_path: Path) -> None:
    run = tmp_path / "r"
    for kwargs in (
        {"method": "nope"},
        {"method": "unimodal"},
        {"method": "baseline", "sets": ["train.lr=1"]},
        {"method": "baseline", "device": "cuda:0"} if not torch.cuda.is_available() else {"method": "nope"},
    ):
        with pytest.raises(ConfigError):
            balancemm.train(**kwargs, out=run)  # type: ignore[arg-type]
        assert not run.exists()
