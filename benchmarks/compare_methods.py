"""Every registered method (and each modality alone) on one dataset: test accuracy, macro-F1,
imbalance degree and training FLOPs, mean ± std over seeds. A stop-gap until `balancemm sweep`.

Usage: python benchmarks/compare_methods.py [--dataset embedded] [--seeds 3] [--methods agm,pmr]

FLOPs are the run's own training; "+artifacts" adds the runs it needed first (UMT's teachers,
ReconBoost's pre-trained learners). The baseline always runs first: it is the FLOPs reference.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import balancemm
from balancemm.report.tables import eng


def _std(values: list[float]) -> float:
    """The sample standard deviation; 0 for one seed (``--seeds 1``), which has no spread to show."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="embedded")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--methods", default="", help="comma-separated keys (default: every registered method)")
    args = ap.parse_args()
    modalities = balancemm.create_dataset(args.dataset).modalities
    chosen = args.methods.split(",") if args.methods else balancemm.list_methods()
    rows: list[tuple[str, dict[str, str]]] = [("baseline", {})]
    rows += [(m, {}) for m in chosen if m not in ("baseline", "unimodal")]
    if "unimodal" in chosen:
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
            with_artifacts = statistics.mean(r["flops"]["total_with_artifacts"] for r in runs)
            base_flops = base_flops or flops  # the first row is the baseline
            label = f"{name}({hp['modality']})" if hp else name
            imb_text = f"{statistics.mean(imb):5.1f} ± {_std(imb):4.1f}" if imb else "  n/a      "
            print(
                f"{label:18s} acc {statistics.mean(acc):6.2f} ± {_std(acc):4.2f}  "
                f"F1 {statistics.mean(f1):6.2f}  imbalance {imb_text}  FLOPs {eng(flops)} "
                f"({flops / base_flops:.2f}x baseline"
                + (f", {with_artifacts / base_flops:.2f}x +artifacts)" if with_artifacts != flops else ")")
            )


if __name__ == "__main__":
    main()
