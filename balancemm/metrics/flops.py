"""Training FLOPs, counted over the actual training and attributed to the hook that spent them.

The per-operator formulas are torch's own (``torch.utils.flop_counter.flop_registry``: matmuls,
convolutions and attention, forward and backward, 2 FLOPs per multiply-add). We apply them from a
lightweight dispatch mode instead of ``FlopCounterMode`` because the latter also tracks the module
hierarchy on every call, which slowed small-model training noticeably; the totals are identical
(``tests/test_metrics.py`` checks this against ``FlopCounterMode``).

Attribution is exclusive: FLOPs go to the innermost open phase. The trainer opens phases around the
hooks (``forward``, ``losses``, ``backward``, ``after_backward``, ``on_epoch_start`` …) and methods can
name sub-phases with ``ctx.phase("boost")``.
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
            self.meter.by_phase[self.meter.stack[-1]] += int(formula(*args, **kwargs, out_val=out))
        return out


class FlopMeter:
    """Counts FLOPs of everything run inside :meth:`counting`, by phase.

    ``by_phase`` survives checkpoints (see :meth:`state_dict`), so a resumed run reports the FLOPs
    of the whole training, not only of its last segment.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.by_phase: defaultdict[str, int] = defaultdict(int)
        self.stack: list[str] = ["other"]

    @contextmanager
    def counting(self) -> Iterator[None]:
        """Count every operator run inside (a no-op when disabled)."""
        if not self.enabled:
            yield
            return
        with _CountingMode(self):
            yield

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Attribute FLOPs run inside to ``name`` (innermost phase wins)."""
        self.stack.append(name)
        try:
            yield
        finally:
            self.stack.pop()

    @property
    def total(self) -> int:
        return sum(self.by_phase.values())

    def state_dict(self) -> dict[str, int]:
        return dict(self.by_phase)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.by_phase = defaultdict(int, state)
