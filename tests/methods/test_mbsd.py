"""MBSD against values computed by hand from its equations (docs/methods/mbsd.md)."""

from __future__ import annotations

import math
from itertools import combinations

import pytest
import torch
import torch.nn.functional as F

import balancemm.methods.mbsd  # noqa: F401  (registers "mbsd")
from balancemm.methods import create_method
from balancemm.methods.mbsd import self_distillation
from balancemm.models import ModelOutput
from tests.conftest import TinyDataset, first_batch, tiny_model

# Two classes, true class 0: p_a = (0.8, 0.2) (correct, the teacher), p_v = (0.3, 0.7) (wrong).
Z_A = torch.tensor([[math.log(0.8), math.log(0.2)]])
Z_V = torch.tensor([[math.log(0.3), math.log(0.7)]])
Y = torch.tensor([0])
OMEGA = 0.8 - 0.3  # a prediction of the pair is correct, so ω = s − w
RS = 0.5 * (math.log(0.8 / 0.3) ** 2 + math.log(0.2 / 0.7) ** 2)  # (1/C) Σ_c (z_a − z_v)² = 1.265721


def _losses(logits: dict[str, torch.Tensor], fused: torch.Tensor, label: torch.Tensor, **hp: object) -> dict:
    data = TinyDataset(len(logits))
    method = create_method("mbsd", tiny_model(data), **hp)
    batch = first_batch(data, len(label))
    batch = type(batch)(batch.inputs, label, batch.index, batch.present, batch.modalities)
    return method.losses(ModelOutput(fused, {}, logits), batch)


def test_true_kl_between_teacher_and_student_is_the_hand_value() -> None:
    # KL(p_a ‖ p_v) = 0.8 ln(0.8/0.3) + 0.2 ln(0.2/0.7) = 0.784663 − 0.250552 = 0.534111 ≥ 0
    kl, rs = self_distillation([Z_A, Z_V], Y)
    assert float(kl) == pytest.approx(OMEGA * 0.534111, abs=1e-5) == pytest.approx(0.267055, abs=1e-5)
    assert float(rs) == pytest.approx(OMEGA * RS, abs=1e-6) == pytest.approx(0.632860, abs=1e-6)
    # The teacher is chosen per sample by confidence, not by position.
    kl_swapped, rs_swapped = self_distillation([Z_V, Z_A], Y)
    assert float(kl_swapped) == pytest.approx(float(kl)) and float(rs_swapped) == pytest.approx(float(rs))


def test_balancemm_compat_kl_is_the_scalar_formula() -> None:
    # BalanceMM's "KL": F.kl_div(s, w) = w (ln w − s) = 0.3 (ln 0.3 − 0.8) = −0.6012, negative.
    kl, rs = self_distillation([Z_A, Z_V], Y, compat=True)
    assert 0.3 * (math.log(0.3) - 0.8) == pytest.approx(-0.6012, abs=1e-4)
    assert float(kl) == pytest.approx(OMEGA * -0.601192, abs=1e-5)
    assert float(rs) == pytest.approx(OMEGA * RS, abs=1e-6)  # RS on logits for two modalities


def test_the_reconstruction_trains_only_the_student_and_compat_both() -> None:
    z_a, z_v = Z_A.clone().requires_grad_(), Z_V.clone().requires_grad_()
    kl, rs = self_distillation([z_a, z_v], Y)
    g_a, g_v = torch.autograd.grad(kl + rs, [z_a, z_v], allow_unused=True)
    assert g_a is None or torch.count_nonzero(g_a) == 0  # teacher and ω are detached
    assert torch.count_nonzero(g_v) > 0
    kl, rs = self_distillation([z_a, z_v], Y, compat=True)
    g_a, g_v = torch.autograd.grad(kl + rs, [z_a, z_v])
    assert torch.count_nonzero(g_a) > 0 and torch.count_nonzero(g_v) > 0  # BalanceMM detaches nothing


@pytest.mark.parametrize("compat", [False, True])
def test_both_unimodal_predictions_wrong_leaves_the_plain_cross_entropies(compat: bool) -> None:
    label = torch.tensor([0, 1])
    logits = {
        "audio": torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 1.0]]),  # predicts 1, 0: both wrong
        "visual": torch.tensor([[0.0, 1.0, 3.0], [0.0, 0.0, 2.0]]),  # predicts 2, 2: both wrong
    }
    fused = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.0]])
    terms = _losses(logits, fused, label, compat=compat)
    assert float(terms["distill"]) == 0 and float(terms["rs"]) == 0
    expected = F.cross_entropy(fused, label) + sum(F.cross_entropy(z, label) for z in logits.values())
    torch.testing.assert_close(sum(terms.values()), expected)
    # CE(z) by hand: mean(ln(1 + 2e^-1), ln(2 + e^0.5) − 0.5) = mean(0.551445, 0.794377)
    assert float(terms["fused"]) == pytest.approx((0.551445 + 0.794377) / 2, abs=1e-6)


@pytest.mark.parametrize("compat", [False, True])
def test_identical_modalities_give_zero_weight_and_zero_similarity(compat: bool) -> None:
    z = torch.tensor([[2.0, 0.0, 1.0], [0.0, 3.0, 1.0]])  # both predictions correct
    kl, rs = self_distillation([z, z.clone()], torch.tensor([0, 1]), compat=compat)
    assert float(kl) == 0 and float(rs) == 0


def test_three_modalities_average_the_pairs() -> None:
    # Pairs (a, a'), (a, v), (a', v): the first has ω = 0, the other two equal the 2-modality value.
    kl, rs = self_distillation([Z_A, Z_A.clone(), Z_V], Y)
    assert float(kl) == pytest.approx(2 / 3 * OMEGA * 0.534111, abs=1e-5)
    assert float(rs) == pytest.approx(2 / 3 * OMEGA * RS, abs=1e-6)
    # compat: BalanceMM switches RS to probabilities for 3 modalities: mean_c (p_a − p_v)² = 0.25
    kl, rs = self_distillation([Z_A, Z_A.clone(), Z_V], Y, compat=True)
    assert float(kl) == pytest.approx(2 / 3 * OMEGA * -0.601192, abs=1e-5)
    assert float(rs) == pytest.approx(2 / 3 * OMEGA * 0.25, abs=1e-6)


def _loop_reference(logits: list[torch.Tensor], label: torch.Tensor, compat: bool) -> tuple[float, float]:
    """The per-sample definition, written as BalanceMM's loop, for comparison with the vectorised code."""
    kls, rss = [], []
    for a, b in combinations(range(len(logits)), 2):
        kl_sum = rs_sum = 0.0
        for i in range(label.numel()):
            za, zb, y = logits[a][i], logits[b][i], int(label[i])
            pa, pb = za.softmax(0), zb.softmax(0)
            s, w = max(pa[y], pb[y]), min(pa[y], pb[y])
            omega = float(s - w) if int(za.argmax()) == y or int(zb.argmax()) == y else 0.0
            if compat:
                kl = float(w * (w.log() - s))
                rep_a, rep_b = (za, zb) if len(logits) == 2 else (pa, pb)
                rs = float(((rep_a - rep_b) ** 2).mean())
            else:
                (pt, zt), (ps, zs) = ((pa, za), (pb, zb)) if pa[y] >= pb[y] else ((pb, zb), (pa, za))
                kl = float((pt * (pt.log() - ps.log())).sum())
                rs = float(((zt - zs) ** 2).mean())
            kl_sum += omega * kl
            rs_sum += omega * rs
        kls.append(kl_sum / label.numel())
        rss.append(rs_sum / label.numel())
    return sum(kls) / len(kls), sum(rss) / len(rss)


@pytest.mark.parametrize("num_modalities", [2, 3])
@pytest.mark.parametrize("compat", [False, True])
def test_vectorised_terms_match_the_per_sample_loop(num_modalities: int, compat: bool) -> None:
    g = torch.Generator().manual_seed(0)
    logits = [2 * torch.randn(16, 4, generator=g, dtype=torch.float64) for _ in range(num_modalities)]
    label = torch.randint(0, 4, (16,), generator=g)
    kl, rs = self_distillation(logits, label, compat=compat)
    ref_kl, ref_rs = _loop_reference(logits, label, compat)
    assert float(kl) == pytest.approx(ref_kl, rel=1e-9) and float(rs) == pytest.approx(ref_rs, rel=1e-9)
    assert compat or float(kl) >= 0


def test_loss_terms_and_weights() -> None:
    logits = {"audio": Z_A, "visual": Z_V}
    fused = Z_A + Z_V
    terms = _losses(logits, fused, Y, unimodal_weight=0.5, kl_weight=3.0, beta=2.0)
    assert list(terms) == ["fused", "uni_audio", "uni_visual", "distill", "rs"]
    assert float(terms["uni_audio"]) == pytest.approx(0.5 * -math.log(0.8), abs=1e-6)
    assert float(terms["uni_visual"]) == pytest.approx(0.5 * -math.log(0.3), abs=1e-6)
    assert float(terms["distill"]) == pytest.approx(3 * OMEGA * 0.534111, abs=1e-5)
    assert float(terms["rs"]) == pytest.approx(2 * OMEGA * RS, abs=1e-6)
