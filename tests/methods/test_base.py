"""The method template itself (``methods/base.py``): its step, its epoch, its default hyper-parameters and
how a method with its own ``predict`` is scored on every coalition."""

from __future__ import annotations

from typing import Any

import torch

from balancemm.methods.base import Method
from balancemm.methods.baseline import Baseline
from balancemm.metrics.flops import FlopMeter
from balancemm.precision import Precision
from tests.conftest import TinyDataset, build_method, first_batch


class Touching(Baseline):
    """Baseline that counts its ``after_backward`` calls."""

    after: int = 0

    def after_backward(self, out: Any, batch: Any) -> None:
        Touching.after += 1


def test_a_step_runs_each_hook_under_its_own_phase() -> None:
    # Phases name the rows of the FLOP cost table; a method's own phase, when one is open, takes precedence.
    data = TinyDataset()
    method = build_method("baseline", data)
    method.__class__ = Touching
    phases: list[str] = []
    real = method.ctx.hook_phase

    def hook_phase(name: str) -> Any:
        phases.append(name)
        return real(name)

    method.ctx.hook_phase = hook_phase  # type: ignore[method-assign]
    method.training_step(first_batch(data))
    assert phases == ["forward", "losses", "backward", "after_backward", "optimizer_step"]
    assert method.ctx.step == 1
    meter = method.ctx.meter = FlopMeter("exact")
    with meter.counting():
        method.training_step(first_batch(data))
    assert meter.by_phase["forward"] > 0 and meter.by_phase["backward"] > 0


def test_an_overflowing_fp16_step_is_skipped_before_after_backward() -> None:
    data = TinyDataset()
    method = build_method("baseline", data, precision=Precision("fp16", "cpu"))
    method.__class__ = Touching
    Touching.after = 0
    before = [p.detach().clone() for p in method.parameters()]
    real = Baseline.losses

    def huge(self: Method, out: Any, batch: Any) -> dict[str, torch.Tensor]:
        return {k: v * 1e35 for k, v in real(self, out, batch).items()}  # × 2^16 loss scale overflows fp32

    Touching.losses = huge  # type: ignore[method-assign]
    try:
        out, losses = method.training_step(first_batch(data))
    finally:
        del Touching.losses
    assert Touching.after == 0 and method.ctx.precision.skipped == 1 and method.ctx.step == 1
    assert all(torch.equal(p, q) for p, q in zip(method.parameters(), before, strict=True))
    assert all(p.grad is None for p in method.parameters())
    assert set(losses) == {"ce"} and out.logits.shape == (8, 3)
    method.training_step(first_batch(data))  # a finite step goes through to after_backward and the update
    assert Touching.after == 1 and method.ctx.step == 2
    assert any(not torch.equal(p, q) for p, q in zip(method.parameters(), before, strict=True))


def test_an_epoch_logs_the_mean_training_accuracy_of_its_batches() -> None:
    data = TinyDataset()
    method = build_method("baseline", data, lr=0.0)  # no update: every batch meets the same model
    batches = list(method.ctx.batches("train", shuffle=True))  # 3 batches of 8
    with torch.no_grad():
        correct = [(method.model(b).logits.argmax(1) == b.label).float().mean().item() for b in batches]
    method.train_epoch(0, batches)
    logs = method.ctx.pop_logs()
    assert abs(logs["train_accuracy"] - sum(correct) / len(correct)) < 1e-6
    assert 0 < logs["train_accuracy"] < 1 and method.ctx.step == 3


def test_hyper_parameters_default_to_the_methods_own() -> None:
    data = TinyDataset()
    made = build_method("ogm_ge", data, alpha=0.3)
    assert made.hp.alpha == 0.3
    bare = type(made)(made.model, made.ctx)
    assert bare.hp == type(made).HParams() and bare.hp.alpha != 0.3


def test_a_method_with_its_own_predict_is_asked_once_per_coalition() -> None:
    data = TinyDataset()
    asked: list[tuple[str, ...]] = []

    class Own(Baseline):
        def predict(self, batch: Any) -> Any:
            asked.append(tuple(m for m, p in zip(batch.modalities, batch.present.all(0), strict=True) if p))
            return self.model(batch)

    method = build_method("baseline", data)
    method.__class__ = Own
    batch = first_batch(data)
    coalitions = [frozenset(), frozenset({"audio"}), frozenset({"visual"}), frozenset({"audio", "visual"})]
    method.eval()
    with torch.no_grad():
        out, logits = method.predict_coalitions(batch, coalitions)
        # The whole batch once, then each coalition other than the whole one.
        assert asked == [("audio", "visual"), (), ("audio",), ("visual",)]
        assert logits.shape == (4, 8, 3) and torch.equal(logits[3], out.logits)
        for k, s in enumerate(coalitions[:3]):
            assert torch.equal(logits[k], method.model(batch.with_only(s)).logits)
        # The default predict leaves it to the model (one encoder pass under feature masking).
        method.__class__ = Baseline
        asked.clear()
        default_out, default = method.predict_coalitions(batch, coalitions)
        expected_out, expected = method.model.predict_coalitions(batch, coalitions)
    assert asked == [] and torch.equal(default, expected) and torch.equal(default_out.logits, expected_out.logits)
