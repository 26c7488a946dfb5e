"""ReconBoost on hand-computed numbers, and against huacong/ReconBoost's behaviour (train.py, models/dynamic_net.py)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from balancemm.data.batch import Batch
from balancemm.errors import ConfigError
from balancemm.methods.reconboost import ReconBoost, boosting_loss, ga_term
from tests.conftest import TinyDataset, build_method, first_batch


def _method(num_modalities: int = 2, **hp: Any) -> ReconBoost:
    hp = {"pretrained": False, "epochs_per_stage": 1, "correct_epoch": 1, **hp}
    method = build_method("reconboost", TinyDataset(num_modalities), **hp)
    assert isinstance(method, ReconBoost)
    return method


def test_boosting_loss_hand_numbers() -> None:
    z, y = torch.zeros(1, 2), torch.tensor([0])
    # (w1 − w2·P(y))/C · CE = (5 − 0.5)/2 · ln 2
    assert boosting_loss(z, y, torch.tensor([0.5]), 5.0, 1.0).item() == pytest.approx(1.559581, abs=1e-6)
    # per-sample weight (w1 − w2)/C = 2.0 when the others are sure, w1/C = 2.5 when they are wrong
    assert boosting_loss(z, y, torch.tensor([1.0]), 5.0, 1.0).item() == pytest.approx(2.0 * math.log(2))
    assert boosting_loss(z, y, torch.tensor([0.0]), 5.0, 1.0).item() == pytest.approx(2.5 * math.log(2))


def test_boosting_loss_equals_the_official_expression() -> None:
    g = torch.Generator().manual_seed(0)
    z, others = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    target = F.one_hot(y, 4).float()
    log_p = z.log_softmax(1)
    official = (-5.0 * (target * log_p).mean(-1) + 1.0 * (target * others.softmax(1) * log_p).mean(-1)).mean()
    p_true = others.softmax(1).gather(1, y[:, None]).squeeze(1)
    torch.testing.assert_close(boosting_loss(z, y, p_true, 5.0, 1.0), official)


def test_ga_term_has_no_gradient_and_does_not_change_training() -> None:
    z = torch.randn(3, 2, requires_grad=True)
    assert not ga_term(z, torch.randn(3, 2), 0.5).requires_grad
    trained = []
    for weight in (0.5, 0.0):
        method = _method(ga_weight=weight)
        method.train()
        for epoch in range(2):
            method.ctx.epoch = epoch
            method.train_epoch(epoch, method.ctx.batches("train", shuffle=True))
        trained.append(method.state_dict())
        logs = method.ctx.pop_logs()
        assert ("loss/ga" in logs) == (weight > 0)
    for key, value in trained[0].items():
        torch.testing.assert_close(value, trained[1][key], msg=key)


def test_stage_zero_without_learners_weights_every_sample_by_w1_minus_w2_over_c() -> None:
    method = _method(correct_epoch=0)
    method.train()
    batch = first_batch(TinyDataset())
    with torch.no_grad():
        logits = method.learners(batch, ["audio"])["audio"]
    expected = (5.0 - 1.0) / 3 * F.cross_entropy(logits, batch.label)
    method.train_epoch(0, [batch])
    assert method.ctx.pop_logs()["loss/boost"] == pytest.approx(expected.item(), rel=1e-5)


def test_stages_round_robin_and_keep_one_learner_per_modality() -> None:
    method = _method(num_modalities=3)
    method.train()
    seen = []
    for epoch in range(4):
        method.ctx.epoch = epoch
        method.train_epoch(epoch, method.ctx.batches("train", shuffle=True))
        seen.append(method.members.tolist())
    assert seen == [[True, False, False], [True, True, False], [True, True, True], [True, True, True]]


def test_boosting_trains_only_the_current_learner_and_the_head() -> None:
    method = _method(correct_epoch=0)
    method.members.fill_(True)
    before = {n: p.detach().clone() for n, p in method.named_parameters()}
    method.train()
    method.train_epoch(1, method.ctx.batches("train", shuffle=True))  # stage 1 → visual
    changed = {n for n, p in method.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith(("model.encoders.visual.", "model.fusion.")) for n in changed)
    assert any(n.startswith("model.fusion.") for n in changed)


def test_rectification_trains_every_member_and_the_boost_rate() -> None:
    method = _method(num_modalities=2)
    method.members.fill_(True)
    before = {n: p.detach().clone() for n, p in method.named_parameters()}
    method.train()
    method.train_epoch(0, method.ctx.batches("train", shuffle=True))
    unchanged = [n for n, p in method.named_parameters() if torch.equal(p, before[n])]
    assert not unchanged


def test_stage_optimisers_are_fresh_and_follow_the_schedule(monkeypatch: pytest.MonkeyPatch) -> None:
    method = _method()
    ctx = method.ctx
    assert ctx.optimizer is not None
    ctx.optimizer.param_groups[0]["lr"] = 0.0123  # as if the protocol's scheduler had decayed it
    made = []
    real = ctx.new_optimizer

    def spy(params: Any, lr: float | None = None) -> torch.optim.Optimizer:
        made.append(real(params, lr=lr))
        return made[-1]

    monkeypatch.setattr(ctx, "new_optimizer", spy)
    method.train()
    method.train_epoch(0, ctx.batches("train", shuffle=True))
    assert len(made) == 2 and made[0] is not made[1]
    assert all(g["lr"] == 0.0123 for o in made for g in o.param_groups)
    assert ctx.step == 6  # 3 boosting + 3 rectification steps, all counted


def test_predict_is_the_boosted_ensemble_of_present_members() -> None:
    method = _method()
    method.eval()
    batch = first_batch(TinyDataset())
    with torch.no_grad():
        parts = method.learners(batch, ["audio", "visual"])
        method.boost_rate.fill_(0.7)
        method.members.copy_(torch.tensor([True, False]))
        torch.testing.assert_close(method.predict(batch).logits, 0.7 * parts["audio"])
        method.members.fill_(True)
        torch.testing.assert_close(method.predict(batch).logits, 0.7 * (parts["audio"] + parts["visual"]))
        only_visual = method.predict(batch.with_only(frozenset({"visual"}))).logits
        torch.testing.assert_close(only_visual, 0.7 * parts["visual"])


def test_pretrained_learners_come_from_the_unimodal_runs() -> None:
    assert ReconBoost.needs_for(ReconBoost.HParams()).artifacts == ("unimodal",)
    assert ReconBoost.needs_for(ReconBoost.HParams(pretrained=False)).artifacts == ()
    method = _method(pretrained=True)
    method.on_fit_start()
    teacher = method.ctx.artifact("unimodal", "visual")
    for p, q in zip(method.model.encoders["visual"].parameters(), teacher.encoders["visual"].parameters(), strict=True):
        assert torch.equal(p, q)
    assert method.members.all()
    assert method.own_head.all()  # default pretrained_head=own
    shared = _method(pretrained=True, pretrained_head="shared")
    shared.on_fit_start()
    assert not shared.own_head.any()


def test_the_shared_head_is_an_mlp_by_default() -> None:
    head = _method().model.fusion.head
    assert isinstance(head, torch.nn.Sequential) and head[0].out_features == 256
    assert isinstance(_method(head_hidden=0).model.fusion.head, torch.nn.Linear)


@pytest.mark.parametrize(
    ("setting", "expected"),
    [({}, 1.5563674), ({"pretrained_head": "shared"}, 1.7089525)],
    ids=["own-default", "shared"],
)
def test_stage_zero_target_with_pretrained_learners(setting: dict[str, str], expected: float) -> None:
    # Four label-0 rows. H (one Linear here) is zeroed, so the current learner (audio) has logits 0 and
    # CE = ln 3 = 1.0986123 on every row. The visual learner's own classifier (its unimodal run's Linear)
    # gets weight 0 and bias (ln 6, 0, 0): softmax (6/8, 1/8, 1/8), so with β_b = 1, P(y) = 0.75.
    #   own (official, train.py 287-288): (w1 - w2·P)/C · CE = (5 - 0.75)/3 · ln 3 = 1.4166667 · 1.0986123 = 1.5563674
    #   shared: H(φ_v) = 0 too, P(y) = 1/3:   (5 - 1/3)/3 · ln 3 = 1.5555556 · 1.0986123 = 1.7089525
    method = _method(pretrained=True, head_hidden=0, correct_epoch=0, **setting)
    own = method.ctx.artifact("unimodal", "visual").fusion.fc_out
    with torch.no_grad():
        own.weight.zero_()
        own.bias.copy_(torch.tensor([math.log(6.0), 0.0, 0.0]))
        method.model.fusion.head.weight.zero_()
        method.model.fusion.head.bias.zero_()
    method.on_fit_start()
    batch = method.ctx.rows("train", torch.tensor([0, 3, 6, 9]))
    assert batch.label.tolist() == [0, 0, 0, 0]
    method.train()
    method.train_epoch(0, [batch])
    assert method.ctx.pop_logs()["loss/boost"] == pytest.approx(expected, rel=1e-6)


def test_the_own_classifier_is_frozen_and_gives_way_to_the_shared_head_at_the_learners_stage() -> None:
    method = _method(pretrained=True)
    method.on_fit_start()
    teacher = method.ctx.artifact("unimodal", "visual")
    own_before = [p.clone() for p in teacher.fusion.parameters()]
    visual_before = [p.detach().clone() for p in method.model.encoders["visual"].parameters()]
    batch = first_batch(TinyDataset())

    def check_prediction(visual_head: torch.nn.Module) -> None:
        method.eval()
        with torch.no_grad():
            h = method.model.encode(batch)
            expected = method.boost_rate * (method.model.fusion.head(h["audio"]) + visual_head(h["visual"]))
            torch.testing.assert_close(method.predict(batch).logits, expected)
        method.train()

    method.train()
    method.train_epoch(0, method.ctx.batches("train", shuffle=True))  # stage 0: audio
    assert method.own_head.tolist() == [False, True]
    # The stage-0 rectification trained the visual encoder through its own classifier, which stayed fixed.
    visual_after = method.model.encoders["visual"].parameters()
    assert any(not torch.equal(p, q) for p, q in zip(visual_after, visual_before, strict=True))
    assert all(torch.equal(p, q) for p, q in zip(teacher.fusion.parameters(), own_before, strict=True))
    check_prediction(teacher.fusion.fc_out)
    method.train_epoch(1, method.ctx.batches("train", shuffle=True))  # stage 1: visual takes H
    assert not method.own_head.any()
    check_prediction(method.model.fusion.head)


@pytest.mark.parametrize(
    ("setting", "mean", "var", "tracked"),
    [({}, 0.2, 0.9, 1), ({"partner_pass": "again"}, 0.38, 0.81, 2)],
    ids=["reuse-default", "again"],
)
def test_partner_pass_batchnorm_running_statistics(
    setting: dict[str, str], mean: float, var: float, tracked: int
) -> None:
    # Stage 1 trains visual; the GA partner is audio. Audio's first conv copies input channel 0 into
    # output channel 0 (centre tap 1, every other weight 0) and that input channel is 2 everywhere, so
    # BatchNorm channel 0 sees batch mean 2, variance 0. From running mean 0, variance 1, momentum 0.1:
    #   one update (the F_{-m} pass):           mean 0.9·0 + 0.1·2 = 0.2,    var 0.9·1 + 0.1·0 = 0.9
    #   a second, same batch (train.py 348):    mean 0.9·0.2 + 0.1·2 = 0.38, var 0.9·0.9 + 0.1·0 = 0.81
    method = _method(correct_epoch=0, **setting)
    method.members.fill_(True)
    conv, bn = method.model.encoders["audio"].blocks[0][:2]
    assert bn.momentum == 0.1
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 1] = 1.0
    batch = first_batch(TinyDataset())
    audio = batch.inputs["audio"].clone()
    audio[:, 0] = 2.0
    batch = Batch({**batch.inputs, "audio": audio}, batch.label, batch.index, batch.present, batch.modalities)
    method.train()
    method.train_epoch(1, [batch])
    assert bn.running_mean[0].item() == pytest.approx(mean)
    assert bn.running_var[0].item() == pytest.approx(var)
    assert bn.num_batches_tracked.item() == tracked


def test_the_second_partner_pass_changes_only_the_partners_running_statistics() -> None:
    batch = first_batch(TinyDataset())
    states, ga = [], []
    for setting in ("reuse", "again"):
        method = _method(correct_epoch=0, partner_pass=setting)
        method.members.fill_(True)
        method.train()
        method.train_epoch(1, [batch])  # visual trained, audio the GA partner
        ga.append(method.ctx.pop_logs()["loss/ga"])
        states.append(method.state_dict())
    assert ga[0] == ga[1]
    moved = {k for k, v in states[0].items() if not torch.equal(v, states[1][k])}
    stats = ("running_mean", "running_var", "num_batches_tracked")
    assert moved and all(k.startswith("model.encoders.audio.") and k.endswith(stats) for k in moved)


@pytest.mark.parametrize("setting", [{"pretrained_head": "fc"}, {"partner_pass": "twice"}])
def test_unknown_settings_are_refused(setting: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        _method(**setting)
