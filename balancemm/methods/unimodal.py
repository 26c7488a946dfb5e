"""Unimodal: one modality alone, with the same encoder, head and protocol as the multimodal runs.

The "Unimodal-k" rows of the paper's Table 2 and the "trained alone" bars of its Fig. 2; later also
UMT's teachers. The model is built from the dataset's spec restricted to ``method.modality`` (any of
the M modalities); the fused logits of a one-modality concat model are W h + b.

Deviations from BalanceMM: BalanceMM's ``unimodalTrainer`` needs hand-editing the model config and
crashes at HEAD reading hyper-parameters that no longer exist; here the modality is a validated
hyper-parameter.
"""

from __future__ import annotations

from typing import Any

from balancemm.catalog.methods import UnimodalHParams
from balancemm.errors import ConfigError
from balancemm.methods.base import Method, Needs
from balancemm.models.classifier import ModelSpec
from balancemm.registry import METHODS


@METHODS.register("unimodal")
class Unimodal(Method):
    HParams = UnimodalHParams
    needs = Needs(min_modalities=1)

    def acts_in(self, epoch: int) -> bool:
        return False  # a reference: plain training on one modality

    @classmethod
    def model_spec(cls, spec: ModelSpec, hp: Any) -> ModelSpec:
        if hp.modality not in spec.modalities:
            got = f"got {hp.modality!r}" if hp.modality else "it is not set"
            raise ConfigError(
                f"unimodal needs method.modality, one of {', '.join(spec.modalities)} ({got}); "
                f"e.g. --set method.modality={spec.modalities[0]}"
            )
        return spec.only([hp.modality])
