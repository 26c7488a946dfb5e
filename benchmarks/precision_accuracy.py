"""Does mixed precision change the results? Test accuracy in fp32, bf16 and fp16, mean ± std over seeds.

The target (issue 13): on the embedded dataset with 3 seeds, bf16 within 2 points of fp32. Runs on the
CPU (autocast and the fp16 loss scaler run there too), one torch thread, the protocol's 30 epochs.

Usage: python benchmarks/precision_accuracy.py [--seeds 3] [--methods baseline,ogm_ge] [--dataset embedded]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

import balancemm


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--methods", default="baseline,ogm_ge")
    ap.add_argument("--dataset", default="embedded")
    args = ap.parse_args()
    torch.set_num_threads(1)  # as sweeps run their jobs
    precisions = ("fp32", "bf16", "fp16")
    print(f"{'method':10s}" + "".join(f"{p:>18s}" for p in precisions) + f"{'bf16 − fp32':>14s}{'skipped':>9s}")
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            acc: dict[str, list[float]] = {p: [] for p in precisions}
            skipped, t0 = 0, time.perf_counter()
            for precision in precisions:
                for seed in range(args.seeds):
                    s = balancemm.train(
                        method, args.dataset, seed=seed, out=f"{tmp}/{method}-{precision}-{seed}",
                        sets=[f"train.precision={precision}"],
                    )  # fmt: skip
                    acc[precision].append(100 * s["test"]["accuracy"])
                    skipped += s["precision"]["skipped_steps"] or 0
            cells = "".join(
                f"{statistics.mean(acc[p]):10.2f} ± {statistics.stdev(acc[p]) if len(acc[p]) > 1 else 0:5.2f}"
                for p in precisions
            )
            gap = statistics.mean(acc["bf16"]) - statistics.mean(acc["fp32"])
            print(f"{method:10s}{cells}{gap:+14.2f}{skipped:9d}   ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
