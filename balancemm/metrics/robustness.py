"""Robustness to corrupted modalities: the area under an accuracy-severity curve, MultiBench's relative and
effective robustness. Plain Python: reports compute them from run directories without torch.

Liang et al., "MultiBench: Multiscale Benchmarks for Multimodal Representation Learning", NeurIPS 2021
(datasets and benchmarks), §3: *relative robustness* is the accuracy kept under imperfect modalities
compared with the clean accuracy, *effective robustness* the accuracy under corruption beyond what the
clean accuracy alone predicts, read off a line fitted across the compared methods.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence


def auc(severities: Sequence[float], accuracy: Sequence[float]) -> float:
    """The area under the accuracy-severity curve by the trapezoid rule, divided by the severity range
    it spans: the mean accuracy over the range (a grid of one point gives that point's accuracy).

    Args:
        severities: increasing severities in [0, 1].
        accuracy: the accuracy at each.
    """
    if len(severities) != len(accuracy) or not severities:
        raise ValueError("auc needs one accuracy per severity, and at least one")
    if any(b <= a for a, b in itertools.pairwise(severities)):
        raise ValueError(f"severities must increase: {list(severities)}")
    span = severities[-1] - severities[0]
    if span == 0:
        return float(accuracy[0])
    steps = range(len(severities) - 1)
    area = sum((severities[i + 1] - severities[i]) * (accuracy[i] + accuracy[i + 1]) / 2 for i in steps)
    return area / span


def curve_summary(severities: Sequence[float], accuracy: Sequence[float]) -> dict[str, float | None]:
    """``auc`` (:func:`auc`) and ``relative``, the relative robustness: ``auc`` over the clean accuracy
    (the accuracy at severity 0, the grid's first point; None when the grid has no 0 or it is 0)."""
    area = auc(severities, accuracy)
    clean = accuracy[0] if severities[0] == 0 else 0.0
    return {"auc": area, "relative": area / clean if clean > 0 else None}


def effective_robustness(clean: Sequence[float], robust: Sequence[float]) -> list[float]:
    """Each method's robust accuracy (an AUC) minus the value the least-squares line ``robust ≈ a + b·clean``
    fitted across all the methods gives for its clean accuracy. Positive: more robust than its clean
    accuracy predicts. With fewer than two distinct clean accuracies the line is flat at their mean.
    """
    if len(clean) != len(robust) or not clean:
        raise ValueError("effective_robustness needs one robust value per clean accuracy, and at least one")
    n = len(clean)
    mx, my = sum(clean) / n, sum(robust) / n
    sxx = sum((x - mx) ** 2 for x in clean)
    if sxx == 0:  # every method equally accurate when clean: the line is flat at the mean
        return [y - my for y in robust]
    slope = sum((clean[i] - mx) * robust[i] for i in range(n)) / sxx  # Σ(x − x̄)(y − ȳ) = Σ(x − x̄)·y
    return [robust[i] - (my + slope * (clean[i] - mx)) for i in range(n)]
