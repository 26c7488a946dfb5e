"""Evaluation: accuracy, macro-F1 (fused and per modality), Shapley values and the imbalance degree."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F

from balancemm.context import eval_mode
from balancemm.data.batch import Batch
from balancemm.methods.base import Method
from balancemm.metrics.classification import accuracy, confusion_matrix, macro_f1
from balancemm.metrics.imbalance import imbalance_degree
from balancemm.metrics.shapley import coalitions, shapley_values


def coalition_name(coalition: frozenset[str]) -> str:
    """``frozenset({"visual", "audio"})`` → ``"audio+visual"``; the empty coalition is ``"empty"``."""
    return "+".join(sorted(coalition)) or "empty"


def evaluate(method: Method, batches: Iterable[Batch], num_classes: int, *, shapley: bool = True) -> dict[str, Any]:
    """Evaluate on every sample of ``batches`` (no dropped last batch), in eval mode, without gradients.

    In a data-parallel run each rank scores its part of the split and the counts are summed over the
    ranks (predictions gathered in rank order), so every rank returns the numbers of the whole split.

    Returns a JSON-able dict: ``num_samples``, ``loss`` (mean CE of the fused logits), ``accuracy``,
    ``macro_f1``, ``per_modality`` ({m: {accuracy, macro_f1}} from each modality's own logits),
    ``predictions_sha256`` (of the predicted class ids as int64, in sample order) and, with
    ``shapley``, ``shapley`` ({m: φ_m}, paper eq. 7–8), ``coalition_values`` ({name: v(S)}, including
    v(∅) as ``"empty"``) and ``imbalance`` (eq. 9–10; None for one modality).
    """
    modalities = method.model.modalities
    coals = coalitions(modalities) if shapley else []
    fused_cm = torch.zeros(num_classes, num_classes, dtype=torch.long)
    uni_cm = {m: torch.zeros_like(fused_cm) for m in modalities}
    coal_correct = torch.zeros(len(coals), dtype=torch.long)
    ctx = method.ctx
    loss_sum, n = 0.0, 0
    predictions: list[torch.Tensor] = []
    # Evaluation computes in the run's precision too (the coalition passes included), as it trained.
    with eval_mode(method), method.ctx.autocast():
        for batch in batches:
            if shapley:
                out, coal_logits = method.predict_coalitions(batch, coals)
                coal_correct += (coal_logits.argmax(-1) == batch.label).sum(1).cpu()
            else:
                out = method.predict(batch)
            loss_sum += float(F.cross_entropy(out.logits.float(), batch.label, reduction="sum"))
            n += len(batch)
            predicted = out.logits.argmax(1)
            predictions.append(predicted.to(torch.int64).cpu())
            fused_cm += confusion_matrix(predicted, batch.label, num_classes)
            for m in modalities:
                uni_cm[m] += confusion_matrix(out.unimodal_logits[m].argmax(1), batch.label, num_classes)
    if ctx.world.distributed:
        loss_sum, n = ctx.all_sum(torch.tensor([loss_sum, n], dtype=torch.float64)).tolist()
        n = int(n)
        fused_cm, coal_correct = ctx.all_sum(fused_cm), ctx.all_sum(coal_correct)
        uni_cm = {m: ctx.all_sum(cm) for m, cm in uni_cm.items()}
    # Two runs with the same digest made the same prediction on every sample: the report uses it to
    # show a method that, on this seed, did nothing different from the baseline.
    ordered = ctx.gather(torch.cat(predictions) if predictions else torch.zeros(0, dtype=torch.int64))
    digest = hashlib.sha256(ordered.numpy().astype("<i8").tobytes())
    result: dict[str, Any] = {
        "num_samples": n,
        "loss": loss_sum / max(n, 1),
        "accuracy": accuracy(fused_cm),
        "macro_f1": macro_f1(fused_cm),
        "per_modality": {m: {"accuracy": accuracy(cm), "macro_f1": macro_f1(cm)} for m, cm in uni_cm.items()},
        "predictions_sha256": digest.hexdigest(),
    }
    if shapley:
        values = {s: int(c) / max(n, 1) for s, c in zip(coals, coal_correct, strict=True)}
        phi = shapley_values(values, modalities)
        result["shapley"] = phi
        result["coalition_values"] = {coalition_name(s): v for s, v in values.items()}
        result["imbalance"] = imbalance_degree(phi)
    return result
