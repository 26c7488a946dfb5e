"""G-Blending: Gradient-Blending.

Wang, Tran, Feiszli. "What Makes Training Multi-Modal Classification Networks Hard?" CVPR 2020.
Released code (facebookresearch/VMZ, ``c2/lib/models/loss/loss_creator.py``) covers only training with
fixed, precomputed weights; the weight estimation was never released, so it follows the paper's text
— a reconstruction, stated as such in docs/methods/gblending.md.

Idea: give every modality its own head and the fused features one more, and train with a weighted
sum of their losses, weighting each head by how much it generalises per unit of overfitting (the
overfitting-to-generalisation ratio), re-estimated as training goes.

Objective (hook ``losses``):  L = Σ_{k ∈ {1..M, mm}} w_k · CE(z_k, y).

Weight estimation (hook ``on_epoch_start``, online mode: at epochs 0, n, 2n, …). From the current
checkpoint θ_N, for each head k, a copy of the model is trained for n epochs on CE(z_k) alone with a
fresh optimiser from the protocol's recipe, and with L^T / L^V the per-sample mean losses of head k
on the training and validation splits:

    O = L^V − L^T                          (overfitting)
    ΔG_k = L^V_k(N) − L^V_k(N+n)           (generalisation gained)
    ΔO_k = O_k(N+n) − O_k(N)               (overfitting gained)
    w_k ∝ max(ΔG_k, 0) / ΔO_k²,  normalised to Σ_k w_k = 1.

Offline mode estimates once, at epoch 0, with side trainings as long as the whole run.

Data-parallel runs: L^T and L^V are means over the whole split: each rank reads a part of it, the
per-row losses are gathered in split order (``ctx.gather``) and summed per evaluation batch as one
process sums them; the side models train on sharded global batches like the run's model.

Cost: every estimation trains (M + 1) copies for n epochs plus 4(M + 1) loss passes — about 4× the
baseline for 30 epochs with n = 10 and M = 2. All of it is counted in the run's training FLOPs
(phase ``gblending/estimate``). It reads the validation split (``needs.val``), never the test split.

Deviations from the paper:
  * Weights are normalised to sum 1 (as VMZ's published weights and BalanceMM do); the paper's Z
    makes them sum 2, i.e. a global learning-rate factor of 2.
  * A head whose validation loss rose (ΔG ≤ 0) gets weight 0; if every head's did, the previous
    weights are kept (uniform before the first estimate). The paper does not say.
  * L^V is measured on the validation split; the paper uses a held-out part of the training data.
  * VMZ's joint head is FC→ReLU→FC→ReLU→FC; here the joint head is the protocol's fusion (concat),
    so G-Blending changes the objective and not the architecture.
Deviations from BalanceMM (``GBlending_trainer.py``):
  * Unimodal heads are real heads (``heads=linear``) trained and scored as such; BalanceMM estimates
    a modality by zeroing the other inputs of the full network and scoring the fused output.
  * Losses are per-sample means, not sums of batch means (BalanceMM mixes the scales of L^T, L^V).
  * The first measurement is at the checkpoint, the window is n epochs (BalanceMM: after one epoch).
  * ΔG's sign is kept (BalanceMM takes |ΔG/ΔO²|, rewarding a head whose validation loss rose).
  * Validation data is the validation split (BalanceMM's default validation loader is the test set).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from balancemm.catalog.methods import GBlendingHParams
from balancemm.context import RunContext
from balancemm.data.base import SplitName
from balancemm.data.batch import Batch, SamplePlan
from balancemm.methods.base import Method, Needs
from balancemm.models.classifier import ModelOutput, ModelSpec, MultimodalClassifier
from balancemm.registry import METHODS

FUSED = "fused"


def blend_weights(delta_g: Tensor, delta_o: Tensor) -> Tensor | None:
    """w_k ∝ max(ΔG_k, 0)/ΔO_k², normalised to sum 1; None when no head generalised (all ΔG ≤ 0)."""
    raw = delta_g.clamp(min=0) / delta_o.pow(2).clamp(min=1e-12)
    total = raw.sum()
    return raw / total if total > 0 else None


def head_logits(out: ModelOutput, head: str) -> Tensor:
    """``[B, C]`` logits of a head: the fused head or one modality's own."""
    return out.logits if head == FUSED else out.unimodal_logits[head]


def term_name(head: str) -> str:
    """Loss-term names as in MMPareto: ``fused`` and ``uni_<modality>``."""
    return head if head == FUSED else f"uni_{head}"


class _OneHead(Method):
    """A side model trained on one head's loss alone (used only inside the weight estimation)."""

    def __init__(self, model: MultimodalClassifier, ctx: RunContext, head: str) -> None:
        super().__init__(model, ctx)
        self.head = head

    def losses(self, out: ModelOutput, batch: Batch) -> dict[str, Tensor]:
        return {term_name(self.head): F.cross_entropy(head_logits(out, self.head), batch.label)}


@METHODS.register("gblending")
class GBlending(Method):
    HParams = GBlendingHParams
    search: ClassVar[Mapping[str, Any]] = {  # its only knobs: super_epoch is an epoch schedule (adaptation)
        "mode": ["online", "offline"],
        "heads": ["linear", "slice"],
    }
    needs = Needs(val=True)
    weights: Tensor  # [M + 1] blend weights (a buffer, so checkpoints and resume carry it)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.heads = (*self.model.modalities, FUSED)
        # Method state (saved in checkpoints): current blend weights, uniform until the first estimate.
        self.register_buffer("weights", torch.full((len(self.heads),), 1 / len(self.heads)))

    @classmethod
    def model_spec(cls, spec: ModelSpec, hp: Any) -> ModelSpec:
        return replace(spec, unimodal_heads=hp.heads)

    def on_epoch_start(self, epoch: int) -> SamplePlan | None:
        window = self.epoch_of(self.hp.super_epoch, ge=1) if self.hp.mode == "online" else self.ctx.num_epochs
        if epoch % window == 0 and (self.hp.mode == "online" or epoch == 0):
            with self.ctx.phase("gblending/estimate"):
                weights = self.estimate(window)
            if weights is not None:
                self.weights.copy_(weights)
        self.ctx.log(**{f"gblending/w_{k}": float(w) for k, w in zip(self.heads, self.weights, strict=True)})
        return None

    def estimate(self, epochs: int) -> Tensor | None:
        """Train one copy of the model per head for ``epochs`` epochs; return the blend weights."""
        delta_g, delta_o = [], []
        for head in self.heads:
            model = copy.deepcopy(self.model)
            side = _OneHead(model, self.ctx.spawn(self.ctx.new_optimizer(model.parameters())), head)
            before = self._losses(side)
            for e in range(epochs):
                side.train()
                side.train_epoch(e, side.ctx.batches("train", shuffle=True))
            after = self._losses(side)
            delta_g.append(before["val"] - after["val"])
            delta_o.append((after["val"] - after["train"]) - (before["val"] - before["train"]))
        return blend_weights(torch.tensor(delta_g), torch.tensor(delta_o))

    def _losses(self, side: _OneHead) -> dict[str, float]:
        """Per-sample mean loss of the side model's head on the training and validation splits."""
        ctx = self.ctx

        def mean_loss(split: SplitName) -> float:
            # ``ctx.mean_loss`` over the whole split on every rank: each rank reads a part of the split, so
            # the per-row losses are gathered in split order and summed per evaluation batch, in the order
            # one process sums them (ΔO is a small difference of these means: a sum in another order would
            # move the weights by ~1e-4 of their size).
            parts = [
                F.cross_entropy(head_logits(side.model(batch), side.head), batch.label, reduction="none")
                for batch in ctx.batches(split)
            ]
            rows = ctx.gather(torch.cat(parts) if parts else torch.zeros(0, device=ctx.device))
            total = 0.0
            for chunk in rows.split(ctx.batching.eval_batch_size):
                total += float(chunk.clone().sum())  # clone: a fresh tensor, as each batch's losses were
            return total / max(len(rows), 1)

        splits: tuple[SplitName, ...] = ("train", "val")
        with ctx.eval_mode(side):
            return {s: mean_loss(s) for s in splits}

    def losses(self, out: ModelOutput, batch: Batch) -> dict[str, Tensor]:
        return {
            term_name(head): w * F.cross_entropy(head_logits(out, head), batch.label)
            for head, w in zip(self.heads, self.weights, strict=True)
        }
