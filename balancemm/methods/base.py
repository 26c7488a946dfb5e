"""The Method contract: a method is an ``nn.Module`` that holds the model and overrides a few hooks.

There is one training loop in BalanceMM (``balancemm.engine.trainer``). It calls the hooks below in
this order; a method overrides only the hooks it needs and every hook has a default. Holding the model
as a submodule means ``.to()``, ``.train()`` and ``state_dict()`` cover the model *and* the method's own
state (prototypes, running means, blend weights), so checkpoints and resume need nothing extra.

Hooks, in call order
--------------------

====================================  ==================  ===============================================
hook                                  default             when / guarantees
====================================  ==================  ===============================================
``model_spec(spec, hp)`` (classmeth)  unchanged           before the model is built; pick heads/fusion
``on_fit_start()``                    no-op               once, after model and optimiser are built
``on_epoch_start(epoch) → plan?``     None                before each epoch; may return a SamplePlan
``forward(batch) → ModelOutput``      ``model(batch)``    each step; extra no-grad passes go inside
                                                          ``ctx.eval_mode(module)``
``losses(out, batch) → {name: T}``    ``{"ce": CE}``      each step; each named term is logged and
                                                          checked for NaN/inf
``backward(losses)``                  sum, backward       each step; the only place per-loss gradients
                                                          are taken
``after_backward(out, batch)``        no-op               each step; grads are true (unscaled under
                                                          fp16), unclipped, not stepped
``on_epoch_end(epoch)``               no-op               after each epoch, before validation; may
                                                          change weights
``predict(batch) → ModelOutput``      ``model(batch)``    validation / test / Shapley; run in eval mode
                                                          under no_grad; must be deterministic
*hatch* ``training_step(batch)``      the template        overriding it = manual optimisation
*hatch* ``train_epoch(epoch, bs)``    loop of steps       overriding it = owning the epoch
====================================  ==================  ===============================================

The template step::

    out = forward(batch); losses = losses(out, batch); ctx.check_finite(losses)
    backward(losses)
    if ctx.overflowed(): ctx.skip_step()        # fp16 only: a gradient overflowed
    else: after_backward(out, batch); ctx.optimizer_step()

The trainer runs every hook inside ``ctx.autocast()`` (``train.precision``). Gradients are taken
only through ``ctx.backward(loss)`` and ``ctx.grad(outputs, inputs)``: they leave autocast for the
backward pass and, under fp16 loss scaling, return true gradients, so no method ever reads, combines
or rewrites a scaled gradient. A method that steps an optimiser itself calls ``ctx.optimizer_step``,
which skips a step whose gradients overflowed.

Data-parallel runs (``--nproc N``, torchrun): every batch a method sees is this rank's shard of the
global batch (``batch.share`` of it), and passes over a split in order (``ctx.batches(split)``) give
each rank a part of the split. What a method author must do:

* take gradients only through ``ctx.backward`` / ``ctx.grad``: they return the global batch's gradient
  on every rank (a second synchronisation of them would count it twice);
* compute every batch or split statistic that steers training (scores, coefficients, prototypes,
  means, valuations, weights) over all ranks: ``ctx.all_sum(t)`` for sums, ``ctx.global_mean(t)`` for a
  mean over rows, ``ctx.gather(t)`` for per-row values in global order; all three return their input
  on one process, so the method stays the same code;
* draw randomness from ``ctx.generator`` / ``ctx.device_generator``: they are seeded alike on every rank;
* make the same collective calls on every rank (a branch on a shard's own data must not skip one).

``tests/test_distributed.py`` trains every registered method on two gloo ranks and requires the
parameters, buffers and state to stay bit-identical on both.

A method that overrides ``train_epoch`` must call ``self.ctx.check_finite(losses)`` on its losses
(the default loop does), so NaN detection and loss logging keep working, and must wrap each step in
``self.ctx.counted_step(batch_size)``: with sampled FLOP counting only its steps are counted.

Where the 23 methods plug in (docs/methods/<name>.md gives each method's details):

* ``model_spec``: MMCosine (cosine head), AMCo (masked head), MLA and ReconBoost (shared head),
  Greedy (MMTM mid-fusion), unimodal (one modality), MMPareto / G-Blending (unimodal heads option),
  AUG (boosted head), Remix and G²D (unimodal heads), InfoReg, DGL and CGGM (slice heads);
* ``needs_for`` (classmethod): ReconBoost (unimodal runs only when ``pretrained``);
* ``on_fit_start``: UMT and G²D (frozen teachers), ReconBoost (pre-trained learners), Greedy (speed
  accumulators), LFM (initial α), InfoReg (trace history), CGGM (the classifiers' optimiser);
* ``on_epoch_start``: PMR (prototypes), Relearning (diagnosis and re-initialisation after the
  previous epoch's validation), G-Blending (weights), LFM (α update), CML, AMCo, InfoReg (anchor and
  window), AUG (learners decided last epoch), Modality-valuation and Remix (return a ``SamplePlan``);
* ``forward``: AGM (coalition passes), OPM (feature dropping), AMCo (feature or class mask), DGL
  (detached head and features), G²D (teacher pass);
* ``losses``: UMT, MBSD, CML, MMPareto, G-Blending, LFM, PMR, OPM, AMCo, InfoReg, DGL, CGGM, G²D, Remix;
* ``backward``: MMPareto (per-loss gradients, min-norm combination);
* ``after_backward``: OGM-GE, AGM (gradient clipping rule), Greedy, InfoReg (proximal pull and trace),
  CGGM (classifier step, gradient scaling), G²D (sequential modality prioritisation);
* ``on_epoch_end``: InfoReg (trace), AUG (learner assignment);
* ``predict``: MLA (entropy-weighted fusion), ReconBoost (boosted ensemble);
* hatches: MLA and AUG own ``training_step``, ReconBoost owns ``train_epoch``.

Rules: no loops over batches inside methods (use ``ctx.batches`` or the ``train_epoch`` hatch);
randomness only from ``ctx.generator`` (``ctx.device_generator`` for tensors drawn on the model's
device); gradients only through ``ctx.backward`` / ``ctx.grad``; parameters by structure
(``model.modality_parameters(m)``); the test split is unreachable and validation only with ``needs.val``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from balancemm.catalog.methods import NoHParams
from balancemm.context import Needs, RunContext
from balancemm.data.batch import Batch, SamplePlan
from balancemm.models.classifier import ModelOutput, ModelSpec, MultimodalClassifier
from balancemm.schema import EpochValue, resolve_epoch


class Method(nn.Module):
    """Base class of all methods; see the module docstring for the hook table."""

    HParams: ClassVar[type] = NoHParams
    needs: ClassVar[Needs] = Needs()
    #: Default search space for sweeps' hyper-parameter trials: ``{field: [candidate values]}``, from
    #: the ranges the method's paper and code explore. A sweep file's ``search:`` replaces it.
    search: ClassVar[Mapping[str, Sequence[Any]]] = {}
    #: Protocol adaptation: ``HParams`` values (relative epoch schedules such as ``"30%"``) under which
    #: the method acts within any protocol's length; the benchmark applies them over the defaults.
    adapted: ClassVar[Mapping[str, Any]] = {}

    def __init__(self, model: MultimodalClassifier, ctx: RunContext, hp: Any = None) -> None:
        super().__init__()
        self.model = model
        self.ctx = ctx
        self.hp = hp if hp is not None else self.HParams()

    @classmethod
    def needs_for(cls, hp: Any) -> Needs:
        """What a run with hyper-parameters ``hp`` requires (``needs`` unless a setting changes it,
        e.g. ReconBoost asks for unimodal runs only when it starts from pre-trained learners)."""
        return cls.needs

    # -- hooks -----------------------------------------------------------------------------------

    @classmethod
    def model_spec(cls, spec: ModelSpec, hp: Any) -> ModelSpec:
        return spec

    def on_fit_start(self) -> None:
        pass

    def on_epoch_start(self, epoch: int) -> SamplePlan | None:
        return None

    def forward(self, batch: Batch) -> ModelOutput:
        return self.model(batch)

    def losses(self, out: ModelOutput, batch: Batch) -> dict[str, Tensor]:
        return {"ce": F.cross_entropy(out.logits, batch.label)}

    def backward(self, losses: dict[str, Tensor]) -> None:
        self.ctx.backward(torch.stack(list(losses.values())).sum())

    def after_backward(self, out: ModelOutput, batch: Batch) -> None:
        pass

    def on_epoch_end(self, epoch: int) -> None:
        pass

    def predict(self, batch: Batch) -> ModelOutput:
        return self.model(batch)

    # -- escape hatches --------------------------------------------------------------------------

    def training_step(self, batch: Batch) -> tuple[ModelOutput, dict[str, Tensor]]:
        ctx = self.ctx
        with ctx.hook_phase("forward"):
            out = self.forward(batch)
        with ctx.hook_phase("losses"):
            losses = self.losses(out, batch)
        ctx.check_finite(losses)
        with ctx.hook_phase("backward"):
            self.backward(losses)
        if ctx.overflowed():
            # fp16: the loss scale was too large for this batch; the method never sees the overflow.
            ctx.skip_step()
            return out, losses
        with ctx.hook_phase("after_backward"):
            self.after_backward(out, batch)
        with ctx.hook_phase("optimizer_step"):
            ctx.optimizer_step()
        return out, losses

    def train_epoch(self, epoch: int, batches: Iterable[Batch]) -> None:
        for batch in batches:
            with self.ctx.counted_step(len(batch)):
                out, _ = self.training_step(batch)
            self.ctx.log(train_accuracy=(out.logits.argmax(1) == batch.label).float().mean())

    # -- evaluation support (not a hook) ---------------------------------------------------------

    def predict_coalitions(self, batch: Batch, coalitions: list[frozenset[str]]) -> tuple[ModelOutput, Tensor]:
        """The prediction on ``batch`` and fused logits ``[K, B, C]`` for each coalition.

        With the default ``predict`` the model answers (one encoder pass for every coalition under
        feature masking); a method with its own ``predict`` is evaluated once per coalition instead.
        """
        if type(self).predict is Method.predict:
            return self.model.predict_coalitions(batch, coalitions)
        out = self.predict(batch)
        everything = frozenset(self.model.modalities)
        logits = [out.logits if s == everything else self.predict(batch.with_only(s)).logits for s in coalitions]
        return out, torch.stack(logits)

    # -- schedules (not hooks) -------------------------------------------------------------------

    def epoch_of(self, value: EpochValue, *, ge: int = 0) -> int:
        """An epoch hyper-parameter in this run's epochs: ``10`` stays 10, ``"30%"`` of 30 epochs is 9."""
        return resolve_epoch(value, self.ctx.num_epochs, ge=ge)

    def within(self, epoch: int, starts: EpochValue, ends: EpochValue | None = None) -> bool:
        """``starts ≤ epoch ≤ ends`` with both resolved for this run (no ``ends``: from ``starts`` on)."""
        return self.epoch_of(starts) <= epoch and (ends is None or epoch <= self.epoch_of(ends))

    def acts_in(self, epoch: int) -> bool:
        """Whether the method changes training in ``epoch`` (0-based), from its schedule alone.

        The run's summary lists these epochs (``intervention``), so that a method whose schedule falls
        outside the protocol, or after the selected epoch, is visible as one that compared baseline
        with itself. Methods with an epoch window or period override it; the rest act in every epoch.
        """
        return True

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def dormant_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters allocated ahead of use that no forward pass reads yet (AUG's learners before they are
        switched on): they get no gradient, so optimisers leave them as they are until then."""
        return iter(())
