"""AMCo: Adaptive Mask Co-optimization — a RECONSTRUCTION (no code was released).

Zhou, Liang, Zheng, Xuan, Kumada. "Adaptive Mask Co-Optimization for Modal Dependence in Multimodal
Learning." ICASSP 2023 (doi:10.1109/ICASSP49357.2023.10096641). Only the abstract is public: an adaptive
mask makes the *dependent* modality harder to learn and a co-optimisation keeps the performance on it.
No original code exists, so this follows BalanceMM's interpretation (GeWu-Lab/BalanceBenchmark @
4c1482fca5aa: ``balancemm/trainer/AMCo_trainer.py``, ``BaseClassifierAMCoModel`` in
``balancemm/models/avclassify_model.py``; earlier commits where named), with its broadcast bug fixed.
Every detail below is unverified against the paper.

Model (hook ``model_spec``: fusion ``amco``, :class:`~balancemm.models.fusions.amco.AMCoFusion`), with
h_m the pooled feature of modality m (width d_m), u_m = W_m h_m + b/M the concat head's slice for it and
L* an extra Linear(C, C). A flagged (dependent) modality is masked in one of two places (``mask_unit``):

    feature (default): h̃_m = h_m ⊙ mask · s,   mask ∈ {0, 1}^{d_m} with N = ⌊p_t·d_m⌋ zeros,
                       s = 1/max(1 − p_t, 0.1) (``rescale``; s = 1 without it),
                       ũ_m = W_m h̃_m + b/M,   z = L*(fc_out(concat(h̃)))
    class:             ũ_m = u_m ⊙ mask,      mask ∈ {0, 1}^C with N = ⌊p_t·C⌋ zeros,
                       z = L*(Σ_m ũ_m)

Unflagged modalities keep h_m and u_m; with nothing masked z = L*(fc_out(concat(h))) in both modes.

Mask schedule (hook ``forward``): a level ℓ starts at 0 every epoch and grows by epoch/10 after every
batch (so it stays 0 throughout epoch 0);

    p_t = sin(π/2 · min(ε, ℓ)/ε),

the N masked positions are the first N of a random permutation drawn on the model's device
(``ctx.device_generator``), shared by every sample of the batch: one permutation of the d_m units per
flagged modality (in sorted order) in feature mode, one of the C classes for all flagged modalities in
class mode. With ε = 0.3, p_t reaches 1 after ⌈3/epoch⌉ batches, so from epoch 1 on a dependent
modality is fully masked for almost the whole epoch in either mode: its encoder then gets no gradient.
The modes differ during the ramp (dropped feature units, rescaled, vs dropped classes) and when fully
masked: in feature mode ũ_m = b/M and z is the model's own output with m removed by feature masking;
in class mode ũ_m = 0 and z lacks the b/M share.

Loss (hook ``losses``) inside the modulation window: L = CE(z, y) + Σ_m CE(ũ_m, y) (the
co-optimisation, on the masked ũ_m); outside it: CE(z, y).

Dependence (hook ``after_backward``, inside the window), used for the NEXT batch: one softmax over the
concatenated ``[B, M·C]`` unimodal logits ũ (the ones this step trained on), and

    mass_m = (1/B) Σ_i Σ_{c ∈ block m} softmax(ũ_i)_c,    m dependent ⟺ mass_m > σ.

The flags and ℓ are buffers (checkpoints and resume carry them); both are reset at every epoch start,
as BalanceMM does. The masses sum to 1, so with σ = 0.5 at most one modality is flagged, and with
M = 2 exactly one after every step (barring an exact tie). Because the dependence is measured on the
masked logits, a fully masked modality tends to lose its flag on the next batch: from epoch 1 on the
flag mostly alternates between the modalities, so each batch trains the fused head on one modality.

Three or more modalities: the same joint softmax, with σ = 0.5 for every M (BalanceMM's choice, kept):
a modality is flagged only when it holds more than half of the joint confidence, more than all the
others together. With M ≥ 3 that is stricter than with M = 2 (the even share is 1/M), so flags are
rarer; a lower ``sigma`` (e.g. 1/M + 0.1) flags more often and may flag two modalities at once.

Logged per step: ``amco/p_t``; inside the window ``amco/mass_<m>`` and ``amco/dependent_<m>`` (the
flags for the next batch).

Cost: the co-optimisation adds M cross-entropies on the slices (no extra encoder pass). In feature
mode a masked step runs the same matrix products as an unmasked one. In class mode a masked step builds
z from the slices and skips the concat head's matrix product, so steps with and without a mask differ
slightly in FLOPs per sample and sampled FLOP counting is off by about 1e-3 (measured +0.13 % over 30
epochs on ``embedded``); epoch 0 never masks, so a one-epoch run is counted exactly.

Data-parallel runs: the masses are averaged over the global batch's rows (``ctx.global_mean``), so
every rank flags the same modalities; the mask is one draw per batch, the same on every rank.

Deviations from the paper (unknown; these are BalanceMM's readings): the dependence criterion and the
schedule are BalanceMM's; α = 0.1 of BalanceMM's config (``configs/trainer_config.yaml:21``) is used by
none of its code and is not a parameter here.
Deviations from BalanceMM (``AMCo_trainer.py``):
  * Mask unit. BalanceMM HEAD masks the C class logits of the dependent modality's slice
    (``AMCo_trainer.py:73-82``, ``avclassify_model.py:376-377``), yet its config sizes the mask by
    feature units, ``U: 512`` (``configs/trainer_config.yaml:26``; stored at ``AMCo_trainer.py:28``,
    never used), the feature width of its AMCo model (``configs/model_config.yaml:6-9``: ResNet-18,
    ``modality_size: 512``). Its first version masked feature units: at 596b434 (the parent of
    2f2b8b5, the commit that moved the mask to class logits) ``AMCo_trainer.py:69-78`` draws
    N = ⌊p_t·U⌋ zeros by one shuffle per batch, and ``avclassify_model.py:211-222`` multiplies the
    dependent modality's pooled [B, 512] feature by it *before* the concat head, then by 1/(1 − p_t),
    or by 10 once |p_t − 1| ≤ 0.1 (``:556-573`` for three modalities). HEAD still has a branch for
    the dependent modality's encoding that does what the others do (``avclassify_model.py:346-347``).
    ``mask_unit="feature"`` (the default) is that first version with U = d_m, since encoders here
    differ in width; ``rescale=False`` drops the factor; ``mask_unit="class"`` is HEAD. Everything
    else follows HEAD in both modes (596b434 also kept a flag raised for the rest of the epoch,
    flagged at ≥ σ, masked only the first flagged modality and had no L*).
  * The class mask broadcasts over the batch; BalanceMM expands it to a leading size of 2
    (``AMCo_trainer.py:82``), which only works for per-GPU batches of 1 or 2.
  * When no modality is masked, z = L*(fc_out(concat(h))) (BalanceMM sums the slices: the same up
    to rounding), so evaluation and such steps are the fusion's own forward.
  * The losses are summed and backpropagated once (BalanceMM: one backward each, accumulated; same
    gradients).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from balancemm.catalog.methods import AMCoHParams
from balancemm.data.batch import Batch, SamplePlan
from balancemm.methods.base import Method
from balancemm.models.classifier import ModelOutput, ModelSpec, require_slice_heads
from balancemm.models.fusions.amco import AMCoFusion
from balancemm.registry import METHODS


def mask_ratio(level: float, eps: float) -> float:
    """p_t = sin(π/2 · min(ε, ℓ)/ε): the share of feature units (or classes) masked at level ℓ."""
    return math.sin(math.pi / 2 * min(eps, level) / eps)


def random_mask(size: int, masked: int, generator: torch.Generator) -> Tensor:
    """``[size]`` float mask: zeros at the first ``masked`` entries of one random permutation, ones elsewhere.

    Drawn and built on the generator's device (``ctx.device_generator``: the model's), so a step copies
    nothing from the host.
    """
    order = torch.randperm(size, generator=generator, device=generator.device)
    return torch.ones(size, device=generator.device).index_fill_(0, order[:masked], 0)


def dependence_mass(unimodal: list[Tensor], batch_mean: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Per-modality mass ``[M]`` of one joint softmax over the concatenated ``[B, M·C]`` logits.

    Args:
        unimodal: M tensors ``[B, C]``, one per modality in sorted order.
        batch_mean: the mean over rows of the per-row masses ``[B, M]`` (default ``t.mean(0)``); a
            data-parallel run passes ``ctx.global_mean``, the mean over the global batch's rows.
    """
    joint = torch.softmax(torch.cat(unimodal, dim=1), dim=1)  # [B, M·C]
    per_row = joint.view(joint.shape[0], len(unimodal), -1).sum(2)  # [B, M]
    return per_row.mean(0) if batch_mean is None else batch_mean(per_row)


@METHODS.register("amco")
class AMCo(Method):
    HParams = AMCoHParams
    search: ClassVar[Mapping[str, Any]] = {  # no released code or values: a band around BalanceMM's 0.5 / 0.3
        "sigma": [0.4, 0.5, 0.6],
        "eps": [0.1, 0.3, 0.5, 1.0],
    }
    dependent: Tensor  # [M] bool: modalities the next batch masks
    level: Tensor  # ℓ (float64): mask-schedule level within the epoch

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("dependent", torch.zeros(len(self.model.modalities), dtype=torch.bool))
        self.register_buffer("level", torch.zeros((), dtype=torch.float64))

    @classmethod
    def model_spec(cls, spec: ModelSpec, hp: Any) -> ModelSpec:
        why = "masks the per-modality slices of a concat head and adds a class-space layer after it"
        require_slice_heads(spec, "amco", why, ("concat",), own="amco")
        return replace(spec, fusion="amco", unimodal_heads="slice")

    def acts_in(self, epoch: int) -> bool:
        return self.within(epoch, self.hp.modulation_starts, self.hp.modulation_ends)

    def _in_window(self) -> bool:
        return self.acts_in(self.ctx.epoch)

    def on_epoch_start(self, epoch: int) -> SamplePlan | None:
        self.dependent.zero_()
        self.level.zero_()
        return None

    def forward(self, batch: Batch) -> ModelOutput:
        model, ctx = self.model, self.ctx
        fusion = cast(AMCoFusion, model.fusion)
        p_t = mask_ratio(float(self.level), self.hp.eps)
        masked = math.floor(p_t * fusion.num_classes)
        ctx.log(**{"amco/p_t": p_t})
        # BalanceMM's feature version rescales even when ⌊p_t·U⌋ is still 0, so any p_t > 0 acts there.
        acts = p_t > 0 if self.hp.mask_unit == "feature" else masked > 0
        if not (self._in_window() and acts and bool(self.dependent.any())):
            return model(batch)
        features = model.apply_mask(model.encode(batch), batch.present, batch.modalities)
        flagged = [m for m, d in zip(model.modalities, self.dependent.tolist(), strict=True) if d]
        if self.hp.mask_unit == "feature":
            return self._mask_features(features, flagged, p_t)
        unimodal = model.unimodal(features)
        mask = random_mask(fusion.num_classes, masked, ctx.device_generator)
        for m in flagged:
            unimodal[m] = unimodal[m] * mask.to(unimodal[m].dtype)
        return ModelOutput(fusion.combine(unimodal), features, unimodal)

    def _mask_features(self, features: dict[str, Tensor], flagged: list[str], p_t: float) -> ModelOutput:
        """Drop ⌊p_t·d_m⌋ units of each flagged ``h_m`` ``[B, d_m]`` (one draw each, shared by the batch)
        and fuse; the output's features are the ones the head saw."""
        # Inverted dropout: kept units grow by 1/(1 − p_t), capped at 10 as in BalanceMM, so the
        # unmasked features at evaluation have the scale the head was trained on.
        scale = 1 / max(1 - p_t, 0.1) if self.hp.rescale else 1.0
        features = dict(features)
        for m in flagged:
            h = features[m]
            mask = random_mask(h.shape[1], math.floor(p_t * h.shape[1]), self.ctx.device_generator)
            features[m] = h * (mask.to(h.dtype) * scale)
        return ModelOutput(self.model.fuse(features), features, self.model.unimodal(features))

    def losses(self, out: ModelOutput, batch: Batch) -> dict[str, Tensor]:
        ce = F.cross_entropy(out.logits, batch.label)
        if not self._in_window():
            return {"ce": ce}
        return {"ce": ce, **{f"uni_{m}": F.cross_entropy(u, batch.label) for m, u in out.unimodal_logits.items()}}

    def after_backward(self, out: ModelOutput, batch: Batch) -> None:
        mods = self.model.modalities
        if self._in_window():
            with torch.no_grad():
                mass = dependence_mass([out.unimodal_logits[m] for m in mods], self.ctx.global_mean)
            self.dependent.copy_(mass > self.hp.sigma)
            self.ctx.log(**{f"amco/mass_{m}": v for m, v in zip(mods, mass, strict=True)})
            flags = self.dependent.tolist()
            self.ctx.log(**{f"amco/dependent_{m}": float(d) for m, d in zip(mods, flags, strict=True)})
        self.level += self.ctx.epoch / 10
