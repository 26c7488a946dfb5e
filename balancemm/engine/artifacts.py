"""Artifacts: runs a method needs before it can train (UMT's frozen unimodal teachers).

A method declares them (``Needs(artifacts=("unimodal",))``); the trainer prepares them before
``on_fit_start``, outside the FLOP meter, and the method fetches them with ``ctx.artifact(...)``.

``unimodal`` = one ``unimodal`` run per modality of the model, with **the same protocol** (data,
model, training config and seed) as the run that needs it. Each is an ordinary run directory named
like the default one ``balancemm train --method unimodal`` would create, beside the requesting run,
so a teacher trained earlier with the same config is reused instead of trained again, and an
interrupted teacher training resumes like any run. The trainer that needs them trains them: it hands
:class:`Artifacts` the function that trains one run, so this module never imports the trainer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from balancemm.config import RunConfig, RunSection
from balancemm.context import RunContext
from balancemm.data import MultimodalDataset, create_dataset
from balancemm.engine.rundir import RunDir
from balancemm.errors import DataError
from balancemm.layout import BEST_CHECKPOINT, default_out, read_json
from balancemm.methods import METHODS, Method
from balancemm.models import ModelSpec, MultimodalClassifier, build_model

KINDS = ("unimodal",)
#: Trains (or reuses, or resumes) the run of a config in a directory and returns its summary.
Fit = Callable[[RunConfig, Path], dict[str, Any]]


def load_run(path: str | Path, dataset: MultimodalDataset | None = None) -> tuple[RunConfig, Method]:
    """The config and the method (with its selected, best-on-validation weights) of a finished run."""
    run = RunDir(path)
    if not run.best.is_file() or not run.config.is_file():
        raise DataError(f"{run.path} has no {BEST_CHECKPOINT}; is it a finished BalanceMM run?")
    cfg = RunConfig.from_dict(read_json(run.config)["config"])
    data = dataset if dataset is not None else create_dataset(cfg.run.dataset, cfg.data)
    method_cls = METHODS.get(cfg.run.method)
    spec = method_cls.model_spec(ModelSpec.from_config(cfg.model, data.input_shapes, data.num_classes), cfg.method)
    needs = method_cls.needs_for(cfg.method)
    loader = None
    if needs.artifacts:
        # The frozen runs it trained with, found beside it as in training (never trained again here): a
        # method may predict with them (ReconBoost's pre-trained heads).
        artifacts = Artifacts(cfg, run.path.parent, spec.modalities, data, torch.device("cpu"), _finished)
        artifacts.prepare(needs.artifacts)
        loader = artifacts.load
    method = method_cls(build_model(spec), RunContext(spec.modalities, needs=needs, artifact_loader=loader), cfg.method)
    if needs.artifacts:
        method.on_fit_start()  # where a method takes its artifacts; the weights below then replace its own
    method.load_state_dict(run.load(run.best)["method"])
    return cfg, method


def _finished(cfg: RunConfig, path: Path) -> dict[str, Any]:
    """The summary of an artifact run a finished run was trained with; it must still be there."""
    run = RunDir(path)
    if not run.done.is_file():
        raise DataError(
            f"{path} is missing or unfinished: the {cfg.run.method} run ({cfg.run.dataset}, seed {cfg.run.seed}) "
            "this run was trained with; keep artifact runs beside the runs that used them"
        )
    return run.read_summary()


def unimodal_config(cfg: RunConfig, modality: str) -> RunConfig:
    """The same protocol and seed, trained on one modality alone."""
    hparams = METHODS.get("unimodal").HParams(modality=modality)
    return dataclasses.replace(cfg, run=RunSection("unimodal", cfg.run.dataset, cfg.run.seed), method=hparams)


class Artifacts:
    """Prepares and serves the artifacts of one run."""

    def __init__(
        self,
        cfg: RunConfig,
        root: Path,
        modalities: tuple[str, ...],
        dataset: MultimodalDataset,
        device: torch.device,
        fit: Fit,
    ) -> None:
        self.cfg, self.root, self.modalities = cfg, root, modalities
        self.dataset, self.device, self.fit = dataset, device, fit
        self.runs: dict[str, dict[str, Any]] = {}
        self._loaded: dict[str, MultimodalClassifier] = {}

    def path(self, kind: str, modality: str) -> Path:
        return default_out(unimodal_config(self.cfg, modality), self.root)

    def prepare(self, kinds: tuple[str, ...]) -> None:
        """Train (or reuse) every declared artifact; the global RNG is left exactly as it was."""
        for kind in kinds:
            if kind not in KINDS:
                raise ValueError(f"unknown artifact kind {kind!r}; known: {', '.join(KINDS)}")
            for m in self.modalities:
                path = self.path(kind, m)
                reused = RunDir(path).done.is_file()
                with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                    summary = self.fit(unimodal_config(self.cfg, m), path)
                self.runs[f"{kind}:{m}"] = {
                    "run": str(path),
                    "reused": reused,
                    "flops": summary["flops"]["total"],
                    "test_accuracy": summary["test"]["accuracy"],
                }

    def load(self, kind: str, modality: str) -> MultimodalClassifier:
        """A frozen model (eval mode, no gradients) of the artifact, on the run's device."""
        key = f"{kind}:{modality}"
        if key not in self.runs:
            raise KeyError(f"artifact {key} was not prepared; declare it in needs.artifacts")
        if key not in self._loaded:
            _, method = load_run(self.runs[key]["run"], self.dataset)
            model = method.model.to(self.device).eval()
            model.requires_grad_(False)
            self._loaded[key] = model
        return self._loaded[key]
