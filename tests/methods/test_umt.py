"""UMT against values computed by hand (equations in docs/methods/umt.md) and its teachers' life cycle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import balancemm
from balancemm.methods import RunContext, create_method
from balancemm.methods.umt import UMT
from balancemm.models import MultimodalClassifier, build_model
from tests.conftest import TinyDataset, first_batch, tiny_model, tiny_spec


def _umt(data: TinyDataset, teachers: dict[str, MultimodalClassifier], weight: float = 10.0):  # type: ignore[no-untyped-def]
    ctx = RunContext(data.modalities, needs=UMT.needs, artifact_loader=lambda kind, m: teachers[m])
    method = create_method("umt", tiny_model(data), ctx, weight=weight)
    method.on_fit_start()
    return method


def _frozen(model: MultimodalClassifier, data: TinyDataset, modality: str) -> MultimodalClassifier:
    teacher = build_model(tiny_spec(data).only([modality]))
    teacher.encoders[modality].load_state_dict(model.encoders[modality].state_dict())
    return teacher.eval().requires_grad_(False)


def test_student_equal_to_teacher_has_zero_distillation_and_plain_gradients() -> None:
    data = TinyDataset()
    student = tiny_model(data)
    method = _umt(data, {m: _frozen(student, data, m) for m in data.modalities})
    method.eval()  # both in eval mode: identical features
    batch = first_batch(data)
    losses = method.losses(method.forward(batch), batch)
    assert float(losses["distill"].detach()) == 0.0
    method.backward(losses)
    ref = tiny_model(data).eval()
    F.cross_entropy(ref(batch).logits, batch.label).backward()
    for p, q in zip(method.model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)


def test_distillation_gradient_is_2_lambda_diff_over_bd() -> None:
    # MSE mean over B·d elements: ∂/∂h [λ·mean((h − t)²)] = 2λ(h − t)/(B·d); B = 2, d = 3
    h = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 0.5]], requires_grad=True)
    t = torch.tensor([[0.5, 2.0, 2.0], [1.0, -1.0, 0.0]])
    (10.0 * F.mse_loss(h, t)).backward()
    expected = 2 * 10.0 * (h.detach() - t) / 6
    torch.testing.assert_close(h.grad, expected)
    assert h.grad.flatten().tolist() == pytest.approx([1.6667, 0.0, 3.3333, -3.3333, 0.0, 1.6667], abs=1e-4)


def test_teachers_stay_frozen_in_eval_mode_through_a_training_step() -> None:
    data = TinyDataset(3)
    teachers = {m: _frozen(tiny_model(data), data, m) for m in data.modalities}
    stats = {m: [b.clone() for b in t.buffers()] for m, t in teachers.items()}
    method = _umt(data, teachers)
    method.ctx.attach_optimizer(torch.optim.SGD(method.trainable_parameters(), lr=0.1))
    method.train()
    method.training_step(first_batch(data))
    for m, teacher in teachers.items():
        assert not teacher.training and all(p.grad is None for p in teacher.parameters())
        assert all(torch.equal(a, b) for a, b in zip(stats[m], teacher.buffers(), strict=True))  # BN stats
    assert not any(t in list(method.modules()) for t in teachers.values())  # not part of the method


def test_teachers_are_trained_once_with_the_same_protocol_then_reused(tmp_path: Path) -> None:
    sets = ["train.epochs=2"]
    s = balancemm.train("umt", out=tmp_path / "umt", sets=sets)
    assert set(s["artifacts"]) == {"unimodal:audio", "unimodal:visual"}
    assert not any(a["reused"] for a in s["artifacts"].values())
    for key, art in s["artifacts"].items():
        teacher = json.loads((Path(art["run"]) / "summary.json").read_text())
        assert teacher["method"] == "unimodal" and teacher["modalities"] == [key.split(":")[1]]
        assert s["flops"]["artifacts"][key] == teacher["flops"]["total"] > 0
        config = json.loads((Path(art["run"]) / "config.json").read_text())["config"]
        student = json.loads((tmp_path / "umt" / "config.json").read_text())["config"]
        assert {k: config[k] for k in ("data", "model", "train")} == {k: student[k] for k in ("data", "model", "train")}
    assert s["flops"]["total_with_artifacts"] == s["flops"]["total"] + sum(s["flops"]["artifacts"].values())
    assert s["flops"]["by_phase"]["umt/teachers"] > 0
    again = balancemm.train("umt", out=tmp_path / "umt2", sets=[*sets, "method.weight=1"])
    assert all(a["reused"] for a in again["artifacts"].values())
    # the same command as a user's unimodal run finds the same teacher directory
    alone = balancemm.train("unimodal", out=Path(s["artifacts"]["unimodal:audio"]["run"]), sets=sets, modality="audio")
    assert (
        alone["test"]
        == json.loads((Path(s["artifacts"]["unimodal:audio"]["run"]) / "summary.json").read_text())["test"]
    )
