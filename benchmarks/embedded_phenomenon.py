"""Does the embedded dataset show the imbalance phenomenon (the paper's Fig. 2)? Mean over seeds.

Checks, for issue 2:
  1. the two unimodal models differ by >= 10 accuracy points;
  2. the jointly trained baseline beats the best unimodal model;
  3. the weak modality's encoder inside the baseline, probed linearly, is >= 5 points below the same
     encoder trained alone (probed the same way, and the unimodal model's own accuracy);
  4. one baseline run (default epochs) takes <= 60 s.

Usage: python benchmarks/embedded_phenomenon.py [--seeds 3] [--set data.audio_informativeness=0.5 ...]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import balancemm
from balancemm.engine.probe import probe_run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--dataset", default="embedded")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    args = ap.parse_args()
    rows: dict[str, list[float]] = {}

    def add(key: str, value: float, scale: float = 100.0) -> None:  # accuracies in points, times in s
        rows.setdefault(key, []).append(scale * value)

    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            base = balancemm.train("baseline", args.dataset, seed=seed, sets=args.sets, out=f"{tmp}/b{seed}")
            add("baseline wall time (s)", time.perf_counter() - t0, scale=1.0)
            add("baseline acc", base["test"]["accuracy"])
            probes = probe_run(f"{tmp}/b{seed}")
            for m in base["modalities"]:
                add(f"baseline phi[{m}]", base["shapley"][m])
                add(f"{m}: slice acc inside baseline", base["test"]["per_modality"][m]["accuracy"])
                add(f"{m}: probe of baseline encoder", probes[m]["test_accuracy"])
                uni = balancemm.train(
                    "unimodal", args.dataset, seed=seed, sets=args.sets, modality=m, out=f"{tmp}/u{m}{seed}"
                )
                add(f"{m}: unimodal alone acc", uni["test"]["accuracy"])
                add(f"{m}: probe of unimodal encoder", probe_run(f"{tmp}/u{m}{seed}")[m]["test_accuracy"])
            add("baseline imbalance", base["imbalance"])
    mean = {k: statistics.mean(v) for k, v in rows.items()}
    for key, values in rows.items():
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"{key:40s} {mean[key]:7.2f} ± {sd:5.2f}   {' '.join(f'{v:6.2f}' for v in values)}")
    mods = sorted({k.split(":")[0] for k in rows if ":" in k})
    alone = {m: mean[f"{m}: unimodal alone acc"] for m in mods}
    weak = min(alone, key=alone.__getitem__)
    strong = max(alone, key=alone.__getitem__)
    checks = [
        ("unimodal gap >= 10 points", alone[strong] - alone[weak], alone[strong] - alone[weak] >= 10),
        ("baseline - best unimodal > 0", mean["baseline acc"] - alone[strong], mean["baseline acc"] > alone[strong]),
        (
            f"{weak} alone - probe in baseline >= 5",
            alone[weak] - mean[f"{weak}: probe of baseline encoder"],
            alone[weak] - mean[f"{weak}: probe of baseline encoder"] >= 5,
        ),
        (
            f"{weak} probe alone - probe in baseline >= 5",
            mean[f"{weak}: probe of unimodal encoder"] - mean[f"{weak}: probe of baseline encoder"],
            mean[f"{weak}: probe of unimodal encoder"] - mean[f"{weak}: probe of baseline encoder"] >= 5,
        ),
        (
            "baseline run <= 60 s",
            mean["baseline wall time (s)"],
            mean["baseline wall time (s)"] <= 60,
        ),
    ]
    print()
    for name, value, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {name:45s} {value:7.2f}")


if __name__ == "__main__":
    main()
