"""OPM: On-the-fly Prediction Modulation.

Wei, Hu, Du, Wen. "On-the-fly Modulation for Balanced Multimodal Learning." TPAMI 2024. Official code:
GeWu-Lab/BML_TPAMI2024 (``code/models/Classifier.py``: ``Modality_drop``, ``calcu_q``; ``code/main.py:
train``), which this follows (documented in docs/methods/opm.md). The same paper's OGM variant is
``ogm_ge``.

Idea: in the feed-forward stage, randomly drop the pooled feature of the dominant modality for some
samples, so the fusion head has to use the others; the drop probability grows with how much more
confident the dominant modality's own logits are.

Per step (hook ``forward``), with z_m = W_m h_m + b/M the modality's slice of the concat head,
computed from the features before any drop with W and b held constant (and without any gradient
unless ``score_gradient="official"``, step 6):

1. score        s_m = Σ_i softmax(z_m)_i[y_i]                      (a sum over the batch)
2. ratio        ρ_m = s_m / mean_{j≠m} s_j                         (M = 2: ρ_a = s_a/s_v, ρ_v = 1/ρ_a)
3. probability  r_m = tanh(relu(ρ_m − 1)),  q_m = q_base·(1 + λ·r_m) if r_m > 0 else 0,  clipped to [0, 1]
4. with probability p_exe per batch (epochs ≥ ``modulation_starts``), drop:
                θ = Σ_m d_m q_m / Σ_m d_m                          (one scalar for the batch)
                κ_{m,i} ~ Bernoulli(1 − q_m)                       (per sample and modality)
                h̃_{m,i} = κ_{m,i}·h_{m,i} / (1 − θ)                (the same 1/(1 − θ) on every modality)
                kept rows: Σ_m κ_{m,i} > 0
5. z = fusion(h̃), and (hook ``losses``) L = CE(z, y) over the kept rows only.
6. ``score_gradient="official"`` only, executed drops only: L += ½θ² (term ``half_theta_sq``), with θ
   a function of the features h_m through steps 1–4. Its gradient θ·∇θ is what the official code
   adds to the encoders (see the deviations).

Only the dominant modality gets q > 0, and q jumps from 0 to q_base as soon as ρ > 1. Only the fused
loss is trained; the step's ``unimodal_logits`` are the no-grad slices of the features before the
drop (the official code only logs their losses). Steps that do not drop (warm-up, the 1 − p_exe
batches) are exactly the plain forward and the plain CE. Inference is the plain model (no drop).

Three or more modalities (no official version): ρ_m = s_m / mean_{j≠m} s_j (``ratio_to=mean``, our
extension, the same as ``ogm_ge`` and ``pmr`` here), so a modality is dropped when it beats the
average of the others; BalanceMM's s_m / Σ_{j≠m} s_j (``ratio_to=sum``) drops only a modality that
beats all the others together (3 equal modalities: ρ = 0.5). For M = 2 both are the official rule.

The weakest modality always has ρ ≤ 1, hence q = 0 and κ = 1, so with these probabilities no row
ever loses every modality. The row filter is still applied as in the official code, and a batch in
which every row was dropped would give the loss 0 with zero gradients (the official code skips the
batch: ``continue`` before ``optimizer.step``).

Logged per step: ``opm/s_<m>`` always; in modulated epochs ``opm/q_<m>`` and ``opm/executed``; on
executed steps ``opm/theta`` and ``opm/kept`` (share of rows kept), and the loss term
``half_theta_sq`` with ``score_gradient="official"``.

Data-parallel runs: the scores s_m are summed over the ranks (``ctx.all_sum``), κ is drawn for the
whole global batch and sliced to the rank's rows, and the CE is the mean over the global batch's kept rows.

Deviations from the paper/official code:
  * The fused logits are computed on every row and the dropped rows are left out of the loss (the
    official code removes them before the fusion head): same loss and gradients, and the FLOPs per
    sample stay the same on every step, so sampled FLOP counting stays exact.
  * A batch with every row dropped gives a zero loss and still takes an optimiser step with zero
    gradients (momentum and weight decay act); the official code skips the step. Unreachable with
    score-derived probabilities (see above).
  * θ uses the encoders' real feature sizes d_m; the official ``cfg.d`` is hard-coded to [512, 512].
  * Scores are computed vectorised (a gather) where the official code loops over the samples (same
    values). They are clamped at 1e-12 before dividing, so an underflowed score cannot produce NaN.
  * By default (``score_gradient="none"``) the scores carry no gradient. The official ones do: its
    unimodal logits multiply the live pooled features by detached copies of the head's weight and
    bias (``Classifier.py`` 112–113, 139–143), ``calcu_q`` writes q into a tensor that keeps the graph
    (58–72) and ``execute_drop`` builds θ from q (39–41), so θ depends on every modality's features
    (ρ compares the scores). θ then enters ``custom_autograd`` (49), whose backward returns θ itself
    as θ's gradient (21), independent of the loss. Every executed drop thus adds θ·∇θ = ∇(½θ²) to the
    encoders of all modalities through their pre-drop features, and nothing to the head (its copies
    are detached): a few per cent of the CE gradient. Warm-up epochs (``calcu_q`` is not called,
    145) and batches whose drop is not executed (``execute_drop`` returns before θ, 34–36) get none;
    nor does a step with θ = 0 (a tie) or with the dominant q clipped above 1 (the clip passes no
    gradient there). ``score_gradient="official"`` reproduces it with the loss term ½θ², same θ,
    same graph (the head held constant), taken through the loss so that fp16 loss scaling covers it;
    like the CE, it is left out of a batch in which every row was dropped (the official code skips
    that batch).
  * Random numbers come from the run's generators (the official code mixes numpy and torch RNGs): the
    per-batch coin from the host one (``ctx.generator``), κ from the one on the model's device
    (``ctx.device_generator``).
Deviations from BalanceMM (``OPM_trainer.py``):
  * q_base = 0.5 (official argparse) instead of 0.4; a warm-up (epochs 0–5 unmodulated) that BalanceMM
    lacks (``modulation_starts=0`` reproduces it).
  * Outside the modulated epochs the plain CE is trained (BalanceMM does no backward there).
  * Three or more modalities: the mean of the others by default (``ratio_to=sum`` is BalanceMM's rule).
  * BalanceMM's scores use the live head weights and it divides by 1 − θ + 1e-5 with θ still in the
    graph, so its CE differentiates through θ into the encoders and the head (a third behaviour, not
    offered; its HEAD does not run this code, see ``Unimodality_Calculate``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from balancemm.catalog.methods import OPMHParams
from balancemm.data.batch import Batch
from balancemm.methods._scores import others_sum
from balancemm.methods.base import Method
from balancemm.models.classifier import ModelOutput, ModelSpec, require_slice_heads
from balancemm.models.fusions.concat import ConcatFusion
from balancemm.registry import METHODS


def opm_drop_probabilities(scores: Tensor, q_base: float, lam: float, ratio_to: str = "mean") -> Tensor:
    """Drop probabilities q ``[M]`` (float64) from per-modality scores s ``[M]`` (sorted modality order).

    ρ_m = s_m / mean_{j≠m} s_j (``ratio_to="sum"``: / Σ_{j≠m} s_j), r_m = tanh(relu(ρ_m − 1)),
    q_m = q_base·(1 + λ·r_m) where r_m > 0, else 0, clipped to [0, 1]. For M = 2 both rules are the
    official ρ_a = s_a/s_v, ρ_v = s_v/s_a.
    """
    s = scores.double().clamp(min=1e-12)
    others = others_sum(s)  # exact for M = 2, so both ratios cannot exceed 1
    if ratio_to == "mean":
        others = others / (s.numel() - 1)
    r = torch.tanh(torch.relu(s / others - 1))
    return torch.where(r > 0, q_base * (1 + lam * r), torch.zeros_like(r)).clamp(0, 1)


def drop_rate(q: Tensor, dims: Sequence[int]) -> Tensor:
    """θ = Σ_m d_m q_m / Σ_m d_m, a 0-dim tensor from drop probabilities q ``[M]`` and feature sizes d_m.

    Differentiable in q: with ``score_gradient="official"`` the gradient of ½θ² is taken through it.
    """
    # The widths d_m, each filled in where q lives: a tensor made from a Python list would be copied.
    d = torch.stack([q.new_full((), n) for n in dims])
    return (d * q).sum() / d.sum()


def frozen_head_slices(fusion: ConcatFusion, features: dict[str, Tensor]) -> dict[str, Tensor]:
    """The concat head's per-modality logits W_m h_m + b/M ``{m: [B, C]}`` with W and b held constant.

    The same values as ``fusion.slice(features)``, but a gradient reaches the features ``{m: [B, d_m]}``
    only, never the head: the official scores use detached copies of the head's weight and bias
    (``Classifier.py`` 112–113) and the live features (139–143).
    """
    blocks, bias = fusion.modality_weights()
    bias = bias.detach() / len(fusion.modalities)
    return {m: features[m] @ w.detach().t() + bias for m, w in blocks.items()}


def drop_features(
    features: dict[str, Tensor], q: Tensor, generator: torch.Generator, rows: tuple[int, int, int] | None = None
) -> tuple[dict[str, Tensor], Tensor, float]:
    """Randomly drop each modality's feature per sample and rescale; the official ``execute_drop``.

    Args:
        features: ``{m: [B, d_m]}`` pooled features, in the order of ``q``.
        q: ``[M]`` drop probabilities, on the features' device.
        generator: the only source of randomness, on the features' device (the run's
            ``ctx.device_generator``): κ is drawn there, so a step copies nothing from the host.
        rows: ``(start, end, size)``: these B rows are rows ``start:end`` of a global batch of ``size``
            (``ctx.rows_in_global_batch``); κ is drawn for all ``size`` rows and sliced, so every rank
            of a data-parallel run draws the one-process κ of its rows. Default: the B rows are the batch.

    Returns:
        ``{m: [B, d_m]}`` features κ_{m,i}·h_{m,i}/(1 − θ), the ``[B]`` bool mask of rows that keep at
        least one modality, and θ = Σ_m d_m q_m / Σ_m d_m.
    """
    first = next(iter(features.values()))
    start, end, size = rows if rows is not None else (0, first.shape[0], first.shape[0])
    theta = float(drop_rate(q, [h.shape[1] for h in features.values()]))
    # κ ~ Bernoulli(1 − q): u < 1 − q with u uniform on [0, 1), drawn on the features' device.
    u = torch.rand(size, len(features), generator=generator, dtype=q.dtype, device=first.device)[start:end]
    keep = u < (1 - q)
    # θ = 1 only if every q is 1, and then every κ is 0: nothing is left to rescale.
    scale = 1.0 / (1.0 - theta) if theta < 1 else 0.0
    dropped = {m: h * (keep[:, j, None].to(h.dtype) * scale) for j, (m, h) in enumerate(features.items())}
    return dropped, keep.any(dim=1), theta


@METHODS.register("opm")
class OPM(Method):
    adapted: ClassVar[Mapping[str, Any]] = {"modulation_starts": "6%"}  # official: warm-up 0–5 of 100 epochs
    HParams = OPMHParams
    search: ClassVar[Mapping[str, Any]] = {  # q_base: official 0.5, its config.py 0.4; λ around 0.5
        "q_base": [0.3, 0.4, 0.5, 0.6],
        "lam": [0.25, 0.5, 1.0],
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The rows the last forward kept (None: it dropped nothing, every row counts) and, with
        # ``score_gradient="official"``, its θ with a gradient to the encoders (None: no drop or no
        # such gradient); ``losses`` reads both. Transient, not buffers: they only pass from one hook
        # to the next in a step.
        self.kept: Tensor | None = None
        self.theta: Tensor | None = None

    @classmethod
    def model_spec(cls, spec: ModelSpec, hp: Any) -> ModelSpec:
        # Dropping acts on the pooled features that a concat head reads, and the scores come from
        # that head's per-modality slices.
        why = "drops pooled features before a concat fusion head and scores each modality by its slice of that head"
        require_slice_heads(spec, "opm", why, ("concat",))
        return replace(spec, unimodal_heads="slice")

    def acts_in(self, epoch: int) -> bool:
        return self.within(epoch, self.hp.modulation_starts)

    def forward(self, batch: Batch) -> ModelOutput:
        hp, ctx, model = self.hp, self.ctx, self.model
        mods = model.modalities
        features = model.apply_mask(model.encode(batch), batch.present, batch.modalities)
        acts = self.acts_in(ctx.epoch)
        # The scores keep a graph to the features only where an executed drop may use it (below).
        with torch.set_grad_enabled(torch.is_grad_enabled() and acts and hp.score_gradient == "official"):
            unimodal = frozen_head_slices(self.fusion, features)
            live_scores = self._over_ranks(
                torch.stack([torch.softmax(unimodal[m], dim=1).gather(1, batch.label[:, None]).sum() for m in mods])
            )
        scores = live_scores.detach()
        ctx.log(**{f"opm/s_{m}": s for m, s in zip(mods, scores, strict=True)})
        self.kept, self.theta = None, None
        if acts:
            q = opm_drop_probabilities(scores, hp.q_base, hp.lam, hp.ratio_to)
            # A host decision: drawn on the host generator and read there, so nothing is copied.
            execute = bool(torch.rand((), generator=ctx.generator) < hp.p_exe)
            ctx.log(**{f"opm/q_{m}": v for m, v in zip(mods, q, strict=True)})
            ctx.log(**{"opm/executed": float(execute)})
            if execute:
                if live_scores.requires_grad:
                    # The same θ, differentiable through the scores (see ``losses``).
                    live_q = opm_drop_probabilities(live_scores, hp.q_base, hp.lam, hp.ratio_to)
                    self.theta = drop_rate(live_q, [features[m].shape[1] for m in mods])
                rows = ctx.rows_in_global_batch(batch)
                features, kept, theta = drop_features(features, q, ctx.device_generator, rows)
                self.kept = kept
                ctx.log(**{"opm/theta": theta})
                ctx.log(**{"opm/kept": ctx.global_mean(kept.float())})
        return ModelOutput(model.fuse(features), features, {m: z.detach() for m, z in unimodal.items()})

    def _over_ranks(self, scores: Tensor) -> Tensor:
        """The scores ``[M]`` summed over the ranks' shards: the global batch's (``scores`` on one process).

        With a graph (``score_gradient="official"``) the sum keeps it to this rank's features: the
        other ranks' part is a constant here, and they take its gradient through their own rows.
        """
        if not self.ctx.world.distributed:
            return scores
        total = self.ctx.all_sum(scores.detach())
        return total + (scores - scores.detach()) if scores.requires_grad else total

    @property
    def fusion(self) -> ConcatFusion:
        """The model's concat head (``model_spec`` admits no other)."""
        fusion = self.model.fusion
        assert isinstance(fusion, ConcatFusion)
        return fusion

    def losses(self, out: ModelOutput, batch: Batch) -> dict[str, Tensor]:
        if self.kept is None:
            return {"ce": F.cross_entropy(out.logits, batch.label)}
        per_row = F.cross_entropy(out.logits, batch.label, reduction="none")
        kept = self.kept.to(per_row.dtype)
        if not self.ctx.world.distributed:
            # Mean over the kept rows; with none kept the loss is 0 and every gradient is zero.
            terms = {"ce": (per_row * kept).sum() / kept.sum().clamp(min=1)}
            any_kept = kept.amax()
        else:
            # The global batch's kept rows: the gradients are averaged with weight ``batch.share``, so
            # this rank's sum is divided by the global count times its share (the one-process loss).
            total = self.ctx.all_sum(kept.sum())
            terms = {"ce": (per_row * kept).sum() / (total.clamp(min=1) * batch.share)}
            any_kept = (total > 0).to(per_row.dtype)
        if self.theta is not None:
            # The official θ backward returns θ itself as θ's gradient, whatever the loss: the gradient
            # of ½θ², which this term adds through the loss (so loss scaling covers it). It is dropped
            # with the batch when no row is kept, as the official code skips that batch.
            half = (0.5 * self.theta.square()).to(per_row.dtype)
            if self.ctx.world.distributed:
                # θ is the global batch's; its gradient here reaches this rank's rows only, which the
                # share-weighted average would scale by ``batch.share``: undone, the value unchanged.
                half = half.detach() + (half - half.detach()) / batch.share
            terms["half_theta_sq"] = half * any_kept
        return terms
