"""Shared fixtures: a session cache for the embedded dataset, tiny in-memory datasets, small models."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from balancemm.config import EncoderConfig
from balancemm.data.base import InMemorySplit, MultimodalDataset, Split, SplitName
from balancemm.data.batch import Batch
from balancemm.distributed import World
from balancemm.methods import METHODS, Method, RunContext
from balancemm.models import ModelSpec, MultimodalClassifier, build_model
from balancemm.models.encoders.cnn import CompactCNNOptions
from balancemm.precision import Precision
from balancemm.schema import parse


@pytest.fixture(scope="session", autouse=True)
def _dataset_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    # One cache per test session (subprocesses inherit it), never the user's ~/.cache.
    old = os.environ.get("BALANCEMM_CACHE")
    os.environ["BALANCEMM_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("BALANCEMM_CACHE", None)
    else:
        os.environ["BALANCEMM_CACHE"] = old


MODALITY_SHAPES = {"audio": (4, 6), "text": (3, 5), "visual": (1, 6, 6)}


class TinyDataset(MultimodalDataset):
    """Random, learnable 2- or 3-modality data for fast unit tests (not registered)."""

    Options: ClassVar[type] = object
    name: ClassVar[str] = "tiny"

    def __init__(self, num_modalities: int = 2, n: int = 24, num_classes: int = 3, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.modalities = ("audio", "visual") if num_modalities == 2 else ("audio", "text", "visual")
        self.num_classes = num_classes
        self.class_names = tuple(str(c) for c in range(num_classes))
        self.input_shapes = {m: MODALITY_SHAPES[m] for m in self.modalities}
        self._splits = {}
        for split in ("train", "val", "test"):
            labels = torch.arange(n) % num_classes
            inputs = {
                m: torch.randn(n, *s, generator=g) + labels.view(-1, *[1] * len(s))
                for m, s in self.input_shapes.items()
            }
            self._splits[split] = InMemorySplit(inputs, labels)

    def split(self, name: SplitName) -> Split:
        return self._splits[name]


def tiny_spec(data: TinyDataset, **kw: Any) -> ModelSpec:
    enc = {m: EncoderConfig("cnn", CompactCNNOptions(channels=(4, 6))) for m in data.modalities}
    return ModelSpec(data.modalities, data.input_shapes, data.num_classes, enc, **kw)


def tiny_model(data: TinyDataset, **kw: Any) -> MultimodalClassifier:
    torch.manual_seed(0)
    return build_model(tiny_spec(data, **kw))


def first_batch(data: TinyDataset, n: int = 8) -> Batch:
    split = data.split("train")
    rows = torch.arange(n)
    present = torch.ones(n, len(data.modalities), dtype=torch.bool)
    inputs = split.get_batch(rows)
    assert inputs is not None
    return Batch(inputs, split.labels[rows], rows, present, data.modalities)


def build_method(
    name: str,
    data: TinyDataset,
    *,
    lr: float = 0.05,
    precision: Precision | None = None,
    world: World | None = None,
    **hparams: Any,
) -> Method:
    """A registered method on a tiny model, with the data, an SGD recipe (attached as the run's
    optimiser), untrained stand-ins for the unimodal runs a method may declare as artifacts,
    ``precision`` (fp32 by default) and this process's ``world`` (one process by default)."""
    cls = METHODS.get(name)
    hp = parse(cls.HParams, hparams, "method")
    torch.manual_seed(0)
    model = build_model(cls.model_spec(tiny_spec(data), hp))

    def recipe(params: Any) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=lr, momentum=0.9)

    stand_ins: dict[str, MultimodalClassifier] = {}

    def unimodal(kind: str, modality: str) -> MultimodalClassifier:
        if modality not in stand_ins:
            stand_ins[modality] = build_model(tiny_spec(data).only([modality])).eval().requires_grad_(False)
        return stand_ins[modality]

    ctx = RunContext(
        model.modalities,
        dataset=data,
        needs=cls.needs_for(hp),
        batch_size=8,
        optimizer_factory=recipe,
        artifact_loader=unimodal,
        precision=precision,
        world=world,
    )
    method = cls(model, ctx, hp)
    ctx.attach_optimizer(recipe(method.trainable_parameters()), method)
    return method


def encoders_stepped(method: Method, monkeypatch: pytest.MonkeyPatch) -> list[set[str]]:
    """Spy on the run's optimiser steps: the returned list gets, per step, the modalities whose encoder
    the step changed (MLA and AUG step once per modality, each moving that modality's encoder only)."""
    model, mods, ctx = method.model, method.model.modalities, method.ctx
    stepped: list[set[str]] = []
    real = ctx.optimizer_step

    def spy(*args: Any, **kwargs: Any) -> Any:
        before = {m: [p.detach().clone() for p in model.modality_parameters(m)] for m in mods}
        result = real(*args, **kwargs)
        after = {m: list(model.modality_parameters(m)) for m in mods}
        stepped.append(
            {m for m in mods if any(not torch.equal(p, b) for p, b in zip(after[m], before[m], strict=True))}
        )
        return result

    monkeypatch.setattr(ctx, "optimizer_step", spy)
    return stepped


def train_epochs(method: Method, epochs: int) -> None:
    """The trainer's hook sequence for ``epochs`` epochs, without validation or a run directory."""
    ctx = method.ctx
    method.on_fit_start()
    for epoch in range(epochs):
        ctx.epoch = epoch
        method.train()
        method.on_epoch_start(epoch)
        method.train_epoch(epoch, ctx.batches("train", shuffle=True))
        method.on_epoch_end(epoch)


@contextmanager
def interrupted_at(monkeypatch: pytest.MonkeyPatch, epoch: int) -> Iterator[None]:
    """Inside, a run stops with KeyboardInterrupt (as on Ctrl-C) when training epoch ``epoch`` would
    fetch its batches, after that epoch's ``on_epoch_start``; the trainer is itself again on exit."""
    from balancemm.engine.trainer import Trainer

    real = Trainer._batches

    def crashing(self: Trainer, split: Any, at: int | None = None, plan: Any = None) -> Any:
        if split == "train" and at == epoch:
            raise KeyboardInterrupt
        return real(self, split, at, plan)

    monkeypatch.setattr(Trainer, "_batches", crashing)
    try:
        yield
    finally:
        monkeypatch.setattr(Trainer, "_batches", real)


@pytest.fixture(params=[2, 3], ids=["M2", "M3"])
def tiny(request: pytest.FixtureRequest) -> TinyDataset:
    return TinyDataset(request.param)


@pytest.fixture
def run_root(tmp_path: Path) -> Path:
    return tmp_path / "runs"


class ScriptedLauncher:
    """A sweep launcher whose every job ends at the next ``wait`` with ``code`` and ``output``: the
    scheduler's handling of what a worker reports, without starting one."""

    parallel = 1

    def __init__(self, code: int, output: str = "") -> None:
        from balancemm.sweep.launchers import Placement

        self.placement = Placement()
        self.code, self.output = code, output
        self.started: list[Any] = []

    def start(self, job: Any) -> None:
        self.started.append(job)

    def wait(self) -> list[tuple[Any, int, str]]:
        ended = [(job, self.code, self.output) for job in self.started]
        self.started.clear()
        return ended

    def stop(self) -> None:
        self.started.clear()
