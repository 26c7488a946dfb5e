"""Linear probes of trained encoders: how much does a modality's encoder know on its own?

This is the "unimodal counterpart" of the paper's Fig. 2 (BalanceMM's LinearProbe): freeze the
encoder of one modality, extract its pooled features, fit a multinomial logistic regression on the
training split, choose the regularisation on the validation split, report test accuracy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from balancemm.context import Batching
from balancemm.data import SPLITS, MultimodalDataset, create_dataset
from balancemm.data.loader import close_loaders
from balancemm.device import resolve_device
from balancemm.engine.artifacts import load_run
from balancemm.engine.rundir import RunDir
from balancemm.errors import ConfigError
from balancemm.files import DamagedFile
from balancemm.layout import read_json, write_json
from balancemm.models import MultimodalClassifier

C_GRID = (0.01, 0.1, 1.0, 10.0)
BATCH_SIZE = 512  # rows per feature-extraction batch


def features(
    model: MultimodalClassifier, data: MultimodalDataset, split: str, modality: str, num_workers: int = 0
) -> np.ndarray:
    """Pooled features ``[N, d]`` of one modality's encoder on a split, in eval mode, on the model's
    device and in fp32 (the probe is a measurement, not a training run: no autocast); splits without
    an in-memory fast path are read by ``num_workers`` loader workers (the run's ``train.num_workers``).

    With mid-fusion (Greedy's MMTM) the other modalities are masked out, as in the Shapley metric's
    coalitions: their squeezed features are zero, so the probe reads what the encoder knows on its own
    rather than the other modalities fed into its branch.
    """
    model.eval()
    batching = Batching(device=next(model.parameters()).device, num_workers=num_workers)
    out = []
    with torch.no_grad():
        for batch in batching(data.split(split), batch_size=BATCH_SIZE):  # type: ignore[arg-type]
            alone = batch.with_only([modality]) if model.mid_fusion is not None else batch
            out.append(model.encode(alone, only=[modality])[modality].float().cpu())
    return torch.cat(out).numpy()


def linear_probe(
    model: MultimodalClassifier, data: MultimodalDataset, modality: str, num_workers: int = 0
) -> dict[str, Any]:
    """Fit the probe; returns test/val accuracy and the chosen inverse regularisation C."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    xs = {s: features(model, data, s, modality, num_workers) for s in ("train", "val", "test")}
    ys = {s: data.split(s).labels.numpy() for s in xs}  # type: ignore[arg-type]
    scaler = StandardScaler().fit(xs["train"])
    xs = {s: scaler.transform(x) for s, x in xs.items()}
    best: tuple[float, float, Any] = (-1.0, 0.0, None)
    for c in C_GRID:
        clf = LogisticRegression(C=c, max_iter=2000).fit(xs["train"], ys["train"])
        val = float(clf.score(xs["val"], ys["val"]))
        if val > best[0]:
            best = (val, c, clf)
    val_acc, c, clf = best
    return {
        "modality": modality,
        "test_accuracy": float(clf.score(xs["test"], ys["test"])),
        "val_accuracy": val_acc,
        "C": c,
    }


def probe_run(path: str | Path, modality: str | None = None, device: str = "auto") -> dict[str, dict[str, Any]]:
    """Probe every modality (or one) of the selected checkpoint of a finished run directory.

    The results are also merged into ``<run>/probe.json``, where reports read them without torch. The
    run directory is locked meanwhile, so a probe never runs beside a training of the run or another probe
    (which would lose one's results in probe.json).
    """
    run = RunDir(path)
    if run.config.is_file():
        run.read_config()  # a damaged config.json is named with what to do about it
    where = resolve_device(device)
    cfg, method = load_run(path)
    modalities = list(method.model.modalities)
    if modality is not None and modality not in modalities:
        raise ConfigError(f"{run.path} has no modality {modality!r}; its modalities: {', '.join(modalities)}")
    method.to(where)
    with run.locked():
        data = create_dataset(cfg.run.dataset, cfg.data)
        try:
            results = {
                m: linear_probe(method.model, data, m, cfg.train.num_workers)
                for m in ([modality] if modality else modalities)
            }
        finally:
            close_loaders([data.split(s) for s in SPLITS])
        earlier = read_json(run.probe) if run.probe.is_file() else {}
        if not isinstance(earlier, dict):
            raise DamagedFile(run.probe, "is not a JSON object")
        write_json(run.probe, {**earlier, **results})
    return results
