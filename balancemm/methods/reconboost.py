"""ReconBoost: modality reconcilement by alternating boosting.

Hua, Xu, Bao, Yang, Huang. "ReconBoost: Boosting Can Achieve Modality Reconcilement." ICML 2024.
Official code: huacong/ReconBoost @ 14ab57ac26 (``train.py``, ``models/dynamic_net.py``), which this follows.

Idea: train the modalities in turn, like gradient boosting. Each modality's learner is
f_m(x_m) = H(φ_m(x_m)) with one head H shared by all learners; the ensemble is F = β_b·Σ_m f_m with a
learnable boost rate β_b, and keeps only the latest learner of each modality. The current learner is
trained on a cross-entropy that down-weights the samples the other modalities' ensemble already gets
right; after each such stage a "global rectification" fine-tunes everything jointly.

One protocol epoch is one stage s (the method owns the epoch, ``train_epoch``), picking modality
m = modalities[s mod |M|] round robin:

1. Boosting (phase ``reconboost/boost``), ``epochs_per_stage`` passes over the training split with a
   fresh optimiser (the protocol's recipe at its current learning rate) over φ_m and H:
       P_i = softmax(F_{−m}(x_i)),   F_{−m} = β_b·Σ_{j ∈ E, j ≠ m} f_j   (no gradient, train mode)
       ℓ = (1/B) Σ_i (w1 − w2·P_i(y_i))/C · CE(f_m(x_i), y_i)
   plus the official "GA" term α·MSE(sg softmax(f_m), sg softmax(f_{m'})) with m' the previous stage's
   modality, for s > 0. Both arguments are detached in the official code, so it adds no gradient; it is
   computed and logged as there (``ga_weight=0`` skips it).
2. f_m joins the ensemble E, replacing its earlier self (E holds at most one learner per modality).
3. Rectification (phase ``reconboost/rectify``), ``correct_epoch`` passes with a fresh optimiser over
   every learner's encoder, H and β_b, on CE(F, y).

Prediction is F = β_b·Σ_{m ∈ E} f_m over the learners whose modality is present.

Pre-trained learners (``pretrained``, the official README's ``--use_pretrain``) enter E before stage 0
with the encoders of the toolkit's ``unimodal`` runs. Until its own first stage such a learner predicts
through its unimodal run's classifier, frozen (``pretrained_head=own``, the official behaviour): the
official code loads whole unimodal models, ``fc`` included (``train.py`` 103–107, 243–246), swaps the
shared head into a learner only when that learner's stage begins (``model.fc = net_ensemble.head``,
``train.py`` 287–288), and its rectification optimiser skips every parameter named ``fc``
(``models/dynamic_net.py`` 64), so at stage 0 the other learner's F_{−m} term, its rectification term and
the stage-0 evaluation all use its own pre-trained ``fc``, which no optimiser updates.

Deviations from the paper/official code:
  * When E holds no other learner (stage 0 without pre-training) the official F_{−m} is a random
    constant c0 whose softmax over a single column is 1, so P_i(y_i) = 1; we use 1 directly.
  * The GA partner's logits are taken from the F_{−m} pass (``partner_pass=reuse``, the default). The
    official code runs the partner a second time, in train mode, after the current learner
    (``train.py`` 348, all learners put in train mode at 298): the logits are the same (BatchNorm
    normalises with batch statistics in train mode, and nothing has stepped in between), but each
    BatchNorm of the partner updates its running mean and variance twice per step with the same batch,
    so they forget earlier batches at rate (1 − momentum)² per step instead of (1 − momentum), and
    ``num_batches_tracked`` counts two per step. An encoder with dropout would also draw a second mask
    (a different GA value, no gradient either way). ``partner_pass=again`` reproduces the second pass
    (with ``ga_weight=0`` neither setting runs it; the official code still does with ``--alpha 0``).
  * Stage learning rates follow the protocol's schedule (``ctx.lr``), and the optimiser is the
    protocol's (the official code: SGD, lr 0.01, momentum 0.9, weight decay 5e-4, ×0.1 every 30 stages).
  * Pre-trained learners are the toolkit's ``unimodal`` runs with the same protocol and seed, declared
    as artifacts and counted apart from this run's FLOPs. Their "own classifier" is the unimodal run's
    fusion head on its single modality (a Linear for the protocols' concatenation fusion, as the
    official ``fc``). ``pretrained_head=shared`` instead uses H for every learner from the start.
  * The user's ``model.fusion`` is replaced by the shared head (``fusion=shared``): ReconBoost has no
    fusion module.
Deviations from BalanceMM (``ReconBoost_trainer.py``):
  * official defaults: 4 + 4 epochs per stage (BalanceMM 1 + 1), boost rate 1.0 (BalanceMM 0.01, which
    makes P nearly uniform), the MLP head 256 (BalanceMM a single Linear, ``head_hidden=0``), pre-trained
    learners (BalanceMM none, ``pretrained=false``);
  * fresh optimisers per stage (BalanceMM: one persistent AdamW for everything);
  * the ensemble starts empty or pre-trained; BalanceMM's F_{−m} at stage 0 comes from untrained learners;
  * BalanceMM, too, runs the GA partner a second time in train mode (``ReconBoost_trainer.py`` 343);
    here that is ``partner_pass=again``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from balancemm.catalog.methods import ReconBoostHParams
from balancemm.data.batch import Batch
from balancemm.methods.base import Method, Needs
from balancemm.models.classifier import ModelOutput, ModelSpec, MultimodalClassifier
from balancemm.registry import METHODS


def boosting_loss(logits: Tensor, label: Tensor, p_true: Tensor, w1: float, w2: float) -> Tensor:
    """Mean over the batch of (w1 − w2·P_i(y_i))/C · CE(z_i, y_i); ``logits [B, C]``, ``p_true [B]``."""
    weights = (w1 - w2 * p_true) / logits.shape[1]
    return (weights * F.cross_entropy(logits, label, reduction="none")).mean()


def ga_term(logits: Tensor, partner: Tensor, weight: float) -> Tensor:
    """The official GA term α·MSE(sg softmax(z), sg softmax(z')): a number to log, with no gradient."""
    return weight * F.mse_loss(logits.detach().softmax(1), partner.detach().softmax(1))


@METHODS.register("reconboost")
class ReconBoost(Method):
    HParams = ReconBoostHParams
    search: ClassVar[Mapping[str, Any]] = {  # w1: README CREMA-D 5, AVE 4; w2 around its 1
        "w1": [3.0, 4.0, 5.0, 6.0],
        "w2": [0.5, 1.0, 2.0],
    }
    members: Tensor  # [M] bool: which modalities' learners are in the ensemble
    own_head: Tensor  # [M] bool: which learners still predict through their unimodal run's classifier

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.boost_rate = nn.Parameter(torch.tensor(float(self.hp.boost_rate)))
        self.register_buffer("members", torch.zeros(len(self.model.modalities), dtype=torch.bool))
        self.register_buffer("own_head", torch.zeros(len(self.model.modalities), dtype=torch.bool))
        # A plain dict, not a ModuleDict: the frozen unimodal runs stay out of the method's parameters
        # and checkpoints; the trainer serves them again before a resumed run loads its state.
        self.teachers: dict[str, MultimodalClassifier] = {}

    @classmethod
    def needs_for(cls, hp: Any) -> Needs:
        return Needs(artifacts=("unimodal",)) if hp.pretrained else Needs()

    @classmethod
    def model_spec(cls, spec: ModelSpec, hp: Any) -> ModelSpec:
        return replace(spec, fusion="shared", fusion_options={"hidden": hp.head_hidden}, unimodal_heads="slice")

    def on_fit_start(self) -> None:
        if not self.hp.pretrained:
            return
        for m in self.model.modalities:
            teacher = cast(MultimodalClassifier, self.ctx.artifact("unimodal", m))
            self.model.encoders[m].load_state_dict(teacher.encoders[m].state_dict())
            self.teachers[m] = teacher
        self.members.fill_(True)
        self.own_head.fill_(self.hp.pretrained_head == "own")

    # -- the learners ------------------------------------------------------------------------------

    def learners(self, batch: Batch, modalities: Iterable[str]) -> dict[str, Tensor]:
        """f_j(x_j) ``{j: [B, C]}`` for the given modalities."""
        return self._heads(self.model.encode(batch, only=modalities))

    def _heads(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        """``{j: [B, C]}`` from features ``{j: [B, d]}``: H(h_j), or the unimodal run's classifier for a
        pre-trained learner whose first stage has not begun."""
        own = {m for m, k in zip(self.model.modalities, self.own_head.tolist(), strict=True) if k}
        shared = self.model.unimodal({m: h for m, h in features.items() if m not in own})
        return {m: self.teachers[m].fuse({m: h}) if m in own else shared[m] for m, h in features.items()}

    def _in_ensemble(self, exclude: str | None = None) -> list[str]:
        keep = self.members.tolist()
        return [m for m, k in zip(self.model.modalities, keep, strict=True) if k and m != exclude]

    # -- one stage per epoch -------------------------------------------------------------------------

    def train_epoch(self, epoch: int, batches: Iterable[Batch]) -> None:
        mods = self.model.modalities
        current = mods[epoch % len(mods)]
        partner = mods[(epoch - 1) % len(mods)] if epoch > 0 and self.hp.ga_weight > 0 else None
        # Officially H is swapped into a learner when its stage begins (train.py 287–288), not before.
        self.own_head[mods.index(current)] = False
        with self.ctx.phase("reconboost/boost"):
            self._boost(current, partner, batches)
        self.members[mods.index(current)] = True
        with self.ctx.phase("reconboost/rectify"):
            self._rectify()
        self.ctx.log(**{"reconboost/boost_rate": self.boost_rate.detach()})

    def _passes(self, count: int, first: Iterable[Batch] | None = None) -> Iterable[Batch]:
        for i in range(count):
            yield from first if i == 0 and first is not None else self.ctx.batches("train", shuffle=True)

    def _boost(self, current: str, partner: str | None, batches: Iterable[Batch]) -> None:
        ctx, hp, model = self.ctx, self.hp, self.model
        others = self._in_ensemble(exclude=current)
        params = [*model.modality_parameters(current), *model.head_parameters()]
        optimizer = ctx.new_optimizer(params, lr=ctx.lr)
        for batch in self._passes(hp.epochs_per_stage, batches):
            with ctx.counted_step(len(batch)):
                # In train mode, as the official ensemble pass: BatchNorm normalises with the batch's
                # statistics and updates its running ones.
                with torch.no_grad():
                    fixed = self.learners(batch, others)
                    if others:
                        ensemble = self.boost_rate * torch.stack([fixed[j] for j in others]).sum(0)
                        p_true = ensemble.softmax(1).gather(1, batch.label[:, None]).squeeze(1)
                    else:
                        p_true = torch.ones(len(batch), device=batch.label.device)
                logits = self.learners(batch, [current])[current]
                terms = {"boost": boosting_loss(logits, batch.label, p_true, hp.w1, hp.w2)}
                if partner is not None:
                    if hp.partner_pass == "again" or partner not in fixed:
                        with torch.no_grad():  # train mode on purpose: the official second pass
                            fixed[partner] = self.learners(batch, [partner])[partner]
                    terms["ga"] = ga_term(logits, fixed[partner], hp.ga_weight)
                ctx.check_finite(terms)
                ctx.backward(terms["boost"])  # the GA term has no gradient (both sides detached)
                ctx.optimizer_step(optimizer)

    def _rectify(self) -> None:
        ctx, model = self.ctx, self.model
        members = self._in_ensemble()
        params = [*(p for m in members for p in model.modality_parameters(m)), *model.head_parameters()]
        optimizer = ctx.new_optimizer([*params, self.boost_rate], lr=ctx.lr)
        for batch in self._passes(self.hp.correct_epoch):
            with ctx.counted_step(len(batch)):
                parts = self.learners(batch, members)
                logits = self.boost_rate * torch.stack([parts[m] for m in members]).sum(0)
                terms = {"ce": F.cross_entropy(logits, batch.label)}
                ctx.check_finite(terms)
                ctx.backward(terms["ce"])
                ctx.optimizer_step(optimizer)
            ctx.log(train_accuracy=(logits.argmax(1) == batch.label).float().mean())

    def predict(self, batch: Batch) -> ModelOutput:
        model = self.model
        features = model.apply_mask(model.encode(batch), batch.present, batch.modalities)
        parts = self._heads(features)
        # Only learners in the ensemble and modalities present in the sample vote.
        weight = batch.present.to(self.boost_rate.dtype) * self.members.to(self.boost_rate.dtype)
        votes = torch.stack([weight[:, i, None] * parts[m] for i, m in enumerate(model.modalities)])
        return ModelOutput(self.boost_rate * votes.sum(0), features, parts)
