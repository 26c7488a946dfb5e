"""OGM / OGM-GE: On-the-fly Gradient Modulation with Generalization Enhancement.

Peng, Wei, Deng, Wang, Hu. "Balanced Multimodal Learning via On-the-fly Gradient Modulation."
CVPR 2022. Official code: GeWu-Lab/OGM-GE_CVPR2022 (``main.py: train_epoch``), which this follows
(documented in docs/methods/ogm_ge.md).

Idea: measure, on every batch, how confident each modality's own logits are on the true class;
shrink the gradient of the dominant modality's encoder so the others can catch up; optionally (GE)
add Gaussian noise to the encoder gradients to restore the SGD noise the shrinking removed.

Per step, after the plain backward of CE(z, y) (hook ``after_backward``), with z_m the unimodal
logits sliced from the fusion head, z_m = W_m h_m + b/M:

1. score        s_m = Σ_i softmax(z_m)_i[y_i]                       (a sum over the batch, not a mean)
2. ratio        ρ_v = s_v / s_a,  ρ_a = 1 / ρ_v                     (two modalities)
3. coefficient  if ρ_v > 1: k_v = 1 − tanh(α·ρ_v), k_a = 1;  else: k_a = 1 − tanh(α·ρ_a), k_v = 1
4. modulation   g ← k_m·g  (OGM)   or   g ← k_m·g + ε, ε ~ N(0, σ²), σ = std(g) + 1e-8  (OGM-GE)
                for every conv kernel g of encoder m, while modulation_starts ≤ epoch ≤ modulation_ends.

The official code uses ρ, not ρ − 1, inside tanh, so k jumps from 1 to 1 − tanh(α) as ρ crosses 1,
and on an exact tie the else-branch still shrinks the *first* modality (audio in the original; here
the first in sorted order). ``continuous=True`` gives the ρ − 1 form instead. σ is the unbiased std
of the unmodulated gradient tensor, and noise is added to every modality, including the one with k = 1.

Three or more modalities (no official version): ρ_m = s_m / mean_{j≠m} s_j and
k_m = 1 − tanh(α·ρ_m) if ρ_m > 1 else 1, for every m at once (our extension).

Deviations from the paper/official code:
  * Scores are computed vectorised (a gather on softmax(z_m)), not by a per-sample loop; same value.
  * "Conv kernels" is decided by module type (every ``ConvNd`` weight of the encoder) rather than
    the official ``ndim == 4`` test, so 1-D convolutions (spectrograms read over time, sequences)
    are modulated too; with 2-D CNNs both rules pick the same tensors.
  * Scores are clamped at 1e-12 before dividing, so an underflowed score cannot produce NaN.
  * The noise is drawn on the gradient's device from ``ctx.device_generator`` (the official code
    draws it on the GPU from the global generator), so it is seeded, checkpointed and never copied
    from the host; on a CPU that generator is the run's own, as in earlier releases.
Deviations from BalanceMM (``OGM_trainer.py``), all available as settings where they matter:
  * BalanceMM shrinks a modality only if its own ρ > 1 (no shrink on a tie); we follow the code.
  * BalanceMM modulates every non-1-D encoder weight (``params=weights``) and starts at epoch 10
    (``modulation_starts=10``); its 3-modality score variants (cosine score, OGM_GE3) are not used.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any, ClassVar

import torch
from torch import Tensor

from balancemm.catalog.methods import OGMGEHParams
from balancemm.data.batch import Batch
from balancemm.methods._grads import conv_weights
from balancemm.methods.base import Method
from balancemm.models.classifier import ModelOutput, ModelSpec, require_slice_heads
from balancemm.registry import METHODS


def ogm_coefficients(scores: Tensor, alpha: float, continuous: bool = False) -> Tensor:
    """Modulation coefficients k ``[M]`` from per-modality scores s ``[M]`` (sorted modality order)."""
    s = scores.double().clamp(min=1e-12)
    shift = 1.0 if continuous else 0.0
    k = torch.ones_like(s)
    if s.numel() == 2:
        # PAPER: the official two-branch rule; a tie (ρ_v == 1) shrinks the first modality.
        ratio = s[1] / s[0]
        if ratio > 1:
            k[1] = 1 - torch.tanh(alpha * (ratio - shift))
        else:
            k[0] = 1 - torch.tanh(alpha * (1 / ratio - shift))
        return k
    others = (s.sum() - s) / (s.numel() - 1)
    ratio = s / others
    return torch.where(ratio > 1, 1 - torch.tanh(alpha * (ratio - shift)), k)


@METHODS.register("ogm_ge")
class OGMGE(Method):
    adapted: ClassVar[Mapping[str, Any]] = {"modulation_ends": "50%"}  # official: epochs 0–50 of 100
    HParams = OGMGEHParams
    search: ClassVar[Mapping[str, Any]] = {  # α: CVPR README 0.1/0.3, TPAMI 0.8 (script) / 1.0 (argparse)
        "alpha": [0.1, 0.2, 0.3, 0.5, 0.8, 1.0],
        "ge": [True, False],
    }

    @classmethod
    def model_spec(cls, spec: ModelSpec, hp: Any) -> ModelSpec:
        # The scores need per-modality logits from the fusion head itself (W_m h_m + b/M).
        require_slice_heads(spec, "ogm_ge", "scores each modality by its slice of the fusion head")
        return replace(spec, unimodal_heads="slice")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        encoders = self.model.encoders
        self.modulated = {
            m: conv_weights(encoders[m])
            if self.hp.params == "conv"
            else [p for p in encoders[m].parameters() if p.dim() > 1]
            for m in self.model.modalities
        }

    def acts_in(self, epoch: int) -> bool:
        return self.within(epoch, self.hp.modulation_starts, self.hp.modulation_ends)

    def after_backward(self, out: ModelOutput, batch: Batch) -> None:
        hp, ctx = self.hp, self.ctx
        if not self.acts_in(ctx.epoch):
            return
        with torch.no_grad():
            # Sums over the batch: over every rank's shard in a data-parallel run (the global batch's).
            scores = ctx.all_sum(
                torch.stack(
                    [
                        torch.softmax(out.unimodal_logits[m], dim=1).gather(1, batch.label[:, None]).sum()
                        for m in self.model.modalities
                    ]
                )
            )
            k = ogm_coefficients(scores, hp.alpha, hp.continuous).tolist()
            for m, coeff in zip(self.model.modalities, k, strict=True):
                for p in self.modulated[m]:
                    if p.grad is None:
                        continue
                    if hp.ge:
                        sigma = p.grad.std() + 1e-8
                        # Drawn where the gradient lives: no host-to-device copy per step.
                        noise = torch.randn(p.grad.shape, generator=ctx.device_generator, device=p.grad.device)
                        p.grad.mul_(coeff).add_(noise * sigma)
                    else:
                        p.grad.mul_(coeff)
                ctx.log(**{f"ogm/k_{m}": coeff})
