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
    """Unweighted mean of per-class F1 over all C classes of the dataset (``cm`` is ``[C, C]``).

    A class that neither occurs nor is predicted counts as F1 = 0, as in the paper's toolkit
    (BalanceBenchmark ``balancemm/evaluation/precisions.py`` 26–35, ``np.mean`` over every class) and in
    scikit-learn's ``f1_score(labels=range(C), average="macro", zero_division=0)``. Averaging only over
    the classes present (scikit-learn's default) gives a higher number whenever a split or subset lacks
    a class, so the paper's figures could not be set beside ours.
    """
    cm = cm.double()
    tp = cm.diag()
    denom = cm.sum(1) + cm.sum(0)  # 2·TP + FP + FN per class
    f1 = torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.zeros_like(tp))
    return float(f1.mean())
