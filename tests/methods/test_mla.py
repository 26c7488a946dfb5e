"""MLA against numbers computed by hand from its equations (docs/methods/mla.md) and its behaviour."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import balancemm.methods.mla as mla
from balancemm.config import EncoderConfig
from balancemm.data.batch import Batch
from balancemm.errors import ConfigError
from balancemm.methods import RunContext
from balancemm.models import build_model
from balancemm.models.encoders.cnn import CompactCNNOptions
from balancemm.precision import Precision
from tests.conftest import TinyDataset, build_method, first_batch, tiny_spec

# -- numbers computed by hand -------------------------------------------------------------------------


def test_gating_weights_follow_the_entropies() -> None:
    logits = torch.tensor([[[2.0, 0.0, 0.0]], [[0.0, 0.0, 0.0]]])  # [M=2, B=1, C=3]
    log_p = logits.log_softmax(-1)
    entropy = -(log_p.exp() * log_p).sum(-1).squeeze(1)
    assert entropy.tolist() == pytest.approx([0.665573, math.log(3)], abs=1e-6)
    assert mla.entropy_weights(logits).squeeze(1).tolist() == pytest.approx([0.606599, 0.393401], abs=1e-6)


@pytest.mark.parametrize("num", [2, 3])
def test_equal_entropies_give_equal_weights(num: int) -> None:
    # permuted logits have the same entropy; per sample, whatever the other rows hold
    base = torch.tensor([[1.0, -0.5, 0.2], [3.0, 0.0, 0.0]])
    logits = torch.stack([base.roll(k, dims=1) for k in range(num)])
    torch.testing.assert_close(mla.entropy_weights(logits), torch.full((num, 2), 1 / num))


def test_projector_update_elementwise_and_scalar() -> None:
    eye, r = torch.eye(2, dtype=torch.float64), torch.tensor([1.0, 1.0], dtype=torch.float64)
    elementwise = mla.owm_update(eye, r, 0.1, "elementwise")
    scalar = mla.owm_update(eye, r, 0.1, "scalar")
    expected_e = torch.tensor([[0.070360, -0.703598], [-0.703598, 0.070360]], dtype=torch.float64)
    expected_s = torch.tensor([[0.523217, -0.475651], [-0.475651, 0.523217]], dtype=torch.float64)
    torch.testing.assert_close(elementwise, expected_e, atol=1e-6, rtol=0)
    torch.testing.assert_close(scalar, expected_s, atol=1e-6, rtol=0)


def test_projector_updates_agree_when_r_has_one_non_zero_entry() -> None:
    # k = [1, 0]: P = diag(1 − 1/1.1, 1) / ‖·‖_F = diag(0.090909, 1) / 1.004124
    eye, r = torch.eye(2, dtype=torch.float64), torch.tensor([1.0, 0.0], dtype=torch.float64)
    expected = torch.tensor([[0.090536, 0.0], [0.0, 0.995893]], dtype=torch.float64)
    for denominator in ("scalar", "elementwise"):
        torch.testing.assert_close(mla.owm_update(eye, r, 0.1, denominator), expected, atol=1e-6, rtol=0)


def test_alpha_schedule() -> None:
    assert mla.gs_alpha(0, 10) == pytest.approx(0.1, abs=1e-12)
    assert mla.gs_alpha(5, 10) == pytest.approx(0.031623, abs=1e-6)


def test_project_replaces_or_adds() -> None:
    g = torch.tensor([[1.0, 2.0]])
    p = torch.tensor([[0.5, 0.0], [1.0, 0.25]])  # g Pᵀ = [0.5, 1.5]
    assert mla.project(g, p, "replace").tolist() == [[0.5, 1.5]]
    assert mla.project(g, p, "add").tolist() == [[1.5, 3.5]]


def test_fuse_masks_absent_modalities_and_renormalises() -> None:
    logits = torch.tensor([[[1.0, 0.0]], [[0.0, 2.0]], [[4.0, 4.0]]])  # [M=3, B=1, C=2]
    weights = torch.tensor([[0.2], [0.3], [0.5]])
    both = torch.tensor([[True, True, False]])
    # (0.2·[1, 0] + 0.3·[0, 2]) / 0.5 = [0.4, 1.2]
    assert mla.fuse(logits, weights, both)[0].tolist() == pytest.approx([0.4, 1.2])
    assert mla.fuse(logits, weights, torch.zeros(1, 3, dtype=torch.bool)).tolist() == [[0.0, 0.0]]


def test_official_fixed_weights_by_name() -> None:
    assert mla.fixed_weights(("audio", "text", "visual"), None) == [0.35, 0.4, 0.25]
    assert mla.fixed_weights(("audio", "visual"), None) == [0.5, 0.5]
    assert mla.fixed_weights(("audio", "depth", "visual"), None) == pytest.approx([1 / 3] * 3)
    assert mla.fixed_weights(("audio", "visual"), (0.7, 0.3)) == [0.7, 0.3]


# -- behaviour ---------------------------------------------------------------------------------------


def _build(data: TinyDataset, **hp: Any) -> mla.MLA:
    method = build_method("mla", data, **hp)
    assert isinstance(method, mla.MLA)
    return method


@dataclass
class _Step:
    """What one optimiser step saw: H's weight gradient, and every parameter before and after."""

    grad: Tensor | None
    before: dict[str, Tensor]
    after: dict[str, Tensor]


def _recording(method: mla.MLA) -> list[_Step]:
    """Wrap ``ctx.optimizer_step`` to record every step."""
    ctx, steps = method.ctx, []
    original = ctx.optimizer_step

    def step(optimizer: torch.optim.Optimizer | None = None) -> None:
        grad = method.head.weight.grad
        before = {n: p.detach().clone() for n, p in method.named_parameters()}
        original(optimizer)
        after = {n: p.detach().clone() for n, p in method.named_parameters()}
        steps.append(_Step(grad.clone() if grad is not None else None, before, after))

    ctx.optimizer_step = step  # type: ignore[method-assign]
    return steps


def _raw_head_grad(method: mla.MLA, batch: Batch, modality: str) -> Tensor:
    """CE(H(φ_m(x_m)), y)'s gradient on H's weight at the current weights (no projection)."""
    model = method.model
    h = model.encoders[modality](batch.inputs[modality])
    loss = F.cross_entropy(model.unimodal({modality: h})[modality], batch.label)
    (grad,) = torch.autograd.grad(loss, method.head.weight)
    return grad


@pytest.mark.parametrize("mode", ["replace", "add"])
def test_projection_replaces_the_head_weight_gradient(mode: str) -> None:
    data = TinyDataset()
    method = _build(data, gs_mode=mode)
    method.updates.fill_(1)  # past the first update, so the very first modality is projected
    batch = first_batch(data)
    raw = _raw_head_grad(method, batch, "audio")
    with torch.no_grad():
        r = method.model.encoders["audio"](batch.inputs["audio"]).mean(0, keepdim=True)  # [1, d]
    # Hand OWM update at batch 0 of ceil(24 / 8) = 3 batches: α = 0.1, P = I − k kᵀ / (α + r k), k = rᵀ.
    k = r.T
    p = torch.eye(k.shape[0]) - k @ k.T / (0.1 + float(r @ k))
    p = p / p.norm()
    records = _recording(method)
    method.on_epoch_start(0)
    method.training_step(batch)
    expected = raw @ p.T if mode == "replace" else raw + raw @ p.T
    torch.testing.assert_close(records[0].grad, expected, rtol=1e-4, atol=1e-6)
    # SGD's first step (momentum buffer = gradient, no weight decay): W ← W − lr·g
    w = "model.fusion.head.weight"
    torch.testing.assert_close(records[0].after[w], records[0].before[w] - 0.05 * expected, rtol=1e-4, atol=1e-6)


def test_the_first_update_of_training_is_not_projected() -> None:
    data = TinyDataset()
    method = _build(data)
    batch = first_batch(data)
    raw = _raw_head_grad(method, batch, "audio")
    records = _recording(method)
    method.on_epoch_start(0)
    method.training_step(batch)
    torch.testing.assert_close(records[0].grad, raw)
    assert int(method.updates) == 2
    # the second modality's step did update P, which is no longer the identity
    assert not torch.allclose(method.projector, torch.eye(method.projector.shape[0]))
    torch.testing.assert_close(method.projector.norm(), torch.tensor(1.0))


def test_without_the_projection_gradients_are_plain() -> None:
    data = TinyDataset()
    method = _build(data, gs=False)
    method.updates.fill_(5)
    batch = first_batch(data)
    raw = _raw_head_grad(method, batch, "audio")
    records = _recording(method)
    method.training_step(batch)
    torch.testing.assert_close(records[0].grad, raw)
    assert torch.equal(method.projector, torch.eye(method.projector.shape[0]))


def test_by_default_each_modality_step_moves_only_its_encoder_and_the_head(tiny: TinyDataset) -> None:
    method = _build(tiny)
    assert method.hp.zero_grad == "none"
    records = _recording(method)
    method.on_epoch_start(0)
    for batch in method.ctx.batches("train", shuffle=True):  # several batches: momentum buffers everywhere
        method.training_step(batch)
    mods = method.model.modalities
    assert method.ctx.step == 3 * len(mods)  # one optimiser step per modality per batch
    for i, record in enumerate(records):
        m = mods[i % len(mods)]
        changed = {n for n, p in record.after.items() if not torch.equal(p, record.before[n])}
        allowed = {n for n in record.after if n.startswith((f"model.encoders.{m}.", "model.fusion.head."))}
        assert changed <= allowed, (m, changed - allowed)
        assert {"model.fusion.head.weight", "model.fusion.head.bias"} <= changed
    assert all(p.grad is None for p in method.parameters())


# -- zero_grad: torch >= 2 clears the gradients, the official torch 1.8.1 zero-fills them -----------------


@pytest.mark.parametrize(("zero_grad", "held", "audio_after"), [("none", [], 1.6), ("zeros", ["a", "h"], 1.16)])
def test_zero_grad_by_hand(zero_grad: str, held: list[str], audio_after: float) -> None:
    # Encoders a = v = 2 and the shared head h = 1; SGD η = 0.1, μ = 0.9, λ = 0.5: d = g + λθ, buf ← μ buf + d
    # (buf = d at a parameter's first step), θ ← θ − η buf.
    # Audio step, L = 3a + h:   a: d = 3 + 1 = 4 = buf, a = 2 − 0.4 = 1.6;  h: d = 1 + 0.5 = 1.5 = buf, h = 0.85.
    # Visual step, L = v + 2h:  v: d = 1 + 1 = 2 = buf, v = 2 − 0.2 = 1.8;
    #   h: d = 2 + 0.425 = 2.425, buf = 1.35 + 2.425 = 3.775, h = 0.85 − 0.3775 = 0.4725;
    #   a, none: no gradient, SGD skips it: 1.6;
    #   a, zeros: g = 0, d = 0 + 0.8, buf = 0.9·4 + 0.8 = 4.4, a = 1.6 − 0.44 = 1.16.
    params = {n: nn.Parameter(torch.tensor(x, dtype=torch.float64)) for n, x in (("a", 2.0), ("v", 2.0), ("h", 1.0))}
    a, v, h = params.values()
    ctx = RunContext(("audio", "visual"))
    ctx.attach_optimizer(torch.optim.SGD([a, v, h], lr=0.1, momentum=0.9, weight_decay=0.5))
    ctx.backward(3 * a + h)
    mla.optimizer_step(ctx, zero_grad)
    assert [n for n, p in params.items() if p.grad is not None] == held
    assert all(float(p.grad) == 0.0 for p in params.values() if p.grad is not None)
    ctx.backward(v + 2 * h)
    mla.optimizer_step(ctx, zero_grad)
    assert [a.item(), v.item(), h.item()] == pytest.approx([audio_after, 1.8, 0.4725], abs=1e-12)


def test_zero_filled_gradients_move_the_earlier_encoders_within_a_batch(tiny: TinyDataset) -> None:
    method = _build(tiny, zero_grad="zeros")
    records = _recording(method)
    method.on_epoch_start(0)
    batches = iter(method.ctx.batches("train", shuffle=True))
    method.training_step(next(batches))
    mods = method.model.modalities
    names = {m: [n for n in records[0].after if n.startswith(f"model.encoders.{m}.")] for m in mods}
    for i, m in enumerate(mods):
        for record in records[:i]:  # before its own step: no gradient yet
            assert all(torch.equal(record.after[n], record.before[n]) for n in names[m])
        # An encoder's first step makes its momentum buffer, buf = g (the test recipe has no weight decay);
        # k steps later, with a zero gradient, buf = μ^k g, so it moves by 0.9^k times its own first step.
        own = {n: records[i].after[n] - records[i].before[n] for n in names[m]}
        for k, record in enumerate(records[i + 1 :], 1):
            for n in names[m]:
                torch.testing.assert_close(record.after[n] - record.before[n], 0.9**k * own[n], rtol=1e-4, atol=1e-6)
            assert any(not torch.equal(record.after[n], record.before[n]) for n in names[m])
    # Deleted after the last modality (official main.py 468-470): in the next batch's first step, the encoders
    # that have momentum but no gradient do not move.
    assert all(p.grad is None for p in method.parameters())
    method.training_step(next(batches))
    first = records[len(mods)]
    changed = {n for n, p in first.after.items() if not torch.equal(p, first.before[n])}
    assert changed <= {*names[mods[0]], "model.fusion.head.weight", "model.fusion.head.bias"}


def test_zero_filled_gradients_follow_a_step_skipped_for_fp16_overflow() -> None:
    a = nn.Parameter(torch.tensor(1.0))
    ctx = RunContext(("audio",), precision=Precision("fp16", "cpu", init_scale=2.0**120))
    ctx.attach_optimizer(torch.optim.SGD([a], lr=0.1, momentum=0.9))
    ctx.backward(1e3 * a)  # the scaled gradient 1e3 · 2^120 overflows float32
    mla.optimizer_step(ctx, "zeros")
    assert ctx.precision.skipped == 1 and a.item() == 1.0
    assert a.grad is not None and a.grad.item() == 0.0


def test_alpha_schedule_counts_batches_per_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    data = TinyDataset(n=20)  # batches of 8, 8 and 4 rows: ceil(20 / 8) = 3
    method = _build(data)
    calls: list[tuple[int, int]] = []
    real = mla.gs_alpha

    def spy(batch_idx: int, num_batches: int) -> float:
        calls.append((batch_idx, num_batches))
        return real(batch_idx, num_batches)

    monkeypatch.setattr(mla, "gs_alpha", spy)
    for epoch in range(2):
        method.on_epoch_start(epoch)
        for batch in method.ctx.batches("train", shuffle=True):
            method.training_step(batch)
    assert calls == [(0, 3), (1, 3), (2, 3)] * 2


def test_absent_modalities_get_zero_weight(tiny: TinyDataset) -> None:
    for fusion in ("entropy", "fixed"):
        method = _build(tiny, fusion=fusion).eval()
        batch = first_batch(tiny)
        mods = method.model.modalities
        with torch.no_grad():
            full = method.predict(batch)
            only = method.predict(batch.with_only({mods[0]}))
            # one modality left: the prediction is its own logits, the masked ones do not vote
            torch.testing.assert_close(only.logits, full.unimodal_logits[mods[0]])
            torch.testing.assert_close(method.predict(batch.with_only(set())).logits, torch.zeros_like(full.logits))
            # rows missing a modality differ from full rows only through that modality's weight
            partial = method.predict(batch.with_only(set(mods[:2])))
            z = torch.stack([full.unimodal_logits[m] for m in mods[:2]])
            w = mla.entropy_weights(z) if fusion == "entropy" else method.fixed[:2, None].expand(2, len(batch))
            torch.testing.assert_close(partial.logits, (w / w.sum(0))[..., None].mul(z).sum(0))


def test_fixed_fusion_uses_the_official_weights() -> None:
    data = TinyDataset(3)
    method = _build(data, fusion="fixed").eval()
    batch = first_batch(data)
    with torch.no_grad():
        out = method.predict(batch)
    z = out.unimodal_logits
    torch.testing.assert_close(out.logits, 0.35 * z["audio"] + 0.4 * z["text"] + 0.25 * z["visual"])


def test_fixed_weights_must_match_the_modalities() -> None:
    with pytest.raises(ConfigError, match="one weight per modality"):
        build_method("mla", TinyDataset(3), fusion="fixed", fixed_weights=[0.5, 0.5])
    with pytest.raises(ConfigError, match="non-negative"):
        build_method("mla", TinyDataset(), fixed_weights=[-1.0, 2.0])


def test_unequal_feature_sizes_are_refused() -> None:
    data = TinyDataset()
    spec = tiny_spec(data)
    encoders = {**spec.encoders, "visual": EncoderConfig("cnn", CompactCNNOptions(channels=(4, 8)))}
    spec = mla.MLA.model_spec(replace(spec, encoders=encoders), mla.MLAHParams())
    with pytest.raises(ConfigError, match="same feature size"):
        build_model(spec)
