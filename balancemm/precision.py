"""Mixed precision for one run: autocast regions, and loss scaling that never shows a method a scaled gradient.

``bf16`` and ``fp16`` run the forward passes, the losses and evaluation under ``torch.autocast``;
parameters, gradients and optimiser state stay fp32. ``fp16``'s narrow exponent range needs loss
scaling: the loss is multiplied by a power of two S before each backward pass so small gradients do
not flush to zero in half precision, and the step is skipped (S halved) when a gradient overflowed.

Why not ``torch.amp.GradScaler``: it unscales once per step, over the gradients accumulated in
``.grad``, just before the optimiser step. Several methods read or combine gradients *between*
backward passes (MLA projects the head's gradient after each modality's backward, MMPareto takes
per-loss gradients with ``autograd.grad``), so they would see gradients multiplied by S. Here every
backward pass returns true gradients: :meth:`Precision.backward` scales the loss, and divides the
gradients it produced by S as soon as it ends. S is a power of two, so both the multiplication and
the division are exact: the gradients a method sees are exactly those of an fp16 forward without
scaling, minus the underflow that scaling prevents. The scale's schedule is GradScaler's: start at
2^16, halve on an overflow, double after 2000 steps in a row without one.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from balancemm.device import DTYPES


class Precision:
    """The autocast and loss-scaling policy of a run (``fp32``, ``bf16`` or ``fp16``).

    Args:
        name: the resolved precision (``balancemm.device.resolve_precision``).
        device_type: ``"cpu"`` or ``"cuda"``.
        init_scale, growth_interval: fp16's loss-scale schedule (GradScaler's defaults).
    """

    def __init__(
        self, name: str = "fp32", device_type: str = "cpu", *, init_scale: float = 2.0**16, growth_interval: int = 2000
    ) -> None:
        if name not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"unknown precision {name!r}")
        self.name = name
        self.device_type = device_type
        self.dtype = DTYPES.get(name)
        self.scaled = name == "fp16"
        self.scale = init_scale if self.scaled else 1.0
        self.growth_interval = growth_interval
        self.good_steps = 0  # steps in a row without an overflow, towards the next doubling
        self.skipped = 0  # steps skipped because a gradient overflowed, over the whole run

    def autocast(self) -> Any:
        """The region's autocast (a no-op in fp32)."""
        return torch.autocast(self.device_type, dtype=self.dtype) if self.dtype is not None else nullcontext()

    def full_precision(self) -> Any:
        """Autocast switched off inside (backward passes and optimiser steps run outside autocast)."""
        return torch.autocast(self.device_type, enabled=False) if self.dtype is not None else nullcontext()

    # -- gradients -------------------------------------------------------------------------------

    def backward(self, loss: Tensor, params: Sequence[nn.Parameter], **kwargs: Any) -> None:
        """``loss.backward(**kwargs)``, leaving true (unscaled) gradients in the ``.grad`` of ``params``.

        ``params`` must hold every parameter the pass can reach: gradients accumulated earlier in the
        step are scaled up first, so after the pass and one division every ``.grad`` is true again.
        """
        with self.full_precision():
            if not self.scaled:
                loss.backward(**kwargs)
                return
            self._mul_grads(params, self.scale)
            (loss * self.scale).backward(**kwargs)
            self._mul_grads(params, 1.0 / self.scale)

    def grad(
        self, outputs: Tensor | Sequence[Tensor], inputs: Sequence[Tensor], **kwargs: Any
    ) -> tuple[Tensor | None, ...]:
        """``torch.autograd.grad(outputs, inputs, **kwargs)`` with scaling: true gradients (graph kept
        with ``create_graph``, so a Hessian-vector product through them is true as well)."""
        with self.full_precision():
            if not self.scaled:
                return torch.autograd.grad(outputs, inputs, **kwargs)
            scaled = outputs * self.scale if isinstance(outputs, Tensor) else [o * self.scale for o in outputs]
            grads = torch.autograd.grad(scaled, inputs, **kwargs)
            return tuple(None if g is None else g / self.scale for g in grads)

    @staticmethod
    def _mul_grads(params: Sequence[nn.Parameter], factor: float) -> None:
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, factor)

    def finite(self, params: Sequence[nn.Parameter]) -> bool:
        """Whether every gradient of ``params`` is finite; always true without loss scaling (no check,
        no device sync: in fp32 and bf16 a non-finite gradient comes from a non-finite loss, which the
        loop already stops on)."""
        if not self.scaled:
            return True
        grads = [p.grad for p in params if p.grad is not None]
        return not grads or bool(torch.stack(torch._foreach_norm(grads)).isfinite().all())

    def update(self, overflow: bool) -> None:
        """After each step: halve the scale on an overflow, double it after a run of good steps."""
        if not self.scaled:
            return
        if overflow:
            self.scale /= 2.0
            self.good_steps = 0
            self.skipped += 1
            return
        self.good_steps += 1
        if self.good_steps == self.growth_interval:
            self.scale *= 2.0
            self.good_steps = 0

    # -- checkpoints -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "scale": self.scale, "good_steps": self.good_steps, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale = float(state["scale"])
        self.good_steps = int(state["good_steps"])
        self.skipped = int(state["skipped"])
