"""CML against hand-computed numbers."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import balancemm.methods.cml  # noqa: F401  (registers the method)
from balancemm.distributed import World
from balancemm.methods import RunContext, create_method
from balancemm.methods.cml import calibration_penalty, removal_chain
from tests.conftest import TinyDataset, build_method, first_batch, tiny_model, train_epochs


def _chain(*elements: list[list[float]]) -> torch.Tensor:
    """Chain logits ``[K, B, 3]`` whose softmax is exactly the given probability rows."""
    return torch.tensor(elements).log()


def test_per_sample_hinge_not_batch_hinge() -> None:
    # Every prediction is correct (σ = 1, no trick 2). conf^S = (0.5, 0.9, 0.6), conf^T = (0.8, 0.4, 0.7):
    # d = (0.3, −0.5, 0.1) → Σ ReLU(d) = 0.4 (original); BalanceMM's max(0, Σ d) = max(0, −0.1) = 0.
    logits = _chain(
        [[0.5, 0.25, 0.25], [0.9, 0.05, 0.05], [0.6, 0.2, 0.2]],
        [[0.8, 0.1, 0.1], [0.4, 0.3, 0.3], [0.7, 0.15, 0.15]],
    )
    label = torch.zeros(3, dtype=torch.long)
    for variant in ("miwae", "cpm"):
        assert float(calibration_penalty(logits, label, variant)) == pytest.approx(0.4, abs=1e-6)
    conf = logits.softmax(-1).amax(-1)
    assert float(F.relu((conf[1] - conf[0]).sum())) == 0.0  # the BalanceMM hinge this must not equal
    # margin ε = 0.05: ReLU(0.3 − 0.05) + ReLU(0.1 − 0.05) = 0.3
    assert float(calibration_penalty(logits, label, "miwae", epsilon=0.05)) == pytest.approx(0.3, abs=1e-6)


def test_no_penalty_and_no_gradient_when_every_confidence_drops() -> None:
    logits = _chain(
        [[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.6, 0.2, 0.2]],
        [[0.5, 0.25, 0.25], [0.3, 0.4, 0.3], [0.25, 0.25, 0.5]],
    )
    logits.requires_grad_()
    label = torch.tensor([0, 0, 0])  # right→right, wrong→wrong, right→wrong: all drop
    for variant in ("miwae", "cpm"):
        penalty = calibration_penalty(logits, label, variant)
        (grad,) = torch.autograd.grad(penalty, logits)
        assert float(penalty.detach()) == 0.0 and torch.count_nonzero(grad) == 0


# Four single-sample cases, label 0, confidence rising by 0.3 from S (fuller) to T (one modality fewer):
RIGHT_50, WRONG_50 = [0.5, 0.25, 0.25], [0.25, 0.5, 0.25]
RIGHT_80, WRONG_80 = [0.8, 0.1, 0.1], [0.1, 0.8, 0.1]
CASES = {  # (S, T): (miwae, cpm) penalty
    "S right, T right": ((RIGHT_50, RIGHT_80), (0.3, 0.3)),
    "S wrong, T right": ((WRONG_50, RIGHT_80), (0.0, 0.0)),
    "S right, T wrong": ((RIGHT_50, WRONG_80), (0.3, 0.3)),
    "both wrong": ((WRONG_50, WRONG_80), (0.3, 0.3)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sign_mask(case: str) -> None:
    (s, t), expected = CASES[case]
    for variant, value in zip(("miwae", "cpm"), expected, strict=True):
        logits = _chain([s], [t]).requires_grad_()
        penalty = calibration_penalty(logits, torch.tensor([0]), variant)
        assert float(penalty.detach()) == pytest.approx(value, abs=1e-6), variant
        if value:
            (grad,) = torch.autograd.grad(penalty, logits)
            assert torch.count_nonzero(grad[1]) > 0  # the reduced set's confidence is pushed down
            # trick 2 (miwae, both wrong) stops the gradient into the fuller set's confidence
            assert (torch.count_nonzero(grad[0]) == 0) == (variant == "miwae" and case == "both wrong")


def test_removal_chain_is_nested_per_sample_and_covers_every_order() -> None:
    chain = removal_chain(600, 3, torch.Generator().manual_seed(0))
    assert chain.shape == (3, 600, 3) and chain.dtype == torch.bool
    assert chain[0].all()
    torch.testing.assert_close(chain.sum(-1), torch.tensor([3, 2, 1])[:, None].expand(3, 600))
    assert bool((chain[1:] <= chain[:-1]).all())  # S_{k+1} ⊂ S_k
    removed_first = (chain[0] & ~chain[1]).int().argmax(1)
    removed_second = (chain[1] & ~chain[2]).int().argmax(1)
    orders = set(zip(removed_first.tolist(), removed_second.tolist(), strict=True))
    assert len(orders) == 6  # all 3! removal orders occur, drawn per sample


def _method(data: TinyDataset, seed: int = 0, **hp: object) -> object:
    model = tiny_model(data)
    return create_method("cml", model, RunContext(model.modalities, seed=seed), **hp)


def test_chain_logits_equal_separate_masked_forwards(tiny: TinyDataset) -> None:
    method = _method(tiny)
    model = method.model  # type: ignore[attr-defined]
    batch = first_batch(tiny)
    chain = removal_chain(len(batch), len(tiny.modalities), torch.Generator().manual_seed(3))
    out = model(batch)
    logits = method.chain_logits(out, batch, chain)  # type: ignore[attr-defined]
    expected = torch.stack([model(replace(batch, present=p)).logits for p in chain])
    torch.testing.assert_close(logits, expected)


def test_losses_are_chain_mean_ce_plus_lambda_penalty_and_deterministic(tiny: TinyDataset) -> None:
    batch = first_batch(tiny)
    a, b, other = _method(tiny, seed=5), _method(tiny, seed=5), _method(tiny, seed=6)
    rng_state = torch.get_rng_state()
    losses = [m.losses(m.forward(batch), batch) for m in (a, b, other)]  # type: ignore[attr-defined]
    assert torch.equal(torch.get_rng_state(), rng_state)  # only ctx.generator is used
    assert list(losses[0]) == ["ce", "calibration"]
    torch.testing.assert_close(losses[0], losses[1])
    # the same draw by hand: chain from a fresh generator with the run's seed
    chain = removal_chain(len(batch), len(tiny.modalities), RunContext(tiny.modalities, seed=5).generator)
    model = a.model  # type: ignore[attr-defined]
    logits = torch.stack([model(replace(batch, present=p)).logits for p in chain])
    ce = torch.stack([F.cross_entropy(z, batch.label) for z in logits]).mean()
    torch.testing.assert_close(losses[0]["ce"], ce)
    torch.testing.assert_close(losses[0]["calibration"], 0.1 * calibration_penalty(logits, batch.label))
    assert not torch.equal(
        removal_chain(64, 3, RunContext(tiny.modalities, seed=5).generator),
        removal_chain(64, 3, RunContext(tiny.modalities, seed=6).generator),
    )


def test_zero_penalty_when_the_removed_modality_contributes_nothing(tiny: TinyDataset) -> None:
    method = _method(tiny)
    model = method.model  # type: ignore[attr-defined]
    with torch.no_grad():  # W_r = 0 for the first modality r: dropping h_r changes no logit
        model.fusion.fc_out.weight[:, : model.encoders[tiny.modalities[0]].num_features] = 0
    batch = first_batch(tiny)
    present = torch.ones(len(batch), len(tiny.modalities), dtype=torch.bool)
    without_r = present.clone()
    without_r[:, 0] = False
    logits = method.chain_logits(model(batch), batch, torch.stack([present, without_r]))  # type: ignore[attr-defined]
    torch.testing.assert_close(logits[1], logits[0])
    assert float(calibration_penalty(logits, batch.label).detach()) == 0.0


def test_input_masking_runs_separate_forwards() -> None:
    data = TinyDataset(3)
    model = tiny_model(data, mask="input")
    method = create_method("cml", model)
    batch = first_batch(data)
    chain = removal_chain(len(batch), 3, torch.Generator().manual_seed(0))
    logits = method.chain_logits(model(batch), batch, chain)  # type: ignore[attr-defined]
    expected = torch.stack([model(replace(batch, present=p)).logits for p in chain])
    torch.testing.assert_close(logits, expected)


def test_one_optimiser_step_per_batch(tiny: TinyDataset) -> None:
    # The original's 5 steps per batch are MIWAE's schedule, not CML's (see cml.py): 24 samples in
    # batches of 8 give 3 batches, hence 3 steps, not 15.
    method = build_method("cml", tiny)
    train_epochs(method, 1)
    assert method.ctx.step == 3


# -- data-parallel runs -------------------------------------------------------------------------


def test_on_a_rank_of_two_the_chain_is_its_rows_of_the_global_draw_and_the_penalty_a_share(
    tiny: TinyDataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    method = _method(tiny, lam=0.5)
    ctx, model = method.ctx, method.model  # type: ignore[attr-defined]
    # Rank 1 of two, holding the last 8 rows of a global batch of 16 (no collective is run).
    monkeypatch.setattr(ctx, "world", World(1, 2, 1, "gloo"))
    batch = replace(first_batch(tiny), share=0.5)
    replay = torch.Generator().manual_seed(0)
    replay.set_state(ctx.device_generator.get_state())
    losses = method.losses(method.forward(batch), batch)  # type: ignore[attr-defined]
    chain = removal_chain(16, len(tiny.modalities), replay)[:, 8:]  # the one-process orders of rows 8–15
    logits = torch.stack([model(replace(batch, present=p)).logits for p in chain])
    ce = torch.stack([F.cross_entropy(z, batch.label) for z in logits]).mean()
    torch.testing.assert_close(losses["ce"], ce)  # a mean: the gradient averaging weights it by the share
    # A sum over the global batch: this rank's part, divided by its share, so the share-weighted average of
    # the ranks' gradients is the gradient of the sum.
    torch.testing.assert_close(losses["calibration"], 0.5 * calibration_penalty(logits, batch.label) / 0.5)
