"""One MMPareto training step vs one baseline step: time ratio and number of backward passes.

Both run the template step (forward, losses, backward, after_backward, optimiser step) on the same
batch with the same encoders; MMPareto adds separate unimodal heads, per-loss gradients and the
min-norm combination. Backward passes are counted by wrapping torch.autograd's entry points.

Usage: python benchmarks/mmpareto_step.py [--repeats 50]
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
from _common import interleaved, method_and_batch


def count_backward(method, batch) -> int:  # type: ignore[no-untyped-def]
    calls = []
    grad, backward = torch.autograd.grad, torch.autograd.backward
    torch.autograd.grad = lambda *a, **k: (calls.append(1), grad(*a, **k))[1]  # type: ignore[assignment]
    torch.autograd.backward = lambda *a, **k: (calls.append(1), backward(*a, **k))[1]  # type: ignore[assignment]
    try:
        method.training_step(batch)
    finally:
        torch.autograd.grad, torch.autograd.backward = grad, backward
    return len(calls)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()
    for dataset in ("embedded", "embedded3"):
        base, batch = method_and_batch("baseline", dataset)
        pareto, _ = method_and_batch("mmpareto", dataset)
        t = interleaved(
            {"baseline": partial(base.training_step, batch), "mmpareto": partial(pareto.training_step, batch)},
            args.repeats,
        )
        print(
            f"{dataset:10s} step: baseline {1000 * t['baseline']:6.2f} ms, mmpareto {1000 * t['mmpareto']:6.2f} ms, "
            f"ratio {t['mmpareto'] / t['baseline']:4.2f}x; backward passes per step: baseline "
            f"{count_backward(base, batch)}, mmpareto {count_backward(pareto, batch)} (limit 2)"
        )


if __name__ == "__main__":
    main()
