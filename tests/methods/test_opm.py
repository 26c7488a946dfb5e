"""OPM against the spec's hand-computed numbers (specs/methods-optim-forward-data.md §7.6) and its behaviour."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

import balancemm.methods.opm  # noqa: F401  (registers "opm")
from balancemm.errors import ConfigError
from balancemm.methods.opm import OPM, OPMHParams, drop_features, opm_drop_probabilities
from tests.conftest import TinyDataset, build_method, first_batch, tiny_spec


def _method(data: TinyDataset | None = None, **hp: Any) -> OPM:
    method = build_method("opm", data or TinyDataset(), **hp)
    assert isinstance(method, OPM)
    return method


def _q(scores: list[float], **kw: Any) -> list[float]:
    return opm_drop_probabilities(torch.tensor(scores), **{"q_base": 0.5, "lam": 0.5, **kw}).tolist()


# -- the spec's numbers -------------------------------------------------------------------------


def test_a_tie_drops_nothing() -> None:
    assert _q([3.0, 3.0]) == [0.0, 0.0]


def test_q_jumps_to_q_base_as_soon_as_rho_exceeds_one() -> None:
    # ρ = 1.0001: q = 0.5·(1 + 0.5·tanh(0.0001)) = 0.500025
    assert _q([1.0001, 1.0]) == pytest.approx([0.500025, 0.0], abs=1e-6)


def test_rho_two_with_official_and_balancemm_q_base() -> None:
    # ρ = 2: q = q_base·(1 + 0.5·tanh 1) = 0.690399 (q_base 0.5), 0.552319 (q_base 0.4)
    assert _q([4.0, 2.0]) == pytest.approx([0.690399, 0.0], abs=1e-6)
    assert _q([4.0, 2.0], q_base=0.4) == pytest.approx([0.552319, 0.0], abs=1e-6)
    assert _q([2.0, 4.0]) == pytest.approx([0.0, 0.690399], abs=1e-6)  # the dominant one may be either
    assert _q([4.0, 2.0], q_base=0.9) == [1.0, 0.0]  # 0.9·1.380797 clipped to 1


def test_both_three_modality_rules_reduce_to_the_official_one_for_two() -> None:
    assert _q([4.0, 2.0], ratio_to="sum") == _q([4.0, 2.0], ratio_to="mean")
    # M = 3, s = (3, 1, 1): mean → ρ_1 = 3 → 0.5·(1 + 0.5·tanh 2) = 0.741007;
    #                        sum  → ρ_1 = 1.5 → 0.5·(1 + 0.5·tanh 0.5) = 0.615529; others ρ < 1
    assert _q([3.0, 1.0, 1.0]) == pytest.approx([0.741007, 0.0, 0.0], abs=1e-6)
    assert _q([3.0, 1.0, 1.0], ratio_to="sum") == pytest.approx([0.615529, 0.0, 0.0], abs=1e-6)
    # s = (6, 2, 4): mean → ρ = (2, 0.4, 1) drops only the first; sum → ρ_1 = 1, nothing is dropped
    assert _q([6.0, 2.0, 4.0]) == pytest.approx([0.690399, 0.0, 0.0], abs=1e-6)
    assert _q([6.0, 2.0, 4.0], ratio_to="sum") == [0.0, 0.0, 0.0]


def test_theta_and_scale_with_equal_dims() -> None:
    # d = (4, 4), q = (0.552319, 0): θ = 0.276159, kept features scaled by 1/(1 − θ) = 1.381520
    h = {"audio": torch.rand(64, 4) + 0.5, "visual": torch.rand(64, 4) + 0.5}
    out, kept, theta = drop_features(h, torch.tensor([0.552319, 0.0], dtype=torch.float64), torch.Generator())
    assert theta == pytest.approx(0.276159, abs=1e-6)
    assert bool(kept.all())  # the never-dropped modality keeps every row
    torch.testing.assert_close(out["visual"], h["visual"] * 1.381520, rtol=1e-6, atol=0)
    zero = (out["audio"] == 0).all(1)  # whole rows are dropped, the others scaled by 1/(1 − θ)
    assert 0 < int(zero.sum()) < 64
    torch.testing.assert_close(out["audio"][~zero], h["audio"][~zero] * 1.381520, rtol=1e-6, atol=0)


def test_theta_weights_the_drop_rates_by_feature_size() -> None:
    # d = (4, 12), q = (0.5, 0): θ = 4·0.5/16 = 0.125
    h = {"audio": torch.ones(2, 4), "visual": torch.ones(2, 12)}
    _, _, theta = drop_features(h, torch.tensor([0.5, 0.0], dtype=torch.float64), torch.Generator())
    assert theta == 0.125


def test_rho_one_leaves_the_features_and_output_identical() -> None:
    data = TinyDataset()
    method = _method(data)
    features = method.model.encode(first_batch(data))
    q = opm_drop_probabilities(torch.tensor([2.5, 2.5]), 0.5, 0.5)
    out, kept, theta = drop_features(features, q, torch.Generator())
    assert theta == 0.0 and bool(kept.all())
    assert all(torch.equal(out[m], features[m]) for m in features)
    assert torch.equal(method.model.fuse(out), method.model.fuse(features))


# -- behaviour ----------------------------------------------------------------------------------


def test_p_exe_zero_is_exactly_the_plain_model() -> None:
    data = TinyDataset()
    method = _method(data, p_exe=0.0, modulation_starts=0)
    batch = first_batch(data)
    out = method.forward(batch)
    plain = method.model(batch)
    assert torch.equal(out.logits, plain.logits)
    assert torch.equal(method.losses(out, batch)["ce"], F.cross_entropy(plain.logits, batch.label))
    assert method.ctx.pop_logs()["opm/executed"] == 0.0


def test_an_executed_drop_zeroes_rows_of_the_dominant_modality_and_rescales_all() -> None:
    data = TinyDataset()
    method = _method(data, p_exe=1.0, modulation_starts=0, q_base=0.9)
    batch = first_batch(data, n=24)
    with torch.no_grad():
        plain = method.model.encode(batch)
        out = method.forward(batch)
    logs = method.ctx.pop_logs()
    q = [logs["opm/q_audio"], logs["opm/q_visual"]]
    assert sorted(q)[0] == 0.0 and sorted(q)[1] >= 0.9  # only the dominant modality is dropped
    dominant, other = ("audio", "visual") if q[0] > 0 else ("visual", "audio")
    scale = 1 / (1 - logs["opm/theta"])
    torch.testing.assert_close(out.features[other], plain[other] * scale)
    zero = (out.features[dominant] == 0).all(1)
    assert 0 < int(zero.sum()) < 24
    torch.testing.assert_close(out.features[dominant][~zero], plain[dominant][~zero] * scale)
    assert torch.equal(out.logits, method.model.fuse(out.features))
    assert method.kept is not None and bool(method.kept.all())  # the other modality keeps every row


def test_dropped_rows_are_removed_from_the_loss() -> None:
    data = TinyDataset()
    method = _method(data)
    batch = first_batch(data)
    out = method.model(batch)
    method.kept = torch.tensor([True, False, True, True, False, False, True, True])
    expected = F.cross_entropy(out.logits[method.kept], batch.label[method.kept])
    torch.testing.assert_close(method.losses(out, batch)["ce"], expected)


def test_a_batch_with_every_row_dropped_gives_a_zero_loss_and_zero_gradients() -> None:
    h = {"audio": torch.ones(6, 4), "visual": torch.ones(6, 4)}
    out, kept, theta = drop_features(h, torch.tensor([1.0, 1.0], dtype=torch.float64), torch.Generator())
    assert theta == 1.0 and not bool(kept.any()) and all(bool((v == 0).all()) for v in out.values())
    data = TinyDataset()
    method = _method(data)
    batch = first_batch(data)
    model_out = method.model(batch)
    method.kept = torch.zeros(8, dtype=torch.bool)
    loss = method.losses(model_out, batch)["ce"]
    assert loss.item() == 0.0
    loss.backward()
    assert all(p.grad is None or not bool(p.grad.any()) for p in method.model.parameters())


def test_some_rows_lose_every_modality_when_all_are_dropped() -> None:
    h = {"audio": torch.ones(256, 2), "visual": torch.ones(256, 2)}
    _, kept, _ = drop_features(h, torch.tensor([0.5, 0.5], dtype=torch.float64), torch.Generator().manual_seed(0))
    assert 0.15 < 1 - kept.float().mean().item() < 0.35  # P(both dropped) = 0.25


def test_the_keep_masks_come_from_the_run_generator() -> None:
    h = {"audio": torch.ones(64, 3), "visual": torch.ones(64, 3)}
    q = torch.tensor([0.5, 0.0], dtype=torch.float64)

    def draw(seed: int) -> torch.Tensor:
        torch.manual_seed(seed + 100)  # the global RNG must not matter
        return drop_features(h, q, torch.Generator().manual_seed(seed))[0]["audio"]

    assert torch.equal(draw(1), draw(1)) and not torch.equal(draw(1), draw(2))
    data = TinyDataset()
    runs = []
    for _ in range(2):
        method = _method(data, p_exe=1.0, modulation_starts=0)
        with torch.no_grad():
            runs.append(method.forward(first_batch(data, n=24)).features)
    assert all(torch.equal(runs[0][m], runs[1][m]) for m in runs[0])


def test_the_warm_up_epochs_are_not_modulated() -> None:
    data = TinyDataset()
    method = _method(data, p_exe=1.0)
    assert method.hp.modulation_starts == OPMHParams().modulation_starts == 6  # official: epoch <= 5 is warm-up
    batch = first_batch(data)
    method.ctx.epoch = 5
    method.forward(batch)
    assert method.kept is None and "opm/q_audio" not in method.ctx.pop_logs()
    method.ctx.epoch = 6
    method.forward(batch)
    assert method.kept is not None and "opm/q_audio" in method.ctx.pop_logs()


def test_three_modalities_train_and_log_every_probability(tiny: TinyDataset) -> None:
    method = _method(tiny, p_exe=1.0, modulation_starts=0)
    batch = first_batch(tiny)
    method.backward(method.losses(method.forward(batch), batch))
    logs = method.ctx.pop_logs()
    assert {f"opm/q_{m}" for m in tiny.modalities} <= set(logs)
    assert min(logs[f"opm/q_{m}"] for m in tiny.modalities) == 0.0  # the weakest is never dropped


@pytest.mark.parametrize("kw", [{"fusion": "sum"}, {"fusion": "gated"}, {"unimodal_heads": "linear"}])
def test_non_concat_models_are_refused(kw: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match=r"model\.fusion=concat"):
        OPM.model_spec(tiny_spec(TinyDataset(), **kw), OPMHParams())
