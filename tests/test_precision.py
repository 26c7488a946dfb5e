"""Mixed precision: every method trains in bf16, and under fp16 loss scaling sees true gradients."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import balancemm
from balancemm.cli import main
from balancemm.config import resolve_config
from balancemm.engine.trainer import Trainer
from balancemm.methods import Method, RunContext, list_methods
from balancemm.precision import Precision
from tests.conftest import TinyDataset, build_method, interrupted_at
from tests.methods.test_all_methods import HPARAMS

Snapshots = list[tuple[str, dict[str, torch.Tensor]]]


def _grads_seen(name: str, data: TinyDataset, scale: float, steps: int = 2) -> tuple[Method, Snapshots]:
    """The gradients a method finds at ``after_backward`` and at each optimiser step of its first
    ``steps`` steps, trained in fp16 with loss scale ``scale`` (1 = no scaling)."""
    method = build_method(name, data, precision=Precision("fp16", "cpu", init_scale=scale), **HPARAMS.get(name, {}))
    ctx = method.ctx
    seen: Snapshots = []

    def snapshot(where: str) -> None:
        if sum(w == "step" for w, _ in seen) < steps:
            grads = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
            seen.append((where, grads))

    after_backward, optimizer_step = method.after_backward, ctx.optimizer_step

    def spy_after_backward(out: Any, batch: Any) -> None:
        snapshot("after_backward")
        after_backward(out, batch)

    def spy_step(optimizer: Any = None) -> None:
        snapshot("step")
        optimizer_step(optimizer)

    method.after_backward = spy_after_backward  # type: ignore[method-assign]
    ctx.optimizer_step = spy_step  # type: ignore[method-assign]
    # As the trainer runs it: every hook inside the run's autocast.
    with ctx.autocast():
        method.on_fit_start()
        method.train()
        method.on_epoch_start(0)
        method.train_epoch(0, ctx.batches("train", shuffle=True))
    return method, seen


@pytest.mark.parametrize("name", list_methods())
def test_under_fp16_a_method_sees_the_unscaled_gradients(name: str) -> None:
    data = TinyDataset(2)
    scaled_method, scaled = _grads_seen(name, data, scale=2.0**12)
    _, plain = _grads_seen(name, data, scale=1.0)
    assert scaled_method.ctx.precision.skipped == 0 and scaled_method.ctx.precision.scale == 2.0**12
    assert [w for w, _ in scaled] == [w for w, _ in plain] and any(w == "step" for w, _ in scaled)
    for (where, got), (_, want) in zip(scaled, plain, strict=True):
        assert got.keys() == want.keys() and got, where
        for key in got:
            # Scaled gradients would be 4096 times too large; true ones differ by the fp16 rounding of
            # intermediates that underflow without scaling (an fp16 ulp of the tensor's largest entry).
            atol = 1e-3 * float(want[key].abs().max()) + 1e-7
            torch.testing.assert_close(got[key], want[key], rtol=1e-2, atol=atol, msg=f"{name} {where} {key}")


def test_loss_scaling_is_exact_across_accumulated_backward_passes() -> None:
    torch.manual_seed(0)
    layer, x = nn.Linear(4, 3), torch.randn(5, 4)
    results = []
    for scale in (1.0, 2.0**10):
        ctx = RunContext(("a",), precision=Precision("fp16", "cpu", init_scale=scale))
        ctx.attach_optimizer(torch.optim.SGD(layer.parameters(), lr=0.1), layer)
        layer.zero_grad(set_to_none=True)
        with ctx.autocast():
            ctx.backward(layer(x).square().mean())
            ctx.backward(layer(x).sum())  # accumulates onto the first pass's gradients
            (g,) = ctx.grad(layer(x).mean(), [layer.weight])
        assert layer.weight.grad is not None and g is not None
        results.append((layer.weight.grad.clone(), g))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=0, atol=0)


def test_an_overflowing_step_is_skipped_not_a_failure() -> None:
    method = build_method("ogm_ge", TinyDataset(2), precision=Precision("fp16", "cpu", init_scale=2.0**120))
    ctx, called = method.ctx, []
    method.after_backward = lambda out, batch: called.append(1)  # type: ignore[method-assign]
    before = {n: p.detach().clone() for n, p in method.named_parameters()}
    batch = next(iter(ctx.batches("train", shuffle=True)))
    with ctx.autocast():
        method.training_step(batch)
    assert ctx.step == 1 and ctx.precision.skipped == 1 and ctx.precision.scale == 2.0**119
    assert not called, "after_backward saw an overflowed step"
    assert all(torch.equal(p, before[n]) for n, p in method.named_parameters())
    assert all(p.grad is None for p in method.parameters())
    assert ctx.pop_logs()["amp/skipped_steps"] == 1.0


def test_the_loss_scale_halves_on_overflow_and_doubles_after_a_run_of_good_steps() -> None:
    p = Precision("fp16", "cpu", init_scale=8.0, growth_interval=2)
    p.update(overflow=False)
    assert p.scale == 8.0
    p.update(overflow=False)
    assert p.scale == 16.0
    p.update(overflow=True)
    assert (p.scale, p.skipped, p.good_steps) == (8.0, 1, 0)
    q = Precision("fp16", "cpu")
    q.load_state_dict(p.state_dict())
    assert q.state_dict() == p.state_dict()
    assert Precision("bf16").scale == 1.0 and not Precision("bf16").scaled


@pytest.mark.parametrize("name", list_methods())
def test_every_method_trains_in_bf16_on_the_cpu(name: str, tmp_path: Path) -> None:
    sets = ["train.epochs=1", "train.precision=bf16"]
    summary = balancemm.train(name, out=tmp_path / "run", sets=sets, **HPARAMS.get(name, {}))
    assert summary["precision"] == {"name": "bf16", "requested": "bf16", "loss_scale": None, "skipped_steps": None}
    assert summary["environment"]["precision"] == "bf16"
    assert 0 <= summary["test"]["accuracy"] <= 1 and summary["flops"]["total"] > 0


def test_autocast_covers_training_and_evaluation(tmp_path: Path) -> None:
    cfg = resolve_config("agm", sets=["train.epochs=1", "train.precision=bf16"])
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    seen: set[tuple[bool, torch.dtype]] = set()
    layer = next(m for m in trainer.method.model.modules() if isinstance(m, nn.Linear))
    layer.register_forward_hook(lambda mod, args, out: seen.add((mod.training, out.dtype)))
    trainer.fit()
    # AGM's coalition passes run in eval mode during training; evaluation is eval mode too.
    assert seen == {(True, torch.bfloat16), (False, torch.bfloat16)}


def test_fp16_resumes_exactly_with_its_loss_scale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sets = ["train.epochs=3", "train.precision=fp16"]
    whole = balancemm.train("ogm_ge", out=tmp_path / "whole", sets=sets)
    with interrupted_at(monkeypatch, 2), pytest.raises(KeyboardInterrupt):
        balancemm.train("ogm_ge", out=tmp_path / "cut", sets=sets)
    resumed = balancemm.train("ogm_ge", out=tmp_path / "cut", sets=sets)
    for key in ("test", "shapley", "selected_epoch", "precision", "flops"):
        assert resumed[key] == whole[key], key
    assert whole["precision"]["name"] == "fp16" and whole["precision"]["loss_scale"] == 2.0**16


def test_resuming_in_another_precision_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    with interrupted_at(monkeypatch, 1):
        assert main(["train", "--method", "baseline", "--set", "train.epochs=2", "--out", str(out), "--quiet"]) == 130
    # The same config (precision auto) on a device where auto means bf16, as on a GPU.
    monkeypatch.setattr("balancemm.engine.trainer.resolve_precision", lambda precision, device: "bf16")
    capsys.readouterr()
    assert main(["train", "--method", "baseline", "--set", "train.epochs=2", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("balancemm: error:") and "trained in fp32" in err and "\n" not in err
    assert not (out / "summary.json").exists()
