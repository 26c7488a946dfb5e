"""Every registered method (and each modality alone) on one dataset: test accuracy, macro-F1,
imbalance degree and training FLOPs, mean ± std over seeds. A stop-gap until `balancemm sweep`.

Usage: python benchmarks/compare_methods.py [--dataset embedded] [--seeds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import balancemm


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="embedded")
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    modalities = balancemm.create_dataset(args.dataset).modalities
    rows = [(m, {}) for m in balancemm.list_methods() if m != "unimodal"]
    rows += [("unimodal", {"modality": m}) for m in modalities]
    base_flops = None
    print(f"{args.dataset}, {args.seeds} seeds: test accuracy, macro-F1, imbalance degree (%), training FLOPs")
    with tempfile.TemporaryDirectory() as tmp:
        for name, hp in rows:
            runs = [
                balancemm.train(name, args.dataset, seed=s, out=f"{tmp}/{name}{hp.get('modality', '')}{s}", **hp)
                for s in range(args.seeds)
            ]
            acc = [100 * r["test"]["accuracy"] for r in runs]
            f1 = [100 * r["test"]["macro_f1"] for r in runs]
            imb = [100 * r["imbalance"] for r in runs if r["imbalance"] is not None]
            flops = statistics.mean(r["flops"]["total"] for r in runs)
            base_flops = base_flops or flops  # the first row is the baseline
            label = f"{name}({hp['modality']})" if hp else name
            imb_text = f"{statistics.mean(imb):5.1f} ± {statistics.stdev(imb):4.1f}" if imb else "  n/a      "
            print(
                f"{label:18s} acc {statistics.mean(acc):6.2f} ± {statistics.stdev(acc):4.2f}  "
                f"F1 {statistics.mean(f1):6.2f}  imbalance {imb_text}  FLOPs {flops:.3g} "
                f"({flops / base_flops:.2f}x baseline)"
            )


if __name__ == "__main__":
    main()
