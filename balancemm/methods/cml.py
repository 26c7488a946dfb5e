"""CML: Calibrating Multimodal Learning.

Ma, Zhang, Zhang, Wu, Fu, Zhou, Hu. "Calibrating Multimodal Learning." ICML 2023. Official code:
QingyangZhang/CML @ 9d2496e6 (``miwae/train.py`` stage 2, ``cpm/CPM_Nets.py: rank_loss``), which this
follows.

Idea: a trustworthy classifier should not become *more* confident when a modality is taken away.
For modality sets T ⊂ S the requirement is conf(f(x^T)) ≤ conf(f(x^S)); every per-sample violation
is penalised with a hinge, which keeps the model from leaning on whichever modality makes it
over-confident.

Per step (hook ``losses``), with conf_k,i = max_c softmax(z_k,i)_c and ŷ_k,i = argmax_c z_k,i,c:

1. chain     per sample i a random removal order π_i; S_0 = all modalities ⊃ S_1 ⊃ … ⊃ S_{M−1},
             S_k = S_0 minus the first k modalities of π_i (one modality is left in S_{M−1});
2. logits    z_k = f(x^{S_k}): one encoder pass, the removed modalities' features zeroed
             (feature masking) and the fusion re-run for each k;
3. CE        L_cls = (1/M) Σ_k CE(z_k, y);
4. sign      σ_k,i = 1[ŷ_k,i = y_i]                              (``variant=miwae``, trick 1)
             σ_k,i = 1 − 1[ŷ_k+1,i = y_i ∧ ŷ_k,i ≠ y_i]           (``variant=cpm``)
5. penalty   L_reg = Σ_{k<M−1} Σ_i ReLU((conf_k+1,i − conf_k,i)·σ_k,i − ε)
             + (miwae, trick 2) Σ_{k,i} ReLU((conf_k+1,i − sg(conf_k,i))·1[ŷ_k+1,i ≠ y_i ∧ ŷ_k,i ≠ y_i] − ε)
             — a per-sample hinge *summed* over the batch and the M − 1 consecutive pairs;
6. loss      L = L_cls + λ·L_reg, λ = β/100 = 0.1 (README ``--beta 10``), ε = 0.

Data-parallel runs: removal orders are drawn for every row of the global batch and each rank keeps its
rows' (``ctx.rows_in_global_batch``); L_reg, a sum over the batch, is divided by the rank's share, so
the share-weighted average of the ranks' gradients is the gradient of the global batch's sum.

Three or more modalities: the chain has M elements and M − 1 consecutive pairs, as in the code (the
paper's general form uses all pairs T ⊂ S).

Deviations from the paper/official code:
  * Removal zeroes the pooled feature of the removed modality (the model's feature masking), so the
    chain costs one encoder pass plus M − 1 fusion passes; the original runs M forwards on inputs
    imputed with the training mean (MIWAE) or masked (CPM). With ``model.mask=input`` the chain runs
    M forwards on zeroed inputs instead.
  * Removal orders come from ``torch.rand(B, M).argsort`` on the run's device generator (the original
    uses Python's ``random.shuffle`` per sample); same distribution.
  * The original's reconstruction losses (MIWAE/CPM stage 1 and ``rec_loss``) belong to its
    imputation backbones, not to CML, and are absent.
  * One optimiser step per batch, as the baseline takes (and BalanceMM, ``CML_trainer.py:82``), and
    no setting for more. The MIWAE run takes 5 Adam steps per batch after 29 reconstruction-only
    epochs (``miwae/train.py:195-200``: epochs 1-29 ``step = [5, 0, 0]``, epochs 30-59
    ``step = [0, 0, 5]``). That schedule is MIWAE's, not CML's:
      - the 29 epochs train only the MIWAE imputer on its bound (``:237-249``; no classifier, no CML
        term), so that the classifier, which reads the imputed input (``miwae/model.py:131-136``),
        starts from usable imputations. Nothing here imputes, so there is nothing to warm up;
      - the reconstruction-only epochs take 5 steps per batch too, so the count is not tied to the
        CML term. Each stage-2 step recomputes the imputer's bound, the chain CE and the CML term on
        the same chain (drawn once per batch, ``:224-234``; the loss at ``:304``);
      - the README's run without the CML term (``readme.md:25``; β = 0 by default, ``:131``) and
        the β sweep (``miwae/batch_train.py:14``) use the same schedule with only β changed;
      - the CPM run has another schedule: full batch, each epoch 5 network steps on reconstruction
        then 5 steps of the latent codes on reconstruction + classification + CML, 30 epochs, no
        warm-up (``cpm/CPM_Nets.py:127-174``, ``cpm/main.py:98``). That is CPM-Nets' own
        alternation (hanmenghan/CPM_Nets ``util/model.py:127-145``, ``train(..., step=[5, 5])``).
    Each run inherits its base model's schedule; only the regulariser is common to both.
Deviations from BalanceMM (``CML_trainer.py``):
  * BalanceMM penalises the hinge of the *batch sum*, max(0, Σ_i (conf^T_i − conf^S_i)), computes the
    trick-1 mask without applying it and has no trick 2; we use the original per-sample hinges with
    the mask. BalanceMM's variant is not offered.
  * BalanceMM draws one removal order per epoch, shared by every sample; here each sample draws its
    own order at every step, as in the original.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from balancemm.catalog.methods import CMLHParams
from balancemm.data.batch import Batch
from balancemm.methods.base import Method, Needs
from balancemm.models.classifier import ModelOutput
from balancemm.registry import METHODS

Variant = Literal["miwae", "cpm"]


def removal_chain(batch_size: int, num_modalities: int, generator: torch.Generator) -> Tensor:
    """Nested per-sample modality masks ``[M, B, M]`` bool: element k keeps the modalities not yet removed.

    Each sample draws its own removal order; element 0 keeps every modality and element M − 1 one.
    Drawn and built on the generator's device (``ctx.device_generator``: the model's), so a step copies
    nothing from the host.
    """
    device = generator.device
    u = torch.rand(batch_size, num_modalities, generator=generator, device=device)
    order = u.argsort(1)  # [B, M]: the modality removed k-th
    removed_at = order.argsort(1)  # [B, M]: the chain step at which each modality is removed
    steps = torch.arange(num_modalities, device=device)
    return removed_at[None] >= steps[:, None, None]


def calibration_penalty(logits: Tensor, label: Tensor, variant: Variant = "miwae", epsilon: float = 0.0) -> Tensor:
    """L_reg from chain logits ``[K, B, C]`` (element k+1 has one modality fewer) and labels ``[B]``.

    Per-sample hinges on the confidence increase from each chain element to the next, summed over the
    batch and the K − 1 consecutive pairs (see the module docstring for σ and trick 2).
    """
    conf, pred = logits.softmax(-1).max(-1)  # [K, B] each
    correct = pred == label
    full, reduced = conf[:-1], conf[1:]
    full_ok, reduced_ok = correct[:-1], correct[1:]
    # PAPER: trick 1, σ = 1[S right] (miwae) or 0 only when T is right and S wrong (cpm).
    sign = full_ok if variant == "miwae" else ~(reduced_ok & ~full_ok)
    penalty = F.relu((reduced - full) * sign - epsilon).sum()
    if variant == "miwae":
        # PAPER: trick 2 pushes the reduced set's confidence down when both predictions are wrong.
        both_wrong = ~full_ok & ~reduced_ok
        penalty = penalty + F.relu((reduced - full.detach()) * both_wrong - epsilon).sum()
    return penalty


@METHODS.register("cml")
class CML(Method):
    HParams = CMLHParams
    search: ClassVar[Mapping[str, Any]] = {  # λ = β/100 around the README's β = 10; ε is the code's margin
        "lam": [0.01, 0.03, 0.1, 0.3, 1.0],
        "epsilon": [0.0, 0.1],
    }
    needs = Needs(min_modalities=2)

    def losses(self, out: ModelOutput, batch: Batch) -> dict[str, Tensor]:
        # Orders are drawn for every row of the global batch and this rank keeps its rows' orders.
        start, end, size = self.ctx.rows_in_global_batch(batch)
        chain = removal_chain(size, len(batch.modalities), self.ctx.device_generator)[:, start:end]
        logits = self.chain_logits(out, batch, chain & batch.present)  # [M, B, C]
        # Every chain element has B rows, so the mean over all M·B rows is the mean of the M CEs.
        ce = F.cross_entropy(logits.flatten(0, 1), batch.label.repeat(len(logits)))
        # L_reg is a sum over the global batch's rows: a rank's sum over its shard, divided by its share
        # (1 on one process), makes the ranks' share-weighted gradient average that sum's gradient.
        reg = calibration_penalty(logits, batch.label, self.hp.variant, self.hp.epsilon) / batch.share
        return {"ce": ce, "calibration": self.hp.lam * reg}

    def chain_logits(self, out: ModelOutput, batch: Batch, chain: Tensor) -> Tensor:
        """Fused logits ``[K, B, C]`` for the ``present`` masks ``chain`` ``[K, B, M]``; ``chain[0]`` is the
        mask ``out`` was computed with, so ``out.logits`` is reused for it."""
        model = self.model
        with self.ctx.phase("chain"):
            if model.mask == "feature":
                rest = [model.fuse(model.apply_mask(out.features, present, batch.modalities)) for present in chain[1:]]
            else:
                rest = [model(replace(batch, present=present)).logits for present in chain[1:]]
        return torch.stack([out.logits, *rest])
