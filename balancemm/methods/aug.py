"""AUG: sustained boosting with adaptive classifier assignment.

Jiang, Huang, Yang. "Rethinking Multimodal Learning from the Perspective of Mitigating Classification Ability
Disproportion." NeurIPS 2025 (oral; arXiv 2502.20120). Original code: njustkmg/NeurIPS25-AUG @ 841d079
(``train_CREMAD.py``, ``model/AudioVideo.py``), and the three-modality script of its history, 966dbf5
``train_NVGesture.py`` (documented in docs/methods/aug.md).

Idea: give every modality a boosted classifier, a base learner plus learners added during training, all
reading the encoder's feature and sharing one output layer; train the modalities in turn, one optimiser
step each per batch; and periodically give a new learner to the modality whose classifier is behind
(adaptive classifier assignment, ACA). Each new learner is fitted to what the ensemble before it gets
wrong, through a residual-weighted cross-entropy. The prediction is a weighted sum of the unimodal
ensembles; there is no joint fusion head.

Model (``model_spec``): the ``boosted`` fusion (``balancemm/models/fusions/boosted.py``): per modality
e_m = fc(ReLU(E_m h_m)), learners a_{m,k} = fc(ReLU(L_{m,k} h_m)), f_m = e_m + Σ_{k≤K_m} a_{m,k},
o_m = f_m − a_{m,K_m}, one fc shared by all, z = Σ_m w_m f_m. ``max_learners`` learners per modality are
preallocated and switched on in order.

Per batch (hatch ``training_step``), every encoder runs once, h_m = φ_m(x_m); then for m in sorted
modality order (audio, visual; ``train_CREMAD.py:49-75``):
    L_m = CE(f_m, y)                                                         K_m = 0
    L_m = CE(f_m, y) + CE(o_m, y) + mean_i (1 − c·sg(p_{o_m}(y_i))) CE_i(a_{m,K}, y)   K_m ≥ 1
    backward; optimiser step (``ctx.optimizer_step``)
f_m is computed after the previous modality's step, so each loss sees the current shared fc. The code
writes the last term as CE(a, y) − c·CE(a, y ⊙ softmax(o)) with one-hot soft targets (``:56-57``), the same
per sample: −p_o(y)·log p_a(y) = p_o(y)·CE(a, y).
Scores (``:82-86``): S_m = Σ over the epoch's rows of p_{f_m}(y), summed over ranks (``ctx.all_sum``).

ACA (``on_epoch_end``), after epoch 0 and after every epoch e with (e + 1) mod P = 0, P = ``check_every``
(the code's int(E/10), at least 1; ``:205-208,220``):
    M = 2: r = S_1/S_2 (audio over visual);  r > λ + δ: a learner for the second (visual),
           r < λ − δ: one for the first (audio)  (``:222-228``, λ = 1, δ = 0.01)
    M ≥ 3: r_m = S_m / Σ_{j≠m} S_j;  a learner for every m with r_m < λ  (966dbf5 ``:144-146,297-305``)
The learner is switched on at the start of the next epoch (``on_epoch_start``): the validation after
epoch e sees the model the code validated at epoch e (it adds the learner after ``val``, ``:214-228``).

Prediction (the fusion's forward, so ``predict`` is the default and the Shapley metric re-runs only the
head): z = μ f_a + (1 − μ) f_v (``:128``, μ = ``--merge_alpha`` 0.4); three modalities 0.33 / 0.33 / 0.34
(966dbf5 ``:225-226``) in sorted modality order.

Original defaults: λ = 1.0 (0.4 for three modalities), μ = 0.4, c = 0.5 (0.2 at 966dbf5), learner width
256, check period E/10; SGD lr 1e-2, momentum 0.9, wd 1e-4, StepLR(70, 0.1), 200 epochs, batch 64 (the
recipe is the protocol's here, as for every method).

Deviations from the paper/official code:
  * Learners are trained (``train_learners=true``), as the paper describes. In the code they never are: the
    optimiser is built once (``train_CREMAD.py:201``) and the learners made later (``AudioVideo.py:67-74``)
    never join it, so their weights stay at their initialisation while gradient still flows through them to
    the encoder and fc. ``train_learners=false`` reproduces that (learner weights ``requires_grad=False``).
  * Learners are preallocated (``max_learners``, default 10 = the most the E/10 period can add) and switched
    on in order; the code appends new layers. Xavier-normal weights and zero biases as the code's.
  * A learner decided after epoch e is switched on at the start of epoch e + 1, so the one decided after the
    last epoch (a useless addition in the code) never is.
  * The check period accepts a share of the run (default ``"10%"``, rounded half up, at least 1) where the
    code floors E/10 (they differ for E = 15, 25, … by one epoch).
  * Three modalities use the history commit's ratio and rule without its weighting network (``w_network``),
    which HEAD removed; λ defaults to 0.8/(M − 1) for M ≥ 3 (0.4 for three, the script's value).
  * Modalities are trained in sorted order (audio, text, visual); the code's order is a, v and r, o, d.
  * Gradients are set to None after each modality's step (torch ≥ 2's ``zero_grad``). Under the README's
    torch 1.11, ``optimizer.zero_grad()`` at ``:62`` zero-fills them, so the audio encoder and embedding take a
    second SGD step (momentum and weight decay) in the video step; ``del p.grad`` (``:87-89``) then clears all
    gradients each batch, so the video side never gets one. That asymmetry is not reproduced.
  * ``val()`` and ``train_audio_video()`` default ``merge_alpha`` to 0.5 but the command line passes 0.4;
    μ = 0.4 is used for both training logs and prediction (training does not depend on it).
Deviations from BalanceMM: BalanceMM (the authors' toolkit) does not implement AUG.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from balancemm.catalog.methods import AUGHParams
from balancemm.data.batch import Batch, SamplePlan
from balancemm.errors import ConfigError
from balancemm.methods.base import Method
from balancemm.models.classifier import ModelOutput, ModelSpec
from balancemm.models.fusions.boosted import BoostedFusion, Ensemble
from balancemm.registry import METHODS

# The three-modality fusion weights of 966dbf5 train_NVGesture.py:225-226 (merge_alpha1, merge_alpha2, rest).
THREE_WEIGHTS = (0.33, 0.33, 0.34)


def fusion_weights(num_modalities: int, mu: float, given: Sequence[float] | None) -> tuple[float, ...]:
    """w_m in sorted modality order: ``given``, else (μ, 1 − μ) for two modalities, 0.33/0.33/0.34 for three,
    1/M beyond."""
    if given is not None:
        if len(given) != num_modalities:
            raise ConfigError(f"method.weights needs one weight per modality ({num_modalities}), got {len(given)}")
        return tuple(float(w) for w in given)
    if num_modalities == 2:
        return (mu, 1.0 - mu)
    if num_modalities == 3:
        return THREE_WEIGHTS
    return (1.0 / num_modalities,) * num_modalities


def threshold(num_modalities: int, lam: float | None) -> float:
    """λ: ``lam``, else 1.0 for two modalities and 0.8/(M − 1) for more (0.4 for three, 966dbf5)."""
    if lam is not None:
        return lam
    return 1.0 if num_modalities == 2 else 0.8 / (num_modalities - 1)


def boosted_loss(parts: Ensemble, label: Tensor, residual: float) -> Tensor:
    """L_m of one modality (scalar).

    Args:
        parts: f_m, o_m and a_{m,K} ``[B, C]`` (the last two None while the modality has no learner).
        label: ``[B]`` class indices.
        residual: c, the weight of the newest learner's residual discount.

    Returns:
        CE(f) while K = 0; else CE(f) + CE(o) + mean_i (1 − c·p_o(y_i)) CE_i(a), p_o without gradient.
    """
    loss = F.cross_entropy(parts.full, label)
    if parts.rest is None or parts.newest is None:
        return loss
    p_rest = parts.rest.detach().float().softmax(1).gather(1, label[:, None]).squeeze(1)
    per_row = F.cross_entropy(parts.newest, label, reduction="none")
    return loss + F.cross_entropy(parts.rest, label) + ((1.0 - residual * p_rest) * per_row).mean()


def assignment(scores: Sequence[float], lam: float, margin: float) -> list[bool]:
    """Which modalities (sorted order) get a new learner from the epoch's score sums S_m.

    Two modalities: r = S_1/S_2; the second if r > λ + δ, the first if r < λ − δ (``train_CREMAD.py:222-228``).
    More: r_m = S_m / Σ_{j≠m} S_j and every m with r_m < λ (966dbf5 ``train_NVGesture.py:297-305``).
    """
    tiny = torch.finfo(torch.float64).tiny
    if len(scores) == 2:
        r = scores[0] / max(scores[1], tiny)
        return [r < lam - margin, r > lam + margin]
    total = sum(scores)
    return [s / max(total - s, tiny) < lam for s in scores]


def is_check_epoch(epoch: int, period: int) -> bool:
    """ACA runs after epoch 0 and after every epoch e with (e + 1) mod period = 0 (``train_CREMAD.py:220``)."""
    return epoch == 0 or (epoch + 1) % period == 0


@METHODS.register("aug")
class AUG(Method):
    HParams = AUGHParams
    # c: HEAD's 0.5, the history's 0.2 and 0 (no residual discount); μ around the command line's 0.4 and the
    # functions' default 0.5. No ``adapted``: the default period, a tenth of the run, already follows its length.
    search: ClassVar[Mapping[str, Any]] = {"residual": [0.0, 0.2, 0.5], "mu": [0.3, 0.4, 0.5]}
    pending: Tensor  # [M] bool: learners decided at the last check, switched on at the next epoch's start

    @classmethod
    def model_spec(cls, spec: ModelSpec, hp: Any) -> ModelSpec:
        options = {
            "hidden": hp.hidden,
            "max_learners": hp.max_learners,
            "weights": fusion_weights(len(spec.modalities), hp.mu, hp.weights),
        }
        return replace(spec, fusion="boosted", fusion_options=options, unimodal_heads="slice")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.model.fusion, BoostedFusion):
            raise ConfigError("aug needs the boosted head its model_spec builds (fusion 'boosted')")
        if not self.hp.train_learners:
            # Code parity: the learners never join the optimiser; they still pass gradient on to h_m.
            for p in self.fusion.learner_parameters():
                p.requires_grad_(False)
        mods = self.model.modalities
        self.register_buffer("pending", torch.zeros(len(mods), dtype=torch.bool))
        self.lam = threshold(len(mods), self.hp.lam)
        self._scores: Tensor | None = None  # [M] float64 S_m of this rank's rows in the current epoch

    @property
    def fusion(self) -> BoostedFusion:
        """The boosted head (a property, so it is not registered twice in the state dict)."""
        return cast(BoostedFusion, self.model.fusion)

    def dormant_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the learners not switched on yet, which training cannot have moved."""
        return self.fusion.dormant_parameters()

    def period(self) -> int:
        return self.epoch_of(self.hp.check_every, ge=1)

    def on_epoch_start(self, epoch: int) -> SamplePlan | None:
        fusion = self.fusion
        for j, m in enumerate(self.model.modalities):
            if bool(self.pending[j]) and not fusion.activate(m):
                self.ctx.log(**{f"aug/full_{m}": 1.0})  # every preallocated learner is already on
        self.pending.fill_(False)
        self._scores = None
        for m in self.model.modalities:
            self.ctx.log(**{f"aug/learners_{m}": float(fusion.num_active(m))})
        return None

    def training_step(self, batch: Batch) -> tuple[ModelOutput, dict[str, Tensor]]:
        ctx, model, fusion = self.ctx, self.model, self.fusion
        with ctx.hook_phase("forward"):
            features = model.apply_mask(model.encode(batch), batch.present, batch.modalities)
        ensembles: dict[str, Tensor] = {}
        losses: dict[str, Tensor] = {}
        scores = []
        for m in model.modalities:
            with ctx.hook_phase("forward"):
                parts = fusion.ensemble(m, features[m])  # after the previous modality's step: the current fc
            with ctx.hook_phase("losses"):
                loss = boosted_loss(parts, batch.label, self.hp.residual)
            ctx.check_finite({f"uni_{m}": loss})
            with ctx.hook_phase("backward"):
                ctx.backward(loss)
            with ctx.hook_phase("optimizer_step"):
                ctx.optimizer_step()
            full = parts.full.detach()
            scores.append(full.float().softmax(1).gather(1, batch.label[:, None]).sum())
            ensembles[m], losses[f"uni_{m}"] = full, loss.detach()
        with torch.no_grad():
            step = torch.stack(scores).double()
            self._scores = step if self._scores is None else self._scores + step
            out = ModelOutput(fusion.combine(ensembles), {m: h.detach() for m, h in features.items()}, ensembles)
        return out, losses

    def on_epoch_end(self, epoch: int) -> None:
        if not is_check_epoch(epoch, self.period()):
            return
        mods = self.model.modalities
        local = self._scores if self._scores is not None else torch.zeros(len(mods), dtype=torch.float64)
        # The whole epoch's sums on every rank, so every rank makes the same assignment.
        scores = self.ctx.all_sum(local.to(self.pending.device)).tolist()
        chosen = assignment(scores, self.lam, self.hp.margin)
        self.pending.copy_(torch.tensor(chosen, dtype=torch.bool))
        for m, s, c in zip(mods, scores, chosen, strict=True):
            self.ctx.log(**{f"aug/score_{m}": s, f"aug/assigned_{m}": float(c)})
