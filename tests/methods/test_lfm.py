"""LFM against values computed by hand from its equations (docs/methods/lfm.md)."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

import balancemm
import balancemm.methods.lfm  # registers "lfm"
from balancemm.methods import RunContext
from balancemm.methods.lfm import (
    LFM,
    alignment,
    alpha_signal,
    fitted_alpha_cls,
    heuristic_alpha_al,
    learned_alpha_al,
    objective_terms,
)
from balancemm.models import ModelOutput, build_model
from balancemm.schema import parse
from tests.conftest import TinyDataset, first_batch, tiny_spec

O_A = torch.tensor([[1.0, 2.0, 3.0]])
O_V = torch.tensor([[3.0, 2.0, 1.0]])
JS_123 = 0.247588  # true JS of softmax(1, 2, 3) and softmax(3, 2, 1)
CODE_123 = 0.327622  # the released code's ½[KL(m‖p_a) + KL(m‖p_v)] for the same pair


def _method(num_modalities: int = 2, **hp: Any) -> LFM:
    data = TinyDataset(num_modalities)
    params = parse(LFM.HParams, hp, "method")
    torch.manual_seed(0)
    model = build_model(LFM.model_spec(tiny_spec(data), params))
    method = LFM(model, RunContext(model.modalities, dataset=data, needs=LFM.needs, batch_size=8), params)
    method.train()
    return method


def test_alignment_values() -> None:
    assert float(alignment([O_A, O_A.clone()])) == 0
    assert float(alignment([O_A, O_A.clone()], "mixture_kl")) == 0
    assert float(alignment([O_A, O_V])) == pytest.approx(JS_123, abs=1e-6)
    assert float(alignment([O_A, O_V], "mixture_kl")) == pytest.approx(CODE_123, abs=1e-6)
    # Extreme logits: JS stays below ln 2, the code's quantity grows without bound.
    far_a, far_v = torch.tensor([[10.0, 0.0]]), torch.tensor([[0.0, 10.0]])
    js_far = float(alignment([far_a, far_v]))
    assert js_far == pytest.approx(0.6926, abs=1e-4) and js_far <= math.log(2)
    assert float(alignment([far_a, far_v], "mixture_kl")) == pytest.approx(4.307, abs=1e-3)
    assert float(alignment([2 * far_a, 2 * far_v], "mixture_kl")) == pytest.approx(9.307, abs=1e-3)
    assert float(alignment([2 * far_a, 2 * far_v])) <= math.log(2)


def test_alignment_is_batchmean_and_averages_pairs() -> None:
    # Rows (O_A vs O_V) and (O_A vs O_A): sum over classes, mean over samples → JS/2.
    both_a, mixed = torch.cat([O_A, O_A]), torch.cat([O_V, O_A])
    assert float(alignment([both_a, mixed])) == pytest.approx(JS_123 / 2, abs=1e-6)
    # Three modalities, pairs (a, a'), (a, v), (a', v) → (0 + JS + JS) / 3.
    assert float(alignment([O_A, O_A.clone(), O_V])) == pytest.approx(2 / 3 * JS_123, abs=1e-6)
    assert float(alignment([O_A, O_A.clone(), O_V], "mixture_kl")) == pytest.approx(2 / 3 * CODE_123, abs=1e-6)


def test_heuristic_and_fitted_schedules() -> None:
    assert heuristic_alpha_al(0) == 0.95  # clipped from 1
    assert heuristic_alpha_al(1) == pytest.approx(0.7408, abs=1e-4)
    assert heuristic_alpha_al(5) == pytest.approx(0.2231, abs=1e-4)
    assert heuristic_alpha_al(10) == heuristic_alpha_al(30) == 0.05
    fitted = [fitted_alpha_cls(e) for e in (0, 50, 100, 150, 170)]
    assert fitted == pytest.approx([0.2046, 0.4367, 0.5392, 0.8213, 0.9686], abs=1e-4)
    assert fitted_alpha_cls(183) == 1.0 and fitted_alpha_cls(240) == 0.0  # outside the fitted range


def test_learned_step_direction_and_clip() -> None:
    assert learned_alpha_al(0.95, 1e-4, 100.0) == pytest.approx(0.94)  # a > 0 moves weight to classification
    assert learned_alpha_al(0.5, 1e-4, -100.0) == pytest.approx(0.51)
    assert learned_alpha_al(0.95, 1e-4, -100.0) == 0.95
    assert learned_alpha_al(0.5, 1e-4, 1e6) == 0.05


def test_model_fuses_by_averaging_separate_linear_heads() -> None:
    method = _method(3)
    model = method.model.eval()
    out = model(first_batch(TinyDataset(3)))
    torch.testing.assert_close(out.logits, torch.stack(list(out.unimodal_logits.values())).mean(0))
    for m, h in out.features.items():
        fc = model.fusion.fc[m]
        torch.testing.assert_close(out.unimodal_logits[m], h @ fc.weight.t() + fc.bias)


@pytest.mark.parametrize("kind", ["js", "mixture_kl"])
def test_loss_is_twice_the_alpha_weighted_sum(kind: str) -> None:
    # ō = mean((1, 2, 3), (3, 2, 1)) = (2, 2, 2) → CE = ln 3 whatever the label.
    method = _method(alignment=kind)
    batch = first_batch(TinyDataset(), 1)
    terms = method.losses(ModelOutput((O_A + O_V) / 2, {}, {"audio": O_A, "visual": O_V}), batch)
    align = JS_123 if kind == "js" else CODE_123
    assert float(terms["ce"]) == pytest.approx(2 * 0.05 * math.log(3), abs=1e-6)
    assert float(terms["align"]) == pytest.approx(2 * 0.95 * align, abs=1e-6)
    if kind == "js":
        assert float(sum(terms.values())) == pytest.approx(0.580279, abs=1e-6)


def test_alpha_signal_matches_a_finite_difference_hvp() -> None:
    method = _method()
    model = method.model.double().eval()
    batch = first_batch(TinyDataset(), 8)
    batch = replace(batch, inputs={m: x.double() for m, x in batch.inputs.items()})
    a = alpha_signal(model, batch, 0.3, 0.7, "js")
    params = list(model.parameters())
    first = next(iter(model.encoders[model.modalities[0]].parameters()))
    assert first is params[0]

    def grads() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        ce, al = objective_terms(model(batch), batch.label, model.modalities, "js")
        total = torch.autograd.grad(0.3 * ce + 0.7 * al, params, retain_graph=True)
        return list(total), list(torch.autograd.grad(ce, params))

    _, g_c = grads()
    eps = 1e-5
    with torch.no_grad():
        for p, v in zip(params, g_c, strict=True):
            p.add_(eps * v)
    plus, _ = grads()
    with torch.no_grad():
        for p, v in zip(params, g_c, strict=True):
            p.sub_(2 * eps * v)
    minus, _ = grads()
    expected = float(((plus[0] - minus[0]) / (2 * eps)).mean())
    assert a == pytest.approx(expected, rel=1e-4, abs=1e-9)
    assert a != 0


def test_learned_rule_keeps_alpha_in_range_and_halves_eta() -> None:
    method = _method(3)
    ctx = method.ctx
    method.on_fit_start()
    bn = next(m for m in method.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
    stats = bn.running_mean.clone()
    prev_al, etas = 0.95, {}
    for epoch in range(42):
        method.on_epoch_start(epoch)
        logs = ctx.pop_logs()
        al, cls = float(method.alpha_al), float(method.alpha_cls)
        assert 0.05 <= al <= 0.95 and al + cls == pytest.approx(1.0, abs=1e-15)
        assert al == pytest.approx(learned_alpha_al(prev_al, logs["lfm/lr_alpha"], logs["lfm/signal"]), abs=1e-15)
        assert logs["lfm/alpha_al"] == al and logs["lfm/alpha_cls"] == pytest.approx(cls)
        etas[epoch], prev_al = float(method.lr_alpha), al
    assert etas[0] == etas[19] == 1e-4 and etas[20] == etas[39] == 5e-5 and etas[40] == 2.5e-5
    # The α pass runs in eval mode: BatchNorm statistics untouched, train mode restored.
    torch.testing.assert_close(bn.running_mean, stats)
    assert all(m.training for m in method.model.modules())


def test_learned_rule_reads_the_same_validation_rows_every_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    method = _method(val_samples=5)
    ctx = method.ctx
    calls: list[tuple[str, Any]] = []
    real = ctx.rows

    def spy(split: Any, index: Any) -> Any:
        batch = real(split, index)
        calls.append((split, batch.index.clone()))
        return batch

    monkeypatch.setattr(ctx, "rows", spy)
    method.on_fit_start()
    for epoch in range(3):
        method.on_epoch_start(epoch)
    assert [split for split, _ in calls] == ["val"] * 3 and ctx.used_val
    rows = [r for _, r in calls]
    assert rows[0].numel() == 5 and all(torch.equal(r, rows[0]) for r in rows)


@pytest.mark.parametrize("schedule", ["fitted", "heuristic"])
def test_fixed_schedules_set_alpha_without_validation_data(schedule: str) -> None:
    method = _method(schedule=schedule)
    method.on_fit_start()
    method.on_epoch_start(5)
    expected_al = heuristic_alpha_al(5) if schedule == "heuristic" else 1 - fitted_alpha_cls(5)
    assert float(method.alpha_al) == pytest.approx(expected_al) and not method.ctx.used_val


def test_alpha_state_is_in_the_state_dict() -> None:
    method = _method()
    method.on_fit_start()
    method.on_epoch_start(0)
    state = method.state_dict()
    assert {"alpha_cls", "alpha_al", "lr_alpha"} <= set(state)
    clone = _method()
    clone.load_state_dict(state)
    assert float(clone.alpha_al) == float(method.alpha_al) and float(clone.alpha_cls) == float(method.alpha_cls)


def test_initial_alpha_follows_the_original_and_balancemm_is_a_setting() -> None:
    assert (float(_method().alpha_cls), float(_method().alpha_al)) == pytest.approx((0.05, 0.95))
    assert (float(_method(alpha_al_init=0.05).alpha_cls), 0.05) == pytest.approx((0.95, 0.05))


def test_end_to_end_uses_validation_data_and_counts_the_alpha_pass(tmp_path: Path) -> None:
    summary = balancemm.train("lfm", "embedded", out=tmp_path / "run", sets=["train.epochs=2"])
    assert summary["status"] == "complete" and summary["used_validation_in_training"] is True
    assert summary["flops"]["by_phase"]["lfm_alpha"] > 0
