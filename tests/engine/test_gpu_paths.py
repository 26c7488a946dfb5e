"""The GPU-facing switches, exercised on the CPU: devices, determinism, channels-last, compile, loaders."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import pytest
import torch

import balancemm
from balancemm import device as devices
from balancemm.cli import main
from balancemm.config import resolve_config
from balancemm.data import Batches
from balancemm.data import loader as loaders
from balancemm.engine.trainer import Trainer
from balancemm.errors import ConfigError
from tests.conftest import TinyDataset, interrupted_at


def test_auto_is_the_cpu_without_a_gpu_and_missing_gpus_are_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    assert devices.resolve_device("auto") == torch.device("cpu")
    assert devices.resolve_precision("auto", torch.device("cpu")) == "fp32"
    with pytest.raises(ConfigError, match="no CUDA GPU is available"):
        devices.resolve_device("cuda")
    with pytest.raises(ConfigError, match="unknown device 'tpu'"):
        devices.resolve_device("tpu")
    monkeypatch.setattr(devices, "visible_gpus", lambda: 2)
    assert devices.resolve_device("auto") == torch.device("cuda")
    assert devices.resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ConfigError, match="2 visible GPU"):
        devices.resolve_device("cuda:2")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device", "cuda"], "no CUDA GPU is available"),
        (["--device", "cuda:0"], "no CUDA GPU is available"),
        (["--set", "train.precision=fp8"], "train.precision: 'fp8' is not allowed"),
        (["--set", "train.precision=fp16"], "cannot autocast to fp16 on cpu"),
    ],
)
def test_a_device_or_precision_that_cannot_run_is_one_line_and_writes_nothing(
    args: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # As on an old torch build whose CPU autocast has no fp16.
    monkeypatch.setattr(devices, "_autocast_runs", lambda device, dtype: False)
    out = tmp_path / "run"
    assert main(["train", "--method", "baseline", "--out", str(out), "--quiet", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("balancemm: error:") and message in err and "\n" not in err
    assert not out.exists()


def test_a_gpu_is_described_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    class Props:
        name, total_memory = "NVIDIA H100 80GB HBM3", 80 * 2**30

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props())
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91002)
    facts = devices.device_environment(torch.device("cuda:0"))
    assert facts == {"device": "cuda:0", "gpu": Props.name, "gpu_memory_gb": "80.0", "cuda": "12.8", "cudnn": "91002"}


def test_deterministic_switches_and_the_cublas_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        devices.deterministic_setup(torch.device("cuda"), False)
        assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark
        assert torch.backends.cuda.matmul.allow_tf32 and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
        devices.deterministic_setup(torch.device("cuda"), True)
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert not torch.backends.cudnn.benchmark and not torch.backends.cuda.matmul.allow_tf32
    finally:
        devices.deterministic_setup(torch.device("cpu"), True)


def test_a_run_with_determinism_off_trains(tmp_path: Path) -> None:
    try:
        summary = balancemm.train(
            "baseline", out=tmp_path / "run", sets=["train.epochs=1", "train.deterministic=false"]
        )
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        devices.deterministic_setup(torch.device("cpu"), True)
    assert summary["status"] == "complete"


def test_channels_last_converts_the_convolution_encoders_and_counts_the_same_flops(tmp_path: Path) -> None:
    sets = ["train.epochs=1"]
    cfg = resolve_config("baseline", sets=[*sets, "train.channels_last=true"])
    trainer = Trainer(cfg, tmp_path / "cl", progress=False)
    convs = [m for m in trainer.method.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    channels_last = trainer.fit()
    plain = balancemm.train("baseline", out=tmp_path / "plain", sets=sets)
    assert channels_last["flops"]["total"] == plain["flops"]["total"]
    assert abs(channels_last["test"]["accuracy"] - plain["test"]["accuracy"]) < 0.05


def test_compile_keeps_flops_checkpoints_and_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torch._dynamo.utils import counters

    # The default backend generates C++ (a minute on 2 cores); aot_eager traces the same graphs.
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    sets = ["train.epochs=2", "train.flops_sample_steps=1"]
    compiled = [*sets, "train.compile=true"]
    whole = balancemm.train("ogm_ge", out=tmp_path / "whole", sets=compiled)
    assert counters["stats"]["unique_graphs"] > 0, "nothing was compiled"
    plain = balancemm.train("ogm_ge", out=tmp_path / "plain", sets=sets)
    assert whole["flops"] == plain["flops"]
    best = torch.load(tmp_path / "whole" / "checkpoints" / "best.pt", weights_only=True)["method"]
    assert not any("_orig_mod" in key for key in best)

    with interrupted_at(monkeypatch, 1), pytest.raises(KeyboardInterrupt):
        balancemm.train("ogm_ge", out=tmp_path / "cut", sets=compiled)
    resumed = balancemm.train("ogm_ge", out=tmp_path / "cut", sets=compiled)
    for key in ("test", "shapley", "selected_epoch", "flops"):
        assert resumed[key] == whole[key], key


def _no_fast_path(data: TinyDataset) -> Any:
    split = data.split("train")

    class Slow(type(split)):  # type: ignore[misc]
        def get_batch(self, index: torch.Tensor) -> None:  # type: ignore[override]
            return None

    return Slow(split.inputs, split.labels)  # type: ignore[attr-defined]


def _epoch(split: Any, seed: int, **kw: Any) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [b.inputs["audio"] for b in Batches(split, 5, shuffle=True, generator=g, **kw)]


def test_persistent_workers_serve_every_epoch_and_a_nested_reader_gets_its_own() -> None:
    split = _no_fast_path(TinyDataset(n=23))
    try:
        for seed in (0, 1):
            pooled = _epoch(split, seed, num_workers=2, persistent=True)
            assert all(torch.equal(a, b) for a, b in zip(pooled, _epoch(split, seed), strict=True))
        (pool,) = [loaders._pools[split]]
        assert len(pool) == 1 and pool[0].loader._iterator is not None  # the same workers, kept alive
        outer = iter(Batches(split, 5, num_workers=2, persistent=True))
        next(outer)  # an epoch half-read while a method reads the split again
        inner = [b.index for b in Batches(split, 5, num_workers=2, persistent=True)]
        assert torch.equal(torch.cat(inner), torch.arange(23)) and len(pool) == 2
        assert sum(len(b) for b in outer) == 23 - 5
    finally:
        loaders.close_loaders([split])
    assert split not in loaders._pools


def test_a_split_is_made_resident_once_and_only_if_it_fits() -> None:
    split = TinyDataset(n=10).split("train")
    row_bytes = sum(x[:1].numel() * x.element_size() for x in split.inputs.values())  # type: ignore[attr-defined]
    cpu = torch.device("cpu")
    assert loaders.resident(split, cpu, budget=10 * row_bytes - 1) is None
    held = loaders.resident(split, cpu, budget=10 * row_bytes)
    assert held is not None and loaders.resident(split, cpu) is held
    inputs, labels = held
    order = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    batches = Batches(split, 4, shuffle=True, generator=torch.Generator().manual_seed(0))
    sliced = list(batches._resident(inputs, labels))  # the path a GPU takes, on the CPU
    assert torch.equal(torch.cat([b.index for b in sliced]), order)
    for a, b in zip(sliced, Batches(split, 4, shuffle=True, generator=torch.Generator().manual_seed(0)), strict=True):
        assert torch.equal(a.label, b.label) and all(torch.equal(a.inputs[m], b.inputs[m]) for m in a.inputs)
    assert loaders.resident(_no_fast_path(TinyDataset(n=4)), cpu) is None
