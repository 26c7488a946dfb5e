"""Training FLOPs, counted over the actual training and attributed to the hook that spent them.

The per-operator formulas are torch's own (``torch.utils.flop_counter.flop_registry``: matmuls,
convolutions and attention, forward and backward, 2 FLOPs per multiply-add). We apply them from a
lightweight dispatch mode instead of ``FlopCounterMode`` because the latter also tracks the module
hierarchy on every call; the totals are identical (``tests/test_metrics.py`` checks this).

Attribution is exclusive: FLOPs go to the innermost open phase. The trainer opens phases around the
hooks (``forward``, ``losses``, ``backward``, ``after_backward``, ``on_epoch_start`` …) and methods can
name sub-phases with ``ctx.phase("boost")``. A phase a method names is *sticky*: everything inside it
stays there, including the template hooks of a side model it trains (G-Blending's estimation runs
forward and backward passes, which belong to the estimation, not to the run's own forward/backward).

Intercepting every operator has a price that grows as models shrink: on the embedded dataset's
compact CNNs exact counting adds 50–90 % to training time, on a ResNet-18 step about 5 %
(``benchmarks/trainer_overhead.py``). Three modes, recorded in every summary:

* ``exact``: every operator of the training is counted.
* ``sampled`` (default): everything outside the per-batch training steps is counted exactly
  (``on_fit_start``, ``on_epoch_start``/``end`` such as side trainings); of the training steps
  (``ctx.counted_step``), the first ``sample_steps`` of every epoch are counted exactly and the rest
  are extrapolated per phase from their FLOPs per sample. Steps are sampled per kind (the method
  phase they run in), so a method that owns the epoch and alternates kinds of steps (ReconBoost's
  boosting and rectification passes) has each kind sampled; such a method must do its work inside
  its steps, which is all that is counted of its epoch. Step cost is linear in the batch size, so
  the extrapolation is exact up to rounding for steps of one kind that do the same work
  (``tests/methods/test_all_methods.py`` compares both modes on every method).
* ``off``: nothing is counted.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry


def _pairwise_distance_flops(x1: Any, x2: Any, *args: Any, out_val: Any = None, **kwargs: Any) -> int:
    """``x1 [*, N, d]``, ``x2 [*, K, d]`` → 2·N·K·d per batch: the cross term of ‖a − b‖ dominates."""
    *batch, n, d = x1.shape
    return 2 * math.prod(batch) * n * x2.shape[-2] * d


# torch registers no formula for pairwise distances (PMR's prototype distances); its backward
# decomposes into matrix products, which torch does count.
_EXTRA_FORMULAS = {
    torch.ops.aten._euclidean_dist: _pairwise_distance_flops,
    torch.ops.aten._cdist_forward: _pairwise_distance_flops,
}


class _CountingMode(TorchDispatchMode):
    def __init__(self, meter: FlopMeter) -> None:
        super().__init__()
        self.meter = meter

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket) or _EXTRA_FORMULAS.get(func._overloadpacket)
        if formula is not None:
            self.meter._add(int(formula(*args, **kwargs, out_val=out)))
        return out


@dataclass
class _Sample:
    """One kind of training step within an epoch: how many were counted or skipped, and their FLOPs."""

    counted_steps: int = 0
    counted_samples: int = 0
    skipped_samples: int = 0
    flops: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))  # counted, by phase


class FlopMeter:
    """Counts FLOPs by phase (see the module docstring for the modes).

    ``by_phase`` and ``extrapolated`` survive checkpoints (:meth:`state_dict`), so a resumed run
    reports the FLOPs of the whole training, not only of its last segment.
    """

    def __init__(self, mode: str = "exact", sample_steps: int = 3) -> None:
        if mode not in ("exact", "sampled", "off"):
            raise ValueError(f"unknown FLOP counting mode {mode!r}")
        self.mode = mode
        self.sample_steps = sample_steps
        self.by_phase: defaultdict[str, int] = defaultdict(int)
        self.extrapolated = 0  # the part of ``total`` that was estimated, not counted
        self.stack: list[str] = ["other"]
        self.sticky: list[bool] = [False]  # parallel to stack: is this level inside a sticky phase?
        self._active = False
        self._in_step: _Sample | None = None  # the sample of the step being counted, if any
        self._samples: dict[str, _Sample] = {}  # this epoch's steps, by kind (the method phase they run in)

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def _add(self, flops: int) -> None:
        phase = self.stack[-1]
        self.by_phase[phase] += flops
        if self._in_step is not None:
            self._in_step.flops[phase] += flops

    @contextmanager
    def counting(self) -> Iterator[None]:
        """Count every operator run inside (nested use is fine; a no-op when off)."""
        if not self.enabled or self._active:
            yield
            return
        self._active = True
        try:
            with _CountingMode(self):
                yield
        finally:
            self._active = False

    @contextmanager
    def step(self, batch_size: int) -> Iterator[None]:
        """One training step of ``batch_size`` rows: counted, or left for extrapolation (sampled).

        Steps are sampled per kind, the method phase they run in (``ctx.phase``), so a method that
        alternates kinds of steps within an epoch (ReconBoost's boosting and rectification) has each
        kind counted on its own first steps and extrapolated from them.
        """
        if self._active:
            # Already inside an exactly counted region (e.g. a side training in on_epoch_start):
            # count it there, and keep it out of this epoch's sampling statistics.
            yield
            return
        kind = self.stack[-1] if self.sticky[-1] else ""
        sample = self._samples.setdefault(kind, _Sample())
        if self.mode == "sampled" and sample.counted_steps >= self.sample_steps:
            sample.skipped_samples += batch_size
            yield
            return
        sample.counted_steps += 1
        sample.counted_samples += batch_size
        self._in_step = sample
        try:
            with self.counting():
                yield
        finally:
            self._in_step = None

    def end_epoch(self) -> None:
        """Add the extrapolated FLOPs of the steps that were not counted this epoch."""
        for sample in self._samples.values():
            if not (sample.skipped_samples and sample.counted_samples):
                continue
            for phase, flops in sample.flops.items():
                estimate = round(flops * sample.skipped_samples / sample.counted_samples)
                self.by_phase[phase] += estimate
                self.extrapolated += estimate
        self._samples.clear()

    @contextmanager
    def phase(self, name: str, *, sticky: bool = False) -> Iterator[None]:
        """Attribute FLOPs run inside to ``name`` (innermost phase wins, unless inside a sticky one)."""
        inside_sticky = self.sticky[-1]
        self.stack.append(self.stack[-1] if inside_sticky else name)
        self.sticky.append(sticky or inside_sticky)
        try:
            yield
        finally:
            self.stack.pop()
            self.sticky.pop()

    @property
    def total(self) -> int:
        return sum(self.by_phase.values())

    def state_dict(self) -> dict[str, Any]:
        return {"by_phase": dict(self.by_phase), "extrapolated": self.extrapolated}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.by_phase = defaultdict(int, state["by_phase"])
        self.extrapolated = int(state["extrapolated"])
