"""Data Remixing against numbers computed by hand from its equations (docs/methods/remix.md) and its behaviour."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import balancemm.methods.remix as remix
from balancemm.data.batch import Batch, SamplePlan
from balancemm.errors import ConfigError
from balancemm.metrics.flops import FlopMeter
from balancemm.schema import parse, resolve_epoch
from tests.conftest import TinyDataset, build_method, first_batch, tiny_spec

P_AUDIO = [0.7, 0.1, 0.1, 0.05, 0.03, 0.02]
P_VISUAL = [0.3, 0.2, 0.2, 0.1, 0.1, 0.1]


def _logits(p: list[float]) -> torch.Tensor:
    return torch.tensor([p], dtype=torch.float64).log()  # softmax(log p) = p


# -- numbers computed by hand -------------------------------------------------------------------------


def test_assignment_by_hand() -> None:
    kl_a, kl_v = float(remix.kl_to_uniform(_logits(P_AUDIO))), float(remix.kl_to_uniform(_logits(P_VISUAL)))
    assert kl_a == pytest.approx(1.079635, abs=1e-6)
    assert kl_v == pytest.approx(0.138523, abs=1e-6)
    # subset order (visual, audio): the least confident modality is visual, so the sample trains with video.
    order = remix.resolve_order(("audio", "visual"), None)
    assert order == ("visual", "audio")
    assert remix.assign(torch.tensor([[kl_v, kl_a]])).tolist() == [0]


def test_bounds_and_entropy_form() -> None:
    assert float(remix.kl_to_uniform(torch.zeros(1, 6))) == pytest.approx(0.0, abs=1e-12)
    one_hot = torch.tensor([[100.0, 0, 0, 0, 0, 0]])  # p ≈ (1, 0, …): the zeros are clipped to 1e-9
    assert float(remix.kl_to_uniform(one_hot)) == pytest.approx(2.584962, abs=1e-6)
    assert math.log2(6) == pytest.approx(2.584962, abs=1e-6)
    p = torch.tensor(P_AUDIO, dtype=torch.float64)
    entropy_bits = -(p * p.log2()).sum()
    assert float(remix.kl_to_uniform(_logits(P_AUDIO))) == pytest.approx(math.log2(6) - float(entropy_bits), abs=1e-12)
    # C comes from the logits: with 3 classes a uniform prediction is 0 and a certain one log2 3.
    assert float(remix.kl_to_uniform(torch.tensor([[50.0, 0.0, 0.0]]))) == pytest.approx(math.log2(3), abs=1e-6)


def test_ties_go_to_the_first_modality_of_the_order() -> None:
    assert remix.assign(torch.tensor([[0.5, 0.5], [0.7, 0.2], [0.1, 0.1]])).tolist() == [0, 1, 0]
    assert remix.assign(torch.tensor([[0.3, 0.3, 0.3]])).tolist() == [0]


def test_subset_order_is_checked() -> None:
    mods = ("audio", "text", "visual")
    assert remix.resolve_order(mods, None) == ("visual", "text", "audio")
    assert remix.resolve_order(mods, ("text", "audio", "visual")) == ("text", "audio", "visual")
    with pytest.raises(ConfigError, match="each modality once"):
        remix.resolve_order(mods, ("audio", "visual"))
    with pytest.raises(ConfigError, match="each modality once"):
        remix.resolve_order(mods, ("audio", "audio", "visual"))


def test_adapted_warmup_is_the_officials_share() -> None:
    assert resolve_epoch(remix.Remix.adapted["warmup"], 60) == 10
    assert resolve_epoch(remix.Remix.adapted["warmup"], 30) == 5


# -- behaviour ---------------------------------------------------------------------------------------


def _build(data: TinyDataset, **hp: Any) -> remix.Remix:
    method = build_method("remix", data, **hp)
    assert isinstance(method, remix.Remix)
    return method


def _kl_by_hand(method: remix.Remix, data: TinyDataset) -> torch.Tensor:
    """``[N, M]`` KL to uniform in bits per row, columns in the method's subset order, eval mode."""
    model = method.model
    batch = first_batch(data, n=len(data.split("train")))
    method.eval()
    with torch.no_grad():
        z = model.unimodal(model.encode(batch))
    method.train()
    columns = []
    for m in method.order:
        p = z[m].double().softmax(1).clamp(1e-9, 1)
        columns.append((p * (p * z[m].shape[1]).log2()).sum(1))
    return torch.stack(columns, 1)


def test_model_spec_sets_linear_heads_and_refuses_input_masking() -> None:
    data = TinyDataset(2)
    method = _build(data)
    assert method.model.unimodal_heads is not None and method.model.mask == "feature"
    hp = parse(remix.Remix.HParams, {}, "method")
    with pytest.raises(ConfigError, match=r"model\.mask=feature"):
        remix.Remix.model_spec(tiny_spec(data, mask="input"), hp)
    with pytest.raises(ConfigError, match="one weight per modality"):
        _build(data, gammas=(1.0, 1.0, 1.0))


def test_warm_up_epochs_are_joint_with_the_unimodal_terms() -> None:
    data = TinyDataset(2)
    method = _build(data)
    assert method.on_epoch_start(0) is None and method.on_epoch_start(9) is None
    assert not method.acts_in(9) and method.acts_in(10)
    batch = first_batch(data)
    out = method.forward(batch)
    losses = method.losses(out, batch)
    assert set(losses) == {"ce", "uni_audio", "uni_visual"}
    torch.testing.assert_close(losses["ce"], F.cross_entropy(out.logits, batch.label))
    for m in ("audio", "visual"):  # α = β = 0.5
        torch.testing.assert_close(losses[f"uni_{m}"], 0.5 * F.cross_entropy(out.unimodal_logits[m], batch.label))


@pytest.mark.parametrize("num", [2, 3])
def test_the_remix_pass_assigns_each_row_to_its_least_confident_modality(num: int) -> None:
    data = TinyDataset(num)
    method = _build(data, warmup=1)
    bn = [b.detach().clone() for b in method.buffers()]
    state = method.ctx.generator.get_state()
    kl = _kl_by_hand(method, data)
    plan = method.on_epoch_start(1)
    assert plan is not None and plan.subsets is not None
    assert all(torch.equal(b, a) for b, a in zip(method.buffers(), bn, strict=True))  # eval mode: no BN update
    assert torch.equal(method.ctx.generator.get_state(), state)  # the pass draws nothing
    assert all(p.grad is None for p in method.parameters())
    expected = kl.argmin(1)
    mods = method.model.modalities
    for k, (m, part) in enumerate(zip(method.order, plan.subsets, strict=True)):
        assert part.index.tolist() == (expected == k).nonzero().flatten().tolist(), m
        assert part.present.tolist() == [x == m for x in mods]
    # Every training row exactly once per epoch, with its assigned modality alone.
    batches = list(method.ctx.batches("train", shuffle=True, plan=plan))
    index = torch.cat([b.index for b in batches])
    assert sorted(index.tolist()) == list(range(len(data.split("train"))))
    for b in batches:
        assert (b.present == b.present[0]).all() and int(b.present[0].sum()) == 1
        k = method.order.index(mods[int(b.present[0].nonzero())])
        assert (expected[b.index] == k).all()
    # The subsets are trained in order: visual (then text) then audio.
    seen = [mods[int(b.present[0].nonzero())] for b in batches]
    assert seen == sorted(seen, key=method.order.index)


def test_the_remix_pass_is_counted_in_its_own_phase() -> None:
    data = TinyDataset(2)
    method = _build(data, warmup=0)
    meter = method.ctx.meter = FlopMeter("exact")
    with meter.counting():
        method.on_epoch_start(0)
    assert set(meter.by_phase) == {"remix/assign"} and meter.by_phase["remix/assign"] > 0


def test_ties_in_the_model_follow_the_subset_order(monkeypatch: pytest.MonkeyPatch) -> None:
    data = TinyDataset(2)
    monkeypatch.setattr(remix, "kl_to_uniform", lambda logits: torch.zeros(logits.shape[0], dtype=torch.float64))
    for order, first in ((None, "visual"), (("audio", "visual"), "audio")):
        method = _build(data, warmup=0, subset_order=order)
        plan = method.on_epoch_start(0)
        assert plan is not None and plan.subsets is not None
        assert [p.index.numel() for p in plan.subsets] == [24, 0] and method.order[0] == first


def _only(batch: Batch, modality: str) -> Batch:
    return batch.with_only([modality])


def test_a_video_batch_zeroes_audio_gradients_and_leaves_the_audio_head_alone() -> None:
    data = TinyDataset(2)
    method = _build(data, warmup=0, gamma=2.0)
    batch = _only(first_batch(data), "visual")
    method.zero_grad(set_to_none=True)
    out = method.forward(batch)
    losses = method.losses(out, batch)
    torch.testing.assert_close(losses["ce"], F.cross_entropy(out.logits, batch.label))
    torch.testing.assert_close(losses["uni_visual"], 2.0 * F.cross_entropy(out.unimodal_logits["visual"], batch.label))
    assert float(losses["uni_audio"]) == 0.0 and not losses["uni_audio"].requires_grad
    method.backward(losses)
    model = method.model
    audio = list(model.modality_parameters("audio"))
    assert all(p.grad is not None and not p.grad.any() for p in audio)  # exact zeros, not None
    assert all(p.grad is not None and p.grad.any() for p in model.modality_parameters("visual"))
    assert model.unimodal_heads is not None
    assert all(p.grad is None for p in model.unimodal_heads["audio"].parameters())
    assert all(p.grad is not None for p in model.unimodal_heads["visual"].parameters())
    # With per-modality weights the visual subset takes γ_visual.
    weighted = _build(data, warmup=0, gammas=(3.0, 0.25))
    out = weighted.forward(batch)
    torch.testing.assert_close(
        weighted.losses(out, batch)["uni_visual"], 0.25 * F.cross_entropy(out.unimodal_logits["visual"], batch.label)
    )


def test_a_whole_remixed_epoch_trains_each_subset_in_turn() -> None:
    data = TinyDataset(3)
    method = _build(data, warmup=0)
    ctx = method.ctx
    plan = method.on_epoch_start(0)
    assert isinstance(plan, SamplePlan)
    seen: list[tuple[int, ...]] = []
    real = method.losses

    def spy(out: Any, batch: Batch) -> Any:
        seen.append(tuple(batch.present[0].tolist()))
        return real(out, batch)

    method.losses = spy  # type: ignore[method-assign]
    method.train_epoch(0, ctx.batches("train", shuffle=True, plan=plan))
    assert ctx.step == len(seen) >= 1
    logs = ctx.pop_logs()
    assert sum(logs[f"remix/share_{m}"] for m in method.model.modalities) == pytest.approx(1.0)


def contract_remix(data: TinyDataset, monkeypatch: pytest.MonkeyPatch) -> None:
    """Remix: after warm-up every row goes, alone with its least confident modality (lowest KL to uniform in
    bits), to that modality's subset; subsets are trained in order with CE(z) + γ CE(z_m)."""
    method = build_method("remix", data, warmup=1)
    model, mods = method.model, method.model.modalities
    order = tuple(reversed(mods))  # visual (, text), audio
    assert method.on_epoch_start(0) is None and not method.acts_in(0) and method.acts_in(1)
    n = len(data.split("train"))
    everything = first_batch(data, n=n)
    method.eval()
    with torch.no_grad():
        z = model.unimodal(model.encode(everything))
    method.train()
    kl = torch.stack([(p * (p * z[m].shape[1]).log2()).sum(1) for m in order for p in [z[m].double().softmax(1)]], 1)
    expected = kl.argmin(1)
    plan = method.on_epoch_start(1)
    assert plan is not None and plan.subsets is not None
    for k, (m, part) in enumerate(zip(order, plan.subsets, strict=True)):
        assert part.index.tolist() == (expected == k).nonzero().flatten().tolist(), m
        assert part.present.tolist() == [x == m for x in mods]
    assert sorted(torch.cat([p.index for p in plan.subsets]).tolist()) == list(range(n))
    # A batch of the first non-empty subset: only its modality present; its encoder learns, the others get zeros.
    k, part = next((k, p) for k, p in enumerate(plan.subsets) if p.index.numel())
    m = order[k]
    batch = next(iter(method.ctx.batches("train", shuffle=True, plan=SamplePlan(subsets=(part,)))))
    out = method.forward(batch)
    losses = method.losses(out, batch)
    torch.testing.assert_close(losses["ce"], F.cross_entropy(out.logits, batch.label))
    torch.testing.assert_close(losses[f"uni_{m}"], F.cross_entropy(out.unimodal_logits[m], batch.label))
    method.zero_grad(set_to_none=True)
    method.backward(losses)
    for other in mods:
        grads = [p.grad for p in model.modality_parameters(other)]
        if other == m:
            assert any(g is not None and g.any() for g in grads)
        else:
            assert all(g is not None and not g.any() for g in grads), other
            assert model.unimodal_heads is not None
            assert all(p.grad is None for p in model.unimodal_heads[other].parameters()), other


@pytest.mark.parametrize("num", [2, 3])
def test_contract(num: int, monkeypatch: pytest.MonkeyPatch) -> None:
    contract_remix(TinyDataset(num), monkeypatch)


def test_unknown_keys_are_refused() -> None:
    with pytest.raises(ConfigError):
        parse(remix.Remix.HParams, {"beta": 0.5}, "method")
    assert replace(parse(remix.Remix.HParams, {}, "method"), alpha=1.0).alpha == 1.0
