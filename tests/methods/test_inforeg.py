"""InfoReg against numbers computed by hand from its equations (docs/methods/inforeg.md), and its behaviour."""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from balancemm.data.batch import Batch
from balancemm.errors import ConfigError
from balancemm.methods.inforeg import (
    InfoReg,
    accumulate_squares_,
    add_proximal_,
    regulation_strengths,
    trace_of,
    window_indicator,
)
from balancemm.models.classifier import ModelOutput
from tests.conftest import TinyDataset, build_method, first_batch, tiny_spec, train_epochs

# -- numbers computed by hand ---------------------------------------------------------------------------

TRACES = [5, 8, 9, 9.5, 9.7, 9.8, 9.9, 10, 10, 10, 10, 10.1, 10.2]


# k_e for the traces above, by epoch
K = {0: 1.0, 1: 1.0, 2: 0.615385, 3: 0.409091, 4: 0.301587, 10: 0.110011, 11: 0.052138, 12: 0.021429, 13: 0.012097}


@pytest.mark.parametrize(("epoch", "k"), K.items())
def test_window_indicator_by_hand(epoch: int, k: float) -> None:
    # k_e = (x_{e−1} − x_{e−11}) / Σ_{j=e−10}^{e−1} x_j from x_0 … x_{e−1}, x_j = 0 for j < 0; k_0 = 1
    assert window_indicator(TRACES[:epoch]) == pytest.approx(k, abs=5e-7)
    # τ = 0.05: open in epochs 0–11, closed from 12
    assert (window_indicator(TRACES[:epoch]) > 0.05) == (epoch <= 11)


def test_a_constant_trace_gives_one_over_e_then_exactly_zero() -> None:
    for e in range(1, 11):
        assert window_indicator([3.0] * e) == pytest.approx(1 / e, rel=1e-12)
    for e in range(11, 15):
        assert window_indicator([3.0] * e) == 0.0
    assert window_indicator([0.0] * 4) == 0.0  # no gradient ever reached the traced weights: closed
    # a shorter span averages fewer epochs: (x_2 − x_0)/(x_1 + x_2) with S = 2
    assert window_indicator([1.0, 2.0, 4.0], span=2) == pytest.approx(0.5)


def test_coefficient_by_hand() -> None:
    # p_a(y) = (0.9, 0.8, 0.7, 0.6), p_v(y) = (0.3, 0.4, 0.5, 0.2): s_a = 3.0, s_v = 1.4, tanh(1.6) = 0.921669
    assert math.tanh(1.6) == pytest.approx(0.921669, abs=5e-7)
    assert regulation_strengths([3.0, 1.4], [0.95, 0.1]) == pytest.approx([2.387807, 0.0], abs=5e-7)
    assert regulation_strengths([1.4, 3.0], [0.95, 0.1]) == pytest.approx([0.0, 0.251348], abs=5e-7)
    assert regulation_strengths([2.0, 2.0], [0.95, 0.1]) == [0.0, 0.0]  # a tie pulls neither (the code's branches)


def test_proximal_gradient_by_hand() -> None:
    theta, anchor, g = torch.tensor([1.0, -2.0]), torch.tensor([0.5, -1.5]), torch.tensor([0.1, 0.2])
    add_proximal_([g], [theta], [anchor], 2.387807)
    assert g.tolist() == pytest.approx([1.293903, -0.993903], abs=5e-7)


def test_trace_by_hand() -> None:
    # F = Σ_steps g ⊙ g, trace = Σ_layers mean(F): a 2×2 weight and a length-3 one, two steps
    accumulators = [torch.zeros(2, 2), torch.zeros(3)]
    accumulate_squares_(accumulators, [torch.tensor([[0.1, -0.2], [0.3, 0.0]]), torch.tensor([1.0, -1.0, 0.5])])
    accumulate_squares_(accumulators, [torch.tensor([[0.2, 0.1], [-0.1, 0.4]]), torch.tensor([0.0, 0.5, 0.5])])
    assert trace_of(accumulators) == pytest.approx(1.006667, abs=5e-7)
    # per layer: (0.05 + 0.05 + 0.10 + 0.16)/4 = 0.09 and (1 + 1.25 + 0.5)/3 = 0.916667
    assert [float(a.mean()) for a in accumulators] == pytest.approx([0.09, 0.916667], abs=5e-7)


# -- the method on a tiny model ------------------------------------------------------------------------


def _scored_output(method: InfoReg, p: dict[str, list[float]]) -> tuple[ModelOutput, Batch]:
    """An output whose unimodal true-class probabilities are ``p[m]`` (two classes, every label 0)."""
    n = len(next(iter(p.values())))
    batch = first_batch(TinyDataset(len(method.model.modalities)), n=n)
    batch = replace(batch, label=torch.zeros(n, dtype=torch.long))
    unimodal = {m: torch.tensor([[math.log(q), math.log(1 - q)] for q in p[m]]) for m in method.model.modalities}
    return ModelOutput(torch.zeros(n, 2), {}, unimodal), batch


def _displace(method: InfoReg, delta: float) -> None:
    """θ ← θ⁰ + δ for every encoder parameter (after ``on_epoch_start`` took θ⁰), gradients zero."""
    with torch.no_grad():
        for m in method.model.modalities:
            for p in method.model.modality_parameters(m):
                p.add_(delta)
                p.grad = torch.zeros_like(p)


@pytest.mark.parametrize(
    ("audio", "visual", "leader", "beta"),
    [
        ([0.9, 0.8, 0.7, 0.6], [0.3, 0.4, 0.5, 0.2], "audio", 2.387807),  # s = (3.0, 1.4), c_a = 0.95
        ([0.3, 0.4, 0.5, 0.2], [0.9, 0.8, 0.7, 0.6], "visual", 0.251348),  # s = (1.4, 3.0), c_v = 0.1
    ],
)
def test_the_hand_computed_coefficient_pulls_the_leading_encoder_only(
    audio: list[float], visual: list[float], leader: str, beta: float
) -> None:
    method = build_method("inforeg", TinyDataset())
    assert isinstance(method, InfoReg)
    method.on_epoch_start(0)
    _displace(method, 0.5)
    out, batch = _scored_output(method, {"audio": audio, "visual": visual})
    method.after_backward(out, batch)
    for m in method.model.modalities:
        for p in method.model.modality_parameters(m):
            torch.testing.assert_close(
                p.grad, torch.full_like(p, 0.5 * beta if m == leader else 0.0), atol=2e-6, rtol=0
            )
    logs = method.ctx.pop_logs()
    assert logs[f"inforeg/beta_{leader}"] == pytest.approx(beta, abs=5e-7)
    assert logs["inforeg/s_audio"] == pytest.approx(sum(audio), abs=1e-6)


def _loss_grads(method: InfoReg, batch: Batch) -> dict[str, torch.Tensor]:
    """Gradients of CE(z) + Σ_m CE(z_m) on a copy of the method's model (z_m the head slices)."""
    model = copy.deepcopy(method.model)
    out = model(batch)
    loss = F.cross_entropy(out.logits, batch.label)
    loss = loss + sum(F.cross_entropy(out.unimodal_logits[m], batch.label) for m in model.modalities)
    loss.backward()
    return {f"model.{n}": p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _step(method: InfoReg, batch: Batch) -> tuple[ModelOutput, dict[str, torch.Tensor]]:
    method.zero_grad(set_to_none=True)
    out = method.forward(batch)
    method.backward(method.losses(out, batch))
    method.after_backward(out, batch)
    return out, {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}


def contract_inforeg(data: TinyDataset, monkeypatch: pytest.MonkeyPatch) -> None:
    # Inside the window (k_0 = 1 > τ = 0.05), only the modality with the largest batch-summed true-class score
    # s_m = Σ_i softmax(z_m)_i[y_i] is pulled to its epoch-start weights: g ← g + β(θ − θ⁰) on every parameter
    # of its encoder, β = c·exp(tanh(s_lead − s_second)), c = 0.1 for visual and 0.95 otherwise; every other
    # gradient is that of CE(z) + Σ_m CE(z_m). With a closed window (a constant trace) nothing is pulled.
    batch = first_batch(data)
    method = build_method("inforeg", data)
    mods = method.model.modalities
    method.on_epoch_start(0)
    with torch.no_grad():
        for p in method.model.encoders.parameters():
            p.add_(0.25)  # θ − θ⁰ = 0.25 everywhere
    plain = _loss_grads(method, batch)
    out, grads = _step(method, batch)
    s = [float(out.unimodal_logits[m].detach().softmax(1).gather(1, batch.label[:, None]).sum()) for m in mods]
    lead = max(range(len(mods)), key=lambda i: s[i])
    second = max(s[i] for i in range(len(mods)) if i != lead)
    beta = (0.1 if mods[lead] == "visual" else 0.95) * math.exp(math.tanh(s[lead] - second))
    assert beta > 0.1
    pulled = {f"model.encoders.{mods[lead]}.{n}" for n, _ in method.model.encoders[mods[lead]].named_parameters()}
    assert grads.keys() == plain.keys() and pulled <= grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, plain[name] + (0.25 * beta if name in pulled else 0.0), msg=name)
    closed = build_method("inforeg", data)
    closed.traces = torch.full((11,), 2.0, dtype=torch.float64)  # k = (2 − 2)/20 = 0 ≤ τ
    closed.on_epoch_start(11)
    assert closed.k == 0.0
    with torch.no_grad():
        for p in closed.model.encoders.parameters():
            p.add_(0.25)
    plain = _loss_grads(closed, batch)
    _, grads = _step(closed, batch)
    for name, g in grads.items():
        torch.testing.assert_close(g, plain[name], msg=name)


def test_contract(monkeypatch: pytest.MonkeyPatch, tiny: TinyDataset) -> None:
    contract_inforeg(tiny, monkeypatch)


def test_three_modalities_pull_the_unique_leader_with_the_gap_to_the_runner_up() -> None:
    c = [0.95, 0.95, 0.95]
    assert regulation_strengths([3.0, 5.0, 4.0], c) == pytest.approx([0.0, 0.95 * math.exp(math.tanh(1.0)), 0.0])
    assert regulation_strengths([5.0, 5.0, 4.0], c) == [0.0, 0.0, 0.0]  # tied leaders: nobody
    method = build_method("inforeg", TinyDataset(3), c_visual=None)
    assert method.coefficients == [0.95, 0.95, 0.95] and method.window_modality == "audio"
    method.on_epoch_start(0)
    _displace(method, 1.0)
    out, batch = _scored_output(method, {"audio": [0.5, 0.5], "text": [0.9, 0.9], "visual": [0.6, 0.7]})
    method.after_backward(out, batch)
    beta = 0.95 * math.exp(math.tanh(1.8 - 1.3))
    for m in method.model.modalities:
        for p in method.model.modality_parameters(m):
            torch.testing.assert_close(p.grad, torch.full_like(p, beta if m == "text" else 0.0), atol=2e-6, rtol=0)


def test_the_first_release_never_pulls_visual_and_uses_separate_heads() -> None:
    data = TinyDataset()
    method = build_method("inforeg", data, threshold=0.04, c_visual=0.0, heads="linear")
    assert method.model.unimodal_heads is not None and method.coefficients == [0.95, 0.0]
    method.on_epoch_start(0)
    _displace(method, 1.0)
    out, batch = _scored_output(method, {"audio": [0.1, 0.2], "visual": [0.9, 0.9]})  # visual leads
    method.after_backward(out, batch)
    assert all(not p.grad.any() for p in method.model.encoders.parameters())
    train_epochs(build_method("inforeg", data, heads="linear"), 1)  # the separate heads train


def test_the_window_opens_and_closes_with_the_trace_of_the_window_modality() -> None:
    data = TinyDataset()
    method = build_method("inforeg", data, window_modality="visual")
    assert isinstance(method, InfoReg)
    visual = {id(m.weight) for m in method.model.encoders["visual"].modules() if hasattr(m, "weight")}
    assert method.traced and all(id(w) in visual for w in method.traced)
    method.traces = torch.tensor(TRACES[:12], dtype=torch.float64)
    method.on_epoch_start(12)
    assert method.k == pytest.approx(0.021429, abs=5e-7)  # closed: 0.021429 ≤ 0.05
    method.on_epoch_start(12)
    _displace(method, 1.0)
    out, batch = _scored_output(method, {"audio": [0.9], "visual": [0.1]})
    method.after_backward(out, batch)
    assert all(not p.grad.any() for p in method.model.encoders.parameters())
    assert build_method("inforeg", data, threshold=0.02).k == 1.0  # k_0 = 1 whatever the history
    late = build_method("inforeg", data, threshold=0.02)
    late.traces = torch.tensor(TRACES[:12], dtype=torch.float64)
    late.on_epoch_start(12)
    assert late.k > late.hp.threshold  # 0.021429 > 0.02: open
    with pytest.raises(ConfigError, match="window_modality='text' is not one of the modalities audio, visual"):
        build_method("inforeg", data, window_modality="text")


@pytest.mark.parametrize("trace_grad", ["regulated", "loss"])
def test_the_trace_sums_the_squared_gradient_after_the_pull_or_before_it(trace_grad: str) -> None:
    data = TinyDataset()
    batch = first_batch(data)
    method = build_method("inforeg", data, trace_grad=trace_grad)
    assert isinstance(method, InfoReg)
    assert len(method.traced) == 2  # the tiny CNN's two convolutions (audio: the window modality)
    method.on_epoch_start(0)
    with torch.no_grad():
        for p in method.model.encoders.parameters():
            p.add_(0.25)
    plain = _loss_grads(method, batch)
    names = {id(p): n for n, p in method.named_parameters()}
    steps = []
    for _ in range(2):
        _, grads = _step(method, batch)
        steps.append(grads)
    method.on_epoch_end(0)
    # regulated (the code): g after the pull, which moved audio here (it leads on this batch); loss: before it.
    assert method.ctx.pop_logs()["inforeg/beta_audio"] > 0
    source = [grads if trace_grad == "regulated" else plain for grads in steps]
    if trace_grad == "loss":
        # the second step's loss gradient, from the same weights (no optimiser step was taken)
        source = [plain, _loss_grads(method, batch)]
    expected = math.fsum(
        float(sum(g[names[id(w)]].double() ** 2 for g in source).mean())
        for w in method.traced  # type: ignore[union-attr]
    )
    (x,) = method.traces.tolist()
    assert x == pytest.approx(expected, rel=1e-6)
    other = _loss_grads(method, batch) if trace_grad == "regulated" else steps[0]
    assert not torch.allclose(other[names[id(method.traced[0])]], source[0][names[id(method.traced[0])]])


def test_anchor_and_history_survive_a_checkpoint(tiny: TinyDataset) -> None:
    method = build_method("inforeg", tiny)
    assert isinstance(method, InfoReg)
    train_epochs(method, 2)
    method.on_epoch_start(2)
    state = method.state_dict()
    assert "traces" in state and any(k.startswith("anchor.") for k in state)
    assert not any(k.startswith("squares.") for k in state)  # zeroed at every epoch start: not saved
    fresh = build_method("inforeg", tiny)
    assert isinstance(fresh, InfoReg)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.traces, method.traces) and len(fresh.traces) == 2
    for m in tiny.modalities:
        for a, b in zip(fresh.anchors(m), method.anchors(m), strict=True):
            assert torch.equal(a, b)
    method.on_epoch_start(2)
    fresh.on_epoch_start(2)
    assert fresh.k == method.k


def test_scores_are_summed_over_the_global_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    # This rank's shard has audio ahead (3.0 vs 1.4); the other rank's (0, 2.0) puts visual ahead
    # over the global batch: (3.0, 3.4), gap 0.4 → β_v = 0.1·e^tanh(0.4).
    method = build_method("inforeg", TinyDataset())
    summed: list[torch.Tensor] = []

    def all_sum(t: torch.Tensor) -> torch.Tensor:
        summed.append(t)
        return t + torch.tensor([0.0, 2.0], dtype=t.dtype)

    monkeypatch.setattr(method.ctx, "all_sum", all_sum)
    method.on_epoch_start(0)
    _displace(method, 1.0)
    out, batch = _scored_output(method, {"audio": [0.9, 0.8, 0.7, 0.6], "visual": [0.3, 0.4, 0.5, 0.2]})
    method.after_backward(out, batch)
    assert len(summed) == 1 and summed[0].tolist() == pytest.approx([3.0, 1.4], abs=1e-6)
    beta = 0.1 * math.exp(math.tanh(0.4))
    for m in method.model.modalities:
        for p in method.model.modality_parameters(m):
            torch.testing.assert_close(p.grad, torch.full_like(p, beta if m == "visual" else 0.0), atol=2e-6, rtol=0)


def test_heads_must_be_slices_of_a_sliceable_fusion_unless_separate_heads_are_asked() -> None:
    data = TinyDataset()
    with pytest.raises(ConfigError, match="inforeg scores and trains each modality through its slice"):
        InfoReg.model_spec(tiny_spec(data, unimodal_heads="linear"), InfoReg.HParams())
    with pytest.raises(ConfigError, match=r"model\.fusion=gated"):
        InfoReg.model_spec(tiny_spec(data, fusion="gated"), InfoReg.HParams())
    spec = InfoReg.model_spec(tiny_spec(data, fusion="gated"), InfoReg.HParams(heads="linear"))
    assert spec.unimodal_heads == "linear"
    assert InfoReg.model_spec(tiny_spec(data, fusion="sum"), InfoReg.HParams()).unimodal_heads == "slice"


def test_the_span_is_an_epoch_count_or_a_share_of_the_protocol() -> None:
    method = build_method("inforeg", TinyDataset(), span="20%")
    method.ctx.num_epochs = 30
    method.traces = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0], dtype=torch.float64)
    method.on_epoch_start(7)  # S = 6: (x_6 − x_0) / (x_1 + … + x_6) = 1/7
    assert method.k == pytest.approx(1 / 7)
    assert InfoReg.adapted == {"span": "20%"}


def test_losses_are_the_fused_and_each_unimodal_cross_entropy(tiny: TinyDataset) -> None:
    method = build_method("inforeg", tiny)
    batch = first_batch(tiny)
    out = method.forward(batch)
    losses: dict[str, Any] = method.losses(out, batch)
    assert set(losses) == {"ce"} | {f"uni_{m}" for m in tiny.modalities}
    head = method.model.fusion
    h = out.features
    for m in tiny.modalities:
        weights, b = head.modality_weights()
        z_m = h[m] @ weights[m].t() + b / len(tiny.modalities)  # the slice with b/M
        torch.testing.assert_close(losses[f"uni_{m}"], F.cross_entropy(z_m, batch.label))
