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


def test_the_test_evaluation_scores_shapley_values_under_both_masking_rules(tmp_path: Path) -> None:
    feature = balancemm.train("baseline", out=tmp_path / "f", sets=["train.epochs=2"])
    # Training never masks a modality here, so a run whose own rule is input masking trains the same model.
    inputs = balancemm.train("baseline", out=tmp_path / "i", sets=["train.epochs=2", "model.mask=input"])
    assert feature["test"]["accuracy"] == inputs["test"]["accuracy"]
    assert feature["shapley_mask"] == "feature" and inputs["shapley_mask"] == "input"
    for s in (feature, inputs):
        assert set(s["shapley_by_mask"]) == {"feature", "input"}
        own = s["shapley_by_mask"][s["shapley_mask"]]
        assert own == {k: s[k] for k in ("shapley", "coalition_values", "imbalance")}
    # Each rule, computed once as the run's own and once as the other, gives the same numbers.
    assert feature["shapley_by_mask"]["input"] == inputs["shapley_by_mask"]["input"]
    assert inputs["shapley_by_mask"]["feature"] == feature["shapley_by_mask"]["feature"]
    # The rules differ (the zeroed input still passes through the encoder and its BatchNorm) ...
    assert feature["shapley_by_mask"]["input"]["coalition_values"] != feature["coalition_values"]
    # ... and each still satisfies efficiency: Σ φ = v(M) − v(∅).
    by_input = feature["shapley_by_mask"]["input"]
    assert sum(by_input["shapley"].values()) == pytest.approx(
        by_input["coalition_values"]["audio+visual"] - by_input["coalition_values"]["empty"]
    )


def test_a_single_modality_run_has_only_its_own_rule(tmp_path: Path) -> None:
    s = balancemm.train("unimodal", out=tmp_path / "u", sets=["train.epochs=1", "method.modality=audio"])
    assert list(s["shapley_by_mask"]) == ["feature"] and s["shapley_by_mask"]["feature"]["imbalance"] is None


def test_a_tie_on_the_validation_metric_keeps_the_earlier_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Validation accuracies 0.25, 0.5, 0.5 (the real evaluation, its accuracy overwritten): epoch 1 improves
    # on epoch 0, epoch 2 only ties it, so epoch 1 is selected and tested; ">=" would move to epoch 2.
    from balancemm.engine import trainer

    real, scripted = trainer.evaluate, iter([0.25, 0.5, 0.5])

    def evaluate(*args: Any, **kwargs: Any) -> dict[str, Any]:
        out = real(*args, **kwargs)
        return {**out, "accuracy": next(scripted, out["accuracy"])}  # the test evaluation keeps its own

    monkeypatch.setattr(trainer, "evaluate", evaluate)
    run = tmp_path / "r"
    s = balancemm.train("baseline", out=run, sets=["train.epochs=3"])
    assert [r["accuracy"] for r in _records(run) if r["split"] == "val"] == [0.25, 0.5, 0.5]
    assert s["selected_epoch"] == 1 and s["selection"]["value"] == 0.5
    assert torch.load(run / "checkpoints/best.pt", weights_only=True)["epoch"] == 1
    assert [r["epoch"] for r in _records(run) if r["split"] == "test"] == [1]


def test_every_epoch_shuffles_the_training_rows_anew(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The order of epoch e comes from (seed, "order", e): each epoch is a permutation of all training rows,
    # a different one every epoch (a resumed epoch sees its own again: tests/engine/test_resume.py).
    orders: list[list[int]] = []
    real = Baseline.train_epoch

    def spy(self: Baseline, epoch: int, batches: Any) -> None:
        seen: list[int] = []

        def recorded() -> Any:
            for batch in batches:
                seen.extend(batch.index.tolist())
                yield batch

        real(self, epoch, recorded())
        orders.append(seen)

    monkeypatch.setattr(Baseline, "train_epoch", spy)
    s = balancemm.train("baseline", out=tmp_path / "a", sets=["train.epochs=2"])
    rows = s["dataset_info"]["sizes"]["train"]
    assert len(orders) == 2 and all(sorted(o) == list(range(rows)) for o in orders)
    assert orders[0] != orders[1]
