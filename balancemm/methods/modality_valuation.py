"""Modality valuation: sample-level and modality-level re-sampling by Shapley contribution.

Wei, Feng, Wang, Hu. "Enhancing Multimodal Cooperation via Sample-level Modality Valuation." CVPR 2024.
Official code: GeWu-Lab/Valuate-and-Enhance-Multimodal-Cooperation (``code/sample_level.py``,
``code/modality_level.py``, ``code/datasets/dataloader.py``), which this follows
(documented in docs/methods/modality_valuation.md).

Idea: value each modality's contribution to every training sample with a Shapley value on prediction
correctness, then add training copies of the (sample, modality) pairs that contribute little, with only
that modality present, so the weak modality is trained on exactly the samples where it fails.

Valuation (hook ``on_epoch_start`` from epoch ``warmup`` on, phase ``valuation/estimate``; the model of
the previous epoch, eval mode, no gradients, every training row once):

1. coalition predictions f(S) with the modalities outside S masked (the model's masking: the other
   modalities' features zeroed at the fusion head, the official ``exec_drop``), via the model's
   encode-once coalition evaluation;
2. value  v_i(S) = |S|·1[argmax f_i(S) = y_i]   (v(∅) = 0; the official 2.0 for the full pair);
3. φ_{i,m} = Σ_{S ⊆ M∖{m}} |S|!(|M|−|S|−1)!/|M|! · (v_i(S ∪ {m}) − v_i(S)), per sample, by the codebase's
   one Shapley helper (``metrics.shapley``) on ``[N]`` tensors. Two modalities: φ_a = (v(a) + v(av) − v(v))/2.

Sample-level (``variant=sample``): the epoch's data = every row once (all modalities) plus, for each
sample i and modality m, n_{i,m} copies with only m present:
    n = 1 if 0.4 < φ < 1,   n = 2 if −0.1 < φ < 0.4,   n = 3 if φ < −0.1,   else 0.

Modality-level (``variant=modality``): φ̄_m = mean of φ_{·,m} over ⌊part_ratio·N⌋ rows drawn with
replacement, γ_m = 1 − φ̄_m and
    D = α·(2/3)·|γ_a − γ_v|  (linear),   tanh(α·(2/3)·|γ_a − γ_v|)  (tanh),   α·((2/3)·|γ_a − γ_v|)^1.5  (square);
⌊D·N⌋ rows drawn with replacement are added with only the modality of larger γ (the lower contributor)
present.

The copies are a ``SamplePlan``: the data layer appends them in memory (``extra_index`` /
``extra_present``) and shuffles them in; nothing is rebuilt from disk. Training is plain CE on the
fused output; an absent modality's feature is zeroed, so its encoder gets no gradient from that copy.

Three or more modalities (no official version): sample-level is unchanged (copies keep only m);
modality-level uses the largest minus the smallest γ for |γ_a − γ_v| and keeps only the modality of
largest γ (our extension; for M = 2 it is the official rule).

Data-parallel runs: each rank values its part of the split and φ is gathered in split order
(``ctx.gather``), so every rank builds the same plan; the one difference from one process is the data
layer's: if the copies leave a last global batch with fewer rows than ranks, it is left out on every rank.

Deviations from the paper/official code:
  * Valuation happens at the start of each epoch ≥ ``warmup`` on the previous epoch's model, which is
    the official order (after epoch e ≥ warmup − 1, for epoch e + 1). The official code also values
    during warm-up and discards the result; we skip those passes.
  * The official draws use NumPy's global RNG; here they come from the run's generator.
Deviations from BalanceMM (``Sample_trainer.py`` / ``Modality_trainer.py``, ``datasets/__init__.py``):
  * v(S) = |S|·correct, so a fully correct sample gives φ = 1 per modality and no copies; BalanceMM's 0/1
    value gives 0.5 and a copy of every modality of every correct sample;
  * the other modalities' *features* are zeroed (official); BalanceMM zeroes inputs, which is not a zero
    feature with biases or BatchNorm and pollutes BatchNorm statistics (``model.mask=input`` gives that);
  * modality-level D is α·(2/3)·|Δγ| with one copy per chosen row; BalanceMM has no α, twice the fraction
    and |M| copies per chosen row;
  * every training row is valued (BalanceMM: ⌊N/64⌋·64 rows, with the first batch's predictions reused
    for every batch); valuation starts after 5 warm-up epochs (BalanceMM: epoch 1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from balancemm.catalog.methods import ValuationHParams
from balancemm.data.batch import SamplePlan
from balancemm.methods.base import Method
from balancemm.metrics.shapley import coalitions, shapley_values
from balancemm.registry import METHODS


def sample_values(correct: dict[frozenset[str], Tensor], modalities: tuple[str, ...]) -> dict[str, Tensor]:
    """φ ``{m: [N]}`` per sample from correctness ``{S: [N] bool}`` of every non-empty coalition, with
    the official value v(S) = |S|·1[correct], v(∅) = 0."""
    some = next(iter(correct.values()))
    values = {s: len(s) * c.to(torch.float64) for s, c in correct.items()}
    values[frozenset()] = torch.zeros(some.shape, dtype=torch.float64, device=some.device)
    return shapley_values(values, modalities)


def copies_per_sample(phi: Tensor) -> Tensor:
    """Official copy counts ``[N]`` from contributions ``[N]``: 1 on (0.4, 1), 2 on (−0.1, 0.4), 3 below −0.1."""
    n = torch.zeros(phi.shape, dtype=torch.long, device=phi.device)
    n[(phi > 0.4) & (phi < 1)] = 1
    n[(phi > -0.1) & (phi < 0.4)] = 2
    n[phi < -0.1] = 3
    return n


def resample_fraction(gaps: Tensor, alpha: float, func: str) -> float:
    """D from the gaps γ ``[M]``: α·(2/3)·Δ (linear), tanh of it, or α·((2/3)·Δ)^1.5, Δ = max γ − min γ."""
    base = float(gaps.max() - gaps.min()) / 3 * 2  # the official order of operations
    if func == "tanh":
        return math.tanh(alpha * base)
    if func == "square":
        return alpha * base**1.5
    return alpha * base


def only(modality: int, rows: int, num_modalities: int) -> Tensor:
    """A ``[rows, M]`` presence mask with only ``modality`` present."""
    present = torch.zeros(rows, num_modalities, dtype=torch.bool)
    present[:, modality] = True
    return present


@METHODS.register("modality_valuation")
class ModalityValuation(Method):
    adapted: ClassVar[Mapping[str, Any]] = {"warmup": "8%"}  # official: 5 warm-up epochs of 60
    HParams = ValuationHParams
    search: ClassVar[Mapping[str, Any]] = {  # sample level has nothing to tune: draws are modality level
        "variant": ["modality"],
        "alpha": [0.5, 1.0, 1.5, 2.0],
        "func": ["linear", "tanh", "square"],
    }

    def acts_in(self, epoch: int) -> bool:
        return self.within(epoch, self.hp.warmup)

    def on_epoch_start(self, epoch: int) -> SamplePlan | None:
        if not self.acts_in(epoch):
            return None
        with self.ctx.phase("valuation/estimate"):
            phi = self.valuate()
        plan = self.sample_plan(phi) if self.hp.variant == "sample" else self.modality_plan(phi)
        extra = plan.extra_present
        assert extra is not None
        for i, m in enumerate(self.model.modalities):
            self.ctx.log(**{f"valuation/phi_{m}": phi[:, i].mean(), f"valuation/extra_{m}": extra[:, i].sum()})
        return plan

    def valuate(self) -> Tensor:
        """φ ``[N, M]`` for every training row (rows in split order, modalities in sorted order)."""
        mods = self.model.modalities
        subsets = coalitions(mods, include_empty=False)
        chunks, rows = [], []
        with self.ctx.eval_mode(self):
            for batch in self.ctx.batches("train"):
                _, logits = self.predict_coalitions(batch, subsets)  # [K, B, C]
                correct = logits.argmax(-1) == batch.label
                phi = sample_values(dict(zip(subsets, correct, strict=True)), mods)
                chunks.append(torch.stack([phi[m] for m in mods], dim=1).cpu())
                rows.append(batch.index.cpu())
        out = torch.empty(self.ctx.split_size("train"), len(mods), dtype=torch.float64)
        # In a data-parallel run each rank valued its part of the split: every rank gets every row's φ.
        out[self.ctx.gather(torch.cat(rows))] = self.ctx.gather(torch.cat(chunks))
        return out

    def sample_plan(self, phi: Tensor) -> SamplePlan:
        """n_{i,m} copies of row i with only modality m present (sample-level)."""
        counts = copies_per_sample(phi)  # [N, M]
        index, present = [], []
        for i in range(phi.shape[1]):
            rows = torch.repeat_interleave(torch.arange(phi.shape[0]), counts[:, i])
            index.append(rows)
            present.append(only(i, rows.numel(), phi.shape[1]))
        return SamplePlan(extra_index=torch.cat(index), extra_present=torch.cat(present))

    def modality_plan(self, phi: Tensor) -> SamplePlan:
        """⌊D·N⌋ random rows with only the lowest-contributing modality present (modality-level)."""
        hp, gen = self.hp, self.ctx.generator
        n = phi.shape[0]
        part = torch.randint(n, (max(int(n * hp.part_ratio), 1),), generator=gen)
        gaps = 1.0 - phi[part].mean(0)
        count = int(resample_fraction(gaps, hp.alpha, hp.func) * n)
        rows = torch.randint(n, (count,), generator=gen)
        return SamplePlan(extra_index=rows, extra_present=only(int(gaps.argmax()), count, phi.shape[1]))
