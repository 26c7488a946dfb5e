"""G²D against numbers computed by hand from its equations (docs/methods/g2d.md)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from balancemm.config import EncoderConfig
from balancemm.data.batch import Batch
from balancemm.errors import ConfigError
from balancemm.methods import RunContext, create_method
from balancemm.methods.g2d import G2D, distillation_loss, gated_parameters, smp_gate, teacher_scores
from balancemm.metrics.flops import FlopMeter
from balancemm.models import ModelSpec, build_model
from balancemm.models.classifier import ModelOutput
from balancemm.models.encoders.cnn import CompactCNNOptions
from tests.conftest import MODALITY_SHAPES, TinyDataset, build_method, first_batch, tiny_spec

Z = [[0.5, 0.2, 0.1], [0.0, 1.0, -1.0]]
Y = [0, 1]
T_A = [[2.0, 0.0, -1.0], [0.0, 0.5, 0.0]]
T_V = [[0.0, 1.0, 0.0], [1.0, 2.0, -1.0]]


# -- the hand-computed numbers ---------------------------------------------------------------------


def test_cross_entropy_and_distillation_terms() -> None:
    z, y = torch.tensor(Z), torch.tensor(Y)
    assert float(F.cross_entropy(z, y)) == pytest.approx(0.643852, abs=1e-6)
    assert float(distillation_loss(z, torch.tensor(T_A))) == pytest.approx(0.284131, abs=1e-6)
    assert float(distillation_loss(z, torch.tensor(T_V))) == pytest.approx(0.092929, abs=1e-6)
    # T = 2 with the T² factor
    assert float(distillation_loss(z, torch.tensor(T_A), 2.0)) == pytest.approx(0.376169, abs=1e-6)


def test_feature_term() -> None:
    h = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    t = torch.tensor([[0.8, 0.2], [0.5, 1.0]])
    assert float(F.mse_loss(h, t)) == pytest.approx(0.082500, abs=1e-6)


def test_teacher_scores_and_the_gate() -> None:
    s = teacher_scores({"audio": torch.tensor(T_A), "visual": torch.tensor(T_V)}, torch.tensor(Y))
    assert s.tolist() == pytest.approx([1.295657, 0.917326], abs=1e-6)
    # the audio teacher is more confident: audio's gradients are gated, visual leads
    assert smp_gate(s).tolist() == [0.0, 1.0]
    assert smp_gate(s, "zero_strongest").tolist() == [0.0, 1.0]  # the same rule for M = 2


def test_three_modalities_keep_the_weakest_or_zero_the_strongest_and_ties_gate_nothing() -> None:
    s = torch.tensor([2.0, 1.0, 3.0])
    assert smp_gate(s).tolist() == [0.0, 1.0, 0.0]
    assert smp_gate(s, "zero_strongest").tolist() == [1.0, 1.0, 0.0]
    assert smp_gate(torch.tensor([1.5, 1.5])).tolist() == [1.0, 1.0]  # the code raises here
    assert smp_gate(torch.tensor([1.0, 1.0, 3.0])).tolist() == [1.0, 1.0, 1.0]  # weakest shared
    assert smp_gate(torch.tensor([1.0, 3.0, 3.0]), "zero_strongest").tolist() == [1.0, 1.0, 1.0]
    assert smp_gate(torch.tensor([1.0, 3.0, 3.0])).tolist() == [1.0, 0.0, 0.0]  # only the max is shared


# -- teachers with scripted outputs ----------------------------------------------------------------


class ScriptedTeacher(nn.Module):
    """A frozen stand-in: fixed logits ``[B, C]`` and features ``[B, d]`` for modality ``m``."""

    def __init__(self, modality: str, logits: Tensor, features: Tensor) -> None:
        super().__init__()
        self.modality = modality
        self.register_buffer("logits", logits)
        self.register_buffer("features", features)
        self.calls = 0

    def forward(self, batch: Batch) -> ModelOutput:
        self.calls += 1
        return ModelOutput(self.logits, {self.modality: self.features}, {self.modality: self.logits})


def _scripted(data: TinyDataset, *, lr: float = 0.1, momentum: float = 0.0, **hp: Any) -> tuple[Any, Batch]:
    """G²D on the tiny model with teachers that give T_A / T_V on the two-row batch (labels 0, 1)."""
    batch = first_batch(data, n=2)
    assert batch.label.tolist() == Y
    torch.manual_seed(0)
    model = build_model(G2D.model_spec(tiny_spec(data), G2D.HParams()))
    dims = model.fusion.dims
    torch.manual_seed(1)
    teachers = {
        m: ScriptedTeacher(m, torch.tensor(t), torch.randn(2, dims[m]))
        for m, t in zip(data.modalities, (T_A, T_V), strict=True)
    }
    ctx = RunContext(data.modalities, needs=G2D.needs, artifact_loader=lambda kind, m: teachers[m])
    method = create_method("g2d", model, ctx, **hp)
    ctx.attach_optimizer(torch.optim.SGD(method.trainable_parameters(), lr=lr, momentum=momentum), method)
    method.on_fit_start()
    return method, batch


def _grads_before_and_after_smp(method: Any, batch: Batch, epoch: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    method.ctx.epoch = epoch
    method.zero_grad(set_to_none=True)
    out = method.forward(batch)
    method.backward(method.losses(out, batch))
    before = {n: p.grad.clone() for n, p in method.model.named_parameters() if p.grad is not None}
    method.after_backward(out, batch)
    after = {n: p.grad.clone() for n, p in method.model.named_parameters() if p.grad is not None}
    return before, after


def test_the_losses_are_the_hand_formulas_on_the_model() -> None:
    data = TinyDataset()
    method, batch = _scripted(data, temperature=2.0, ce_weight=0.5, kd_weight=0.3, feat_weight=0.7)
    out = method.forward(batch)
    losses = method.losses(out, batch)
    assert set(losses) == {"ce", "kd_audio", "kd_visual", "feat_audio", "feat_visual"}
    # late fusion: the fused logits are the mean of the per-modality linear heads
    torch.testing.assert_close(out.logits, (out.unimodal_logits["audio"] + out.unimodal_logits["visual"]) / 2)
    torch.testing.assert_close(losses["ce"], 0.5 * F.cross_entropy(out.logits, batch.label))
    for m, t in zip(data.modalities, (T_A, T_V), strict=True):
        p_t = torch.softmax(torch.tensor(t) / 2, 1)
        kl = (p_t * (p_t.log() - torch.log_softmax(out.logits / 2, 1))).sum(1).mean()
        torch.testing.assert_close(losses[f"kd_{m}"], 0.3 * 4 * kl)
        h_t = method.teachers[m].features
        torch.testing.assert_close(losses[f"feat_{m}"], 0.7 * ((out.features[m] - h_t) ** 2).mean())


def test_smp_zeroes_the_stronger_teacher_s_conv_gradients_and_its_kernels_stay_put() -> None:
    data = TinyDataset()
    method, batch = _scripted(data)  # SGD without momentum or weight decay
    audio, visual = (method.model.encoders[m] for m in data.modalities)
    conv = {m: {id(p) for p in gated_parameters(method.model.encoders[m], "conv")} for m in data.modalities}
    before = {n: p.detach().clone() for n, p in method.model.named_parameters()}
    method.ctx.epoch = 0
    method.training_step(batch)
    for name, p in method.model.named_parameters():
        moved = not torch.equal(p, before[name])
        if id(p) in conv["audio"]:
            assert not moved, name  # s^T_a = 1.295657 > s^T_v = 0.917326: audio's kernels are gated
        else:
            assert moved, name  # audio's BatchNorm, visual's encoder, both heads
    assert conv["audio"] and all(p.dim() == 3 for p in gated_parameters(audio, "conv"))  # Conv1d kernels
    assert gated_parameters(audio, "conv4d") == [] and gated_parameters(visual, "conv4d")
    logs = method.ctx.pop_logs()
    assert (logs["g2d/gate_audio"], logs["g2d/gate_visual"]) == (0.0, 1.0)
    assert logs["g2d/score_audio"] == pytest.approx(1.295657, abs=1e-6)


@pytest.mark.parametrize(
    ("scope", "gated_in_audio"),
    [("conv", "conv kernels"), ("conv4d", "nothing"), ("all", "everything")],
)
def test_gate_scopes(scope: str, gated_in_audio: str) -> None:
    data = TinyDataset()
    method, batch = _scripted(data, gate_params=scope)
    before, after = _grads_before_and_after_smp(method, batch, 0)
    kernels = {f"encoders.audio.{n}" for n, p in method.model.encoders["audio"].named_parameters() if p.dim() > 1}
    for name, g in after.items():
        zeroed = name.startswith("encoders.audio.") and (
            gated_in_audio == "everything" or (gated_in_audio == "conv kernels" and name in kernels)
        )
        torch.testing.assert_close(g, torch.zeros_like(g) if zeroed else before[name], msg=name)
        assert zeroed or before[name].any(), name


def test_outside_the_window_or_without_smp_the_gradients_are_ungated() -> None:
    data = TinyDataset()
    method, batch = _scripted(data, modulation_starts=1, modulation_ends=2)
    assert method.acts_in(0) and not method.smp_acts_in(0) and method.smp_acts_in(2) and not method.smp_acts_in(3)
    for epoch in (0, 3):
        before, after = _grads_before_and_after_smp(method, batch, epoch)
        assert before.keys() == after.keys()
        for name, g in after.items():
            assert torch.equal(g, before[name]), (epoch, name)
    _, inside = _grads_before_and_after_smp(method, batch, 1)
    assert not inside["encoders.audio.blocks.0.0.weight"].any()
    off, _ = _scripted(data, smp="none")
    before, after = _grads_before_and_after_smp(off, batch, 0)
    assert all(torch.equal(g, before[n]) for n, g in after.items())


def test_the_window_adapts_to_half_of_the_protocol() -> None:
    assert G2D.adapted == {"modulation_ends": "50%"}
    data = TinyDataset()
    method, _ = _scripted(data, modulation_ends="50%")
    method.ctx.num_epochs = 30
    assert [e for e in range(30) if method.smp_acts_in(e)] == list(range(16))


def test_scores_are_the_global_batch_s() -> None:
    # Another rank's rows where the visual teacher is sure and the audio one is not: the sums flip the gate.
    data = TinyDataset()
    method, batch = _scripted(data)
    method.ctx.all_sum = lambda t: t + torch.tensor([0.0, 1.0])  # type: ignore[method-assign]
    _, after = _grads_before_and_after_smp(method, batch, 0)
    assert after["encoders.audio.blocks.0.0.weight"].any()
    assert not after["encoders.visual.blocks.0.0.weight"].any()


def test_three_modalities_gate_all_but_the_weakest_teacher() -> None:
    data = TinyDataset(3)
    method = build_method("g2d", data)
    method.on_fit_start()
    batch = first_batch(data)
    before, after = _grads_before_and_after_smp(method, batch, 0)
    mods = data.modalities
    s = teacher_scores({m: method.teacher_out[m].logits for m in mods}, batch.label)
    weakest = mods[int(s.argmin())]
    for m in mods:
        name = f"encoders.{m}.blocks.0.0.weight"
        expected = before[name] if m == weakest else torch.zeros_like(before[name])
        torch.testing.assert_close(after[name], expected, msg=m)
    strongest = mods[int(s.argmax())]
    variant = build_method("g2d", data, smp="zero_strongest")
    variant.on_fit_start()
    before, after = _grads_before_and_after_smp(variant, batch, 0)
    for m in mods:
        name = f"encoders.{m}.blocks.0.0.weight"
        expected = torch.zeros_like(before[name]) if m == strongest else before[name]
        torch.testing.assert_close(after[name], expected, msg=m)


def test_teachers_are_loaded_once_frozen_outside_the_method_and_counted_in_their_phase() -> None:
    data = TinyDataset()
    loads: list[str] = []
    spec = tiny_spec(data)
    teachers = {m: build_model(spec.only([m])).eval().requires_grad_(False) for m in data.modalities}
    stats = {m: [b.clone() for b in t.buffers()] for m, t in teachers.items()}

    def loader(kind: str, m: str) -> Any:
        loads.append(m)
        return teachers[m]

    ctx = RunContext(data.modalities, needs=G2D.needs, artifact_loader=loader, meter=FlopMeter("exact"))
    torch.manual_seed(0)
    method = create_method("g2d", build_model(G2D.model_spec(spec, G2D.HParams())), ctx)
    ctx.attach_optimizer(torch.optim.SGD(method.trainable_parameters(), lr=0.1), method)
    method.on_fit_start()
    method.train()
    with ctx.meter.counting():
        for _ in range(2):
            method.training_step(first_batch(data))
    assert sorted(loads) == sorted(data.modalities)  # once each
    for m, teacher in teachers.items():
        assert not teacher.training and all(p.grad is None for p in teacher.parameters())
        assert all(torch.equal(a, b) for a, b in zip(stats[m], teacher.buffers(), strict=True))
    assert not any(t in list(method.modules()) for t in teachers.values())
    assert not any(k.startswith("teachers") for k in method.state_dict())
    assert ctx.meter.by_phase["g2d/teachers"] > 0
    # the teachers' forward is one student encoder pass per modality with its head: a third of forward + backward
    assert ctx.meter.by_phase["g2d/teachers"] == pytest.approx(ctx.meter.by_phase["forward"], rel=0.05)


def test_a_scope_that_gates_nothing_anywhere_is_refused() -> None:
    shapes = {m: MODALITY_SHAPES[m] for m in ("audio", "text")}  # two 1-D CNNs: no 4-D kernel
    enc = {m: EncoderConfig("cnn", CompactCNNOptions(channels=(4, 6))) for m in shapes}
    spec = G2D.model_spec(ModelSpec(("audio", "text"), shapes, 3, enc), G2D.HParams())
    ctx = RunContext(("audio", "text"), needs=G2D.needs)
    with pytest.raises(ConfigError, match="gate_params=all"):
        create_method("g2d", build_model(spec), ctx, gate_params="conv4d")
    create_method("g2d", build_model(spec), ctx, gate_params="conv4d", smp="none")  # KD alone is fine
    create_method("g2d", build_model(spec), ctx)  # conv: the 1-D kernels


def test_the_student_is_a_late_fusion_model_whatever_the_protocol_fusion() -> None:
    data = TinyDataset(3)
    spec = G2D.model_spec(tiny_spec(data), G2D.HParams())
    assert (spec.fusion, dict(spec.fusion_options), spec.unimodal_heads) == ("sum", {"average": True}, "slice")
    method = build_method("g2d", data)
    method.on_fit_start()
    out = method.forward(first_batch(data))
    torch.testing.assert_close(out.logits, torch.stack(list(out.unimodal_logits.values())).mean(0))
    assert copy.deepcopy(method.state_dict()).keys() == method.state_dict().keys()


# -- for the registry-wide contract (tests/methods/test_all_methods.py) ----------------------------


def contract_g2d(data: TinyDataset, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loss = w_ce CE(z) + Σ_m [T² KL(softmax(t_m/T) ‖ softmax(z/T)) + MSE(h_m, h^T_m)] with the teachers' own
    outputs; in the SMP window the conv-kernel gradients of every encoder but the one whose teacher has the
    smallest s^T_m = Σ_i softmax(t_m)_i[y_i] are zeroed and nothing else changes; outside it nothing is gated."""
    batch = first_batch(data)
    method = build_method("g2d", data, modulation_starts=0, modulation_ends=0)
    method.on_fit_start()
    mods = method.model.modalities
    method.ctx.epoch = 0
    method.zero_grad(set_to_none=True)
    out = method.forward(batch)
    losses = method.losses(out, batch)
    teachers = {m: method.teachers[m](batch) for m in mods}
    assert set(losses) == {"ce"} | {f"kd_{m}" for m in mods} | {f"feat_{m}" for m in mods}
    torch.testing.assert_close(losses["ce"], F.cross_entropy(out.logits, batch.label))
    for m in mods:
        p_t = torch.softmax(teachers[m].logits, 1)
        kl = (p_t * (p_t.log() - torch.log_softmax(out.logits, 1))).sum(1).mean()
        torch.testing.assert_close(losses[f"kd_{m}"], kl)
        torch.testing.assert_close(losses[f"feat_{m}"], ((out.features[m] - teachers[m].features[m]) ** 2).mean())
    method.backward(losses)
    before = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
    method.after_backward(out, batch)
    s = torch.stack([torch.softmax(teachers[m].logits, 1)[torch.arange(len(batch)), batch.label].sum() for m in mods])
    leader = mods[int(s.argmin())]
    assert int((s == s.min()).sum()) == 1
    kernels = {
        f"model.encoders.{m}.{n}"
        for m in mods
        if m != leader
        for n, mod in method.model.encoders[m].named_modules()
        if isinstance(mod, nn.modules.conv._ConvNd)
        for n in [f"{n}.weight"]
    }
    assert kernels
    for name, p in method.named_parameters():
        if p.grad is None:
            continue
        expected = torch.zeros_like(p.grad) if name in kernels else before[name]
        torch.testing.assert_close(p.grad, expected, msg=name)
    assert any(before[n].any() for n in kernels)
    # epoch 1 lies outside the window [0, 0]: the distillation still acts, SMP gates nothing
    assert method.acts_in(1) and not method.smp_acts_in(1)
    method.ctx.epoch = 1
    method.zero_grad(set_to_none=True)
    out = method.forward(batch)
    method.backward(method.losses(out, batch))
    before = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
    method.after_backward(out, batch)
    assert all(torch.equal(p.grad, before[n]) for n, p in method.named_parameters() if p.grad is not None)


@pytest.mark.parametrize("modalities", [2, 3])
def test_contract(modalities: int, monkeypatch: pytest.MonkeyPatch) -> None:
    contract_g2d(TinyDataset(modalities), monkeypatch)
