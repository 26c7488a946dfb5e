"""AMCo: Adaptive Mask Co-optimization — a RECONSTRUCTION (no code was released).

Zhou, Liang, Zheng, Xuan, Kumada. "Adaptive Mask Co-Optimization for Modal Dependence in Multimodal
Learning." ICASSP 2023 (doi:10.1109/ICASSP49357.2023.10096641). Only the abstract is public: an adaptive
mask makes the *dependent* modality harder to learn and a co-optimisation keeps the performance on it.
No original code exists, so this follows BalanceMM's interpretation (``AMCo_trainer.py``,
``BaseClassifierAMCoModel``), as written up in specs/methods-optim-forward-data.md §9, with its
broadcast bug fixed. Every detail below is unverified against the paper.

Model (hook ``model_spec``: fusion ``amco``, :class:`~balancemm.models.fusions.amco.AMCoFusion`), with
u_m = W_m h_m + b/M the concat head's slice for modality m and L* an extra Linear(C, C):

    ũ_m = u_m ⊙ mask if m is dependent, else u_m         mask ∈ {0, 1}^C: N classes set to 0
    z   = L*(Σ_m ũ_m)                                    (= L*(fc_out(concat(h))) exactly when nothing is masked)

Mask schedule (hook ``forward``): a level ℓ starts at 0 every epoch and grows by epoch/10 after every
batch (so it stays 0 throughout epoch 0);

    p_t = sin(π/2 · min(ε, ℓ)/ε),    N = ⌊p_t·C⌋,

the N classes drawn by one random permutation per batch on the model's device
(``ctx.device_generator``), shared by every sample.
With ε = 0.3, p_t reaches 1 after ⌈3/epoch⌉ batches, so from epoch 1 on a dependent modality's logits
are fully zeroed for almost the whole epoch: it then gets no gradient from either loss.

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

Cost: the co-optimisation adds M cross-entropies on the slices (no extra encoder pass). A masked step
builds z from the slices and skips the concat head's matrix product, so steps with and without a mask
differ slightly in FLOPs per sample and sampled FLOP counting is off by about 1e-3 (measured +0.13 %
over 30 epochs on ``embedded``); epoch 0 never masks, so a one-epoch run is counted exactly.

Deviations from the paper (unknown; these are BalanceMM's readings): the mask acts on the C class
logits, not on feature units (BalanceMM's config has U = 512, probably the paper's number of feature
units, and α = 0.1; its code uses neither, and neither is a parameter here); the dependence criterion
and the schedule are BalanceMM's.
Deviations from BalanceMM (``AMCo_trainer.py``):
  * The class mask broadcasts over the batch; BalanceMM expands it to a leading size of 2 (§0.3-4),
    which only works for per-GPU batches of 1 or 2.
  * When no modality is masked, z = L*(fc_out(concat(h))) (BalanceMM sums the slices: the same up
    to rounding), so evaluation and such steps are the fusion's own forward.
  * The losses are summed and backpropagated once (BalanceMM: one backward each, accumulated; same
    gradients).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from balancemm.config import EpochValue, epoch_meta, rng, window_order
from balancemm.data.batch import Batch, SamplePlan
from balancemm.errors import ConfigError
from balancemm.methods.base import Method
from balancemm.models.classifier import ModelOutput, ModelSpec
from balancemm.models.fusions.amco import AMCoFusion
from balancemm.registry import FUSIONS, METHODS


@dataclass(frozen=True)
class AMCoHParams:
    sigma: float = field(default=0.5, metadata=rng(gt=0, lt=1))  # σ, dependence threshold; BMM 0.5 (paper unknown)
    eps: float = field(default=0.3, metadata=rng(gt=0))  # ε, level at which p_t reaches 1; BMM 0.3 (paper unknown)
    modulation_starts: EpochValue = field(default=0, metadata=epoch_meta())  # first epoch with mask + co-loss (BMM 0)
    modulation_ends: EpochValue = field(default=80, metadata=epoch_meta())  # last one, inclusive (BMM 80)

    def _validate(self, path: str) -> None:
        window_order(self.modulation_starts, self.modulation_ends, path)


def mask_ratio(level: float, eps: float) -> float:
    """p_t = sin(π/2 · min(ε, ℓ)/ε): the share of classes masked at level ℓ."""
    return math.sin(math.pi / 2 * min(eps, level) / eps)


def class_mask(num_classes: int, masked: int, generator: torch.Generator) -> Tensor:
    """``[C]`` float mask with ``masked`` zeros at positions from one random permutation, ones elsewhere.

    Drawn and built on the generator's device (``ctx.device_generator``: the model's), so a step copies
    nothing from the host.
    """
    order = torch.randperm(num_classes, generator=generator, device=generator.device)
    return torch.ones(num_classes, device=generator.device).index_fill_(0, order[:masked], 0)


def dependence_mass(unimodal: list[Tensor]) -> Tensor:
    """Per-modality mass ``[M]`` of one joint softmax over the concatenated ``[B, M·C]`` logits.

    Args:
        unimodal: M tensors ``[B, C]``, one per modality in sorted order.
    """
    joint = torch.softmax(torch.cat(unimodal, dim=1), dim=1)  # [B, M·C]
    return joint.view(joint.shape[0], len(unimodal), -1).sum(2).mean(0)


@METHODS.register(
    "amco",
    group="feed-forward",
    paper="Zhou et al., ICASSP 2023 (reconstruction: no code released)",
    aliases=("AMCo", "AMCoTrainer"),
)
class AMCo(Method):
    name = "amco"
    HParams = AMCoHParams
    search: ClassVar[Mapping[str, Any]] = {  # no released code or values: a band around BalanceMM's 0.5 / 0.3
        "sigma": [0.4, 0.5, 0.6],
        "eps": [0.1, 0.3, 0.5, 1.0],
    }
    dependent: Tensor  # [M] bool: modalities whose logits the next batch masks
    level: Tensor  # ℓ (float64): mask-schedule level within the epoch

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("dependent", torch.zeros(len(self.model.modalities), dtype=torch.bool))
        self.register_buffer("level", torch.zeros((), dtype=torch.float64))

    @classmethod
    def model_spec(cls, spec: ModelSpec, hp: Any) -> ModelSpec:
        if FUSIONS.resolve(spec.fusion) not in ("concat", "amco") or spec.unimodal_heads == "linear":
            raise ConfigError(
                "amco masks the per-modality slices of a concat head and adds a class-space layer after it "
                f"(got model.fusion={spec.fusion}, model.unimodal_heads={spec.unimodal_heads}): use "
                "model.fusion=concat with model.unimodal_heads=auto or slice"
            )
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
        if not (self._in_window() and masked > 0 and bool(self.dependent.any())):
            return model(batch)
        features = model.apply_mask(model.encode(batch), batch.present, batch.modalities)
        unimodal = model.unimodal(features)
        mask = class_mask(fusion.num_classes, masked, ctx.device_generator)
        for m, flagged in zip(model.modalities, self.dependent.tolist(), strict=True):
            if flagged:
                unimodal[m] = unimodal[m] * mask.to(unimodal[m].dtype)
        return ModelOutput(fusion.combine(unimodal), features, unimodal)

    def losses(self, out: ModelOutput, batch: Batch) -> dict[str, Tensor]:
        ce = F.cross_entropy(out.logits, batch.label)
        if not self._in_window():
            return {"ce": ce}
        return {"ce": ce, **{f"uni_{m}": F.cross_entropy(u, batch.label) for m, u in out.unimodal_logits.items()}}

    def after_backward(self, out: ModelOutput, batch: Batch) -> None:
        mods = self.model.modalities
        if self._in_window():
            with torch.no_grad():
                mass = dependence_mass([out.unimodal_logits[m] for m in mods])
            self.dependent.copy_(mass > self.hp.sigma)
            self.ctx.log(**{f"amco/mass_{m}": v for m, v in zip(mods, mass, strict=True)})
            flags = self.dependent.tolist()
            self.ctx.log(**{f"amco/dependent_{m}": float(d) for m, d in zip(mods, flags, strict=True)})
        self.level += self.ctx.epoch / 10
