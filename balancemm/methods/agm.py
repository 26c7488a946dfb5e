"""AGM: Adaptive Gradient Modulation.

Li, Li, Jiang, Zhang, Tian, Cao. "Boosting Multi-modal Model Performance with Adaptive Gradient
Modulation." ICCV 2023. Official code: Lingy12/AGM_ICCV2023 (``run/CREMAD_main.py``,
``model/CREMAD_net.py``; ``URFunny_*`` for three modalities), which this follows.

Idea: split the fused output into one "mono-modal output" per modality with a Shapley decomposition
over zero-padded inputs; compare each modality's current loss with its long-run level and rescale the
gradient that flows through its Shapley component, slowing a modality that is ahead of its history
and speeding up one that is behind. The rescaling changes the gradient's direction, not only the
encoders' step sizes: it reaches the fusion head and every shared parameter.

Per step (hook ``forward``, the coalition passes inside the phase ``agm/coalitions``):

1. f(S) = fused logits with the modalities outside S zero-padded at the input, for every non-empty
   S ⊆ M; f(M) is the normal pass in train mode, the others run in eval mode *with* autograd.
2. o_m = φ_m + f(∅)/|M| with φ the Shapley value of the coalition logits, so Σ_m o_m = f(M).
   f(∅) enters φ_m only as −f(∅)/|M|, so o_m is φ_m computed with f(∅) := 0 and the all-zero pass is
   never needed. Computed by the codebase's one Shapley helper (``metrics.shapley``).
3. s_m = (1/B) Σ_i −log max(softmax(o_m)_i[y_i], 1e-8)                  (no gradient)
4. r_m = exp(|M|/(|M|−1) · (s̄ − s_m)),  r*_m = exp(|M|/(|M|−1) · (S̄ − S̄_m)),  s̄, S̄ the means over m,
   where S̄_m is the running average of s_m over every training iteration so far, read before this
   step's update: S̄_m ← S̄_m (t−1)/t + s_m/t.
5. c_m = exp(α · min(r*_m − r_m, κ)).
6. In the modulation window the loss is CE(Σ_m [c_m o_m + (1 − c_m) sg(o_m)], y): the value is
   CE(f(M), y) and ∂L/∂o_m is multiplied by c_m (the official backward hook on o_m). The c_m last
   applied are kept in a buffer; after the window ``after_window`` says whether they go on scaling
   ∂L/∂o_m (``frozen``, the official code) or training is plain CE (``plain``).
Hook ``after_backward``: if any entry of the fusion head's weight gradient leaves [−θ, θ], clip the
norm of all gradients to ``clip_norm`` (the official AGM rule).

Data-parallel runs: s_m is the mean over the global batch's rows (``ctx.global_mean`` of the per-row
values), so every rank updates the same S̄ and c; the clipping rule reads the ranks' averaged gradients.

Deviations from the paper/official code:
  * Zero-padded passes are shared: in eval mode an encoder's output on its real input is the same in
    every coalition, and its output on a zero input is the same for every row, so each encoder runs
    once in train mode, once in eval mode and once on a single zero row, and only the fusion is
    evaluated per coalition. Values and gradients are the official ones (the official code re-runs
    every encoder for every coalition, the all-zero one included: 2^|M| full passes);
    ``passes=official`` runs those passes, for the official cost (``benchmarks/agm_step.py``).
  * After the modulation window training is plain CE and the coalition passes stop
    (``after_window="plain"``, the default). The official code goes on scaling ∂L/∂o_m by the last
    in-window coefficients: its backward hooks on o_m stay registered and keep multiplying by
    ``scale_a``/``scale_v`` (``model/CREMAD_net.py`` 39–55), which only ``update_scale`` changes, and
    that is called inside the window only (``run/CREMAD_main.py`` 159–166); its "normal" branch after
    the window (232) backpropagates through the same hooked outputs, so the coalition passes and the
    running averages also go on. ``after_window="frozen"`` does exactly that, with the frozen
    coefficients in a buffer (1 when the window never ran, as the official initial scale).
  * Epochs count from 0 here and from 1 in the official loop (``run/CREMAD_main.py`` 611 and 635),
    which modulates when ``modulation_starts ≤ epoch ≤ modulation_ends`` (159): its default 0..20
    covers its epochs 1..20, twenty epochs. The default ``modulation_ends`` is therefore 19, the
    same twenty epochs (0..19 here); an official window (s, e) is (max(s − 1, 0), e − 1) here.
  * Three or more modalities use the general Shapley formula with the |M|/(|M|−1) factor, as the
    official URFunny code does for three.
Deviations from BalanceMM (``AGM_trainer.py``), each a BalanceMM bug:
  * the ratios keep the official sign exp(·(s̄ − s_m)); BalanceMM flips it, so it boosts the modality
    that is ahead (its two-modality coefficients are ours with the modalities swapped);
  * the S = ∅ Shapley term is kept (BalanceMM drops it);
  * the padded passes carry gradients and the coefficients reshape the gradient through o_m;
    BalanceMM runs them without gradients and scales encoder weight gradients after the fact;
  * defaults are the official ones (α 1.0, κ 10, the official 20-epoch window, clip 1/1); BalanceMM
    uses α 0.1, κ 7, window 0–80, clip 5/5.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from balancemm.catalog.methods import AGMHParams
from balancemm.data.batch import Batch
from balancemm.methods.base import Method
from balancemm.metrics.shapley import coalitions, shapley_values
from balancemm.models.classifier import ModelOutput
from balancemm.registry import METHODS


def mono_outputs(fused: dict[frozenset[str], Tensor], modalities: tuple[str, ...]) -> dict[str, Tensor]:
    """AGM's mono-modal outputs o_m = φ_m + f(∅)/|M| ``{m: [B, C]}`` from coalition logits ``[B, C]``.

    f(∅) may be left out: its only term in φ_m is −f(∅)/|M|, so o_m is then φ_m with f(∅) := 0.
    """
    full = fused[frozenset(modalities)]
    empty = fused.get(frozenset(), torch.zeros_like(full))
    phi = shapley_values({**fused, frozenset(): empty}, modalities)
    return {m: phi[m] + empty / len(modalities) for m in modalities}


def zero_padded(batch: Batch, keep: frozenset[str]) -> Batch:
    """``batch`` with the inputs of the modalities outside ``keep`` replaced by zeros."""
    inputs = {m: x if m in keep else torch.zeros_like(x) for m, x in batch.inputs.items()}
    return Batch(inputs, batch.label, batch.index, batch.present, batch.modalities)


def agm_scores(
    outputs: dict[str, Tensor], label: Tensor, mean: Callable[[Tensor], Tensor] = lambda t: t.mean(0)
) -> Tensor:
    """s ``[M]``: batch-mean cross-entropy of each o_m, with the true-class probability clamped at 1e-8.

    ``mean`` averages the per-row values ``[B]`` (``ctx.global_mean``: over the global batch's rows).
    """
    rows = [torch.softmax(o, dim=1).gather(1, label[:, None])[:, 0].clamp(min=1e-8).log() for o in outputs.values()]
    return -torch.stack([mean(r) for r in rows]).reshape(len(rows))  # a mean may come back as [1]


def agm_coefficients(scores: Tensor, running: Tensor, alpha: float, kappa: float | None) -> Tensor:
    """c ``[M]`` = exp(α·min(r* − r, κ)) from the current scores s and their running averages S̄ ``[M]``."""
    factor = len(scores) / (len(scores) - 1)
    current = torch.exp(factor * (scores.mean() - scores))
    target = torch.exp(factor * (running.mean() - running))
    gap = target - current
    return torch.exp(alpha * (gap if kappa is None else gap.clamp(max=kappa)))


def modulated_sum(outputs: dict[str, Tensor], coefficients: Tensor) -> Tensor:
    """Σ_m o_m in value, with the gradient through each o_m multiplied by c_m."""
    parts = [c * o + (1 - c) * o.detach() for o, c in zip(outputs.values(), coefficients, strict=True)]
    return torch.stack(parts).sum(0)


@METHODS.register("agm")
class AGM(Method):
    HParams = AGMHParams
    search: ClassVar[Mapping[str, Any]] = {  # α: BalanceMM 0.1 … README 2.5; κ per dataset (None = unclamped)
        "alpha": [0.1, 0.5, 1.0, 2.5],
        "kappa": [7.0, 10.0, None],
    }
    running: Tensor  # [M] S̄_m, running mean of s_m over every iteration
    iteration: Tensor  # t, iterations seen (a buffer, so resume continues the averages)
    coefficients: Tensor  # [M] c_m of the last modulated step, 1 before it (frozen after the window)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("running", torch.zeros(len(self.model.modalities)))
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))
        self.register_buffer("coefficients", torch.ones(len(self.model.modalities)))

    def modulates(self, epoch: int) -> bool:
        """Whether ``epoch`` (0-based) is in the modulation window, where fresh coefficients are applied."""
        return self.within(epoch, self.hp.modulation_starts, self.hp.modulation_ends)

    def acts_in(self, epoch: int) -> bool:
        hp = self.hp
        # Frozen coefficients act until the end of training, unless the window is empty: they stay 1.
        if hp.after_window == "frozen" and self.epoch_of(hp.modulation_starts) <= self.epoch_of(hp.modulation_ends):
            return self.within(epoch, hp.modulation_starts)
        return self.modulates(epoch)

    def forward(self, batch: Batch) -> ModelOutput:
        hp, ctx, model = self.hp, self.ctx, self.model
        mods = model.modalities
        features = model.encode(batch)
        full = model.fuse(features)
        if hp.after_window == "plain" and ctx.epoch > self.epoch_of(hp.modulation_ends):
            return ModelOutput(full, features, {})
        with ctx.phase("agm/coalitions"), ctx.eval_mode(model, grad=True):
            partial = [s for s in coalitions(mods, include_empty=hp.passes == "official") if len(s) < len(mods)]
            if hp.passes == "official":
                fused = {s: model(zero_padded(batch, s)).logits for s in partial}
            else:
                real = model.encode(batch)
                zero = {m: model.encoders[m](torch.zeros_like(batch.inputs[m][:1])).expand_as(real[m]) for m in mods}
                fused = {s: model.fuse({m: real[m] if m in s else zero[m] for m in mods}) for s in partial}
        fused[frozenset(mods)] = full
        outputs = mono_outputs(fused, mods)
        with torch.no_grad():
            scores = agm_scores(outputs, batch.label, ctx.global_mean)  # the global batch's mean
            if self.modulates(ctx.epoch):
                self.coefficients.copy_(agm_coefficients(scores, self.running, hp.alpha, hp.kappa))
            self.iteration += 1
            t = self.iteration.item()
            self.running.mul_((t - 1) / t).add_(scores / t)
        ctx.log(**{f"agm/s_{m}": s for m, s in zip(mods, scores, strict=True)})
        if self.acts_in(ctx.epoch):
            ctx.log(**{f"agm/c_{m}": c for m, c in zip(mods, self.coefficients, strict=True)})
            logits = modulated_sum(outputs, self.coefficients)
        else:
            logits = torch.stack(list(outputs.values())).sum(0)
        return ModelOutput(logits, features, outputs)

    def after_backward(self, out: ModelOutput, batch: Batch) -> None:
        hp = self.hp
        if hp.clip_threshold <= 0:
            return
        weights = [p.grad for p in self.model.fusion.parameters() if p.dim() > 1 and p.grad is not None]
        if any(bool((g.abs() > hp.clip_threshold).any()) for g in weights):
            torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), hp.clip_norm)
