"""LFM: facilitating multimodal classification via dynamically learning the modality gap.

Yang, Wan, Jiang, Xu. "Facilitating Multimodal Classification via Dynamically Learning Modality
Gap." NeurIPS 2024. Official code: njustkmg/NeurIPS24-LFM @ ad44fa09 (``Crema_epoch_learnable.py``:
learned α; ``Crema_epoch.py``: fitted α; history ``55c196a3`` ``Crema_batch.py``: heuristic α;
``model/AudioVideo.py``), which this follows (documented in docs/methods/lfm.md).

Idea: train with two objectives, a classification loss on the late-fused prediction and a
modality-matching term that pulls the unimodal predictions together, and move the weight between them
during training, alignment-heavy at first and classification-heavy later, so that the modality gap is
learned dynamically instead of forcing one modality to fit the labels on its own.

Model (hook ``model_spec``): one linear head per modality, o_m = W_m h_m + b_m, and the fused logits are
their mean ō = (1/M) Σ_m o_m (sum fusion with ``average=True``).

Per step (hook ``losses``), with p_m = softmax(o_m) and P = M(M−1)/2 modality pairs:

1. classification  CE(ō, y)
2. alignment       A = (1/P) Σ_{a<b} JS(p_a, p_b),  JS(p, q) = ½[KL(p‖m) + KL(q‖m)],  m = ½(p + q),
                   with ``batchmean`` reduction (sum over classes, mean over samples); JS ≤ ln 2
3. loss            L = 2(α_cls CE(ō, y) + α_al A),  α_cls + α_al = 1
                   (logged as ``ce`` = 2 α_cls CE and ``align`` = 2 α_al A)

α schedule (hook ``on_epoch_start``, before each epoch's training), chosen by ``schedule``:

* ``learned`` (``Crema_epoch_learnable.py``, the default): on ``val_samples`` validation samples,
  L_tot = α_cls CE + α_al A, g = ∇_θ L_tot (with its graph), g_c = ∇_θ CE, the Hessian-vector product
  H_tot g_c = ∇_θ ⟨g, sg(g_c)⟩, and a = the mean of H_tot g_c over the **first parameter tensor only**
  (the original's quirk, kept: its first tensor is the audio encoder's first conv kernel; here it is
  the first parameter of the first modality's encoder in ``model.modalities`` order). Then
  η_α ← η_α / 2 when epoch % 20 = 0 and epoch ≠ 0, α_al ← clip(α_al − η_α a, 0.05, 0.95) and
  α_cls = 1 − α_al. Initial (α_cls, α_al) = (0.05, 0.95), η_α = 1e-4. This is a heuristic signal,
  not a bilevel hypergradient; it is reproduced as released. Cost: one double backward on
  ``val_samples`` rows per epoch, in the FLOP phase ``lfm_alpha``.
* ``fitted`` (``Crema_epoch.py``): α_cls(e) = Σ_k c_k e^k, the degree-5 polynomial fitted to learned
  curves on CREMA-D over 200 epochs; α_al = 1 − α_cls.
* ``heuristic`` (``Crema_batch.py``): α_al(e) = clip(exp(−0.3 e), 0.05, 0.95); α_cls = 1 − α_al.

α_cls, α_al and η_α are buffers, so checkpoints and resume carry them; they are logged every epoch.

Three or more modalities: A averages over the pairs (as BalanceMM does) and ō is the mean of all the
unimodal logits; α_cls + α_al = 1 still holds.

Deviations from the paper/official code:
  * The alignment term is the true Jensen–Shannon divergence (``alignment=js``). The released code
    calls ``F.kl_div(p.log(), m)``, which is KL(m‖p): its "JS" is ½[KL(m‖p_a) + KL(m‖p_b)], symmetric
    and zero iff p_a = p_b but unbounded (4.307 for logits (10, 0) vs (0, 10), where JS = 0.6926).
    ``alignment=mixture_kl`` gives the code's quantity. Both are computed from log-softmax, so an
    underflowed probability cannot produce the inf the code's ``p.log()`` would.
  * The learned α uses ``val_samples`` rows of the validation split, drawn once per run from the run's
    generator; the original holds out 16 random *training* samples (removing them from training) and
    uses the first 8. Methods here may read validation data only by declaring it (``needs.val``).
  * The α pass runs with the model in eval mode (BatchNorm running statistics, not updated) but with
    gradients. The original runs it in train mode at epoch 0 and, because its test loop leaves the
    model in eval mode, in eval mode from epoch 1 on; eval mode throughout also keeps validation
    samples out of the BatchNorm statistics used at test time.
  * Only the first tensor's block of the HVP is computed (``inputs=[first]``); its value is the
    original's ``hessian_vector_prod[0]`` at a fraction of the cost.
  * ``fitted`` clamps α_cls to [0, 1]: the polynomial exceeds 1 at epochs 177–188 (at most 1.0105)
    and turns negative from epoch 227, beyond the 200 epochs it was fitted on.
  * ``heuristic`` applies the α to this loss (logits, factor 2); ``Crema_batch.py`` aligned encoder
    features and had no factor 2.
  * The protocol's optimiser and schedule apply (the original: SGD lr 1e-2, 200 epochs, StepLR(70)).
Deviations from BalanceMM (``LFM_trainer.py``):
  * BalanceMM initialises (α_cls, α_al) = (0.95, 0.05), the reverse of the original;
    ``alpha_al_init=0.05`` reproduces it.
  * BalanceMM fuses with the concat head (ō = Σ_m W_m h_m + b, unimodal o_m = W_m h_m + b/M); the
    original's separate heads and mean fusion are used here.
  * BalanceMM's α pass uses a quarter of the first ``val_loader`` batch, which is the *test* set when no
    validation split is configured, and runs in train mode (BatchNorm statistics updated).
  * BalanceMM's config says ``learning-fitted`` but its trainer always runs the learned rule;
    ``schedule`` selects the rule here. Its unused ``alpha``/``trainer_probed`` keys are not offered.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from balancemm.catalog.methods import LFMHParams
from balancemm.data.batch import Batch
from balancemm.methods.base import Method, Needs
from balancemm.models.classifier import ModelOutput, ModelSpec, MultimodalClassifier
from balancemm.registry import METHODS

ALPHA_CLIP = (0.05, 0.95)  # PAPER: clip of α_al in the learned and heuristic rules
# PAPER: α_cls(e) coefficients of e^0 … e^5 in Crema_epoch.py (getAlpha_Learnable_Fitted).
FITTED_COEFFS = (2.04623704e-01, 3.35472727e-03, 1.22989557e-04, -2.92947416e-06, 2.23835486e-08, -5.39717505e-11)


def alignment(logits: Sequence[Tensor], kind: str = "js") -> Tensor:
    """The alignment term A, averaged over modality pairs.

    Args:
        logits: one ``[B, C]`` tensor per modality, at least two.
        kind: ``"js"``, the Jensen–Shannon divergence ½[KL(p‖m) + KL(q‖m)] (≤ ln 2), or
            ``"mixture_kl"``, the released code's ½[KL(m‖p) + KL(m‖q)] (unbounded).

    Returns:
        A scalar: the pairwise divergence summed over classes, averaged over samples and pairs.
    """
    log_p = torch.stack([torch.log_softmax(o, dim=-1) for o in logits])  # [M, B, C]
    # Pair indices (a, b), a < b, in lexicographic order, built on the device: no host list is copied.
    a, b = torch.triu_indices(len(logits), len(logits), 1, device=log_p.device)
    lp, lq = log_p[a], log_p[b]  # [P, B, C]
    log_m = torch.logaddexp(lp, lq) - math.log(2)
    if kind == "js":
        return 0.5 * (lp.exp() * (lp - log_m) + lq.exp() * (lq - log_m)).sum(-1).mean()
    return 0.5 * (log_m.exp() * (2 * log_m - lp - lq)).sum(-1).mean()


def objective_terms(out: ModelOutput, label: Tensor, modalities: Sequence[str], kind: str) -> tuple[Tensor, Tensor]:
    """``(CE(ō, y), A)``: the two unweighted LFM objectives of one forward pass."""
    return F.cross_entropy(out.logits, label), alignment([out.unimodal_logits[m] for m in modalities], kind)


def alpha_signal(
    model: MultimodalClassifier,
    batch: Batch,
    alpha_cls: float,
    alpha_al: float,
    kind: str,
    grad: Callable[..., tuple[Tensor | None, ...]] = torch.autograd.grad,
) -> float:
    """The learned rule's scalar a: the mean of H_tot·g_c over the first parameter tensor.

    H_tot is the Hessian of L_tot = α_cls CE + α_al A over all trainable parameters θ and
    g_c = ∇_θ CE; only the block of the first parameter of the first modality's encoder is formed.
    Runs in the model's current train/eval mode, with gradients. ``grad`` takes the gradients
    (``ctx.grad`` in a run, so fp16 loss scaling applies to both differentiations).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    first = next(p for p in model.modality_parameters(model.modalities[0]) if p.requires_grad)
    # A Hessian-vector product differentiates twice; the fused attention kernels (Transformer
    # encoders) have no double backward, the reference attention does.
    with sdpa_kernel(SDPBackend.MATH):
        ce, align = objective_terms(model(batch), batch.label, model.modalities, kind)
    g = grad(alpha_cls * ce + alpha_al * align, params, create_graph=True, allow_unused=True)
    g_c = grad(ce, params, retain_graph=True, allow_unused=True)
    # A parameter whose gradient is constant (or absent) contributes nothing to ∇_θ⟨g, g_c⟩.
    live = [(gi, ci) for gi, ci in zip(g, g_c, strict=True) if gi is not None and gi.requires_grad]
    vector = [ci if ci is not None else torch.zeros_like(gi) for gi, ci in live]
    (hvp,) = grad([gi for gi, _ in live], first, grad_outputs=vector, allow_unused=True)
    return 0.0 if hvp is None else float(hvp.mean())


def fitted_alpha_cls(epoch: int) -> float:
    """α_cls of ``Crema_epoch.py``'s polynomial at ``epoch``, clamped to [0, 1]."""
    return min(max(sum(c * epoch**k for k, c in enumerate(FITTED_COEFFS)), 0.0), 1.0)


def heuristic_alpha_al(epoch: int) -> float:
    """α_al of ``Crema_batch.py``: exp(−0.3·epoch) clipped to [0.05, 0.95]."""
    return min(max(math.exp(-0.3 * epoch), ALPHA_CLIP[0]), ALPHA_CLIP[1])


def learned_alpha_al(alpha_al: float, lr_alpha: float, signal: float) -> float:
    """One step of the learned rule: clip(α_al − η_α·a, 0.05, 0.95)."""
    return min(max(alpha_al - lr_alpha * signal, ALPHA_CLIP[0]), ALPHA_CLIP[1])


@METHODS.register("lfm")
class LFM(Method):
    adapted: ClassVar[Mapping[str, Any]] = {"halve_every": "10%"}  # official: η_α halves every 20 of 200 epochs
    HParams = LFMHParams
    search: ClassVar[Mapping[str, Any]] = {  # α_al₀: BalanceMM 0.05 … original 0.95; η_α a decade around 1e-4
        "alpha_al_init": [0.05, 0.25, 0.5, 0.75, 0.95],
        "lr_alpha": [1e-5, 1e-4, 1e-3],
    }
    needs = Needs(val=True)

    alpha_cls: Tensor
    alpha_al: Tensor
    lr_alpha: Tensor

    @classmethod
    def model_spec(cls, spec: ModelSpec, hp: Any) -> ModelSpec:
        # PAPER: separate linear heads; the fused logits are their mean (late fusion).
        return replace(spec, fusion="sum", fusion_options={"average": True}, unimodal_heads="slice")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # float64: the learned steps η_α·a are often far below float32 resolution at α ≈ 0.9.
        self.register_buffer("alpha_cls", torch.tensor(1.0 - self.hp.alpha_al_init, dtype=torch.float64))
        self.register_buffer("alpha_al", torch.tensor(self.hp.alpha_al_init, dtype=torch.float64))
        self.register_buffer("lr_alpha", torch.tensor(self.hp.lr_alpha, dtype=torch.float64))
        self.val_rows: Tensor | None = None

    def on_fit_start(self) -> None:
        if self.hp.schedule == "learned":
            # Drawn once, before any resume restores the generator, so a resumed run uses the same rows.
            size = self.ctx.split_size("val")
            self.val_rows = torch.randperm(size, generator=self.ctx.generator)[: self.hp.val_samples]

    def on_epoch_start(self, epoch: int) -> None:
        hp = self.hp
        if hp.schedule == "fitted":
            alpha_al = 1.0 - fitted_alpha_cls(epoch)
        elif hp.schedule == "heuristic":
            alpha_al = heuristic_alpha_al(epoch)
        else:
            if epoch % self.epoch_of(hp.halve_every, ge=1) == 0 and epoch != 0:
                self.lr_alpha.mul_(0.5)
            with self.ctx.phase("lfm_alpha"):
                signal = self._alpha_signal()
            alpha_al = learned_alpha_al(float(self.alpha_al), float(self.lr_alpha), signal)
            self.ctx.log(**{"lfm/signal": signal, "lfm/lr_alpha": float(self.lr_alpha)})
        self.alpha_al.fill_(alpha_al)
        self.alpha_cls.fill_(1.0 - alpha_al)
        self.ctx.log(**{"lfm/alpha_cls": 1.0 - alpha_al, "lfm/alpha_al": alpha_al})

    def _alpha_signal(self) -> float:
        if self.val_rows is None:
            raise RuntimeError("lfm draws its validation rows in on_fit_start; call it before on_epoch_start")
        batch = self.ctx.rows("val", self.val_rows)
        # Eval mode with gradients: BatchNorm uses its running statistics and does not absorb the
        # validation rows.
        with self.ctx.eval_mode(self.model, grad=True):
            return alpha_signal(
                self.model, batch, float(self.alpha_cls), float(self.alpha_al), self.hp.alignment, self.ctx.grad
            )

    def losses(self, out: ModelOutput, batch: Batch) -> dict[str, Tensor]:
        ce, align = objective_terms(out, batch.label, self.model.modalities, self.hp.alignment)
        # PAPER: the factor 2 of the released training loop.
        return {"ce": 2 * self.alpha_cls.to(ce.dtype) * ce, "align": 2 * self.alpha_al.to(align.dtype) * align}
