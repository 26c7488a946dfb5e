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
  (``on_fit_start``, ``on_epoch_start``/``end`` such as side trainings, and methods that own the
  whole epoch); of the training steps, the first ``sample_steps`` of every epoch are counted exactly
  and the rest are extrapolated per phase from their FLOPs per sample. Step cost is linear in the
  batch size, so the extrapolation is exact up to rounding for methods whose steps all do the same
  work (``tests/test_metrics.py`` compares both modes on every method).
* ``off``: nothing is counted.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry


class _CountingMode(TorchDispatchMode):
    def __init__(self, meter: FlopMeter) -> None:
        super().__init__()
        self.meter = meter

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.meter._add(int(formula(*args, **kwargs, out_val=out)))
        return out


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
        self._in_step = False
        self._step_flops: defaultdict[str, int] = defaultdict(int)  # counted steps of this epoch, by phase
        self._counted_steps = 0
        self._counted_samples = 0
        self._skipped_samples = 0

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def _add(self, flops: int) -> None:
        phase = self.stack[-1]
        self.by_phase[phase] += flops
        if self._in_step:
            self._step_flops[phase] += flops

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
        """One training step of ``batch_size`` rows: counted, or left for extrapolation (sampled)."""
        if self._active:
            # Already inside an exactly counted region (e.g. a side training in on_epoch_start):
            # count it there, and keep it out of this epoch's sampling statistics.
            yield
            return
        if self.mode == "sampled" and self._counted_steps >= self.sample_steps:
            self._skipped_samples += batch_size
            yield
            return
        self._counted_steps += 1
        self._counted_samples += batch_size
        self._in_step = True
        try:
            with self.counting():
                yield
        finally:
            self._in_step = False

    def end_epoch(self) -> None:
        """Add the extrapolated FLOPs of the steps that were not counted this epoch."""
        if self._skipped_samples and self._counted_samples:
            for phase, flops in self._step_flops.items():
                estimate = round(flops * self._skipped_samples / self._counted_samples)
                self.by_phase[phase] += estimate
                self.extrapolated += estimate
        self._step_flops.clear()
        self._counted_steps = self._counted_samples = self._skipped_samples = 0

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
