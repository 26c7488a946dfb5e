"""PMR: Prototypical Modal Rebalance.

Fan, Xu, Wei, Hu. "PMR: Prototypical Modal Rebalance for Multimodal Learning." CVPR 2023. Official
code: fanyunfeng-bit/Modal-Imbalance-PMR (``main_Prototype_grad.py``: ``calculate_prototype``,
``train_epoch``), which this follows (documented in docs/methods/pmr.md).

Idea: keep, per modality, one prototype per class (the class mean of the pooled encoder feature).
The softmax of negative distances to the prototypes is a non-parametric unimodal classifier that
does not depend on the fusion head; it tells which modality is behind, and its cross-entropy (the
prototypical CE, PCE) is added for that modality only, which speeds up the weaker encoder directly.

Prototypes (hook ``on_epoch_start``, phase ``pmr/prototypes``): in eval mode without gradients,
over the first ⌊N_batches·f⌋ (at least 1) batches of a shuffled pass over the training split,
f = ``proto_fraction`` = 1/10,

    c_{m,k} = mean of h_m over the sampled rows with label k                        [C, d_m]
    c_m ← (1 − μ)·c_m^new + μ·c_m^old        from the second computation of a class on
                                             (``momentum_from="third"``: not before epoch 2).

The official code computes them before epoch 0 and after every epoch; computing them at the start of
every epoch is the same sequence. They are buffers, so checkpoints and resume carry them.

Per step (hook ``losses``), with h_m the pooled features of the training forward:

1. distances   d_{m,i,k} = ‖h_{m,i} − c_{m,k}‖₂   (Euclidean, not squared; ``torch.cdist``)
2. probability q_m = softmax_k(−d_m)
3. score       s^p_m = Σ_i q_{m,i}(y_i)           (a sum over the batch, no gradient)
4. ratio       ρ = s^p_a / s^p_v  (two modalities, first over second in sorted order, as audio/visual)
5. coefficient ρ > 1: β_a = 0, β_v = α;  ρ < 1: β_a = α, β_v = 0;  ρ = 1: β_a = β_v = 0
6. loss        L = CE(z, y) + Σ_m β_m·CE(−d_m, y)   while modulation_starts ≤ epoch ≤ modulation_ends,
               L = CE(z, y) otherwise.

Gradients reach the encoders through h_m (and CE reaches everything); prototypes get none.

Three or more modalities (no official version): ρ_m = s^p_m / mean_{j≠m} s^p_j and β_m = α where
ρ_m < 1, else 0 (our extension). For M = 2 this is exactly step 5: ρ_a < 1
⟺ ρ_v > 1, and a tie gives both 0. The comparison is made as s^p_m < mean_{j≠m} s^p_j, without a
division, so a rounded ratio can never disagree between the two modalities.

Logged: loss terms ``ce`` and ``pce_<m>`` (= β_m·CE(−d_m, y)), ``pmr/rho_<m>`` and ``pmr/beta_<m>`` each
step, ``pmr/classes_sampled`` each prototype pass.

Data-parallel runs: the prototype pass's per-class feature sums and counts and each step's scores s^p_m
are summed over the ranks (``ctx.all_sum``), so every rank holds the global prototypes and β.

Deviations from the paper/official code:
  * A class absent from the prototype sample keeps its previous prototype (the zero vector if it was
    never seen); the official code divides by its zero count and the prototype becomes NaN. Momentum
    applies per class from that class's second measurement on (and, with ``momentum_from="third"``,
    not before epoch 2); with every class present (the usual case) this is the epoch rule below.
  * By default momentum starts with the second computation, the one at the start of epoch 1. The
    official code skips it while ``epoch <= 0`` (``main_Prototype_grad.py`` 435), ``epoch`` being the
    epoch that just ended: ``main`` sets it to 0 for the computation before training (532–539), and
    the training loop's counter, which it receives after epoch 0 (541, 557), is 0 too. So the official
    recomputation after epoch 0 is also left unblended and its momentum starts with the third
    computation. ``momentum_from="third"`` reproduces that: the computation at the start of epoch 1
    takes the class means as they are, and blending starts at the start of epoch 2.
  * Distances, scores and class means are vectorised (``torch.cdist``, a gather, ``index_add_``) rather
    than the official per-sample Python loops; same values. ``cdist`` always uses its matrix-product
    form (‖h‖² + ‖c‖² − 2h·c, clamped at 1e-30 before the square root), whatever the batch size.
  * AVE (and CGMNIST) prototypes come from the whole validation set in the official code; here they
    always come from 10 % of the training split, so the method never reads validation data.
  * PER, the prototype-based entropy regulariser of the abstract, is absent from the official code and
    is not implemented; its form and coefficients are unknown. The coefficients are the code's binary
    ones; the paper's may be continuous (unverified).
Deviations from BalanceMM (``PMR_trainer.py``):
  * Its ≥3-modality branch is not PMR (no prototype loss; OGM-GE-style gradient scaling
    k_m = 1 − tanh(η·s^p_m / min_j s^p_j) with Gaussian noise on every non-1-D weight); it is not
    implemented, the natural extension above is used instead and η does not exist here.
  * Defaults are the official ones (α = 1.0, μ = 0.2, window 0–100; BalanceMM 0.6, 0.5, 0–80), except
    ``momentum_from``: BalanceMM's ``current_epoch <= 0`` test runs at the start of each epoch
    (``PMR_trainer.py`` 241), so its momentum starts with the second computation, as here by default.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from balancemm.catalog.methods import PMRHParams
from balancemm.data.batch import Batch, SamplePlan
from balancemm.methods._scores import others_sum
from balancemm.methods.base import Method
from balancemm.models.classifier import ModelOutput
from balancemm.registry import METHODS


def update_prototypes(old: Tensor, sums: Tensor, counts: Tensor, seen: Tensor, momentum: float) -> Tensor:
    """New prototypes ``[C, d]`` from the old ones ``[C, d]``, feature sums ``[C, d]`` and counts ``[C]``.

    Class k gets its mean sums_k/counts_k, blended as (1 − μ)·mean + μ·old where ``seen[k]`` (it was
    measured before); a class with no sampled row keeps its old prototype instead of dividing by zero.
    """
    present = (counts > 0)[:, None]
    mean = sums / counts.clamp(min=1)[:, None].to(sums.dtype)
    blended = torch.where(seen[:, None], (1 - momentum) * mean + momentum * old, mean)
    return torch.where(present, blended, old)


def proto_logits(features: Tensor, prototypes: Tensor) -> Tensor:
    """Negative Euclidean distances −‖h_i − c_k‖₂ ``[B, C]`` from features ``[B, d]`` and prototypes ``[C, d]``."""
    # The matrix-product form is always used. torch's default picks it only when an input has more
    # than 25 rows, and only that form's backward is made of counted matrix products, so the FLOPs
    # counted per sample would otherwise depend on the batch size (a short last batch counts less).
    return -torch.cdist(features, prototypes.to(features.dtype), compute_mode="use_mm_for_euclid_dist")


def pmr_coefficients(scores: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """PCE weights β ``[M]`` and ratios ρ ``[M]`` from prototype scores s^p ``[M]`` (sorted modality order).

    ρ_m = s^p_m / mean_{j≠m} s^p_j and β_m = α where ρ_m < 1, else 0; for M = 2 this is the official
    binary rule (the weaker modality gets α, a tie gives none).
    """
    s = scores.double()
    others = others_sum(s) / (s.numel() - 1)  # exact for M = 2: the two comparisons cannot disagree
    beta = (s < others).to(s.dtype) * alpha
    return beta, s / others.clamp(min=1e-300)


@METHODS.register("pmr")
class PMR(Method):
    adapted: ClassVar[Mapping[str, Any]] = {"modulation_ends": "67%"}  # official: epochs 0–100 of 150
    HParams = PMRHParams
    search: ClassVar[Mapping[str, Any]] = {  # α and μ over the official argparse defaults and scripts
        "alpha": [0.5, 1.0, 2.0, 3.0, 5.0],
        "momentum_coef": [0.0, 0.2, 0.5],
    }
    seen: Tensor  # [C] bool: classes measured at least once (momentum applies from their second measurement)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        fusion = self.model.fusion
        num_classes = fusion.num_classes
        # Method state (saved in checkpoints): one prototype buffer per modality, in its own feature space.
        for m, dim in fusion.dims.items():
            self.register_buffer(f"prototypes_{m}", torch.zeros(num_classes, dim))
        self.register_buffer("seen", torch.zeros(num_classes, dtype=torch.bool))

    def prototypes(self, modality: str) -> Tensor:
        """The current prototypes ``[C, d_m]`` of one modality."""
        return self.get_buffer(f"prototypes_{modality}")

    def on_epoch_start(self, epoch: int) -> SamplePlan | None:
        with self.ctx.phase("pmr/prototypes"):
            self.compute_prototypes(epoch)
        return None

    def compute_prototypes(self, epoch: int) -> None:
        """Class means of the pooled features over a shuffled fraction of the training batches, the
        computation at the start of ``epoch`` (0-based)."""
        ctx, model = self.ctx, self.model
        batches = ctx.batches("train", shuffle=True)
        take = max(math.floor(len(batches) * self.hp.proto_fraction), 1)
        sums = {m: torch.zeros_like(self.prototypes(m)) for m in model.modalities}
        counts = torch.zeros_like(self.seen, dtype=torch.long)
        with ctx.eval_mode(model):
            for batch in itertools.islice(batches, take):
                features = model.encode(batch)
                for m, h in features.items():
                    sums[m].index_add_(0, batch.label, h.to(sums[m].dtype))
                counts += torch.bincount(batch.label, minlength=counts.numel())
        # Every rank sampled its shard of the same global batches: the class sums are the ranks' sums.
        sums = {m: ctx.all_sum(s) for m, s in sums.items()}
        counts = ctx.all_sum(counts)
        blend = self.seen
        if self.hp.momentum_from == "third" and epoch < 2:
            # The official recomputation after epoch 0 (here: at the start of epoch 1) is unblended.
            blend = torch.zeros_like(self.seen)
        for m in model.modalities:
            old = self.prototypes(m)
            old.copy_(update_prototypes(old, sums[m], counts, blend, self.hp.momentum_coef))
        self.seen |= counts > 0
        ctx.log(**{"pmr/classes_sampled": (counts > 0).sum()})

    def acts_in(self, epoch: int) -> bool:
        return self.within(epoch, self.hp.modulation_starts, self.hp.modulation_ends)

    def losses(self, out: ModelOutput, batch: Batch) -> dict[str, Tensor]:
        hp, ctx = self.hp, self.ctx
        ce = F.cross_entropy(out.logits, batch.label)
        if not self.acts_in(ctx.epoch):
            return {"ce": ce}
        pce, scores = {}, []
        for m in self.model.modalities:
            logits = proto_logits(out.features[m], self.prototypes(m))  # [B, C]
            pce[m] = F.cross_entropy(logits, batch.label)
            scores.append(logits.detach().softmax(1).gather(1, batch.label[:, None]).sum())
        beta, rho = pmr_coefficients(ctx.all_sum(torch.stack(scores)), hp.alpha)  # the global batch's sums
        for m, b, r in zip(self.model.modalities, beta, rho, strict=True):
            ctx.log(**{f"pmr/rho_{m}": r, f"pmr/beta_{m}": b})
        return {"ce": ce, **{f"pce_{m}": b.to(pce[m].dtype) * pce[m] for m, b in zip(pce, beta, strict=True)}}
