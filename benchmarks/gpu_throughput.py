"""GPU throughput: precisions and speed switches, the toolkit against a hand-written loop, FLOP counting, the loader.

Baseline ResNet-18 audio-visual model (concat fusion) at CREMA-D's protocol shapes (kaldi_fbank audio
1024 × 128, two 224-px frames), batch 64, on one device. It prints:

* training samples/s and peak GPU memory for fp32 (deterministic), fp32 with TF32 and cuDNN autotuning,
  bf16, bf16 + channels-last, and bf16 + channels-last + torch.compile (all but the first with
  ``train.deterministic=false``, the speed setting);
* the toolkit's training step (``Method.training_step`` as the trainer runs it) against a hand-written
  PyTorch loop on the same model, batches and card, both in bf16, timed in alternation (a ratio);
* the cost of sampled FLOP counting over one CREMA-D epoch (95 steps, 3 of them counted);
* the training loader's samples/s on a prepared CREMA-D fixture in the real on-disk layout (480 × 360
  video at 30 fps, 16 kHz audio, prepared with ``balancemm data prepare``) with the protocol's 4
  persistent workers, against what the bf16 model consumes.

Model batches are resident on the device (random inputs of the real shapes), so the model figures
measure the model and the loop, not the disk; the loader is measured on its own.

    python benchmarks/gpu_throughput.py            # on a GPU: the real figures
    python benchmarks/gpu_throughput.py --tiny     # anywhere, in a minute: toy sizes (a smoke test)

On a CPU the script always runs ``--tiny``: full-size ResNet-18 steps would take minutes and say
nothing about a GPU.
"""

from __future__ import annotations

import argparse
import copy
import functools
import math
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from _common import interleaved
from av_loader import make_raw  # a sibling benchmark: the raw CREMA-D-like release

from balancemm.config import resolve_config
from balancemm.data import Batch, Batches, create_dataset
from balancemm.data.base import InMemorySplit, MultimodalDataset, Split, SplitName
from balancemm.data.loader import close_loaders
from balancemm.data.prepare import prepare
from balancemm.device import resolve_device
from balancemm.engine.trainer import Trainer

CREMAD_EPOCH_STEPS = math.ceil(6698 * 0.9 / 64)  # OGM-GE's training list less the 10 % validation carve-out
CONFIGS = {
    "fp32 (deterministic)": ["train.precision=fp32"],
    "fp32 (TF32, autotuned)": ["train.precision=fp32", "train.deterministic=false"],
    "bf16": ["train.precision=bf16", "train.deterministic=false"],
    "bf16 + channels_last": ["train.precision=bf16", "train.deterministic=false", "train.channels_last=true"],
    "bf16 + channels_last + compile": [
        "train.precision=bf16",
        "train.deterministic=false",
        "train.channels_last=true",
        "train.compile=true",
    ],
}


class Synthetic(MultimodalDataset):
    """Random inputs of given shapes, the same rows in every split (only the model is measured)."""

    Options: ClassVar[type] = object
    name: ClassVar[str] = "synthetic"

    def __init__(self, shapes: dict[str, tuple[int, ...]], rows: int, num_classes: int = 6) -> None:
        g = torch.Generator().manual_seed(0)
        self.modalities, self.num_classes = ("audio", "visual"), num_classes
        self.class_names = tuple(str(c) for c in range(num_classes))
        self.input_shapes = shapes
        inputs = {m: torch.randn(rows, *s, generator=g) for m, s in shapes.items()}
        self._split = InMemorySplit(inputs, torch.arange(rows) % num_classes)

    def split(self, name: SplitName) -> Split:
        return self._split


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _trainer(data: Synthetic, sets: list[str], device: torch.device, root: Path, batch: int) -> Trainer:
    cfg = resolve_config("baseline", "cremad", sets=[f"train.batch_size={batch}", "train.flops=off", *sets])
    # Only the trainer's model, method and batches are used: nothing is written under ``root``.
    return Trainer(cfg, root, device=str(device), progress=False, dataset=data)


def _toolkit_step(trainer: Trainer) -> Any:
    method, ctx = trainer.method, trainer.ctx
    method.train()

    def step(batch: Batch) -> None:
        with ctx.autocast():  # as the trainer runs every hook
            method.training_step(batch)

    return step


def _hand_step(trainer: Trainer) -> Any:
    """The same model (a copy, same weights) trained by the loop anyone would write."""
    model = copy.deepcopy(trainer.method.model).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    dtype = trainer.ctx.precision.dtype
    device_type = trainer.device.type

    def step(batch: Batch) -> None:
        with torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(model(batch).logits, batch.label)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _rate(step: Any, batches: list[Batch], steps: int, device: torch.device) -> float:
    """Samples per second over ``steps`` steps, after warm-up (autotuning, compilation)."""
    for b in batches[:3]:
        step(b)
    _sync(device)
    n, t0 = 0, time.perf_counter()
    for k in range(steps):
        b = batches[k % len(batches)]
        step(b)
        n += len(b)
    _sync(device)
    return n / (time.perf_counter() - t0)


def _peak_mb(device: torch.device) -> str:
    return f"{torch.cuda.max_memory_allocated(device) / 2**20:8.0f} MB" if device.type == "cuda" else "     n/a"


def model_section(
    args: argparse.Namespace, device: torch.device, shapes: dict[str, tuple[int, ...]], root: Path
) -> float:
    data = Synthetic(shapes, rows=args.batch * 4)
    width = [f"model.encoders.{m}.width={args.width}" for m in shapes]
    rates: dict[str, float] = {}
    print(
        f"\nmodel: baseline, ResNet-18 × 2 (width {args.width}), batch {args.batch}, {device}; {args.steps} steps each"
    )
    print(f"{'configuration':34s}{'samples/s':>12s}{'× fp32':>8s}{'peak memory':>14s}")
    for name, sets in CONFIGS.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        trainer = _trainer(data, [*sets, *width], device, root, args.batch)
        batches = list(trainer._batches("train", 0))
        rates[name] = _rate(_toolkit_step(trainer), batches, args.steps, device)
        base = rates["fp32 (deterministic)"]
        print(f"{name:34s}{rates[name]:12.1f}{rates[name] / base:7.2f}×{_peak_mb(device):>14s}")
        del trainer, batches

    # The toolkit against the hand-written loop, in bf16, timed in alternation.
    trainer = _trainer(data, [*CONFIGS["bf16"], *width], device, root, args.batch)
    batches = list(trainer._batches("train", 0))
    toolkit, hand = _toolkit_step(trainer), _hand_step(trainer)

    def block(step: Any) -> Any:
        def run() -> None:
            for k in range(args.steps):
                step(batches[k % len(batches)])
            _sync(device)

        return run

    for fn in (toolkit, hand):  # warm-up both
        block(fn)()
    times = interleaved({"toolkit": block(toolkit), "hand": block(hand)}, repeats=args.repeats)
    print(
        f"\ntoolkit step vs hand-written loop (bf16): {times['toolkit'] / args.steps * 1e3:.2f} ms vs "
        f"{times['hand'] / args.steps * 1e3:.2f} ms per step = {times['toolkit'] / times['hand']:.3f}×"
    )

    # Sampled FLOP counting over one CREMA-D-length epoch: the first 3 steps counted, the rest extrapolated.
    epoch = [batches[k % len(batches)] for k in range(args.epoch_steps)]
    epoch_time = {}
    for mode in ("off", "sampled"):
        counted = _trainer(data, [*CONFIGS["bf16"], *width, f"train.flops={mode}"], device, root, args.batch)
        counted.method.train()
        with counted.ctx.autocast():
            counted.method.train_epoch(0, epoch[:3])  # warm-up
        counted.meter.end_epoch()  # the measured epoch samples its own first steps
        _sync(device)
        t0 = time.perf_counter()
        with counted.ctx.autocast():
            counted.method.train_epoch(1, epoch)
        counted.meter.end_epoch()
        _sync(device)
        epoch_time[mode] = time.perf_counter() - t0
    overhead = epoch_time["sampled"] / epoch_time["off"] - 1
    print(
        f"sampled FLOP counting over one epoch of {args.epoch_steps} steps: {epoch_time['sampled']:.2f} s vs "
        f"{epoch_time['off']:.2f} s uncounted = {100 * overhead:+.1f} %"
    )
    return rates["bf16"]


def loader_section(args: argparse.Namespace, device: torch.device, root: Path, model_rate: float) -> None:
    raw, out = root / "raw", root / "prepared"
    make_raw(raw, args.clips)
    t0 = time.perf_counter()
    prepare("cremad", raw, out, workers=args.prepare_workers, frame_size=args.frame_size, progress=False)
    prep = args.clips / (time.perf_counter() - t0)
    opts = {
        "root": str(out),
        "split": "random",
        "val_fraction": 0.25,
        "test_fraction": 0.25,
        "image_size": args.image_size,
    }
    cfg = resolve_config("baseline", "cremad", overrides={"data": opts})
    data = create_dataset("cremad", cfg.data)
    # The protocol's workers on a GPU machine; a 2-core CPU gets 2 (more only oversubscribes it).
    split, workers = data.split("train"), cfg.train.num_workers if not args.tiny else 2
    rates = []
    try:
        for epoch in range(args.loader_epochs):
            g = torch.Generator().manual_seed(epoch)
            batches = Batches(
                split, args.batch, shuffle=True, generator=g, device=device, num_workers=workers, persistent=True
            )
            n, t0 = 0, time.perf_counter()
            for b in batches:
                n += len(b)
            _sync(device)
            rates.append(n / (time.perf_counter() - t0))
    finally:
        close_loaders([split])
    steady = sum(rates[1:]) / max(len(rates) - 1, 1)
    shapes = ", ".join(f"{m} {list(s)}" for m, s in data.input_shapes.items())
    print(f"\nloader: {args.clips} prepared CREMA-D-like clips ({shapes}), prepared at {prep:.1f} clips/s")
    print(
        f"training loader, {workers} persistent workers, batch {args.batch}: first epoch {rates[0]:.1f} samples/s, "
        f"then {steady:.1f} samples/s = {steady / model_rate:.2f}× what the bf16 model consumes ({model_rate:.1f}/s)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--tiny", action="store_true", help="toy sizes (always on a CPU)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (the suite uses aot_eager)")
    args = p.parse_args()
    device = resolve_device(args.device)
    args.tiny = tiny = args.tiny or device.type == "cpu"
    full = {"batch": 64, "width": 64, "steps": 30, "repeats": 5, "epoch_steps": CREMAD_EPOCH_STEPS, "clips": 160}
    toy = {"batch": 4, "width": 4, "steps": 2, "repeats": 2, "epoch_steps": 5, "clips": 24}
    for key, value in (toy if tiny else full).items():
        setattr(args, key, value)
    args.frame_size, args.image_size = (32, 32) if tiny else (224, 224)
    args.loader_epochs, args.prepare_workers = 3, 16 if not tiny else 2
    shapes = {"audio": (1, 64, 32) if tiny else (1, 1024, 128), "visual": (2, 3, args.image_size, args.image_size)}
    if args.compile_backend != "inductor":
        torch.compile = functools.partial(torch.compile, backend=args.compile_backend)  # type: ignore[assignment]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"gpu_throughput on {name}, torch {torch.__version__}{' (tiny sizes: a smoke test)' if tiny else ''}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "runs").mkdir()
        model_rate = model_section(args, device, shapes, root / "runs")
        loader_section(args, device, root, model_rate)


if __name__ == "__main__":
    main()
