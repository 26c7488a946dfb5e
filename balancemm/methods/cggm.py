"""CGGM: Classifier-Guided Gradient Modulation.

Guo, Jin, Chen, Zhao. "Classifier-guided Gradient Modulation for Enhanced Multimodal Learning."
NeurIPS 2024 (arXiv 2411.01409). Official code: zrguo/CGGM @ 21e428c (``src/msatrain.py``; ``foodtrain.py``
and ``segtrain.py`` follow the same pattern), which this follows (documented in docs/methods/cggm.md).

Idea: one auxiliary classifier per modality learns, on the *detached* encoder features, how far each
modality alone has come. Each encoder's gradient magnitude is then set from how much its classifier's
accuracy improved over the last step: the modality that improved most gets the smallest factor, the
others larger ones. A second term pulls the fused head toward the classifiers' output layers in cosine.

State: a^prev = 0 for every modality; B^prev = 0 and U^prev = 0, so the first step has no alignment term.

1. main loss (hook ``losses``)
       L = CE(z, y) + λ ℓ_gm,  ℓ_gm = (1/M) (Σ_m |B^prev_m| − Σ_m B^prev_m cos(vec U^prev_m, vec W_m))
   with B^prev and U^prev (classifier m's output weight ``[C, d_m]``) from the previous step, detached,
   and W_m ``[C, d_m]`` the fused head's block that reads h_m (concat: the column block of the weight;
   sum fusion: modality m's own linear). ℓ_gm therefore trains only the fused head (term ``align``).
2. classifiers (hook ``after_backward``)
       u_m = f_m(sg(h_m)),  f_m = Linear(d_m, d_m) → ReLU → Linear(d_m, C),  L_cls = Σ_m CE(u_m, y)
   whose gradient reaches only the classifiers; they have their own optimiser (the protocol's recipe
   at lr ``cls_lr``), outside the run's, and are stepped here.
3. coefficients, from the batch accuracies a_m of the u_m (global batch in a data-parallel run)
       Δ_m = a_m − a^prev_m,  S = Σ_m Δ_m + 1e-8,  B_m = (S − Δ_m) / S,  a^prev ← a
   (Σ_m B_m = M − 1 up to the 1e-8; for M = 2, B_1 = Δ_2 / (Δ_1 + Δ_2)). B and the classifiers' output
   weights before their step become B^prev and U^prev of the next step's ℓ_gm.
4. magnitude: every gradient of encoder m is multiplied by ρ B_m, before the run's optimiser steps.

Three or more modalities: native; every sum above runs over the M modalities (the code writes out
2, 3 or 4 terms per script).

Original defaults (``run/*_run.py``): ρ ``--rou`` 1.3 (BraTS 1.0); λ ``--lamda`` 0.2 MOSI and IEMOCAP,
0.05 Food-101, 0.1 BraTS; classifier lr 5e-4 (BraTS 6e-3); the main optimiser Adam 1e-3 (MSA), AdamW 1e-3
(Food-101), SGD (BraTS); gradient clipping at 0.8 (MSA, Food-101) on the model's parameters.

Deviations from the paper / official code:
  * The classifiers act on pooled features: Linear → ReLU → Linear instead of two transformer layers
    over the detached token sequence, then ``proj1`` → ReLU → ``out_layer`` (``models/msamodel.py:77-94``).
    ``hidden_twice=true`` applies the first Linear twice, as ``Classifier.forward`` does
    (``msamodel.py:91-92``, a likely typo).
  * The paper describes the alignment with the unimodal *gradients*; the code passes the weights
    themselves (``msatrain.py:85-87,99-104``), which is what is done here.
  * The code builds ℓ_gm at step t with a differentiable clone of the head's weight and back-propagates
    it at step t+1, so its gradient is evaluated at the head of step t (``src/eval_metrics.py:165-173``).
    By default the term is rebuilt here from the stored B and U against the current head (a difference
    of one step's update); ``align_at=previous`` evaluates value and gradient at the stored head of step
    t, as the code does.
  * The code's ℓ_gm gradient also reaches the classifiers and is then discarded by their
    ``zero_grad`` (``msatrain.py:81``); here the stored U is detached, with the same effect.
  * Accuracies are counted on the model's device (the code uses sklearn on the CPU, ``msatrain.py:106``);
    same values.
  * The code scales the parameters whose name contains ``encoders.{m}`` and leaves its input
    projections ``proj.{m}`` unscaled (``msatrain.py:119-122``); here every parameter of encoder m is scaled.
  * ``clamp`` (ours, 2 by default) bounds B_m to [0, clamp]. The code's B is unbounded: Δ compares
    accuracies on *different* batches, so when Σ Δ ≈ 0 the B_m explode or turn negative (a negative B_m
    flips its encoder's gradient), and only the code's gradient clipping at 0.8 bounds the step; without
    that clipping (the protocol here has none) the code's rule diverges in the first epochs on the
    embedded data, so the default clamps. ``clamp=null`` with ``train.grad_clip=0.8`` is the code.
  * Clipping is the protocol's (``train.grad_clip``), also for the classifiers, whose step goes through
    ``ctx.optimizer_step``; the code clips only the model. The classifiers' optimiser is the protocol's
    recipe (Food-101's separate weight decay 3e-3 is not reproduced), and it does not follow the
    protocol's learning-rate schedule (the code's ReduceLROnPlateau steps only the main optimiser).
  * The MOSI regression variant (L1 loss, accuracy of the sign) is not offered: BalanceMM classifies.
Deviations from BalanceMM: the authors' BalanceMM toolkit has no CGGM; there is nothing to deviate from.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from balancemm.catalog.methods import CGGMHParams
from balancemm.data.batch import Batch
from balancemm.errors import ConfigError
from balancemm.methods.base import Method
from balancemm.models.classifier import ModelOutput, ModelSpec, MultimodalClassifier
from balancemm.models.fusions.concat import ConcatFusion
from balancemm.models.fusions.sum import SumFusion
from balancemm.registry import FUSIONS, METHODS

EPS = 1e-8  # PAPER: diff_sum = sum(diff) + 1e-8 (msatrain.py:109)
#: state-dict keys of the classifiers' optimiser state: ``cls_optimizer.<param index>.<name>``.
OPTIMIZER_KEY = "cls_optimizer."


class AuxClassifier(nn.Module):
    """f_m: ``[B, d]`` pooled feature → ``[B, C]`` logits, Linear(d, d) → ReLU → Linear(d, C).

    ``hidden_twice`` applies the first Linear twice before the ReLU, as the official classifier does.
    """

    def __init__(self, dim: int, num_classes: int, hidden_twice: bool = False) -> None:
        super().__init__()
        self.hidden = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, num_classes)
        self.hidden_twice = hidden_twice

    def forward(self, h: Tensor) -> Tensor:
        x = self.hidden(h)
        if self.hidden_twice:
            x = self.hidden(x)
        return self.out(F.relu(x))


def cggm_coefficients(acc: Tensor, acc_prev: Tensor, eps: float = EPS) -> Tensor:
    """B ``[M]`` from this step's accuracies a ``[M]`` and the previous step's a^prev ``[M]``:
    Δ = a − a^prev, S = Σ Δ + eps, B_m = (S − Δ_m)/S (unbounded; negative when S and Δ_m disagree)."""
    delta = acc - acc_prev
    total = delta.sum() + eps
    return (total - delta) / total


def alignment_term(coeffs: Tensor, cls_weights: Sequence[Tensor], head_weights: Sequence[Tensor]) -> Tensor:
    """ℓ_gm = (1/M)(Σ_m |B_m| − Σ_m B_m cos(vec U_m, vec W_m)), a scalar.

    Args:
        coeffs: B ``[M]``.
        cls_weights: U_m, the classifiers' output weights, ``[C, d_m]`` each.
        head_weights: W_m, the fused head's weight block that reads modality m, ``[C, d_m]`` each (the
            same tensor M times for the code's single fused ``out_layer``).
    """
    cos = torch.stack(
        [
            F.cosine_similarity(u.reshape(-1), w.reshape(-1), dim=0)
            for u, w in zip(cls_weights, head_weights, strict=True)
        ]
    )
    b = coeffs.to(cos.dtype)
    return (b.abs().sum() - (b * cos).sum()) / len(cls_weights)


def alignment_head_grads(coeffs: Tensor, cls_weights: Sequence[Tensor], head_weights: Sequence[Tensor]) -> list[Tensor]:
    """∂ℓ_gm/∂W_m ``[C, d_m]`` each, in closed form: −(B_m/M)(U_m/(‖U_m‖‖W_m‖) − cos_m W_m/‖W_m‖²).

    Norms are floored at 1e-8, so a zero U (before the first step) gives zero rather than NaN.
    """
    grads = []
    m = len(cls_weights)
    for b, u, w in zip(coeffs.tolist(), cls_weights, head_weights, strict=True):
        nu, nw = u.norm().clamp_min(EPS), w.norm().clamp_min(EPS)
        cos = (u * w).sum() / (nu * nw)
        grads.append(-(b / m) * (u / (nu * nw) - cos * w / nw**2))
    return grads


def head_blocks(model: MultimodalClassifier) -> dict[str, Tensor]:
    """W_m ``[C, d_m]`` per modality: the concat head's column blocks (views of its weight) or the sum
    fusion's per-modality linear weights."""
    fusion = model.fusion
    if isinstance(fusion, ConcatFusion):
        return fusion.modality_weights()[0]
    if isinstance(fusion, SumFusion):
        return {m: typing.cast(nn.Linear, fusion.fc[m]).weight for m in model.modalities}
    raise ConfigError(f"cggm aligns per-modality blocks of the fused head; {type(fusion).__name__} has none")


@METHODS.register("cggm")
class CGGM(Method):
    HParams = CGGMHParams
    search: ClassVar[Mapping[str, Any]] = {  # the values the official run scripts use (run/*_run.py)
        "lam": [0.05, 0.1, 0.2],  # Food-101, BraTS, MOSI/IEMOCAP
        "rho": [1.0, 1.3],  # BraTS, the others
        "cls_lr": [5e-4, 6e-3],  # MSA and Food-101 (Adam), BraTS (SGD, as the protocol's optimiser)
    }

    acc_prev: Tensor  # [M] float64 a^prev, the previous step's accuracies
    coeff_prev: Tensor  # [M] float64 B^prev, the previous step's coefficients

    @classmethod
    def model_spec(cls, spec: ModelSpec, hp: Any) -> ModelSpec:
        # ℓ_gm compares each classifier's output layer with the block of the fused head that reads h_m.
        if FUSIONS.resolve(spec.fusion) not in ("concat", "sum"):
            raise ConfigError(
                f"cggm aligns each modality's classifier with its block of the fused head, which model.fusion="
                f"{spec.fusion} does not have: use model.fusion=concat or sum"
            )
        return spec

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        model, mods = self.model, self.model.modalities
        dims, classes = model.fusion.dims, model.fusion.num_classes
        head_blocks(model)  # a fusion without per-modality blocks is refused here too (a model built by hand)
        self.classifiers = nn.ModuleDict({m: AuxClassifier(dims[m], classes, self.hp.hidden_twice) for m in mods})
        # Everything the next step needs is a buffer, so a resumed run continues exactly.
        self.register_buffer("acc_prev", torch.zeros(len(mods), dtype=torch.float64))
        self.register_buffer("coeff_prev", torch.zeros(len(mods), dtype=torch.float64))
        for m in mods:
            self.register_buffer(f"cls_weight_prev_{m}", torch.zeros(classes, dims[m]))
            if self.hp.align_at == "previous":
                self.register_buffer(f"head_weight_prev_{m}", torch.zeros(classes, dims[m]))
        self.cls_optimizer: torch.optim.Optimizer | None = None
        self._loaded_state: dict[int, dict[str, Tensor]] | None = None

    # -- the classifiers' optimiser: outside the run's, inside the checkpoints ----------------------

    def trainable_parameters(self) -> list[nn.Parameter]:
        # The run's optimiser must not step the classifiers: they have their own (cls_lr, own state).
        aux = {id(p) for p in self.classifiers.parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in aux]

    def classifier_optimizer(self) -> torch.optim.Optimizer:
        """The classifiers' optimiser (the protocol's recipe at ``cls_lr``), built on first use."""
        if self.cls_optimizer is None:
            self.cls_optimizer = self.ctx.new_optimizer(self.classifiers.parameters(), lr=self.hp.cls_lr)
            if self._loaded_state is not None:
                self._restore_optimizer(self._loaded_state)
        return self.cls_optimizer

    def _restore_optimizer(self, state: dict[int, dict[str, Tensor]]) -> None:
        assert self.cls_optimizer is not None
        groups = self.cls_optimizer.state_dict()["param_groups"]
        # load_state_dict puts every state tensor on its parameter's device.
        self.cls_optimizer.load_state_dict({"state": state, "param_groups": groups})

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.cls_optimizer is None:
            return
        for index, state in self.cls_optimizer.state_dict()["state"].items():
            for name, value in state.items():
                if value is None:
                    continue
                tensor = value if isinstance(value, Tensor) else torch.tensor(value)
                destination[f"{prefix}{OPTIMIZER_KEY}{index}.{name}"] = tensor if keep_vars else tensor.detach()

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        ours = prefix + OPTIMIZER_KEY
        state: dict[int, dict[str, Tensor]] = {}
        for key, value in state_dict.items():
            if key.startswith(ours):
                index, name = key[len(ours) :].split(".", 1)
                state.setdefault(int(index), {})[name] = value
        unexpected_keys[:] = [k for k in unexpected_keys if not k.startswith(ours)]
        self._loaded_state = state
        if self.cls_optimizer is not None:
            self._restore_optimizer(state)

    # -- hooks -------------------------------------------------------------------------------------

    def on_fit_start(self) -> None:
        self.classifier_optimizer()

    def classifier(self, modality: str) -> AuxClassifier:
        """f_m, the auxiliary classifier of one modality."""
        return typing.cast(AuxClassifier, self.classifiers[modality])

    def _stored(self, name: str) -> list[Tensor]:
        """A per-modality buffer (``cls_weight_prev``, ``head_weight_prev``) in modality order."""
        return [typing.cast(Tensor, getattr(self, f"{name}_{m}")) for m in self.model.modalities]

    def alignment(self) -> Tensor:
        """ℓ_gm from the previous step's B and U against the head (hook ``losses``); 0 before any step."""
        blocks = head_blocks(self.model)
        heads = [blocks[m] for m in self.model.modalities]
        cls_weights = self._stored("cls_weight_prev")
        with self.ctx.precision.full_precision():
            if self.hp.align_at == "current":
                return alignment_term(self.coeff_prev, cls_weights, heads)
            # PAPER: the code's value and gradient at the head of the step that built the term, applied now.
            before = self._stored("head_weight_prev")
            value = alignment_term(self.coeff_prev, cls_weights, before)
            grads = alignment_head_grads(self.coeff_prev, cls_weights, before)
            pull = torch.stack([(g * (w - w.detach())).sum() for g, w in zip(grads, heads, strict=True)]).sum()
            return value + pull  # the value at the stored head, the gradient evaluated there

    def losses(self, out: ModelOutput, batch: Batch) -> dict[str, Tensor]:
        return {"ce": F.cross_entropy(out.logits, batch.label), "align": self.hp.lam * self.alignment()}

    def after_backward(self, out: ModelOutput, batch: Batch) -> None:
        hp, ctx, mods = self.hp, self.ctx, self.model.modalities
        optimizer = self.classifier_optimizer()
        params = list(self.classifiers.parameters())
        with ctx.phase("cggm/classifiers"):
            logits = {m: self.classifier(m)(out.features[m].detach()) for m in mods}
            loss = torch.stack([F.cross_entropy(logits[m], batch.label) for m in mods]).sum()
            # Only L_cls reaches the classifiers, and the detached features keep it out of the encoders.
            for p, g in zip(params, ctx.grad(loss, params), strict=True):
                p.grad = g
        with torch.no_grad():
            correct = torch.stack([(logits[m].argmax(1) == batch.label).sum() for m in mods]).double()
            rows = torch.full((1,), len(batch), dtype=torch.float64, device=correct.device)
            counts = ctx.all_sum(torch.cat([correct, rows]))  # the global batch's counts on every rank
            acc = counts[:-1] / counts[-1]
            coeff = cggm_coefficients(acc, self.acc_prev)
            if hp.clamp is not None:
                coeff = coeff.clamp(0.0, hp.clamp)
            self.acc_prev.copy_(acc)
            self.coeff_prev.copy_(coeff)
            # U and W as they are now, before either optimiser steps: the next step's ℓ_gm reads them.
            for m, u in zip(mods, self._stored("cls_weight_prev"), strict=True):
                u.copy_(self.classifier(m).out.weight)
            if hp.align_at == "previous":
                blocks = head_blocks(self.model)
                for m, w in zip(mods, self._stored("head_weight_prev"), strict=True):
                    w.copy_(blocks[m])
            factors = (hp.rho * coeff).float()
            for i, m in enumerate(mods):
                for p in self.model.modality_parameters(m):
                    if p.grad is not None:
                        p.grad.mul_(factors[i])
        values = torch.cat([acc, coeff]).tolist()  # one read back to the host for the logs
        for i, m in enumerate(mods):
            ctx.log(**{f"cggm/acc_{m}": values[i], f"cggm/coeff_{m}": values[len(mods) + i]})
        # fp16: a classifier gradient that overflowed skips the classifiers' step only.
        if ctx.overflowed(optimizer):
            ctx.skip_step(optimizer)
        else:
            ctx.optimizer_step(optimizer)
