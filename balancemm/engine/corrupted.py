"""Accuracy of a trained method when one modality is missing or corrupted at test time.

For every corruption (``balancemm/data/corruptions.py``) and severity the whole split is scored once.
The clean pass's encoder features are reused wherever a corruption cannot change them: ``missing`` only
re-runs the fusion on masked features, and an input corruption of modality m re-runs m's encoder alone.
That holds for a method that predicts with the model itself (the default ``predict``) on a model without
mid-fusion and with feature masking; any other method is asked for a full prediction of each corrupted
batch, so its own ``predict`` (MLA's weighting, ReconBoost's ensemble, …) is what is scored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from balancemm.config import RunConfig, deep_merge, parse_sets, protocol_yaml
from balancemm.context import Batching, derive_seed, eval_mode
from balancemm.data import SPLITS, create_dataset
from balancemm.data.batch import Batch
from balancemm.data.corruptions import Corruption, corrupt, parse_corruption
from balancemm.data.loader import close_loaders
from balancemm.device import resolve_device
from balancemm.engine.artifacts import load_run
from balancemm.engine.evaluate import evaluate
from balancemm.engine.rundir import RunDir
from balancemm.errors import ConfigError, DataError
from balancemm.files import DamagedFile
from balancemm.layout import read_json, write_json
from balancemm.methods.base import Method
from balancemm.metrics.robustness import curve_summary
from balancemm.registry import DATASET_OPTIONS
from balancemm.schema import parse, resolve_name


def input_scales(batches: Iterable[Batch], modalities: Sequence[str]) -> dict[str, float]:
    """σ_m, the standard deviation of each modality's float inputs over every element of a split (the
    Gaussian noise's unit); modalities of integer inputs (token ids) get none."""
    sums: dict[str, list[float]] = {}
    for batch in batches:
        for m in modalities:
            x = batch.inputs[m]
            if not x.is_floating_point():
                continue
            x = x.double()
            s = sums.setdefault(m, [0.0, 0.0, 0.0])
            s[0] += float(x.sum())
            s[1] += float((x * x).sum())
            s[2] += x.numel()
    out = {}
    for m, (total, squares, count) in sums.items():
        mean = total / max(count, 1)
        out[m] = max(squares / max(count, 1) - mean * mean, 0.0) ** 0.5
    return out


def _shares_features(method: Method) -> bool:
    model = method.model
    return type(method).predict is Method.predict and model.mid_fusion is None and model.mask == "feature"


def evaluate_corrupted(
    method: Method,
    batches: Iterable[Batch],
    corruptions: Sequence[Corruption],
    severities: Sequence[float],
    *,
    seed: int,
    scales: dict[str, float],
) -> dict[str, Any]:
    """Accuracy of ``method`` on every sample of ``batches`` under each corruption at each severity.

    Args:
        corruptions: what to corrupt (one modality, one kind each).
        severities: the grid, each in [0, 1]; 0 is the clean accuracy (scored once for all).
        seed: the run of corruptions' seed: each (corruption, severity) draws from its own generator,
            seeded from it, in split order.
        scales: σ_m of each modality's inputs (:func:`input_scales`).

    Returns:
        ``{"num_samples", "clean_accuracy", "corruptions": {name: {"severities", "accuracy", "auc",
        "relative"}}}`` (``auc`` and ``relative`` from :func:`~balancemm.metrics.robustness.curve_summary`).
    """
    model = method.model
    grid = [float(s) for s in severities]
    noisy = [(c, s) for c in corruptions for s in grid if s > 0]
    generators = {(c, s): torch.Generator().manual_seed(derive_seed(seed, "corrupt", c.name, s)) for c, s in noisy}
    correct = {key: 0 for key in noisy}
    clean, n = 0, 0
    shared = _shares_features(method)
    with eval_mode(method), method.ctx.autocast():
        for batch in batches:
            label = batch.label
            if shared:
                features = model.encode(batch)
                logits = model.fuse(model.apply_mask(features, batch.present, batch.modalities))
            else:
                logits = method.predict(batch).logits
            clean += int((logits.argmax(1) == label).sum())
            n += len(batch)
            for c, s in noisy:
                bad = corrupt(batch, c, s, scales.get(c.modality, 0.0), generators[(c, s)])
                if not shared:
                    logits = method.predict(bad).logits
                else:
                    seen = features if c.on_features else {**features, **model.encode(bad, only=[c.modality])}
                    logits = model.fuse(model.apply_mask(seen, bad.present, bad.modalities))
                correct[(c, s)] += int((logits.argmax(1) == label).sum())
    clean_accuracy = clean / max(n, 1)
    result: dict[str, Any] = {"num_samples": n, "clean_accuracy": clean_accuracy, "corruptions": {}}
    for c in corruptions:
        accuracy = [clean_accuracy if s == 0 else correct[(c, s)] / max(n, 1) for s in grid]
        result["corruptions"][c.name] = {"severities": grid, "accuracy": accuracy, **curve_summary(grid, accuracy)}
    return result


# -- evaluating a finished run ----------------------------------------------------------------------

DEFAULT_SEVERITIES = (0.0, 0.25, 0.5, 0.75, 1.0)


def _eval_config(cfg: RunConfig, dataset: str | None, sets: Sequence[str]) -> RunConfig:
    """The run's config with its data section replaced: another dataset (its protocol's data options)
    and/or ``data.*`` settings; the model and its training stay the run's."""
    if dataset is None and not sets:
        return cfg
    given = parse_sets(sets)
    others = sorted(set(given) - {"data"})
    if others:
        raise ConfigError(f"eval --set takes data.* keys only (the trained model is fixed); got {', '.join(others)}")
    name = resolve_name(DATASET_OPTIONS, dataset) if dataset is not None else cfg.run.dataset
    base = cfg.to_dict()["data"] if name == cfg.run.dataset else protocol_yaml(name).get("data", {})
    data: Any = parse(DATASET_OPTIONS.get(name), deep_merge(base, given.get("data", {})), "data")
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, dataset=name), data=data)


def _finished_run(path: str | Path) -> tuple[RunDir, dict[str, Any]]:
    """The run directory of a finished run and its config.json, both checked."""
    run = RunDir(path)
    if not run.path.is_dir():
        raise DataError(f"{run.path} is not a run directory; give the --out of a finished train")
    if not run.done.is_file():
        raise DataError(
            f"{run.path} is not a finished run (no {run.done.name} marker); finish it with its train command"
        )
    saved = run.read_config()
    run.read_summary()  # damaged or foreign files are named with what to do
    return run, saved


def eval_run(
    path: str | Path,
    *,
    split: str = "test",
    dataset: str | None = None,
    sets: Sequence[str] = (),
    corruptions: Sequence[str] = ("all",),
    severities: Sequence[float] = DEFAULT_SEVERITIES,
    seed: int = 0,
    device: str = "auto",
) -> dict[str, Any]:
    """Evaluate the selected weights of a finished run on a split, clean and under corruptions.

    The result is stored in ``<run>/eval.json`` under a key of everything that decides it (split,
    dataset and its options, corruptions, severities, seed); asking again for the same evaluation reads
    it back instead of computing it. Everything is checked before anything is loaded or written.

    Returns:
        ``{"key", "request", "clean": evaluate()'s dict, "robustness": evaluate_corrupted()'s dict}``.
    """
    if split not in ("val", "test"):
        raise ConfigError(f"--split {split}: evaluate on val or test")
    grid = sorted({float(s) for s in severities})
    bad = [s for s in grid if not 0.0 <= s <= 1.0]
    if bad or not grid:
        raise ConfigError(f"--severities {','.join(map(str, bad or grid))}: every severity must be in [0, 1]")
    run, recorded = _finished_run(path)
    saved = RunConfig.from_dict(recorded["config"])
    cfg = _eval_config(saved, dataset, sets)
    modalities = tuple(sorted(saved.model.encoders))
    theirs = tuple(DATASET_OPTIONS.entry(cfg.run.dataset).meta.get("modalities") or ())
    if theirs != modalities:
        raise ConfigError(
            f"dataset {cfg.run.dataset} has modalities {', '.join(theirs)}; "
            f"the run was trained on {', '.join(modalities)}"
        )
    try:
        chosen = list(dict.fromkeys(c for text in corruptions for c in parse_corruption(text, modalities)))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    request = {
        "split": split,
        "dataset": cfg.run.dataset,
        "data": cfg.to_dict()["data"],
        "corruptions": [c.name for c in chosen],
        "severities": grid,
        "seed": seed,
    }
    key = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()[:16]
    stored = _stored(run)
    if key in stored:
        return stored[key]
    data = create_dataset(cfg.run.dataset, cfg.data)
    classes = _num_classes(run, recorded)
    if data.num_classes != classes:
        raise ConfigError(
            f"dataset {cfg.run.dataset} has {data.num_classes} classes; the run's model predicts {classes}"
        )
    try:
        _, method = load_run(run.path, dataset=data)
    except RuntimeError as exc:  # a state dict that does not fit: the inputs have other shapes
        raise ConfigError(
            f"dataset {cfg.run.dataset}'s inputs do not fit the run's model ({str(exc).splitlines()[-1].strip()})"
        ) from None
    method.to(resolve_device(device))
    batching = Batching(
        eval_batch_size=saved.train.eval_batch_size,
        device=next(method.parameters()).device,
        num_workers=saved.train.num_workers,
    )
    try:
        held = data.split(split)  # type: ignore[arg-type]
        scales = input_scales(batching(held), modalities)
        missing = [c.name for c in chosen if c.kind == "gaussian" and c.modality not in scales]
        if missing:
            raise ConfigError(
                f"--corrupt {', '.join(missing)}: gaussian noise needs float inputs (token ids: token_drop)"
            )
        clean = evaluate(method, batching(held), data.num_classes)
        robust = evaluate_corrupted(method, batching(held), chosen, grid, seed=seed, scales=scales)
    finally:
        close_loaders([data.split(s) for s in SPLITS])
    # The evaluation sweeps and the report ask for: test split, the run's own data, every default corruption.
    standard = (
        split == "test"
        and cfg == saved
        and list(corruptions) == ["all"]
        and grid == list(DEFAULT_SEVERITIES)
        and seed == 0
    )
    result = {"key": key, "request": request, "standard": standard, "clean": clean, "robustness": robust}
    with run.locked():
        write_json(run.eval, {**_stored(run), key: result})
    return result


def _num_classes(run: RunDir, recorded: dict[str, Any]) -> int:
    """The number of classes the run's model predicts, from its config.json ``recorded``."""
    facts = recorded.get("dataset")
    if not isinstance(facts, dict) or not isinstance(facts.get("num_classes"), int):
        raise DamagedFile(run.config, "has no dataset facts (num_classes)", f"delete {run.path} and train it again")
    return int(facts["num_classes"])


def _stored(run: RunDir) -> dict[str, Any]:
    if not run.eval.is_file():
        return {}
    stored = read_json(run.eval, "delete it and evaluate again")
    if not isinstance(stored, dict) or not all(
        isinstance(v, dict) and {"key", "request", "clean", "robustness"} <= set(v) for v in stored.values()
    ):
        raise DamagedFile(run.eval, "is not a BalanceMM evaluation file", "delete it and evaluate again")
    return stored
