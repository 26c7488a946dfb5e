"""Data-parallel scaling: training samples per second of one run at 1, 2, … processes, side by side.

Usage: python benchmarks/ddp_scaling.py [--method baseline] [--dataset embedded] [--epochs 3] [--nproc 1 2]
       [--device cpu|auto] [--set KEY=VALUE ...]

Each process count trains the same config through ``balancemm train --nproc N`` in a fresh run directory,
in alternation, ``--repeats`` times; the script prints the median training samples per second (training
rows × epochs / the summary's ``train_time_s``, which excludes start-up, validation and the test) and
its ratio to one process. On a CPU the ranks share the machine's cores (gloo, ``torch`` threads split
between them); on a machine with N GPUs each rank has its own (NCCL): run it with ``--device auto``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def samples_per_second(args: argparse.Namespace, nproc: int, out: Path) -> float:
    command = [sys.executable, "-m", "balancemm", "train", "--method", args.method, "--dataset", args.dataset]
    command += ["--nproc", str(nproc), "--quiet", "--device", args.device, "--out", str(out)]
    command += ["--set", f"train.epochs={args.epochs}", *args.sets]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    summary = json.loads((out / "summary.json").read_text())
    rows = summary["dataset_info"]["sizes"]["train"]
    return rows * args.epochs / summary["train_time_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", default="baseline")
    ap.add_argument("--dataset", default="embedded")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--set", dest="sets", nargs="*", default=[])
    args = ap.parse_args()
    rates: dict[int, list[float]] = {n: [] for n in args.nproc}
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.repeats):
            for n in args.nproc:
                rates[n].append(samples_per_second(args, n, Path(tmp) / f"n{n}-{k}"))
    base = statistics.median(rates[args.nproc[0]])
    print(f"{args.method} on {args.dataset}, {args.epochs} epochs, device {args.device}, median of {args.repeats}")
    print(f"{'processes':>9s}  {'samples/s':>10s}  {'vs ' + str(args.nproc[0]):>7s}")
    for n in args.nproc:
        rate = statistics.median(rates[n])
        print(f"{n:9d}  {rate:10.1f}  {rate / base:7.2f}")


if __name__ == "__main__":
    main()
