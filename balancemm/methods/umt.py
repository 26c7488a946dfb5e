"""UMT: Uni-Modal Teacher.

Du, Teng, Li, Liu, Yuan, Wang, Yuan, Zhao. "On Uni-Modal Feature Learning in Supervised Multi-Modal
Learning." ICML 2023 (arXiv 2305.01233). No official code was released; this follows the paper, and
docs/methods/umt.md marks the details that could not be verified.

Idea: joint training under-learns each modality's own features. So first train one unimodal model per
modality, freeze them, and while training the multimodal late-fusion model pull each student encoder's
features towards its frozen teacher's (feature-level distillation).

1. teachers   φ^T_m: a ``unimodal`` run per modality with the same protocol and seed (declared as
              ``needs.artifacts = ("unimodal",)``; the trainer trains them before this run, or reuses
              matching finished runs), frozen and kept in eval mode (hook ``on_fit_start``);
2. objective  L = CE(z, y) + λ Σ_m MSE(φ_m(x_m), sg(φ^T_m(x_m)))                     (hook ``losses``)
              with MSE the mean over the B·d_m feature elements.

The teachers' cost is reported separately from the student's own training (``summary.artifacts``,
``flops.artifacts``); their per-step forward passes are part of the student's FLOPs (phase
``umt/teachers``).

Deviations from the paper:
  * λ: the paper tunes it per dataset and its values could not be verified (no code); the default
    10 is BalanceMM's ``scaling``. A reconstruction, stated as such in docs/methods/umt.md.
  * The paper's companion UME (averaging unimodal predictions at test time) is not part of UMT and
    is not implemented here.
Deviations from BalanceMM (``UMT_trainer.py``):
  * Teachers are trained by the toolkit itself with the run's own protocol (BalanceMM loads the
    newest checkpoint of a separate run that must already exist, on two hard-coded GPUs).
  * Teachers are in eval mode with gradients off: BalanceMM leaves them in train mode, so their
    BatchNorm statistics drift during student training.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from balancemm.catalog.methods import UMTHParams
from balancemm.data.batch import Batch
from balancemm.methods.base import Method, Needs
from balancemm.models.classifier import ModelOutput, MultimodalClassifier
from balancemm.registry import METHODS


@METHODS.register("umt")
class UMT(Method):
    HParams = UMTHParams
    search: ClassVar[Mapping[str, Any]] = {  # λ is tuned per dataset in the paper: 0.1 … 100 around 10
        "weight": [0.1, 0.3, 1.0, 3.0, 5.0, 10.0, 20.0, 30.0, 50.0, 100.0],
    }
    needs = Needs(artifacts=("unimodal",))

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # A plain dict, not a ModuleDict: the teachers must stay out of the method's modules so that
        # method.train() never switches them to train mode and checkpoints do not carry them.
        self.teachers: dict[str, MultimodalClassifier] = {}

    def on_fit_start(self) -> None:
        self.teachers = {m: self.ctx.artifact("unimodal", m) for m in self.model.modalities}  # type: ignore[misc]

    def losses(self, out: ModelOutput, batch: Batch) -> dict[str, Tensor]:
        terms = {"ce": F.cross_entropy(out.logits, batch.label)}
        with self.ctx.phase("umt/teachers"), torch.no_grad():
            targets = {m: self.teachers[m].encode(batch)[m] for m in self.model.modalities}
        distill = torch.stack([F.mse_loss(out.features[m], targets[m]) for m in self.model.modalities]).sum()
        terms["distill"] = self.hp.weight * distill
        return terms
