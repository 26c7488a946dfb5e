"""Accuracy and macro-F1 from a confusion matrix, accumulated over every evaluated sample."""

from __future__ import annotations

import torch
from torch import Tensor


def confusion_matrix(pred: Tensor, label: Tensor, num_classes: int) -> Tensor:
    """``[C, C]`` counts, rows = true class, columns = predicted class. ``pred``, ``label``: ``[N]``."""
    flat = label.long() * num_classes + pred.long()
    return torch.bincount(flat.cpu(), minlength=num_classes * num_classes).view(num_classes, num_classes)


def accuracy(cm: Tensor) -> float:
    total = int(cm.sum())
    return float(cm.trace()) / total if total else 0.0


def macro_f1(cm: Tensor) -> float:
    """Unweighted mean of per-class F1 over the classes present in the labels or the predictions.

    This is scikit-learn's ``f1_score(average="macro")`` (with ``zero_division=0``): a class that
    neither occurs nor is predicted does not drag the mean to 0.
    """
    cm = cm.double()
    tp = cm.diag()
    support, predicted = cm.sum(1), cm.sum(0)
    denom = support + predicted
    seen = denom > 0
    if not bool(seen.any()):
        return 0.0
    f1 = torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.zeros_like(tp))
    return float(f1[seen].mean())
