"""Is data loading the bottleneck? Loader samples/s against the model's training samples/s, same machine.

Builds a small raw release in CREMA-D's layout at the real resolution (480 × 360 FLV at 30 fps,
16 kHz wav), prepares it with ``balancemm data prepare`` (reporting its clips/s), then measures

* the training loader: shuffled batches with augmentation (random resized crop + flip per frame),
  as the trainer reads them, with 0 workers and with ``--workers`` workers;
* the model: training steps (forward, backward, SGD step) of the dataset's protocol model
  (ResNet-18 audio + visual at full width, 224 px, the dataset's frame count) on the same batches.

The issue's goal is a loader at least 5× faster than the model. On a GPU the model side is much
faster; rerun there with ``--device cuda`` to see the ratio that matters for a GPU user.

    python benchmarks/av_loader.py [--clips 48] [--profile kaldi_fbank] [--workers 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from balancemm.config import resolve_config
from balancemm.data import Batches, create_dataset
from balancemm.data.prepare import prepare
from balancemm.models import ModelSpec, build_model
from tests.fixtures.media import tone, write_video, write_wav

EMOTIONS = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")


def make_raw(root: Path, clips: int) -> None:
    """``clips`` CREMA-D-like clips: 2.5 s of 480 × 360 video at 30 fps and a 16 kHz wav."""
    (root / "AudioWAV").mkdir(parents=True)
    (root / "VideoFlash").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k in range(clips):
        emo = EMOTIONS[k % 6]
        clip = f"{1001 + k // 12}_{('DFA', 'IEO')[(k // 6) % 2]}_{emo}_XX"
        frames = rng.integers(0, 256, size=(75, 360, 480, 3), dtype=np.uint8)
        write_video(root / "VideoFlash" / f"{clip}.flv", frames, 30)
        write_wav(root / "AudioWAV" / f"{clip}.wav", tone(200.0 + 50 * (k % 6), 2.5, 16000, 0.3), 16000)


def loader_rate(data: object, batch: int, workers: int, epochs: int) -> float:
    split = data.split("train")  # type: ignore[attr-defined]
    n, t0 = 0, time.perf_counter()
    for epoch in range(epochs):
        g = torch.Generator().manual_seed(epoch)
        for b in Batches(split, batch, shuffle=True, generator=g, num_workers=workers):
            n += b.label.numel()
    return n / (time.perf_counter() - t0)


def model_rate(cfg: object, data: object, batch: int, steps: int, device: str) -> float:
    spec = ModelSpec.from_config(cfg.model, data.input_shapes, data.num_classes)  # type: ignore[attr-defined]
    model = build_model(spec).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    batches = [b.to(device) for b in Batches(data.split("train"), batch)]  # type: ignore[attr-defined]
    loss_fn = torch.nn.CrossEntropyLoss()

    def step(b: object) -> None:
        opt.zero_grad()
        loss_fn(model(b).logits, b.label).backward()  # type: ignore[attr-defined]
        opt.step()

    step(batches[0])  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    n, t0 = 0, time.perf_counter()
    for k in range(steps):
        b = batches[k % len(batches)]
        step(b)
        n += b.label.numel()
    if device == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=48)
    p.add_argument("--profile", default="kaldi_fbank")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        raw, out = Path(tmp) / "raw", Path(tmp) / "prepared"
        make_raw(raw, args.clips)
        t0 = time.perf_counter()
        prepare("cremad", raw, out, profile=args.profile, workers=args.workers, progress=False)
        prep = args.clips / (time.perf_counter() - t0)
        size = sum(f.stat().st_size for f in (out / "clips").iterdir()) / args.clips
        opts = {"root": str(out), "profile": args.profile, "split": "random", "val_fraction": 0.25}
        cfg = resolve_config("baseline", "cremad", overrides={"data": opts})
        data = create_dataset("cremad", cfg.data)
        shapes = ", ".join(f"{m} {list(s)}" for m, s in data.input_shapes.items())
        print(f"cremad-like clips: {args.clips}, profile {args.profile}; per sample {shapes}")
        print(f"prepare: {prep:.1f} clips/s with {args.workers} workers; {size / 1e6:.2f} MB per prepared clip")
        rates = {w: loader_rate(data, args.batch, w, epochs=2) for w in sorted({0, args.workers})}
        model = model_rate(cfg, data, args.batch, args.steps, args.device)
        for w, r in rates.items():
            print(f"loader ({w} workers): {r:8.1f} samples/s   = {r / model:5.1f}× the model")
        print(f"model training ({args.device}, ResNet-18 × 2, batch {args.batch}): {model:8.1f} samples/s")


if __name__ == "__main__":
    main()
