"""Cost of the Shapley / imbalance evaluation vs one plain test pass (targets: <= 1.3x M=2, <= 2x M=3).

Both passes use the same trained-from-init model and the full test split; the Shapley pass encodes
each batch once and re-runs only the fusion for each of the 2^M coalitions (feature masking). The
input-masking policy (BalanceMM's) needs 2^M encoder passes and is shown for comparison.

Usage: python benchmarks/shapley_cost.py [--repeats 20]
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
from _common import interleaved

from balancemm.config import resolve_config
from balancemm.data import Batches, create_dataset
from balancemm.engine.evaluate import evaluate
from balancemm.methods import RunContext, create_method
from balancemm.models import ModelSpec, build_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    print(f"torch threads {torch.get_num_threads()}; full test split; median of {args.repeats} interleaved runs")
    for dataset in ("embedded", "embedded3"):
        for mask in ("feature", "input"):
            cfg = resolve_config("baseline", dataset, sets=[f"model.mask={mask}"])
            data = create_dataset(dataset, cfg.data)
            model = build_model(ModelSpec.from_config(cfg.model, data.input_shapes, data.num_classes))
            method = create_method("baseline", model, RunContext(model.modalities))
            batches = Batches(data.split("test"), cfg.train.eval_batch_size)
            t = interleaved(
                {
                    "plain": partial(evaluate, method, batches, data.num_classes, shapley=False),
                    "shapley": partial(evaluate, method, batches, data.num_classes, shapley=True),
                },
                args.repeats,
            )
            m = len(data.modalities)
            target = {2: 1.3, 3: 2.0}[m]
            note = f"(target <= {target}x)" if mask == "feature" else "(BalanceMM-style input masking, for reference)"
            print(
                f"M={m} mask={mask:7s}  plain {1000 * t['plain']:7.2f} ms   with Shapley {1000 * t['shapley']:7.2f} ms"
                f"   ratio {t['shapley'] / t['plain']:5.2f}x {note}"
            )


if __name__ == "__main__":
    main()
