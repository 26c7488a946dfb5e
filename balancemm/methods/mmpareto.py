"""MMPareto: boosting multimodal learning with innocent unimodal assistance.

Wei and Hu. "MMPareto: Boosting Multimodal Learning with Innocent Unimodal Assistance." ICML 2024.
Official code: GeWu-Lab/MMPareto_ICML2024 (``code/MMPareto.py``, ``code/min_norm_solvers.py``), which
this follows (documented in docs/methods/mmpareto.md).

Idea: train with the fused loss plus one unimodal loss per modality, but never let a unimodal loss
pull an encoder against the multimodal objective: per encoder, if the two gradients conflict, move
along their min-norm (Pareto) combination instead of their sum; then restore (and enlarge) the step
size, since more SGD noise helps generalisation.

Losses (hook ``losses``): L_mm = CE(z, y) and L_m = CE(z_m, y), each on its own head.
Update (hook ``backward``), for every encoder m with g_mm = ∇_θm L_mm and g_u = ∇_θm L_m:

1. direction    if cos(g_mm, g_u) > 0: α = (½, ½); else α₁ = argmin_α ‖α g_mm + (1−α) g_u‖²
                (analytic 2-task min-norm; α₁ = (c−e)/(a+c−2e), clamps 0.999 / 0.001), α₂ = 1 − α₁
                — cos and α on the concatenation of all of encoder m's gradients;
2. candidate    g̃_P = 2(α₁ g_mm,P + α₂ g_u,P) for every parameter tensor P of encoder m;
3. magnitude    g_P = γ · max(1, ‖g_mm,P + g_u,P‖ / ‖g̃_P‖) · g̃_P       (per tensor)
4. heads and every non-encoder parameter keep the plain gradient of L_mm + Σ_m L_m.

Cost: exactly two backward passes per step — one of L_mm and one of Σ_m L_m, which yields every g_u
at once because each L_m reaches only encoder m (and its head). The original runs M + 2.

Three or more modalities: each encoder still sees exactly two objectives, so the rule is unchanged.

Deviations from the paper/official code:
  * Two backward passes (``torch.autograd.grad``) instead of M + 1 retained passes plus a summed one;
    the gradients are identical.
  * The solver sees the concatenated gradient only (the original also adds the per-tensor pieces,
    which doubles every inner product and leaves α unchanged).
  * The original's StepLR is built but never stepped; here the dataset protocol's schedule applies,
    as for every method.
Deviations from BalanceMM (``MMPareto_trainer.py``):
  * BalanceMM accumulates the per-loss gradients without zeroing in between, so its "two" gradients
    are identical, cos is always 1 and the method reduces to 1.5 × the uniform-sum gradient; its
    conflict branch is dead code. We implement the published algorithm and do not offer that variant.
  * BalanceMM slices the shared fusion head for the unimodal logits; the original uses separate
    unimodal heads (``heads=linear``, our default); ``heads=slice`` gives BalanceMM's structure.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from balancemm.catalog.methods import MMParetoHParams
from balancemm.data.batch import Batch
from balancemm.methods._grads import flat, min_norm_two
from balancemm.methods.base import Method
from balancemm.models.classifier import ModelOutput, ModelSpec
from balancemm.registry import METHODS


def pareto_direction(g_mm: Tensor, g_u: Tensor) -> tuple[float, float]:
    """Weights (α₁, α₂) of the multimodal and unimodal gradients of one encoder (flattened)."""
    cos = F.cosine_similarity(g_mm, g_u, dim=0)
    if cos > 0:
        return 0.5, 0.5
    a1 = min_norm_two(g_mm, g_u)
    return a1, 1 - a1


def pareto_combine(g_mm: list[Tensor], g_u: list[Tensor], gamma: float) -> tuple[list[Tensor], tuple[float, float]]:
    """Final per-tensor gradients of one encoder from its multimodal and unimodal gradients."""
    a1, a2 = pareto_direction(flat(g_mm), flat(g_u))
    out = []
    for gm, gu in zip(g_mm, g_u, strict=True):
        cand = 2 * (a1 * gm + a2 * gu)
        norm = cand.norm()
        ratio = (gm + gu).norm() / norm if norm > 0 else torch.ones((), dtype=cand.dtype)
        out.append(gamma * torch.clamp(ratio, min=1.0) * cand)
    return out, (a1, a2)


@METHODS.register("mmpareto")
class MMPareto(Method):
    HParams = MMParetoHParams
    search: ClassVar[Mapping[str, Any]] = {  # γ = 1: no norm enlargement; separate heads or head slices
        "gamma": [1.0, 1.25, 1.5, 2.0, 2.5],
        "heads": ["linear", "slice"],
    }

    @classmethod
    def model_spec(cls, spec: ModelSpec, hp: Any) -> ModelSpec:
        return replace(spec, unimodal_heads=hp.heads)

    def losses(self, out: ModelOutput, batch: Batch) -> dict[str, Tensor]:
        terms = {"fused": F.cross_entropy(out.logits, batch.label)}
        for m in self.model.modalities:
            terms[f"uni_{m}"] = F.cross_entropy(out.unimodal_logits[m], batch.label)
        return terms

    def backward(self, losses: dict[str, Tensor]) -> None:
        modalities = self.model.modalities
        encoder = {m: [p for p in self.model.modality_parameters(m) if p.requires_grad] for m in modalities}
        owned = {id(p) for ps in encoder.values() for p in ps}
        rest = [p for p in self.trainable_parameters() if id(p) not in owned]
        params = [p for m in modalities for p in encoder[m]] + rest
        unimodal = torch.stack([losses[f"uni_{m}"] for m in modalities]).sum()
        g_mm = self.ctx.grad(losses["fused"], params, retain_graph=True, allow_unused=True)
        g_u = self.ctx.grad(unimodal, params, allow_unused=True)
        grads = {id(p): (_dense(a, p), _dense(b, p)) for p, a, b in zip(params, g_mm, g_u, strict=True)}
        for m in modalities:
            combined, (a1, _) = pareto_combine(
                [grads[id(p)][0] for p in encoder[m]], [grads[id(p)][1] for p in encoder[m]], self.hp.gamma
            )
            for p, g in zip(encoder[m], combined, strict=True):
                p.grad = g
            self.ctx.log(**{f"mmpareto/alpha_mm_{m}": a1})
        for p, a, b in zip(params, g_mm, g_u, strict=True):
            if id(p) not in owned and (a is not None or b is not None):
                p.grad = grads[id(p)][0] + grads[id(p)][1]


def _dense(g: Tensor | None, p: Tensor) -> Tensor:
    return torch.zeros_like(p) if g is None else g
