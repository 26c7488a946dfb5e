"""Greedy: balanced multimodal learning with conditional learning speed.

Wu, Jastrzebski, Cho, Geras. "Characterizing and overcoming the greedy nature of learning in
multi-modal deep neural networks." ICML 2022. Official code: nyukat/greedy_multimodal_learning
(``src/balanced_mmtm.py``, ``src/callbacks.py: Bias_Mitigation_Strong``, ``train.py``,
``configs/training_guided.gin``), which this follows (documented in docs/methods/greedy.md).

Idea: a multimodal network learns greedily from the modality that is fastest to learn. Give the
encoders cross-modal MMTM connections, measure each modality's *conditional learning speed* (how fast
its cross-modal parameters learn relative to its own branch), and when the speeds diverge run a few
re-balancing steps in which one modality's cross-modal gate is frozen to its running average, which
cuts its conditional path so its own branch has to learn.

Model (hook ``model_spec``): MMTM blocks after the last k encoder stages
(``balancemm.models.fusions.mmtm``), one linear classifier per branch, z_m = W_m h_m + b_m, and the
prediction z = (1/M) Σ_m z_m (the ``sum`` fusion with ``average=True``; its slices are the z_m).

Loss (hook ``losses``):  L = Σ_m CE(z_m, y)   (the official ``blend_loss``; z itself is not trained on).

Controller (hook ``after_backward``, before the optimiser step), with
bypass_m = m's excitation layers W_m of every block + the shared squeeze layers W_sq, and
main_m = m's encoder + its branch classifier (W_m, b_m):

    μ_b,m = Σ_{p∈bypass_m} ‖∇p‖² / Σ_{p∈bypass_m} ‖p‖²,   μ_main,m likewise over main_m
    M_b,m += μ_b,m,   M_main,m += μ_main,m                 (cumulative sums, never reset)
    BDR_m = log10(M_b,m / M_main,m)
    d = BDR_0 − BDR_1;  if |d| > ε: curation for the next Q steps caring for 0 if d > 0 else 1.

In curation the cared modality's gate in every MMTM block is its running average ḡ_c broadcast over
the batch (hook ``forward``); nothing is accumulated during curation. Before ``starting_epoch`` the
sums are accumulated but curation never starts. The decision of step t applies from step t + 1.

Three or more modalities (our extension, not in the paper or official code): MMTM squeezes all M modalities
and has M excitation layers; the trigger is max_m BDR_m − min_m BDR_m > ε and the cared modality is
argmax_m BDR_m. For M = 2 this is exactly the official rule (|d| = max − min, d > 0 ⇔ argmax = 0).

MMTM details (``balancemm/models/fusions/mmtm.py``): the squeeze averages over every non-channel dim,
including the frames a video encoder folds into the batch; the joint layer has ⌊2Σd/ratio⌋ units, the
official "2" kept as a constant for any M; an absent modality (feature masking, e.g. the Shapley
coalitions) has its squeezed vector zeroed in every block, so it reaches the other modalities nowhere.

Cost: the MMTM layers (small linear layers) in every forward/backward; on non-curation steps two
``torch._foreach_norm`` calls over the tracked parameters and one host sync for the decision. Curation
steps skip the cared modality's excitation backward, so their backward is slightly cheaper. The
Shapley evaluation needs one forward per coalition (2^M), since modalities meet inside the encoders.

Data-parallel runs: the speeds need nothing (the gradients are the global batch's on every rank); the
MMTM running gate averages fold in the gates' mean over the global batch's rows (``ctx.global_mean``).

Deviations from the paper/official code:
  * "main_m" is found by structure (encoder m + its branch classifier), "bypass_m" likewise (the
    blocks' excitation layer m + the shared squeeze layers), not by parameter-name substrings; the
    official name matching (``net_view_m`` / ``mmtm`` + ``visual``/``skeleton``) selects the same sets.
  * The running gate average is updated only by training forward passes. The official code also
    folds in its validation and test passes, which would let evaluation data steer training.
  * Curation applies only to training steps. The official evaluation reuses the controller's
    current mode, so an epoch that ends inside a curation window is validated and tested curated.
  * The running average of modality 1 is modality 1's own gate (official bug: it is updated with
    modality 0's gate and sized d_0).
  * ``starting_epoch`` counts epochs from 0: the official ``starting_epoch=2`` counts from 1 (its
    loop runs epochs 1, 2, …), i.e. one warm-up epoch, which is 1 here.
  * Cumulative sums are clamped at the smallest positive double before the log, so an all-zero
    gradient gives BDR 0 instead of NaN; the official code would produce NaN/inf there.
  * One host sync per non-curation step (``torch._foreach_norm`` and group sums on the device) instead
    of two ``.item()`` per parameter.
  * M ≥ 3 as above (no official version).
Deviations from BalanceMM (``Greedy_trainer.py``, ``avclassify_model.py``), available as settings where
they matter:
  * BalanceMM puts MMTM after all four ResNet stages (``mmtm_stages=4``), uses ε = 0.001
    (``epsilon``) and no warm-up (``starting_epoch=0``).
  * BalanceMM trains one concat head with CE on the fused output (its main_m is then the encoder
    alone); we keep the official per-branch classifiers, blend loss and main_m = encoder + classifier.
  * BalanceMM's MMTM resets its running average on every call (a KeyError at HEAD) and hard-codes
    the batch size 64 when unfolding video frames; neither is reproduced.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from balancemm.catalog.methods import GreedyHParams
from balancemm.data.batch import Batch
from balancemm.errors import ConfigError
from balancemm.methods.base import Method
from balancemm.models.classifier import ModelOutput, ModelSpec
from balancemm.models.fusions.mmtm import MidFusionSpec
from balancemm.models.fusions.sum import SumFusion
from balancemm.registry import METHODS


def balance_direction(bypass: Tensor, main: Tensor) -> Tensor:
    """BDR_m = log10(M_b,m / M_main,m) ``[M]`` from the cumulative speeds ``[M]`` (clamped above 0)."""
    tiny = torch.finfo(bypass.dtype).tiny
    return torch.log10(bypass.clamp(min=tiny) / main.clamp(min=tiny))


@METHODS.register("greedy")
class Greedy(Method):
    HParams = GreedyHParams
    search: ClassVar[Mapping[str, Any]] = {  # ε from BalanceMM's 0.001 past the official 0.01; Q around 5
        "epsilon": [0.001, 0.003, 0.01, 0.03, 0.1],
        "window": [3, 5, 10],
    }
    speed_bypass: Tensor  # [M] cumulative M_b,m (a buffer, so checkpoints and resume carry it)
    speed_main: Tensor  # [M] cumulative M_main,m
    mode: Tensor  # [2] long: curation steps left, cared modality (mirrors curation_left, caring)
    groups: Tensor  # [2M, P] membership of the tracked parameters: bypass_0..M−1, then main_0..M−1

    @classmethod
    def model_spec(cls, spec: ModelSpec, hp: Any) -> ModelSpec:
        # Per-branch classifiers whose average is the prediction: the sum fusion's slices.
        return replace(
            spec,
            fusion="sum",
            fusion_options={"average": True},
            unimodal_heads="slice",
            mid_fusion=MidFusionSpec(hp.mmtm_stages, hp.ratio),
        )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        model = self.model
        if model.mid_fusion is None or not isinstance(model.fusion, SumFusion) or model.unimodal_heads is not None:
            raise ConfigError("greedy needs the model its model_spec builds: MMTM mid-fusion and sum-fusion heads")
        mid, fusion = model.mid_fusion, model.fusion
        shared = list(mid.joint_parameters())
        num = len(model.modalities)
        bypass = [[*shared, *mid.excitation_parameters(m)] for m in model.modalities]
        main = [[*model.modality_parameters(m), *fusion.modality_head_parameters(m)] for m in model.modalities]
        tracked: dict[int, Tensor] = {}
        for group in (*bypass, *main):
            tracked.update((id(p), p) for p in group if p.requires_grad)
        self.tracked = list(tracked.values())
        column = {key: j for j, key in enumerate(tracked)}
        groups = torch.zeros(len(bypass) + len(main), len(self.tracked), dtype=torch.float64)
        for row, group in enumerate((*bypass, *main)):
            groups[row, [column[id(p)] for p in group if p.requires_grad]] = 1.0
        self.register_buffer("groups", groups, persistent=False)
        self.register_buffer("speed_bypass", torch.zeros(num, dtype=torch.float64))
        self.register_buffer("speed_main", torch.zeros(num, dtype=torch.float64))
        # Controller mode: Python ints so that forward never syncs, mirrored in the ``mode`` buffer
        # [curation steps left, cared modality] for checkpoints, and read back from it after a load.
        self.register_buffer("mode", torch.zeros(2, dtype=torch.long))
        self.curation_left = 0
        self.caring = 0
        self.register_load_state_dict_post_hook(lambda module, keys: module._read_mode())

    def _read_mode(self) -> None:
        self.curation_left, self.caring = (int(v) for v in self.mode.tolist())

    def set_mode(self, curation_left: int, caring: int) -> None:
        """Enter (or leave, with 0 steps) curation of modality index ``caring`` for ``curation_left`` steps."""
        self.curation_left, self.caring = curation_left, caring
        self.mode[0].fill_(curation_left)  # fill_ with a Python scalar: no host sync
        self.mode[1].fill_(caring)

    # -- hooks -----------------------------------------------------------------------------------

    def forward(self, batch: Batch) -> ModelOutput:
        assert self.model.mid_fusion is not None  # checked in __init__
        mid = self.model.mid_fusion
        # The running gate averages fold in the mean gates of the global batch (of the batch on one process).
        with mid.curating(self.caring if self.curation_left > 0 else None), mid.averaging(self.ctx.global_mean):
            return self.model(batch)

    def losses(self, out: ModelOutput, batch: Batch) -> dict[str, Tensor]:
        return {f"ce_{m}": F.cross_entropy(z, batch.label) for m, z in out.unimodal_logits.items()}

    def after_backward(self, out: ModelOutput, batch: Batch) -> None:
        if self.curation_left > 0:
            self.set_mode(self.curation_left - 1, self.caring)
            self.ctx.log(**{"greedy/curation": 1.0})
            return
        with torch.no_grad():
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.tracked]
            grad_sq = torch.stack(torch._foreach_norm(grads)).double().square()
            weight_sq = torch.stack(torch._foreach_norm(self.tracked)).double().square()
            speed = (self.groups @ grad_sq) / (self.groups @ weight_sq)  # [2M]: μ_b, then μ_main
            num = len(self.model.modalities)
            self.record(speed[:num], speed[num:])
        self.ctx.log(**{"greedy/curation": 0.0})

    # -- the controller --------------------------------------------------------------------------

    def acts_in(self, epoch: int) -> bool:
        # MMTM changes the model in every epoch, but the method's own rule (curation) may start only here.
        return self.within(epoch, self.hp.starting_epoch)

    def record(self, bypass: Tensor, main: Tensor) -> None:
        """Add one step's speeds μ_b, μ_main ``[M]`` to the sums and start curation if they diverge."""
        self.speed_bypass += bypass
        self.speed_main += main
        bdr = balance_direction(self.speed_bypass, self.speed_main)
        *values, gap, top = torch.cat([bdr, (bdr.max() - bdr.min())[None], bdr.argmax()[None]]).tolist()  # one sync
        self.ctx.log(**{f"greedy/bdr_{m}": v for m, v in zip(self.model.modalities, values, strict=True)})
        self.ctx.log(**{"greedy/bdr_gap": gap})
        if self.acts_in(self.ctx.epoch) and gap > self.hp.epsilon:
            self.set_mode(self.hp.window, int(top))
