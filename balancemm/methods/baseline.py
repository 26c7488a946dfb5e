"""Baseline: concatenation fusion trained with a single cross-entropy on the fused logits.

The paper's reference point (BalanceBenchmark §6.1, eq. 1–3): z = W[h_1; …; h_M] + b and
L = CE(z, y). Every hook keeps its default; the protocol's fusion (concat) is used unchanged.

Deviations: none (BalanceMM's ``baselineTrainer`` is the same objective).
"""

from __future__ import annotations

from balancemm.methods.base import Method
from balancemm.registry import METHODS


@METHODS.register("baseline")
class Baseline(Method):
    def acts_in(self, epoch: int) -> bool:
        return False  # the reference itself: plain training, nothing to record as an intervention
