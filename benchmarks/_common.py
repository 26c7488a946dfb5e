"""Helpers shared by the benchmark scripts (timing with interleaved repeats, medians; one method
on one batch of a dataset with its protocol)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from balancemm.config import resolve_config
from balancemm.data import Batch, Batches, create_dataset
from balancemm.methods import METHODS, Method, RunContext
from balancemm.models import ModelSpec, build_model


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each function, run in alternation so machine noise hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def method_and_batch(name: str, dataset: str, **hparams: Any) -> tuple[Method, Batch]:
    """A freshly initialised method (seed 0, the dataset's protocol and model, SGD attached) and the
    first training batch of the protocol's batch size."""
    cfg = resolve_config(name, dataset, overrides={"method": hparams} if hparams else None)
    data = create_dataset(dataset, cfg.data)
    cls = METHODS.get(name)
    torch.manual_seed(0)
    spec = cls.model_spec(ModelSpec.from_config(cfg.model, data.input_shapes, data.num_classes), cfg.method)
    model = build_model(spec)
    method = cls(model, RunContext(model.modalities), cfg.method)
    method.ctx.attach_optimizer(torch.optim.SGD(method.parameters(), lr=1e-3, momentum=0.9))
    batch = next(iter(Batches(data.split("train"), cfg.train.batch_size)))
    return method, batch
