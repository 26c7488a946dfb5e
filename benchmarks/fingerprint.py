"""Every registered method once on one dataset: the numbers a refactoring must leave unchanged.

Usage: python benchmarks/fingerprint.py [--dataset embedded] [--epochs 5] [--seed 0] > after.txt

One line per method: test accuracy, macro-F1, the first 16 hex digits of the test predictions' SHA-256,
training FLOPs and the selected epoch. Run it on two checkouts on the same machine and ``diff`` the
outputs: no difference means the change kept every prediction of every method (unimodal on its first
modality).
"""

from __future__ import annotations

import argparse
import tempfile

import balancemm


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="embedded")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    first = balancemm.create_dataset(args.dataset).modalities[0]
    with tempfile.TemporaryDirectory() as tmp:
        for name in balancemm.list_methods():
            hp = {"modality": first} if name == "unimodal" else {}
            s = balancemm.train(
                name, args.dataset, seed=args.seed, out=f"{tmp}/{name}", sets=[f"train.epochs={args.epochs}"], **hp
            )
            t = s["test"]
            print(
                name,
                t["accuracy"],
                t["macro_f1"],
                t["predictions_sha256"][:16],
                s["flops"]["total"],
                s["selected_epoch"],
                flush=True,
            )


if __name__ == "__main__":
    main()
