"""Greedy against numbers computed by hand from its equations (docs/methods/greedy.md)."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, cast

import pytest
import torch
import torch.nn.functional as F

import balancemm.methods.greedy  # noqa: F401  (registers the method)
from balancemm.data.batch import Batch
from balancemm.errors import ConfigError
from balancemm.methods import create_method
from balancemm.methods.greedy import Greedy, balance_direction
from balancemm.models.fusions.mmtm import MMTM
from balancemm.models.fusions.sum import SumFusion
from tests.conftest import TinyDataset, build_method, first_batch, tiny_model


def _greedy(data: TinyDataset, **hp: Any) -> Greedy:
    return cast(Greedy, build_method("greedy", data, **hp))


def _blocks(method: Greedy) -> list[MMTM]:
    assert method.model.mid_fusion is not None
    return cast(list[MMTM], list(method.model.mid_fusion.blocks))


def _step(method: Greedy, batch: Batch) -> None:
    out = method.forward(batch)
    method.backward(method.losses(out, batch))
    method.after_backward(out, batch)
    method.ctx.optimizer_step()


def test_bdr_hand_computed_numbers() -> None:
    # M_b = (2, 1), M_main = (1, 1) → BDR_0 = log10 2 = 0.301030, BDR_1 = 0
    bdr = balance_direction(
        torch.tensor([2.0, 1.0], dtype=torch.float64), torch.tensor([1.0, 1.0], dtype=torch.float64)
    )
    assert bdr.tolist() == pytest.approx([0.301030, 0.0], abs=1e-6)
    # an all-zero speed is clamped instead of giving log10(0/0) = NaN
    assert torch.isfinite(
        balance_direction(torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))
    ).all()


def test_hand_set_sums_start_curation_caring_for_modality_0_for_exactly_q_steps() -> None:
    data = TinyDataset()
    method = _greedy(data)
    method.ctx.epoch = 1  # the first epoch that may curate (official starting_epoch=2, counted from 1)
    method.record(torch.tensor([2.0, 1.0], dtype=torch.float64), torch.tensor([1.0, 1.0], dtype=torch.float64))
    assert (method.caring, method.curation_left) == (0, 5)
    seen: list[int | None] = []
    _blocks(method)[0].register_forward_pre_hook(lambda module, args: seen.append(args[3]))
    batch = first_batch(data)
    for _ in range(5):
        _step(method, batch)
        # nothing is accumulated during curation
        assert method.speed_bypass.tolist() == [2.0, 1.0] and method.speed_main.tolist() == [1.0, 1.0]
    assert seen == [0] * 5 and method.curation_left == 0
    _step(method, batch)
    assert seen[-1] is None  # step Q + 1 is a normal MMTM step and accumulates again
    assert method.speed_bypass[0] > 2.0 and method.speed_main[0] > 1.0
    assert method.ctx.pop_logs()["greedy/curation"] == pytest.approx(5 / 6)


def test_before_starting_epoch_the_sums_only_accumulate() -> None:
    method = _greedy(TinyDataset())
    method.ctx.epoch = 0
    method.record(torch.tensor([2.0, 1.0], dtype=torch.float64), torch.tensor([1.0, 1.0], dtype=torch.float64))
    assert method.curation_left == 0 and method.speed_bypass.tolist() == [2.0, 1.0]
    assert method.ctx.pop_logs()["greedy/bdr_gap"] == pytest.approx(0.301030, abs=1e-6)


@pytest.mark.parametrize("bypass, caring", [((1.0, 2.0), 1), ((1.0, 1.0 + 1e-3), None)])
def test_the_sign_of_d_picks_the_cared_modality_and_eps_is_strict(
    bypass: tuple[float, ...], caring: int | None
) -> None:
    # (1, 2): d = −0.301030 → care for modality 1; (1, 1.001): |d| = 0.000434 < ε = 0.01 → no curation
    method = _greedy(TinyDataset(), starting_epoch=0)
    method.record(torch.tensor(bypass, dtype=torch.float64), torch.ones(2, dtype=torch.float64))
    assert (method.caring if method.curation_left else None) == caring


def test_three_modalities_care_for_the_largest_bdr() -> None:
    # BDR = (0, log10 4, log10 2) = (0, 0.602060, 0.301030): max − min = 0.602060 > ε → care for modality 1
    method = _greedy(TinyDataset(3), starting_epoch=0)
    method.record(torch.tensor([1.0, 4.0, 2.0], dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    assert (method.caring, method.curation_left) == (1, 5)
    assert method.ctx.pop_logs()["greedy/bdr_gap"] == pytest.approx(0.602060, abs=1e-6)
    calm = _greedy(TinyDataset(3), starting_epoch=0, epsilon=0.7)
    calm.record(torch.tensor([1.0, 4.0, 2.0], dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    assert calm.curation_left == 0


def test_speeds_are_gradient_over_weight_norms_of_the_structural_groups(tiny: TinyDataset) -> None:
    method = _greedy(tiny)
    model, batch = method.model, first_batch(tiny)
    out = method.forward(batch)
    method.backward(method.losses(out, batch))
    method.after_backward(out, batch)

    def speed(params: list[torch.nn.Parameter]) -> float:
        grad = sum(float(p.grad.double().pow(2).sum()) for p in params if p.grad is not None)
        return grad / sum(float(p.detach().double().pow(2).sum()) for p in params)

    blocks = _blocks(method)
    for i, m in enumerate(model.modalities):
        bypass = [p for b in blocks for layer in (b.squeeze, b.excite[i]) for p in layer.parameters()]
        main = [*model.encoders[m].parameters(), *cast(SumFusion, model.fusion).fc[m].parameters()]
        assert float(method.speed_bypass[i]) == pytest.approx(speed(bypass), rel=1e-6)
        assert float(method.speed_main[i]) == pytest.approx(speed(main), rel=1e-6)


def test_in_curation_the_cared_modality_ignores_the_other_input() -> None:
    data = TinyDataset()
    method = _greedy(data)
    batch = first_batch(data)
    _step(method, batch)  # one training step so the running gate averages are not zero
    m0, m1 = data.modalities
    perturbed = replace(batch, inputs=dict(batch.inputs, **{m1: batch.inputs[m1] + 2.0}))
    method.set_mode(5, 0)
    method.eval()  # evaluation mode: the running averages stay fixed between the two passes
    with torch.no_grad():
        a, b = method.forward(batch), method.forward(perturbed)
        torch.testing.assert_close(a.features[m0], b.features[m0])
        assert not torch.allclose(a.features[m1], b.features[m1])
        method.set_mode(0, 0)  # without curation, modality 0 does see modality 1
        assert not torch.allclose(method.forward(batch).features[m0], method.forward(perturbed).features[m0])


def test_infinite_epsilon_is_plain_mmtm_training() -> None:
    data = TinyDataset()
    greedy = _greedy(data, epsilon=math.inf, starting_epoch=0)
    plain = _greedy(data, epsilon=math.inf)
    greedy.train_epoch(0, greedy.ctx.batches("train", shuffle=True))
    for batch in plain.ctx.batches("train", shuffle=True):  # the blend loss, no controller at all
        out = plain.model(batch)
        torch.stack([F.cross_entropy(z, batch.label) for z in out.unimodal_logits.values()]).sum().backward()
        plain.ctx.optimizer_step()
    assert greedy.curation_left == 0 and greedy.ctx.pop_logs()["greedy/curation"] == 0.0
    for (name, p), q in zip(greedy.model.state_dict().items(), plain.model.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def test_model_is_mmtm_with_branch_heads_averaged(tiny: TinyDataset) -> None:
    method = _greedy(tiny, mmtm_stages=1)
    assert len(_blocks(method)) == 1 and _blocks(method)[0].dims == (6,) * len(tiny.modalities)  # after the last stage
    assert len(_greedy(tiny).model.mid_fusion.blocks) == 2  # type: ignore[union-attr]  # k=3 on 2-stage cnns
    batch = first_batch(tiny)
    out = method.forward(batch)
    torch.testing.assert_close(out.logits, torch.stack(list(out.unimodal_logits.values())).mean(0))
    losses = method.losses(out, batch)
    assert set(losses) == {f"ce_{m}" for m in tiny.modalities}
    torch.testing.assert_close(
        losses[f"ce_{tiny.modalities[0]}"], F.cross_entropy(out.unimodal_logits[tiny.modalities[0]], batch.label)
    )


def test_controller_state_round_trips() -> None:
    data = TinyDataset()
    method = _greedy(data)
    method.record(torch.tensor([2.0, 1.0], dtype=torch.float64), torch.tensor([1.0, 1.0], dtype=torch.float64))
    method.set_mode(3, 1)
    clone = _greedy(data)
    clone.load_state_dict(method.state_dict())
    assert (clone.curation_left, clone.caring) == (3, 1)
    assert clone.speed_bypass.tolist() == [2.0, 1.0] and clone.speed_main.tolist() == [1.0, 1.0]


def test_refuses_a_model_without_mid_fusion() -> None:
    with pytest.raises(ConfigError, match="MMTM mid-fusion"):
        create_method("greedy", tiny_model(TinyDataset()))


def test_the_probe_of_an_mmtm_encoder_reads_it_without_the_other_modality() -> None:
    from balancemm.data.base import InMemorySplit
    from balancemm.engine.probe import features

    data = TinyDataset()
    model = build_method("greedy", data).model
    other = TinyDataset()
    test = data.split("test")
    # Same visual rows, different audio: MMTM would mix the new audio into the visual branch.
    other._splits["test"] = InMemorySplit(
        {"audio": -test.inputs["audio"], "visual": test.inputs["visual"]}, test.labels
    )
    torch.testing.assert_close(features(model, data, "test", "visual"), features(model, other, "test", "visual"))
    fused = model.encode(first_batch(data))["visual"]
    alone = torch.from_numpy(features(model, data, "train", "visual")[:8])
    assert not torch.allclose(fused, alone)  # the masking matters: with audio present the features differ


def test_the_running_gate_averages_fold_in_the_mean_over_every_ranks_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    data = TinyDataset()
    method = _greedy(data)
    batch = first_batch(data)
    seen: list[torch.Tensor] = []

    def global_mean(t: torch.Tensor) -> torch.Tensor:
        seen.append(t)
        return torch.full_like(t[0], 0.25)  # the global batch's mean gates, whatever this shard holds

    monkeypatch.setattr(method.ctx, "global_mean", global_mean)
    method.forward(batch)
    blocks = _blocks(method)
    assert [tuple(t.shape) for t in seen] == [(len(batch), sum(b.dims)) for b in blocks]
    assert all(torch.equal(b.average, torch.full_like(b.average, 0.25)) for b in blocks)  # the first call: ḡ = mean
    assert method.model.mid_fusion is not None and method.model.mid_fusion.row_mean is None  # only inside forward
    method.eval()
    method.forward(batch)  # evaluation folds nothing in and asks no rank for anything
    assert len(seen) == len(blocks)
