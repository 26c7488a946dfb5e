"""MMCosine: multi-modal cosine loss.

Xu, Feng, Zhang, Hu. "MMCosine: Multi-Modal Cosine Loss Towards Balanced Audio-Visual Fine-Grained
Learning." ICASSP 2023. Official code: GeWu-Lab/MMCosine_ICASSP23 (``main_CD.py: train_epoch, valid``),
which this follows (documented in docs/methods/mmcosine.md).

Idea: a linear fusion head lets the dominant modality win by growing its feature and weight norms.
Replacing every modality's logits by a scaled cosine between its (normalised) feature and its own
(normalised) slice of the class weights removes the norms from the game, so each modality's logits
live in the same range [−s, s] and contribute on an equal footing.

Model (hook ``model_spec``: the fusion becomes ``cosine``, :class:`~balancemm.models.fusions.cosine.CosineFusion`),
with W_m^(c) row c of modality m's column block of the fusion weight:

    z_m,c = s · ⟨h_m, W_m^(c)⟩ / (‖h_m‖ ‖W_m^(c)‖),        z = Σ_m z_m,        L = CE(z, y)

The loss is the default fused CE; evaluation, per-modality accuracies (the z_m slices) and the
Shapley metric all use the cosine logits. Three or more modalities: M column blocks, M cosine terms,
|z_c| ≤ M·s.

Deviations from the paper/official code:
  * The supervised cross-modal contrastive term L_NCE (``--lam``, default 0, supplementary material
    only) is not implemented; it is off in the original and defined for two modalities of equal size.
  * The original's ``fc_out`` bias exists but is never used; here the cosine head has no bias at all
    (same function, no parameter that never receives a gradient).
  * The original scores the *multimodal* validation accuracy with the raw linear output (bias
    included), not with the cosine sum it trains on; we evaluate the cosine sum, so what
    is scored is what is trained (BalanceMM's choice too).
  * Fusion: the original applies the cosine to the raw encoder features for concat fusion and to
    post-fusion per-modality vectors for its own symmetric gated/FiLM variants. BalanceMM's gated and
    FiLM fusions (the non-symmetric OGM-GE modules) have no per-modality post-fusion vectors, so only
    the late linear fusions (``concat``, ``sum``, or ``cosine`` itself) are accepted and replaced by
    the cosine head over raw features; ``gated``/``film`` are refused with a ConfigError.
Deviations from BalanceMM (``MMCosine_trainer.py``):
  * s = 10 (original) instead of BalanceMM's 15 (``scale=15`` reproduces it).
  * BalanceMM falls back to plain linear CE outside its modulation window (0..80, i.e. never with
    30 epochs); there is no window here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any, ClassVar

from balancemm.catalog.methods import MMCosineHParams
from balancemm.methods.base import Method, Needs
from balancemm.models.classifier import ModelSpec, require_slice_heads
from balancemm.registry import METHODS


@METHODS.register("mmcosine")
class MMCosine(Method):
    HParams = MMCosineHParams
    search: ClassVar[Mapping[str, Any]] = {  # around the original 10 and BalanceMM's 15
        "scale": [2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 15.0, 20.0, 30.0, 50.0],
    }
    needs = Needs(min_modalities=2)

    @classmethod
    def model_spec(cls, spec: ModelSpec, hp: Any) -> ModelSpec:
        # Late linear fusions: their logits are Σ_m W_m h_m (+ bias) over raw features, the form the cosine
        # head normalises. Gated/FiLM mix modalities before the head, so there is no per-modality W_m h_m.
        why = "replaces a late linear fusion head by per-modality cosines, which are also its per-modality logits"
        require_slice_heads(spec, "mmcosine", why, ("concat", "sum"), own="cosine")
        # PAPER: per-modality logits are the cosine terms themselves (the original's unimodal accuracies).
        return replace(spec, fusion="cosine", unimodal_heads="slice", fusion_options={"scale": hp.scale})
