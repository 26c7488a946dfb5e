"""G²D: Gradient-Guided Distillation.

Rakib, Bagavathi. "G²D: Boosting Multimodal Learning with Gradient-Guided Distillation." ICCV 2025
(arXiv 2506.21514). Official code: rAIson-Lab/G2D @ 95969d8 (``student.py``, ``utils/utils.py``,
``config.py``), which this follows (documented in docs/methods/g2d.md).

Idea: frozen unimodal teachers, each trained alone on its modality, distil into the multimodal student:
their logits into the student's fused logits, their features into the student's encoders. On top of
that, Sequential Modality Prioritization (SMP) switches off the encoder gradient of the modality whose
teacher is more confident on the batch, so the weaker modality leads while the window lasts.

1. teachers   one ``unimodal`` run per modality with the same protocol and seed (``needs.artifacts =
              ("unimodal",)``, shared with UMT), loaded once, frozen, in eval mode (hook ``on_fit_start``);
2. student    late fusion: z = (1/M) Σ_m z_m, z_m = W_m h_m + b_m (sum fusion with ``average=True``;
              hook ``model_spec``); teachers give (h^T_m, t_m) without gradients (hook ``forward``,
              phase ``g2d/teachers``);
3. objective  L = w_ce CE(z, y)
                  + Σ_m [ w_kd T² KL(softmax(t_m/T) ‖ softmax(z/T))  +  w_feat MSE(h_m, h^T_m) ]
              KL averaged over the batch (``batchmean``), MSE over the B·d_m elements; every teacher
              distils into the *fused* logits (hook ``losses``: terms ``ce``, ``kd_<m>``, ``feat_<m>``);
4. SMP        after the backward (hook ``after_backward``), within ``modulation_starts ≤ epoch ≤
              modulation_ends``: s^T_m = Σ_i softmax(t_m)_i[y_i] over the batch; the gated gradients of
              every encoder except the weakest teacher's (argmin s^T) are multiplied by 0. The weights are
              not frozen: momentum and weight decay still move them.

Three or more modalities (ours): the loss sums over the M teachers; SMP keeps only argmin s^T
(``smp=keep_weakest``) or zeroes only argmax s^T (``smp=zero_strongest``); both are the code's rule for
M = 2. When the selected extreme is shared by two modalities (a tie), nothing is gated.

Original defaults (``config.py``): w_ce = w_kd = w_feat = 1 (``:108,118-119,136-137``), T = 1
(``:120,138``), SMP in epochs 0–150 of 300 (``:50-51``), SGD lr 1e-3, momentum 0.9, wd 1e-4, StepLR(200,
0.1), batch 16 (``:36-43``), late fusion (``:73``).

Deviations from the paper / official code:
  * The paper's summary describes SMP as guided by unimodal confidence scores; the code uses the frozen
    teachers' scores (``utils/utils.py:243-267``), as done here. The student's own unimodal scores are
    only written to a CSV there; here the student's unimodal CEs are logged (``g2d/ce_<m>``).
  * Gated tensors: ``gate_params=conv`` (default) gates every convolution kernel of an encoder, by module
    type; the code gates encoder parameters with ``ndim == 4`` (``utils.py:280-284``), which
    ``gate_params=conv4d`` reproduces. Both pick the same tensors on 2-D CNNs such as the original's
    ResNet-18s; on 1-D convolutions (the embedded datasets' audio and text encoders) ``conv4d`` gates
    nothing, so SMP could never hold back those modalities. ``gate_params=all`` gates every encoder
    parameter (the choice for transformer encoders, where neither conv rule finds a kernel to gate).
  * An exact tie of the teacher scores raises ``ValueError`` in the code (``utils.py:266-267``); here
    it gates nothing.
  * The code rebuilds and reloads both teachers from disk every epoch (``student.py:24-60``); here they
    are loaded once.
  * Teachers are selected on validation accuracy (the code's checkpoints were chosen on the test set,
    ``config.py:112,130``), and trained with the protocol, like the student.
  * One weight and temperature for every teacher (the code has one per modality, all equal to 1).
  * No per-step CSV (``utils.py:271-272``); the unused ``alpha`` (``config.py:49``) is not offered.
Deviations from BalanceMM: the authors' BalanceMM toolkit has no G²D; there is nothing to deviate from.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from balancemm.catalog.methods import G2DHParams
from balancemm.data.batch import Batch
from balancemm.errors import ConfigError
from balancemm.methods._grads import conv_weights
from balancemm.methods.base import Method, Needs
from balancemm.models.classifier import ModelOutput, ModelSpec, MultimodalClassifier
from balancemm.registry import METHODS


def distillation_loss(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """T² KL(softmax(t/T) ‖ softmax(z/T)) averaged over the batch, from logits ``[B, C]`` each."""
    log_p = F.log_softmax(student.float() / temperature, dim=1)
    log_q = F.log_softmax(teacher.float() / temperature, dim=1)
    return temperature**2 * F.kl_div(log_p, log_q, reduction="batchmean", log_target=True)


def teacher_scores(logits: Mapping[str, Tensor], label: Tensor) -> Tensor:
    """s^T ``[M]``: Σ_i softmax(t_m)_i[y_i] over the batch, per modality in the mapping's order."""
    return torch.stack([torch.softmax(t.float(), dim=1).gather(1, label[:, None]).sum() for t in logits.values()])


def smp_gate(scores: Tensor, rule: str = "keep_weakest") -> Tensor:
    """Gradient multipliers c ``[M]`` (1 or 0) from the teacher scores s^T ``[M]``.

    ``keep_weakest``: c = 1 only at argmin s^T; ``zero_strongest``: c = 0 only at argmax s^T (the same for
    M = 2). When the extreme is shared (a tie), every c is 1. Tensor operations only: no host sync.
    """
    ones = torch.ones_like(scores)
    if rule == "keep_weakest":
        chosen = scores == scores.min()
        gate = chosen.to(scores.dtype)
    elif rule == "zero_strongest":
        chosen = scores == scores.max()
        gate = 1 - chosen.to(scores.dtype)
    else:
        raise ValueError(f"unknown SMP rule {rule!r}")
    return torch.where(chosen.sum() == 1, gate, ones)


def gated_parameters(encoder: nn.Module, scope: str) -> list[Tensor]:
    """The tensors of one encoder that SMP gates: conv kernels (``conv``), ``ndim == 4`` (``conv4d``) or all."""
    if scope == "conv":
        return conv_weights(encoder)
    if scope == "conv4d":
        return [p for p in encoder.parameters() if p.dim() == 4]
    return list(encoder.parameters())


@METHODS.register("g2d")
class G2D(Method):
    HParams = G2DHParams
    needs = Needs(artifacts=("unimodal",))
    adapted: ClassVar[Mapping[str, Any]] = {"modulation_ends": "50%"}  # official: epochs 0–150 of 300
    search: ClassVar[Mapping[str, Any]] = {  # the code's experiment switches (config.py:12-25)
        "kd_weight": [0.0, 1.0],  # 'aTF+vTF-to-mS' (features only) | 'aT+aTF+vT+vTF-to-mS'
        "smp": ["keep_weakest", "none"],  # modulation 'G2D' | 'Normal'
        "temperature": [1.0, 2.0, 4.0],  # the code's temp_audio / temp_video (1), and the usual KD range
    }

    @classmethod
    def model_spec(cls, spec: ModelSpec, hp: Any) -> ModelSpec:
        # PAPER: late fusion, one linear head per modality and the fused logits their mean (config.py:73).
        return replace(spec, fusion="sum", fusion_options={"average": True}, unimodal_heads="slice")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # A plain dict, not a ModuleDict: the teachers stay out of the method's modules, so method.train()
        # never switches them to train mode and checkpoints do not carry them.
        self.teachers: dict[str, MultimodalClassifier] = {}
        self.teacher_out: dict[str, ModelOutput] = {}  # this step's teacher outputs (forward → losses, SMP)
        self.gated = {m: gated_parameters(self.model.encoders[m], self.hp.gate_params) for m in self.model.modalities}
        if self.hp.smp != "none" and not any(self.gated.values()):
            raise ConfigError(
                f"g2d gate_params={self.hp.gate_params} finds no tensor to gate in any encoder, so SMP would never "
                "act: use method.gate_params=all (or conv for 1-D convolutions)"
            )

    def on_fit_start(self) -> None:
        self.teachers = {m: self.ctx.artifact("unimodal", m) for m in self.model.modalities}  # type: ignore[misc]

    def forward(self, batch: Batch) -> ModelOutput:
        out = self.model(batch)
        with self.ctx.phase("g2d/teachers"):
            self.teacher_out = {}
            for m, teacher in self.teachers.items():
                with self.ctx.eval_mode(teacher):
                    self.teacher_out[m] = teacher(batch)
        return out

    def losses(self, out: ModelOutput, batch: Batch) -> dict[str, Tensor]:
        hp, mods = self.hp, self.model.modalities
        terms = {"ce": hp.ce_weight * F.cross_entropy(out.logits, batch.label)}
        for m in mods:
            terms[f"kd_{m}"] = hp.kd_weight * distillation_loss(out.logits, self.teacher_out[m].logits, hp.temperature)
        for m in mods:
            student, teacher = out.features[m].float(), self.teacher_out[m].features[m].float()
            terms[f"feat_{m}"] = hp.feat_weight * F.mse_loss(student, teacher)
        return terms

    def acts_in(self, epoch: int) -> bool:
        return True  # the distillation acts in every epoch; SMP only within its window

    def smp_acts_in(self, epoch: int) -> bool:
        """Whether SMP gates gradients in ``epoch`` (0-based)."""
        return self.hp.smp != "none" and self.within(epoch, self.hp.modulation_starts, self.hp.modulation_ends)

    def after_backward(self, out: ModelOutput, batch: Batch) -> None:
        ctx, mods = self.ctx, self.model.modalities
        with torch.no_grad():
            unimodal_ce = torch.stack([F.cross_entropy(out.unimodal_logits[m].float(), batch.label) for m in mods])
            if not self.smp_acts_in(ctx.epoch):
                for m, value in zip(mods, unimodal_ce.tolist(), strict=True):
                    ctx.log(**{f"g2d/ce_{m}": value})
                return
            # Sums over the batch: over every rank's shard in a data-parallel run (the global batch's).
            scores = ctx.all_sum(teacher_scores({m: self.teacher_out[m].logits for m in mods}, batch.label))
            gate = smp_gate(scores, self.hp.smp)
            for i, m in enumerate(mods):
                for p in self.gated[m]:
                    if p.grad is not None:
                        p.grad.mul_(gate[i].to(p.grad.dtype))  # × 0, as the code: momentum and decay still move p
        values = torch.cat([unimodal_ce, scores, gate]).tolist()  # one read back to the host for the logs
        n = len(mods)
        for i, m in enumerate(mods):
            ctx.log(**{f"g2d/ce_{m}": values[i], f"g2d/score_{m}": values[n + i], f"g2d/gate_{m}": values[2 * n + i]})
