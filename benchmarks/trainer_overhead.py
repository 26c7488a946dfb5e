"""Trainer overhead: `baseline` through the toolkit vs a minimal hand-written PyTorch loop.

Same model (built by the toolkit's factory, same init), same data tensors, same batch size, same
optimiser; only the loop differs. The toolkit's time is its training time (``train_time_s``: hooks,
loss checks, logging, progress bars off) — validation, which the hand loop does not do, is reported
separately. Also reports what exact FLOP counting costs.

Usage: python benchmarks/trainer_overhead.py [--epochs 10] [--repeats 5] [--dataset embedded]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
import torch.nn.functional as F
from _common import interleaved

from balancemm.config import resolve_config
from balancemm.context import derive_seed
from balancemm.data import Batch, create_dataset
from balancemm.engine.trainer import Trainer
from balancemm.metrics.flops import FlopMeter
from balancemm.models import ModelSpec, build_model
from balancemm.models.encoders.resnet import ResNet18


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dataset", default="embedded")
    args = ap.parse_args()
    modes = ("off", "sampled", "exact")
    cfgs = {
        m: resolve_config("baseline", args.dataset, sets=[f"train.epochs={args.epochs}", f"train.flops={m}"])
        for m in modes
    }
    cfg = cfgs["off"]
    data = create_dataset(cfg.run.dataset, cfg.data)
    train = data.split("train")
    inputs = train.get_batch(torch.arange(len(train)))
    assert inputs is not None
    labels = train.labels
    bs, opt_cfg = cfg.train.batch_size, cfg.train.optimizer
    toolkit_time: dict[str, float] = {}
    toolkit_wall: dict[str, float] = {}

    def hand() -> None:
        torch.manual_seed(derive_seed(0, "init"))
        model = build_model(ModelSpec.from_config(cfg.model, data.input_shapes, data.num_classes))
        opt = torch.optim.SGD(
            model.parameters(), lr=opt_cfg.lr, momentum=opt_cfg.momentum, weight_decay=opt_cfg.weight_decay
        )
        sched = torch.optim.lr_scheduler.StepLR(opt, cfg.train.scheduler.step_size, cfg.train.scheduler.gamma)
        present = torch.ones(bs, len(data.modalities), dtype=torch.bool)
        for epoch in range(args.epochs):
            model.train()
            order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(epoch))
            for k in range(0, len(order), bs):
                rows = order[k : k + bs]
                batch = Batch(
                    {m: x[rows] for m, x in inputs.items()}, labels[rows], rows, present[: len(rows)], data.modalities
                )
                loss = F.cross_entropy(model(batch).logits, batch.label)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            sched.step()

    def toolkit(mode: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            s = Trainer(cfgs[mode], tmp, progress=False, dataset=data).fit()
            toolkit_wall[mode] = toolkit_wall.get(mode, 0.0) + time.perf_counter() - t0
            toolkit_time[mode] = toolkit_time.get(mode, 0.0) + s["train_time_s"]

    fns = {"hand": hand, **{m: (lambda m=m: toolkit(m)) for m in modes}}
    interleaved(fns, 1)  # warm-up
    toolkit_time.clear()
    toolkit_wall.clear()
    hand_t = interleaved(fns, args.repeats)["hand"]
    print(f"dataset {args.dataset}, {args.epochs} epochs, batch {bs}, torch threads {torch.get_num_threads()}")
    print(f"hand-written loop (training only)         {hand_t:7.3f} s")
    off = toolkit_time["off"] / args.repeats
    for m in modes:
        t = toolkit_time[m] / args.repeats
        note = "(target <= 1.05x)" if m == "off" else f"(counting costs {100 * (t / off - 1):+.1f}%)"
        print(f"toolkit, FLOP counting {m:8s}          {t:7.3f} s   ratio {t / hand_t:5.3f}x  {note}")
    print(
        "toolkit whole run (per-epoch validation + Shapley, test, checkpoints, counting off): "
        f"{toolkit_wall['off'] / args.repeats:.3f} s"
    )
    resnet_counting_cost(args.repeats)


def resnet_counting_cost(repeats: int) -> None:
    """Exact counting on a ResNet-18 step (1×128×128 spectrogram, batch 16): the per-operator cost is
    the same as on the compact CNN, but each operator does far more work, so it nearly vanishes."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(ResNet18((1, 128, 128)), torch.nn.Linear(512, 10))
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    x, y = torch.randn(16, 1, 128, 128), torch.randint(0, 10, (16,))

    def step() -> None:
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()

    def counted() -> None:
        with FlopMeter("exact").counting():
            step()

    t = interleaved({"plain": step, "counted": counted}, max(repeats, 5))
    print(
        f"ResNet-18 step: plain {1000 * t['plain']:.0f} ms, exact counting {1000 * t['counted']:.0f} ms "
        f"(counting costs {100 * (t['counted'] / t['plain'] - 1):+.1f}%)"
    )


if __name__ == "__main__":
    main()
