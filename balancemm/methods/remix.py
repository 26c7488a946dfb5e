"""Data Remixing: each training sample is trained on with the one modality it is least confident in.

Ma, Chen, Deng. "Improving Multimodal Learning Balance and Sufficiency through Data Remixing." ICML 2025
(arXiv 2506.11550). Original code: MatthewMaxy/Remix_ICML2025 @ 80898aa (``train.py``, ``models/models.py``,
``datasets/dataloader.py``, ``scripts/run_train.sh``), documented in docs/methods/remix.md.

Idea: after a joint warm-up, assign every training sample to the modality whose unimodal prediction on it
is least confident, and train each modality only on its own samples, in batches that carry that modality
alone (the others' features zeroed). No batch mixes modalities, so the modalities stop interfering inside
a batch, and every sample still trains the model once per epoch.

Model (``model_spec``): the fused head (concatenation by default) on the masked features, plus a separate
linear head per modality (``unimodal_heads: linear``; the code's ``head_audio`` / ``head_video``,
``models/models.py:34-36``). Masking is at the feature level (``models/models.py:55-59`` zeroes a feature
after its encoder); ``model.mask: input`` is refused.

Warm-up epochs e < W (``train.py:101-125,243-245``), all modalities present:
    L = CE(z, y) + Σ_m α_m CE(z_m, y)                               α_m = 0.5 (``--alpha``, ``--beta``)
Every later epoch starts with the remix pass (``on_epoch_start``, phase ``remix/assign``; ``:60-99,248``):
the previous epoch's model in eval mode, without gradients, over the training split in order (no
augmentation, as the code's ``val`` mode reading ``train.csv``, ``datasets/dataloader.py:31-34,73-86``):
    KL_{i,m} = Σ_c p_{m,c} log2(p_{m,c}·C),  p_m = softmax(z_m) clipped to [1e-9, 1]   (= log2 C − H_2(p_m))
    sample i → argmin_m KL_{i,m}      ties: the first modality of ``subset_order`` (the code's ``else``: video)
The epoch is then the subsets in ``subset_order`` (default reverse sorted modality order: visual, then
audio, the code's), each shuffled and batched on its own, every row with only its modality present
(a ``SamplePlan`` with ``subsets``; ``:127-173``), and per batch
    L = CE(z, y) + γ_m CE(z_m, y)                                    γ_m = 1 (``--gamma1``, ``--gamma2``)
The losses hook weighs each row by α_m when it carries every modality and by γ_m when it does not, so it
needs no epoch counter; the heads of absent modalities get no gradient (their term is a constant 0), and
the encoders of absent modalities get exact zero gradients through the zeroed features, as in the code.
Prediction: the fused head on every modality (``:191-192``, the default ``predict``).

Original defaults: W = 10 warm-up epochs, α = β = 0.5, γ_1 = γ_2 = 1; Adam lr 5e-5, betas (0.9, 0.999), wd
1e-4, StepLR(30, 0.1), 60 epochs, batch 64, 2 frames (``train.py:28-50,230-235``; the recipe is the
protocol's here, as for every method). ``--encoder_lr_decay`` is parsed but never used.

Three or more modalities (ours): the same argmin over M modalities and M subsets in ``subset_order``.

Data-parallel runs: each rank scores its contiguous part of the split and the scores are gathered in split
order (``ctx.gather``), so every rank builds the same assignment and plan; the data layer splits every
global batch (one subset's rows) into contiguous per-rank parts.

Deviations from the paper/official code:
  * C is the dataset's number of classes; the code hard-codes 6 (``train.py:76-77``) and fails for any other.
  * The assignment stays in memory; the code writes ``./data/remix_a.csv`` and ``remix_v.csv`` and reads them
    back (``:83-97``).
  * Ties go to the first modality of ``subset_order``: video for the code's order, as its ``else`` branch.
    The probabilities come from a float64 softmax (the code's is float32).
  * Unimodal losses are weighted per row (α_m on rows with every modality, γ_m on rows with one); on the
    homogeneous batches of both phases this is the code's batch-mean form exactly.
Deviations from BalanceMM: BalanceMM (the authors' toolkit) does not implement Data Remixing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from balancemm.catalog.methods import RemixHParams
from balancemm.data.batch import Batch, SamplePlan, Subset
from balancemm.errors import ConfigError
from balancemm.methods.base import Method
from balancemm.models.classifier import ModelOutput, ModelSpec
from balancemm.registry import METHODS

# The code clips probabilities to [1e-9, 1] before the logarithm (train.py:54).
CLIP = 1e-9


def kl_to_uniform(logits: Tensor) -> Tensor:
    """KL(p ‖ uniform) in bits per row, ``[B]`` float64 from logits ``[B, C]``: Σ_c p_c log2(p_c·C), p clipped
    to [1e-9, 1]; C is the logits' class count."""
    p = logits.detach().double().softmax(-1).clamp(CLIP, 1.0)
    return (p * torch.log2(p * logits.shape[-1])).sum(-1)


def assign(kl: Tensor) -> Tensor:
    """``[N]`` positions (in the columns' order) of the least confident modality of each row of ``kl`` ``[N, M]``;
    a tie goes to the first column (``torch.argmin`` returns the first minimum)."""
    return kl.argmin(1)


def resolve_order(modalities: tuple[str, ...], given: tuple[str, ...] | None) -> tuple[str, ...]:
    """The subset order: ``given`` (a permutation of ``modalities``), else reverse sorted order (visual, audio)."""
    if given is None:
        return tuple(reversed(modalities))
    if sorted(given) != sorted(modalities):
        raise ConfigError(
            f"method.subset_order must list each modality once ({', '.join(modalities)}), got {', '.join(given)}"
        )
    return tuple(given)


def per_modality(value: float, given: tuple[float, ...] | None, modalities: tuple[str, ...], name: str) -> list[float]:
    """One weight per modality in sorted order: ``given``, else ``value`` for every modality."""
    if given is None:
        return [value] * len(modalities)
    if len(given) != len(modalities):
        raise ConfigError(f"method.{name} needs one weight per modality ({', '.join(modalities)}), got {len(given)}")
    return list(given)


@METHODS.register("remix")
class Remix(Method):
    HParams = RemixHParams
    # The unimodal weights around the code's α = β = 0.5 and γ = 1 (the paper's script runs only the defaults).
    search: ClassVar[Mapping[str, Any]] = {"alpha": [0.25, 0.5, 1.0], "gamma": [0.5, 1.0, 2.0]}
    adapted: ClassVar[Mapping[str, Any]] = {"warmup": "17%"}  # official: 10 warm-up epochs of 60

    @classmethod
    def model_spec(cls, spec: ModelSpec, hp: Any) -> ModelSpec:
        if spec.mask != "feature":
            raise ConfigError(
                "remix trains each sample with one modality by zeroing the other modalities' features after their "
                f"encoders (models/models.py:55-59); got model.mask={spec.mask}: use model.mask=feature"
            )
        return replace(spec, unimodal_heads="linear")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        mods, hp = self.model.modalities, self.hp
        if self.model.unimodal_heads is None or self.model.mask != "feature":
            raise ConfigError("remix needs the linear unimodal heads and feature masking its model_spec sets")
        self.order = resolve_order(mods, hp.subset_order)
        self.alphas = per_modality(hp.alpha, hp.alphas, mods, "alphas")
        self.gammas = per_modality(hp.gamma, hp.gammas, mods, "gammas")

    def acts_in(self, epoch: int) -> bool:
        # The remixed epochs; warm-up epochs train jointly (with the unimodal terms of the code's warm-up).
        return self.within(epoch, self.hp.warmup)

    def on_epoch_start(self, epoch: int) -> SamplePlan | None:
        if not self.acts_in(epoch):
            return None
        with self.ctx.phase("remix/assign"):
            chosen = self.assignment()
        mods = self.model.modalities
        subsets = []
        for k, m in enumerate(self.order):
            present = torch.zeros(len(mods), dtype=torch.bool)
            present[mods.index(m)] = True
            index = (chosen == k).nonzero().flatten()
            subsets.append(Subset(index, present))
            self.ctx.log(**{f"remix/share_{m}": index.numel() / max(chosen.numel(), 1)})
        return SamplePlan(subsets=tuple(subsets))

    def assignment(self) -> Tensor:
        """``[N]`` position in ``subset_order`` of each training row's least confident modality (split order).

        Eval mode, no gradients, every row once; in a data-parallel run every rank scores its part of the
        split and gets every row's scores.
        """
        model, ctx = self.model, self.ctx
        kl, rows = [], []
        with ctx.eval_mode(self):
            for batch in ctx.batches("train"):
                logits = model.unimodal(model.encode(batch))
                kl.append(torch.stack([kl_to_uniform(logits[m]) for m in self.order], 1))  # [B, M]
                rows.append(batch.index)
        every = torch.empty(ctx.split_size("train"), len(self.order), dtype=torch.float64)
        every[ctx.gather(torch.cat(rows)).cpu()] = ctx.gather(torch.cat(kl)).cpu()
        return assign(every)

    def losses(self, out: ModelOutput, batch: Batch) -> dict[str, Tensor]:
        terms = {"ce": F.cross_entropy(out.logits, batch.label)}
        present = batch.present
        full = present.all(1)
        carried = present.any(0).tolist()  # one read back per step
        for j, m in enumerate(self.model.modalities):
            if not carried[j]:
                # No row carries m: its head must get no gradient at all, not a zero one.
                terms[f"uni_{m}"] = torch.zeros((), device=out.logits.device)
                continue
            weight = torch.where(full, self.alphas[j], self.gammas[j]) * present[:, j]
            per_row = F.cross_entropy(out.unimodal_logits[m], batch.label, reduction="none")
            terms[f"uni_{m}"] = (weight * per_row).mean()
        return terms
