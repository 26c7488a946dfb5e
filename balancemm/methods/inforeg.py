"""InfoReg: Information Acquisition Regulation.

Huang, Wei, Yang, Hu. "Adaptive Unimodal Regulation for Balanced Multimodal Information Acquisition."
CVPR 2025 (arXiv 2503.18595). Official code: GeWu-Lab/InfoReg_CVPR2025 @ 939b2ed (``main.py``:
``train_epoch``), whose rules this follows; the first release 41d887f is available as settings
(documented in docs/methods/inforeg.md).

Idea: early training is a "prime learning window" for every modality. While it lasts, the modality that
currently acquires information fastest (the most confident one) is slowed down by a proximal pull of its
encoder toward the weights it had at the start of the epoch, so the others can acquire theirs. The window
is read from a "Fisher trace" of one encoder (the summed squared gradient): it is open while that trace
still grows fast.

Per epoch and step, with z_m = W_m h_m + b/M the slice of the fusion head (b/2 for two modalities, as
``main.py`` 359–363):

1. epoch start (hook ``on_epoch_start``): θ⁰ ← the encoders' weights (``main.py`` 259, a deep copy), and
   from the window modality's per-epoch traces x_0 … x_{e−1} (x_j = 0 for j < 0, the ten zero pads of
   693–694) the window indicator (237–243)

       k_e = (x̄_[e−S, e) − x̄_[e−S−1, e−1)) / x̄_[e−S, e) = (x_{e−1} − x_{e−1−S}) / Σ_{j=e−S}^{e−1} x_j,  k_0 = 1,

   with S = ``span`` = 10. k_e is about the trace's relative growth per epoch, whatever S;
2. loss (hook ``losses``): L = CE(z) + Σ_m CE(z_m) (the code's three backward passes, 456–458, are one
   here);
3. after backward (hook ``after_backward``), with the batch-summed true-class scores
   s_m = Σ_i softmax(z_m)_i[y_i] (460–461): if k_e > τ and m* is the unique argmax of s,
   β_{m*} = c_{m*}·exp(tanh(s_{m*} − max_{j≠m*} s_j)) and β_m = 0 for every other m (465–485); then for
   every parameter θ of encoder m (convolutions, linear layers and BatchNorm alike)
   g ← g + β_m·(θ − θ⁰_m) (489–495), the gradient of β_m/2·‖θ_m − θ⁰_m‖²;
4. trace: F_w += g_w ⊙ g_w for every Conv and Linear weight w of the window modality's encoder, with the
   gradient after the proximal add (501–514);
5. epoch end (hook ``on_epoch_end``): x_e = Σ_w mean(F_w), appended to the history (570–595).

Original defaults (HEAD): τ = 0.05; c = 0.95 for audio and 0.1 for visual; S = 10; SGD lr 2e-3,
momentum 0.9, weight decay 1e-4, StepLR(30, 0.1), 50 epochs, batch 64 (the recipe is the protocol's
here). The batch sum in s_m makes tanh saturate at B = 64, so β ≈ 0.95e = 2.58 or 0.1e = 0.27.

Three or more modalities (ours; the code is two-modal): only the unique leader m* = argmax_m s_m is
pulled, with the gap to the runner-up; for M = 2 this is the code's two branches (and an exact tie
pulls neither, as there). ``c`` applies to every modality but the one named "visual" (``c_visual``,
the HEAD preset; null gives the uniform rule). The window modality is ``window_modality``: by default
audio when the dataset has one (the code reads the audio trace, 240–241, 594–595, because audio is the
information-sufficient modality on CREMA-D and Kinetics-Sounds), else the first in sorted order.

Deviations from the paper/official code:
  * The code runs three extra retained backward passes per step only to log gradient statistics
    (``main.py`` 401–453); they are skipped, as is every other diagnostic (gradient means, head cosines).
  * The code accumulates squared gradients of every Conv/Linear weight of both encoders and of the heads
    (292–295, 501–514); only the window modality's are kept here, the rest is never read. HEAD crashes
    there (``grad * grad`` on the heads it no longer trains, 504); the first release runs.
  * "Conv" is any ``ConvNd`` (the code: ``nn.Conv2d``), so 1-D convolutions count.
  * A history whose last S traces are all 0 (no gradient reached the window modality's weights) gives
    k = 0, a closed window, where the code would divide by zero.
  * Scores are summed over the global batch in a data-parallel run; β is a Python float.
  * ``model.usegate = False`` (472, 481, 485) sets an unused attribute of the DataParallel wrapper: dropped.
  * Settings reproduce the first release 41d887f: ``threshold=0.04``, ``c_visual=0`` (its visual branch
    tests ``score_v < score_a`` again, 227, so visual is never pulled; β_v = 0 is the same), and
    ``heads=linear`` (separate ``head_audio`` / ``head_video``, ``models/basic_model.py`` @ 4df625a 38–39,
    60–61). ``trace_grad=loss`` keeps the pull's own gradient out of the trace (an ablation: the code
    includes it, 489 before 501, so once regulation starts the pull feeds back into k).
  * ``span`` accepts a share of the protocol (the benchmark uses 20 %, the code's 10 of 50 epochs).
Deviations from BalanceMM: the authors' toolkit has no InfoReg; nothing to compare.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from balancemm.catalog.methods import InfoRegHParams
from balancemm.data.batch import Batch
from balancemm.errors import ConfigError
from balancemm.methods.base import Method
from balancemm.models.classifier import ModelOutput, ModelSpec, require_slice_heads
from balancemm.registry import METHODS


def window_indicator(traces: Sequence[float], span: int = 10) -> float:
    """k_e from the per-epoch traces x_0 … x_{e−1} (``e = len(traces)``), with x_j = 0 for j < 0.

    k_0 = 1; after that (x_{e−1} − x_{e−1−S}) / Σ_{j=e−S}^{e−1} x_j, the code's difference of two
    S-epoch means over the later one; 0 when the last S traces are all 0.
    """
    e = len(traces)
    if e == 0:
        return 1.0
    total = math.fsum(traces[max(0, e - span) :])
    if total <= 0:
        return 0.0
    oldest = traces[e - 1 - span] if e - 1 - span >= 0 else 0.0
    return (traces[e - 1] - oldest) / total


def regulation_strengths(scores: Sequence[float], coefficients: Sequence[float]) -> list[float]:
    """β ``[M]``: c_{m*}·exp(tanh(s_{m*} − max_{j≠m*} s_j)) for the unique leader m* = argmax s, 0 elsewhere.

    Scores and coefficients are in the same (sorted modality) order. A tie for the lead pulls nobody, as
    the code's ``score_a > score_v`` / ``score_a < score_v`` branches do.
    """
    top = max(scores)
    leaders = [i for i, s in enumerate(scores) if s == top]
    beta = [0.0] * len(scores)
    if len(leaders) != 1:
        return beta
    (lead,) = leaders
    runner_up = max(s for i, s in enumerate(scores) if i != lead)
    beta[lead] = coefficients[lead] * math.exp(math.tanh(top - runner_up))
    return beta


@torch.no_grad()
def add_proximal_(grads: Sequence[Tensor], params: Sequence[Tensor], anchors: Sequence[Tensor], beta: float) -> None:
    """g ← g + β·(θ − θ⁰) in place, for matching sequences of gradients, parameters and anchors."""
    if grads:
        torch._foreach_add_(list(grads), torch._foreach_sub(list(params), list(anchors)), alpha=beta)


@torch.no_grad()
def accumulate_squares_(accumulators: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
    """F ← F + g ⊙ g in place, for matching sequences of accumulators and gradients."""
    if grads:
        torch._foreach_addcmul_(list(accumulators), list(grads), list(grads))


def trace_of(accumulators: Sequence[Tensor]) -> float:
    """x = Σ_w mean(F_w): the epoch's trace from its accumulated squared gradients (float64 sum)."""
    return math.fsum(float(a.double().mean()) for a in accumulators)


class _Tensors(nn.Module):
    """Tensors kept as buffers ``t0, t1, …`` (persistent or not), in the order given."""

    def __init__(self, like: Sequence[Tensor], *, persistent: bool, zeros: bool = False) -> None:
        super().__init__()
        self.count = len(like)
        for i, t in enumerate(like):
            value = torch.zeros_like(t) if zeros else t.detach().clone()
            self.register_buffer(f"t{i}", value, persistent=persistent)

    def tensors(self) -> list[Tensor]:
        return [getattr(self, f"t{i}") for i in range(self.count)]


def _traced_weights(encoder: nn.Module) -> list[Tensor]:
    """The weights the trace reads: every trainable Conv and Linear weight of ``encoder``, by module type."""
    kinds = (nn.modules.conv._ConvNd, nn.Linear)
    return [m.weight for m in encoder.modules() if isinstance(m, kinds) and m.weight.requires_grad]


@METHODS.register("inforeg")
class InfoReg(Method):
    HParams = InfoRegHParams
    # The code averages its trace over 10 of 50 epochs; the same fifth of a 30-epoch protocol is 6.
    adapted: ClassVar[Mapping[str, Any]] = {"span": "20%"}
    search: ClassVar[Mapping[str, Any]] = {  # τ: the two releases' 0.04/0.05 and around; c around 0.95 (2.5 tried)
        "threshold": [0.02, 0.04, 0.05, 0.1],
        "c": [0.5, 0.95, 2.0],
        "c_visual": [0.1, None],
    }
    traces: Tensor  # per-epoch traces x_0 … x_{e−1} of the window modality (float64; a buffer, so resume has it)

    @classmethod
    def model_spec(cls, spec: ModelSpec, hp: Any) -> ModelSpec:
        if hp.heads == "linear":
            return replace(spec, unimodal_heads="linear")
        # HEAD scores and trains each modality through its slice of the fusion head (W_m h_m + b/M).
        require_slice_heads(spec, "inforeg", "scores and trains each modality through its slice of the fusion head")
        return replace(spec, unimodal_heads="slice")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        hp, mods = self.hp, self.model.modalities
        window = hp.window_modality
        if window is None:
            window = "audio" if "audio" in mods else mods[0]
        if window not in mods:
            raise ConfigError(f"method.window_modality={window!r} is not one of the modalities {', '.join(mods)}")
        self.window_modality = window
        self.coefficients = [hp.c_visual if m == "visual" and hp.c_visual is not None else hp.c for m in mods]
        self.pulled = {m: [p for p in self.model.modality_parameters(m) if p.requires_grad] for m in mods}
        # θ⁰ of every encoder (any of them can lead when M ≥ 3), refreshed at each epoch start.
        self.anchor = nn.ModuleDict({m: _Tensors(self.pulled[m], persistent=True) for m in mods})
        self.traced = _traced_weights(self.model.encoders[window])
        if not self.traced:
            raise ConfigError(
                f"inforeg reads its window from the trace of the {window} encoder's Conv and Linear weights, and "
                f"it has no trainable one: choose another method.window_modality"
            )
        # Zeroed at every epoch start and read at its end (checkpoints fall between epochs): not saved.
        self.squares = _Tensors(self.traced, persistent=False, zeros=True)
        self.register_buffer("traces", torch.zeros(0, dtype=torch.float64))
        self.k = window_indicator([])

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # The history grows by one entry per epoch: take the saved length before the copy.
        saved = state_dict.get(prefix + "traces")
        if isinstance(saved, Tensor):
            self.traces = torch.zeros(saved.shape, dtype=torch.float64, device=self.traces.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def anchors(self, modality: str) -> list[Tensor]:
        """θ⁰ of one encoder, in the order of its trainable ``model.modality_parameters``."""
        module = self.anchor[modality]
        assert isinstance(module, _Tensors)
        return module.tensors()

    def _squares(self) -> list[Tensor]:
        assert isinstance(self.squares, _Tensors)
        return self.squares.tensors()

    def on_epoch_start(self, epoch: int) -> None:
        with torch.no_grad():
            for m in self.model.modalities:
                torch._foreach_copy_(self.anchors(m), [p.detach() for p in self.pulled[m]])
            torch._foreach_zero_(self._squares())
        self.k = window_indicator(self.traces.tolist(), self.epoch_of(self.hp.span, ge=1))
        self.ctx.log(**{"inforeg/k": self.k})

    def losses(self, out: ModelOutput, batch: Batch) -> dict[str, Tensor]:
        terms = {"ce": F.cross_entropy(out.logits, batch.label)}
        for m in self.model.modalities:
            terms[f"uni_{m}"] = F.cross_entropy(out.unimodal_logits[m], batch.label)
        return terms

    def after_backward(self, out: ModelOutput, batch: Batch) -> None:
        hp, ctx, mods = self.hp, self.ctx, self.model.modalities
        with torch.no_grad():
            # Sums over the batch: over every rank's shard in a data-parallel run (the global batch's).
            label = batch.label[:, None]
            local = torch.stack(
                [torch.softmax(out.unimodal_logits[m].float(), dim=1).gather(1, label).sum() for m in mods]
            )
            scores = ctx.all_sum(local).double().tolist()
        beta = regulation_strengths(scores, self.coefficients) if self.k > hp.threshold else [0.0] * len(mods)
        if hp.trace_grad == "loss":
            self._accumulate()
        for m, b in zip(mods, beta, strict=True):
            if b > 0:
                held = [
                    (p.grad, p, a) for p, a in zip(self.pulled[m], self.anchors(m), strict=True) if p.grad is not None
                ]
                add_proximal_([g for g, _, _ in held], [p for _, p, _ in held], [a for _, _, a in held], b)
            ctx.log(**{f"inforeg/beta_{m}": b, f"inforeg/s_{m}": scores[mods.index(m)]})
        if hp.trace_grad == "regulated":
            self._accumulate()

    def _accumulate(self) -> None:
        """F_w += g_w ⊙ g_w over the window modality's traced weights (the gradients are the global batch's)."""
        held = [(a, w.grad) for a, w in zip(self._squares(), self.traced, strict=True) if w.grad is not None]
        accumulate_squares_([a for a, _ in held], [g for _, g in held])

    def on_epoch_end(self, epoch: int) -> None:
        x = trace_of(self._squares())
        self.traces = torch.cat([self.traces, self.traces.new_tensor([x])])
        self.ctx.log(**{"inforeg/trace": x})
