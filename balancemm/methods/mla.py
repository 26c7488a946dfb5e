"""MLA: Multimodal Learning with Alternating Unimodal Adaptation.

Zhang, Yoon, Bansal, Yao. "Multimodal Representation Learning by Alternating Unimodal Adaptation."
CVPR 2024 (arXiv 2311.10707). Official code: Cecile-hi/Multimodal-Learning-with-Alternating-Unimodal-
Adaptation (``main.py: train_epoch`` with ``--gs_flag``, ``valid``; ``utils/utils.py: GSPlugin``), which
this follows except where listed under the deviations below (documented in docs/methods/mla.md).

Idea: replace joint training by alternating unimodal training, so no modality's gradient drowns
another's. Every modality m is classified by one head H(h) = W h + b shared by all modalities (the
``shared`` fusion with ``hidden=0``); after each modality's step, W's gradient is projected (OWM-style,
"gradient modification") so that learning the next modality disturbs what H learnt from the previous
ones. At test time the unimodal logits are averaged with per-sample uncertainty (entropy) weights.

Per batch (hatch ``training_step``), with every encoder run once, h_m = φ_m(x_m) ``[B, d]``:
    for m in sorted modalities:
        L_m = CE(H(h_m), y); backward                         (reaches φ_m and H only)
        if this is not the first update of training:
            r = mean_i h_{m,i} ``[1, d]``,  α_gs = 0.1^(1 + batch_idx / batches_per_epoch)
            k = P rᵀ ``[d, 1]``
            P ← P − k kᵀ / (α_gs + r k)        denominator "scalar" (textbook OWM / recursive least squares)
            P ← P − (k kᵀ) ⊘ (α_gs + k r)      denominator "elementwise" (as coded officially; k r is d×d)
            P ← P / ‖P‖_F
            ∇W ← ∇W Pᵀ                         mode "replace" (official);  ∇W ← ∇W + ∇W Pᵀ  mode "add" (BalanceMM)
        optimiser step; gradients cleared (``zero_grad=none``) or zero-filled (``zeros``)
    after the loop, every gradient cleared (the official code deletes them)
P starts as I_d and is shared by all modalities and epochs, never reset (a buffer, like the count of
updates). The bias b is not projected. H is applied to h_m only after the previous modality's step,
so each loss sees the current head, and each encoder's graph is used by exactly one backward.
With ``zero_grad=none`` (default) every step sets the gradients to None, so a modality's step moves
only φ_m and H (with momentum too: the optimisers skip parameters without a gradient). With ``zeros``
the parameters that held a gradient keep a zero one until the end of the batch, as the official
code's torch 1.8.1 did: in the step of the k-th modality, the encoders of modalities 1 … k−1 get no
gradient but still a step of the optimiser, from its momentum and weight decay alone (SGD:
buf ← μ buf + λθ, θ ← θ − η buf).

Prediction (``predict``), with z_m = H(h_m) ``[B, C]``:
    e_m = −Σ_c p_m log p_m,  p_m = softmax(z_m)   per sample
    w = softmax(−e) over the modalities (= exp(max_j e_j − e_m) / Σ …, the official form)
    z = Σ_m w_m z_m
``fusion=fixed`` uses the official fixed weights instead: 0.5 / 0.5 for two modalities and audio 0.35,
visual 0.25, text 0.4 for those three (equal weights for other modality sets), or ``fixed_weights``.
A modality absent from a sample (``batch.present``, the Shapley metric's coalitions) gets weight 0 and
the others are renormalised.

Cost: the same encoder forward and backward FLOPs as joint training, M head forward/backward passes
and M optimiser steps per batch, and per step O(C·d²) for the projection (phase ``mla/gs``).

Deviations from the paper/official code:
  * The projection runs. At the official commit the GS plugin only projects a parameter named
    "module.weight", but the head is a bare ``nn.Linear`` whose weight is named "weight", so the
    projection is dead code there; the paper describes it as active.
  * Default denominator is the scalar OWM one (α + r k), the update the paper cites; the official
    code divides elementwise by the d×d matrix α + k r (``gs_denominator=elementwise``). Both agree
    when r has one non-zero entry.
  * The entropy is per sample, softmax over classes (as the paper and BalanceMM); the official
    ``calculate_entropy`` takes softmax over the batch dimension and sums over the whole B×C tensor,
    giving one weight per modality per batch, so a sample's prediction depends on its batch.
  * Three modalities are trained in sorted order (audio, text, visual), not (a, v, t).
  * batches_per_epoch is ceil(N_train / batch size), derived from the epoch's first batch; the batch
    index restarts at every epoch (``on_epoch_start``), as the official loader's does.
  * Absent modalities get zero fusion weight (the official code never masks modalities); fixed weights
    are renormalised over the present modalities (they already sum to 1 when all are present).
  * Gradients are cleared after each modality's step by default (``zero_grad=none``). The official code
    pins torch 1.8.1 (``requirements.txt`` line 57), whose ``optimizer.zero_grad()`` (``main.py`` 440,
    452, 464) fills the gradients with zeros instead; it deletes them only after the last modality
    (``main.py`` 468–470). So SGD (momentum 0.9, weight decay 1e-4, ``main.py`` 749) moves the first
    modality's encoder again in the second (and third) modality's step, and the second's in the third,
    from the first batch on (the momentum buffer was made by the encoder's own step just before); H
    gets a true gradient in every step and is not affected. ``zero_grad=zeros`` reproduces this through
    the run's optimiser, whichever it is.
Deviations from BalanceMM (``MLA_trainer.py``):
  * ``gs_mode=replace``: BalanceMM adds the projected gradient to the raw one (g + g Pᵀ).
  * One encoder pass per batch (BalanceMM's single forward is the same); no ``modulation_starts/ends``
    window with joint-CE epochs outside it; P has the encoders' feature size instead of a hard-coded
    512; the undefined ``self.alpha`` of the HEAD commit is not reproduced.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from balancemm.catalog.methods import MLAHParams
from balancemm.context import RunContext
from balancemm.data.batch import Batch
from balancemm.errors import ConfigError
from balancemm.methods.base import Method
from balancemm.models.classifier import ModelOutput, ModelSpec
from balancemm.models.fusions.shared import SharedHeadFusion
from balancemm.registry import METHODS

# The official three-modality fixed weights (``--a_alpha/--v_alpha/--t_alpha``), by modality name.
OFFICIAL_FIXED_WEIGHTS = {"audio": 0.35, "visual": 0.25, "text": 0.4}


def gs_alpha(batch_idx: int, num_batches: int) -> float:
    """α_gs = 0.1^(1 + batch_idx / num_batches), in (0.01, 0.1] within an epoch."""
    return 0.1 ** (1 + batch_idx / num_batches)


def owm_update(p: Tensor, r: Tensor, alpha: float, denominator: str = "scalar") -> Tensor:
    """One projector update, Frobenius-normalised.

    Args:
        p: ``[d, d]`` current projector P.
        r: ``[d]`` batch-mean feature of the modality just trained.
        alpha: α_gs.
        denominator: ``"scalar"``: P − k kᵀ / (α + r k) (OWM); ``"elementwise"``: P − (k kᵀ) ⊘ (α + k r).

    Returns:
        ``[d, d]`` the new P / ‖P‖_F.
    """
    row = r.reshape(1, -1)
    k = p @ row.T  # [d, 1]
    denom = alpha + (row @ k if denominator == "scalar" else k @ row)  # [1, 1] or [d, d]
    new = p - (k @ k.T) / denom
    return new / torch.linalg.matrix_norm(new)


def project(grad: Tensor, p: Tensor, mode: str = "replace") -> Tensor:
    """``[C, d]`` gradient of H's weight after projection: g Pᵀ (replace) or g + g Pᵀ (add)."""
    projected = grad @ p.T
    return projected if mode == "replace" else grad + projected


def optimizer_step(ctx: RunContext, zero_grad: str = "none") -> None:
    """``ctx.optimizer_step()`` of the run's optimiser, whose gradients are then None or zero-filled.

    ``zero_grad="zeros"`` is ``optimizer.zero_grad()`` of torch < 2.0: every parameter of the optimiser
    that held a gradient keeps a zero one, so the next step still applies its momentum and weight decay
    (SGD and Adam skip only the parameters whose gradient is None). It holds after a step skipped for an
    fp16 overflow as well, as ``zero_grad()`` follows the step whether the loss scaler took it or not.
    """
    optimizer = ctx.optimizer
    held = (
        [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if zero_grad == "zeros" and optimizer is not None
        else []
    )
    ctx.optimizer_step()
    for p in held:
        p.grad = torch.zeros_like(p)


def entropy_weights(logits: Tensor) -> Tensor:
    """Per-sample gating weights ``[M, B]`` = softmax over modalities of −entropy(softmax(z_m)).

    Args:
        logits: ``[M, B, C]`` unimodal logits.
    """
    log_p = logits.log_softmax(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)  # [M, B]
    return (-entropy).softmax(0)


def fixed_weights(modalities: tuple[str, ...], given: tuple[float, ...] | None) -> list[float]:
    """Fixed fusion weights in ``modalities`` order: ``given``, else the official ones by name."""
    if given is not None:
        return list(given)
    if set(modalities) == set(OFFICIAL_FIXED_WEIGHTS):
        return [OFFICIAL_FIXED_WEIGHTS[m] for m in modalities]
    return [1.0 / len(modalities)] * len(modalities)


def fuse(logits: Tensor, weights: Tensor, present: Tensor) -> Tensor:
    """z = Σ_m w_m z_m with absent modalities at weight 0 and the rest renormalised.

    Args:
        logits: ``[M, B, C]`` unimodal logits.
        weights: ``[M, B]`` weights before masking.
        present: ``[B, M]`` bool, column m for ``logits[m]``.

    Returns:
        ``[B, C]``; zeros for a sample with no modality present.
    """
    w = weights * present.T.to(weights.dtype)
    w = w / w.sum(0, keepdim=True).clamp(min=torch.finfo(w.dtype).tiny)
    return (w[..., None] * logits).sum(0)


@METHODS.register("mla")
class MLA(Method):
    HParams = MLAHParams
    search: ClassVar[Mapping[str, Any]] = {  # switches only: the method has no numeric hyper-parameter
        "gs_denominator": ["scalar", "elementwise"],
        "gs_mode": ["replace", "add"],
        "fusion": ["entropy", "fixed"],
    }
    projector: Tensor  # [d, d] P of the gradient projection, shared by all modalities and epochs
    updates: Tensor  # [] long: optimiser steps taken so far (the official exp_count)
    fixed: Tensor  # [M] fixed fusion weights in sorted modality order

    @classmethod
    def model_spec(cls, spec: ModelSpec, hp: Any) -> ModelSpec:
        # One linear head shared by every modality; the fusion refuses unequal encoder feature sizes.
        return replace(spec, fusion="shared", fusion_options={"hidden": 0}, unimodal_heads="slice")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        fusion = self.model.fusion
        if not isinstance(fusion, SharedHeadFusion) or fusion.linear_head is None:
            raise ConfigError("mla needs the shared linear head its model_spec builds (fusion 'shared', hidden 0)")
        mods = self.model.modalities
        if self.hp.fixed_weights is not None and len(self.hp.fixed_weights) != len(mods):
            raise ConfigError(
                f"method.fixed_weights needs one weight per modality ({', '.join(mods)}), "
                f"got {len(self.hp.fixed_weights)}"
            )
        self.register_buffer("projector", torch.eye(self.head.in_features))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("fixed", torch.tensor(fixed_weights(mods, self.hp.fixed_weights)), persistent=False)
        self._batch_idx = 0  # within the epoch; restarted by on_epoch_start
        self._num_batches = 1

    @property
    def head(self) -> nn.Linear:
        """H, the shared linear head (a property, so it is not registered twice in the state dict)."""
        return cast(nn.Linear, cast(SharedHeadFusion, self.model.fusion).linear_head)

    def on_epoch_start(self, epoch: int) -> None:
        self._batch_idx = 0

    def _gradient_step(self, h: Tensor, alpha: float) -> None:
        """Update P from ``h`` ``[B, d]`` and project H's weight gradient (skipped on the first update)."""
        hp = self.hp
        if hp.gs and int(self.updates) > 0:
            with torch.no_grad():
                # The global batch's mean feature: every rank's shard in a data-parallel run.
                mean = self.ctx.global_mean(h)
                self.projector.copy_(owm_update(self.projector, mean, alpha, hp.gs_denominator))
                grad = self.head.weight.grad
                if grad is not None:
                    grad.copy_(project(grad, self.projector, hp.gs_mode))
        self.updates += 1

    def training_step(self, batch: Batch) -> tuple[ModelOutput, dict[str, Tensor]]:
        ctx, model = self.ctx, self.model
        if self._batch_idx == 0:
            # Batches hold batch_size rows except the last, so the first one gives the batch size (the
            # global batch's: a rank's shard holds its share of it).
            self._num_batches = math.ceil(ctx.split_size("train") / ctx.rows_in_global_batch(batch)[2])
        alpha = gs_alpha(self._batch_idx, self._num_batches)
        with ctx.hook_phase("forward"):
            features = model.encode(batch)
        unimodal: dict[str, Tensor] = {}
        losses: dict[str, Tensor] = {}
        last = model.modalities[-1]
        for m in model.modalities:
            with ctx.hook_phase("forward"):
                z = model.unimodal({m: features[m]})[m]
            with ctx.hook_phase("losses"):
                loss = F.cross_entropy(z, batch.label)
            ctx.check_finite({f"uni_{m}": loss})
            with ctx.hook_phase("backward"):
                ctx.backward(loss)
            with ctx.phase("mla/gs"):
                self._gradient_step(features[m].detach(), alpha)
            with ctx.hook_phase("optimizer_step"):
                # The official code deletes every gradient after the last modality (main.py 468-470). Zero
                # gradients kept into the next batch would also step encoders whose backward is still to come.
                optimizer_step(ctx, self.hp.zero_grad if m != last else "none")
            unimodal[m], losses[f"uni_{m}"] = z.detach(), loss.detach()
        self._batch_idx += 1
        with torch.no_grad():
            out = self._output({m: h.detach() for m, h in features.items()}, unimodal, batch)
        return out, losses

    def _weights(self, logits: Tensor) -> Tensor:
        """``[M, B]`` fusion weights before masking absent modalities."""
        if self.hp.fusion == "entropy":
            return entropy_weights(logits)
        return self.fixed[:, None].to(logits.dtype).expand(logits.shape[:2])

    def _output(self, features: dict[str, Tensor], unimodal: dict[str, Tensor], batch: Batch) -> ModelOutput:
        mods = self.model.modalities
        logits = torch.stack([unimodal[m] for m in mods])
        present = torch.stack([batch.present_of(m) for m in mods], 1)
        return ModelOutput(fuse(logits, self._weights(logits), present), features, unimodal)

    def predict(self, batch: Batch) -> ModelOutput:
        model = self.model
        features = model.apply_mask(model.encode(batch), batch.present, batch.modalities)
        return self._output(features, model.unimodal(features), batch)
