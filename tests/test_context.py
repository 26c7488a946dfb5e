"""The run context: a spawned context is the run's own, and every batch of a run is built one way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from balancemm.context import Batching, Needs, RunContext
from balancemm.data import Batches
from balancemm.metrics.flops import FlopMeter
from tests.conftest import TinyDataset


def test_a_spawned_context_is_the_runs_own_with_its_own_optimiser_steps_and_logs() -> None:
    data = TinyDataset()
    teacher = torch.nn.Linear(2, 2)
    loaded: list[tuple[str, str]] = []

    def load(kind: str, modality: str) -> torch.nn.Module:
        loaded.append((kind, modality))
        return teacher

    ctx = RunContext(
        data.modalities,
        seed=3,
        num_epochs=5,
        dataset=data,
        needs=Needs(val=True, artifacts=("unimodal",)),
        batch_size=8,
        eval_batch_size=16,
        grad_clip=1.0,
        meter=FlopMeter("off"),
        num_workers=2,
        artifact_loader=load,
    )
    ctx.epoch, ctx.step = 2, 7
    ctx.log(loss=1.0)
    ctx.batches("val")
    side = torch.optim.SGD(teacher.parameters(), lr=0.1)
    child = ctx.spawn(side)
    assert child.artifact("unimodal", "audio") is teacher and loaded == [("unimodal", "audio")]
    shared = ("modalities", "seed", "num_epochs", "device", "generator", "device_generator", "precision", "meter")
    for name in (*shared, "batching", "needs", "_dataset", "_optimizer_factory", "_grad_clip", "_artifact_loader"):
        assert getattr(child, name) is getattr(ctx, name), name
    assert (child.epoch, child.step, child.optimizer, child.used_val) == (2, 0, side, False)
    assert child.pop_logs() == {} and ctx.pop_logs() == {"loss": 1.0}
    child.log(side=2.0)
    assert ctx.pop_logs() == {} and child.pop_logs() == {"side": 2.0}


def test_batching_builds_batches_with_the_runs_settings() -> None:
    split = TinyDataset().split("train")
    batching = Batching(batch_size=4, eval_batch_size=6, device=torch.device("cpu"), num_workers=3)
    shuffled = batching(split, shuffle=True, generator=torch.Generator().manual_seed(0))
    ordered, rows = batching(split), batching(split, subset=torch.arange(5), batch_size=5)
    assert [b.batch_size for b in (shuffled, ordered, rows)] == [4, 6, 5]
    assert all(b.num_workers == 3 and b.persistent and b.device == torch.device("cpu") for b in (shuffled, ordered))
    assert len(rows) == 1 and rows.num_workers == 3


def test_every_batch_of_a_run_has_the_runs_loader_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import balancemm
    from balancemm.data.embedded import Embedded

    built: list[Batches] = []

    class Recorded(Batches):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr("balancemm.context.Batches", Recorded)
    # A named test subset, as CMU-MOSEI has: scored with the same loader settings as the whole split.
    monkeypatch.setattr(Embedded, "eval_subsets", lambda self, split: {"first": torch.arange(10)})
    s = balancemm.train("lfm", out=tmp_path / "run", sets=["train.epochs=1", "train.num_workers=1"])
    assert s["test"]["subsets"]["first"]["num_samples"] == 10
    # training, validation (the trainer's and LFM's rows), test, the subset, the other masking rule's test
    assert len(built) >= 6 and any(b.rows.numel() == 10 for b in built)
    assert {(b.num_workers, b.persistent, b.device.type) for b in built} == {(1, True, "cpu")}
