"""One AGM training step against a baseline step, with the coalition passes shared (BalanceMM's
default) and as the official code runs them (one full zero-padded pass per coalition, the all-zero
one included): time and FLOPs per step, side by side. Both AGM variants give the same values and
gradients (``tests/methods/test_agm.py``); only their cost differs.

Usage: python benchmarks/agm_step.py [--repeats 30]
"""

from __future__ import annotations

import argparse
from functools import partial

from _common import interleaved, method_and_batch

from balancemm.data import Batch
from balancemm.methods import Method
from balancemm.metrics.flops import FlopMeter
from balancemm.report.tables import eng


def step_flops(method: Method, batch: Batch) -> int:
    meter = FlopMeter("exact")
    with meter.counting():
        method.training_step(batch)
    return meter.total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    for dataset in ("embedded", "embedded3"):
        variants = {
            "baseline": method_and_batch("baseline", dataset),
            "agm shared": method_and_batch("agm", dataset, passes="shared"),
            "agm official": method_and_batch("agm", dataset, passes="official"),
        }
        t = interleaved({k: partial(m.training_step, b) for k, (m, b) in variants.items()}, args.repeats)
        flops = {k: step_flops(m, b) for k, (m, b) in variants.items()}
        base_t, base_f = t["baseline"], flops["baseline"]
        print(
            f"{dataset:10s} "
            + "; ".join(
                f"{k} {1000 * t[k]:6.2f} ms ({t[k] / base_t:4.2f}x), {eng(flops[k])}FLOPs ({flops[k] / base_f:4.2f}x)"
                for k in variants
            )
        )


if __name__ == "__main__":
    main()
