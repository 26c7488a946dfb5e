"""DGL against numbers computed by hand from its equations (docs/methods/dgl.md), and its behaviour."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from balancemm.context import RunContext
from balancemm.data.batch import Batch
from balancemm.errors import ConfigError
from balancemm.methods.dgl import DGL, dgl_logits
from balancemm.models.classifier import MultimodalClassifier, build_model
from balancemm.models.fusions.concat import ConcatFusion
from tests.conftest import TinyDataset, build_method, first_batch, tiny_spec

# -- numbers computed by hand (C = 3, d_a = d_v = 2, y = 1, α = 4) ------------------------------------------

W = [[0.5, -0.2, 0.1, 0.3], [-0.3, 0.4, 0.2, -0.1], [0.1, 0.1, -0.4, 0.2]]
B = [0.1, 0.0, -0.1]


def _head() -> tuple[ConcatFusion, dict[str, torch.Tensor], torch.Tensor]:
    fusion = ConcatFusion({"audio": 2, "visual": 2}, 3).double()
    with torch.no_grad():
        fusion.fc_out.weight.copy_(torch.tensor(W, dtype=torch.float64))
        fusion.fc_out.bias.copy_(torch.tensor(B, dtype=torch.float64))
    h = {
        "audio": torch.tensor([[1.0, 2.0]], dtype=torch.float64, requires_grad=True),
        "visual": torch.tensor([[0.5, -1.0]], dtype=torch.float64, requires_grad=True),
    }
    return fusion, h, torch.tensor([1])


def test_logits_and_losses_by_hand() -> None:
    fusion, h, y = _head()
    z, uni = dgl_logits(fusion, h)
    assert z.tolist()[0] == pytest.approx([-0.05, 0.7, -0.2], abs=1e-12)
    assert uni["audio"].tolist()[0] == pytest.approx([0.2, 0.5, 0.2], abs=1e-12)  # W[h_a; 0] + b: the full bias
    assert uni["visual"].tolist()[0] == pytest.approx([-0.15, 0.2, -0.5], abs=1e-12)
    ce, ce_a, ce_v = (F.cross_entropy(t, y).item() for t in (z, uni["audio"], uni["visual"]))
    assert (ce, ce_a, ce_v) == pytest.approx((0.630706, 0.908918, 0.789036), abs=5e-7)
    assert ce + 4 * (ce_a + ce_v) == pytest.approx(7.422523, abs=1e-6)
    # split: b/M = b/2 instead of b
    _, split = dgl_logits(fusion, h, "split")
    torch.testing.assert_close(split["audio"], uni["audio"] - torch.tensor(B, dtype=torch.float64) / 2)


def test_gradients_by_hand() -> None:
    fusion, h, y = _head()
    z, uni = dgl_logits(fusion, h)
    loss = F.cross_entropy(z, y) + 4 * (F.cross_entropy(uni["audio"], y) + F.cross_entropy(uni["visual"], y))
    loss.backward()
    assert h["audio"].grad.tolist()[0] == pytest.approx([1.432896, -1.074672], abs=5e-7)
    assert h["visual"].grad.tolist()[0] == pytest.approx([-0.669467, 0.782912], abs=5e-7)
    assert fusion.fc_out.bias.grad.tolist() == pytest.approx([0.251401, -0.467784, 0.216383], abs=5e-7)
    assert fusion.fc_out.weight.grad[0].tolist() == pytest.approx([0.251401, 0.502802, 0.125701, -0.251401], abs=5e-7)
    # the plain baseline, CE(z) through the head, gives the audio encoder much less: (0.287674, −0.215756)
    fusion, h, y = _head()
    F.cross_entropy(fusion(h), y).backward()
    assert h["audio"].grad.tolist()[0] == pytest.approx([0.287674, -0.215756], abs=5e-7)


def test_each_loss_reaches_only_its_own_side() -> None:
    fusion, h, y = _head()
    z, uni = dgl_logits(fusion, h)
    F.cross_entropy(z, y).backward()  # the fused loss: the head only
    assert h["audio"].grad is None and h["visual"].grad is None
    assert fusion.fc_out.weight.grad is not None
    fusion.zero_grad(set_to_none=True)
    (F.cross_entropy(uni["audio"], y) + F.cross_entropy(uni["visual"], y)).backward()  # the unimodal ones: features
    assert fusion.fc_out.weight.grad is None and fusion.fc_out.bias.grad is None
    assert h["audio"].grad is not None and h["visual"].grad is not None


def _two_pass_grads(model: MultimodalClassifier, batch: Batch, alpha: float) -> dict[str, torch.Tensor]:
    """The original procedure (main_dgl.py 102–122): α Σ CE(z_m) through the live head (retain_graph), every
    fusion gradient set to None, then CE(z) on detached features."""
    h = model.encode(batch)
    fusion = model.fusion
    assert isinstance(fusion, ConcatFusion)
    mods = fusion.modalities
    z = fusion.fc_out(torch.cat([h[m] for m in mods], 1).detach())
    uni = 0
    for m in mods:
        padded = torch.cat([h[j] if j == m else torch.zeros_like(h[j]) for j in mods], 1)
        uni = uni + F.cross_entropy(fusion.fc_out(padded), batch.label)
    (alpha * uni).backward(retain_graph=True)
    for p in fusion.parameters():
        p.grad = None
    F.cross_entropy(z, batch.label).backward()
    return {f"model.{n}": p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_one_pass_gives_the_two_pass_gradients(tiny: TinyDataset) -> None:
    batch = first_batch(tiny)
    method = build_method("dgl", tiny, alpha=3.0)
    expected = _two_pass_grads(copy.deepcopy(method.model), batch, 3.0)
    method.backward(method.losses(method.forward(batch), batch))
    grads = {n: p.grad for n, p in method.named_parameters() if p.grad is not None}
    assert grads.keys() == expected.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, expected[name], rtol=1e-5, atol=1e-7, msg=name)


# -- the method on a tiny model ------------------------------------------------------------------------


def contract_dgl(data: TinyDataset, monkeypatch: pytest.MonkeyPatch) -> None:
    # L = CE(z) + α Σ_m CE(z_m) with z = W[sg h_1; …; sg h_M] + b and z_m = sg(W_m) h_m + sg(b), α = 4:
    # every encoder's gradient is α W_mᵀ(p_m − y) pulled back through encoder m alone, the head's is that of
    # CE(z) alone, and the prediction is the plain model's fused logits.
    batch = first_batch(data)
    method = build_method("dgl", data)
    mods = method.model.modalities
    reference = copy.deepcopy(method.model)
    h = reference.encode(batch)
    weights, b = reference.fusion.modality_weights()
    head_only = F.cross_entropy(reference.fusion({m: h[m].detach() for m in mods}), batch.label)
    uni = [F.cross_entropy(h[m] @ weights[m].detach().t() + b.detach(), batch.label) for m in mods]
    (head_only + 4 * sum(uni)).backward()
    expected = {f"model.{n}": p.grad for n, p in reference.named_parameters() if p.grad is not None}
    method.zero_grad(set_to_none=True)
    out = method.forward(batch)
    losses = method.losses(out, batch)
    assert set(losses) == {"ce"} | {f"uni_{m}" for m in mods}
    torch.testing.assert_close(losses["ce"], head_only)
    for m, term in zip(mods, uni, strict=True):
        torch.testing.assert_close(losses[f"uni_{m}"], 4 * term)
    method.backward(losses)
    grads = {n: p.grad for n, p in method.named_parameters() if p.grad is not None}
    assert grads.keys() == expected.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, expected[name], msg=name)
    # the encoders' gradients are not the plain model's (CE(z) through the head)
    plain = copy.deepcopy(method.model)
    F.cross_entropy(plain(batch).logits, batch.label).backward()
    baseline = {f"model.{n}": p.grad for n, p in plain.named_parameters() if p.grad is not None}
    for m in mods:
        name = next(n for n in grads if n.startswith(f"model.encoders.{m}.") and grads[n].dim() > 1)
        assert not torch.allclose(grads[name], baseline[name]), name
    method.eval()
    with torch.no_grad():
        torch.testing.assert_close(method.predict(batch).logits, method.model(batch).logits)
        torch.testing.assert_close(method.forward(batch).logits, method.model(batch).logits)


def test_contract(monkeypatch: pytest.MonkeyPatch, tiny: TinyDataset) -> None:
    contract_dgl(tiny, monkeypatch)


def test_sum_fusion_trains_each_modality_head_from_the_fused_loss_only(tiny: TinyDataset) -> None:
    batch = first_batch(tiny)
    hp = DGL.HParams(alpha=2.0)
    spec = DGL.model_spec(tiny_spec(tiny, fusion="sum"), hp)
    assert spec.fusion == "sum" and spec.unimodal_heads == "slice"
    torch.manual_seed(0)
    model = build_model(spec)
    method = DGL(model, RunContext(model.modalities), hp)
    out = method.forward(batch)
    with torch.no_grad():
        parts = model.fusion.slice(out.features)
    for m in tiny.modalities:
        torch.testing.assert_close(out.unimodal_logits[m], parts[m])  # z_m = f_m(h_m), its own bias
    torch.testing.assert_close(out.logits, torch.stack(list(parts.values())).sum(0))
    losses = method.losses(out, batch)
    for m in tiny.modalities:
        torch.testing.assert_close(losses[f"uni_{m}"], 2.0 * F.cross_entropy(parts[m], batch.label))
    method.ctx.backward(losses["ce"])  # the fused loss alone reaches no encoder …
    assert all(p.grad is None for p in model.encoders.parameters())
    assert all(p.grad is not None for p in model.fusion.parameters())
    model.zero_grad(set_to_none=True)
    method.ctx.backward(sum(losses[f"uni_{m}"] for m in tiny.modalities))  # … and the unimodal ones no head
    assert all(p.grad is None for p in model.fusion.parameters())
    assert all(p.grad is not None for p in model.encoders.parameters())


def test_other_fusions_and_separate_heads_are_refused() -> None:
    data = TinyDataset()
    for fusion in ("gated", "film"):
        with pytest.raises(
            ConfigError, match=rf"dgl passes each modality's feature .* model.fusion={fusion}.*concat or sum"
        ):
            DGL.model_spec(tiny_spec(data, fusion=fusion), DGL.HParams())
    with pytest.raises(ConfigError, match="unimodal_heads=linear"):
        DGL.model_spec(tiny_spec(data, unimodal_heads="linear"), DGL.HParams())
    with pytest.raises(TypeError, match="concat or sum"):
        dgl_logits(torch.nn.Identity(), {})  # type: ignore[arg-type]


def test_split_bias_is_the_head_slice(tiny: TinyDataset) -> None:
    batch = first_batch(tiny)
    method = build_method("dgl", tiny, dgl_bias="split")
    out = method.forward(batch)
    sliced = method.model.unimodal(out.features)
    for m in tiny.modalities:
        torch.testing.assert_close(out.unimodal_logits[m], sliced[m])
    full = build_method("dgl", tiny).forward(batch)
    b = method.model.fusion.fc_out.bias.detach()
    for m in tiny.modalities:
        torch.testing.assert_close(
            full.unimodal_logits[m] - out.unimodal_logits[m], (b * (1 - 1 / len(tiny.modalities))).expand_as(sliced[m])
        )
