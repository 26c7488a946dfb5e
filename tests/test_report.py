"""``balancemm report``: reading run records, the validation selection rule, fairness checks, the tables'
statistics, flags and caveats, rendering, atomicity.

Run directories are written by hand in the real format (config.json + summary.json + done, the fields of
``Trainer._finish``), with known validation/test numbers so that the expected table cells are computed here.
"""

from __future__ import annotations

import hashlib
import html
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from balancemm.cli import main
from balancemm.errors import BalanceMMError
from balancemm.report import collect, write_report
from balancemm.report.collect import Flags
from balancemm.report.plots import all_figures
from balancemm.report.tables import (
    Table,
    all_tables,
    cost_table,
    eng,
    modality_table,
    paired_table,
    probe_table,
    robustness_table,
    table2,
    to_csv,
    to_html,
    to_latex,
    to_markdown,
)

GROUP = {"baseline": "reference", "unimodal": "reference", "ogm_ge": "optimization", "agm": "optimization",
         "pmr": "optimization", "mmcosine": "objective", "greedy": "feed-forward"}  # fmt: skip
TRAIN = {"batch_size": 64, "epochs": 1, "flops": "sampled", "optimizer": {"lr": 0.02, "name": "sgd"}}


def sha(name: str) -> str:
    """The test-prediction hash ``make_run`` gives run ``name`` by default (one of its own)."""
    return hashlib.sha256(name.encode()).hexdigest()


def make_run(
    root: Path,
    name: str,
    method: str,
    seed: int,
    val: float,
    acc: float,
    *,
    hparams: dict[str, Any] | None = None,
    f1: float | None = None,
    imbalance: float = 0.2,
    flops: float = 1e9,
    train: dict[str, Any] | None = None,
    done: bool = True,
    predictions: str | None = None,
    acted: tuple[int, ...] = (0,),
    heads: str = "unimodal",
    jobs: int = 1,
    memory_kind: str = "process_max_rss",
    train_time: float = 1.0,
    probe: dict[str, float] | None = None,
    legacy: bool = False,
    input_imbalance: float | None = None,
    mask: str = "feature",
) -> Path:
    """One run directory; ``val`` is the selection value, ``acc``/``f1`` the test accuracy/macro-F1 (fractions).

    The selected epoch is 0. ``predictions`` is the test predictions' SHA-256 (default ``sha(name)``),
    ``acted`` the epochs in which the method intervened, ``heads`` and ``jobs`` are
    ``per_modality_heads`` and ``concurrent_jobs``; ``probe`` ({modality: test accuracy}) writes probe.json;
    ``legacy`` leaves out the fields that runs written before them lack; ``mask`` is the config's
    model.mask, and ``input_imbalance`` writes ``shapley_by_mask`` with that imbalance under input masking.
    """
    hp = dict(hparams or {})
    mods = [hp["modality"]] if method == "unimodal" else ["audio", "visual"]
    d = root / name
    d.mkdir(parents=True)
    config = {
        "run": {"method": method, "dataset": "embedded", "seed": seed},
        "method": hp,
        "data": {"seed": 0},
        "model": {"fusion": "concat", **({"mask": mask} if mask != "feature" else {})},
        "train": train or TRAIN,
    }
    (d / "config.json").write_text(json.dumps({"config": config, "config_hash": name, "run_id": name}))
    f1 = acc - 0.01 if f1 is None else f1
    summary: dict[str, Any] = {
        "schema": 1, "status": "complete", "run_id": name, "config_hash": name, "method": method,
        "method_group": GROUP[method], "dataset": "embedded", "seed": seed, "modalities": mods, "selected_epoch": 0,
        "selection": {"split": "val", "metric": "accuracy", "value": val}, "used_validation_in_training": False,
        "test": {"num_samples": 360, "loss": 1.0, "accuracy": acc, "macro_f1": f1,
                 "per_modality": {m: {"accuracy": acc / 2, "macro_f1": f1 / 2} for m in mods}},
        "shapley": {m: acc / (i + 2) for i, m in enumerate(mods)}, "coalition_values": {"empty": 0.1},
        "imbalance": None if method == "unimodal" else imbalance,
        "flops": {"counting": "sampled", "total": flops, "total_with_artifacts": flops, "by_phase": {},
                  "artifacts": {}, "extrapolated": 0, "sample_steps": 3},
        "artifacts": {}, "train_time_s": train_time, "wall_time_s": 2.0, "peak_memory_mb": 300.0,
        "peak_memory_kind": memory_kind, "params": {"total": 1000, "per_modality": {m: 400 for m in mods}},
    }  # fmt: skip
    if not legacy:
        summary["test"]["predictions_sha256"] = predictions or sha(name)
        first = min(acted, default=None)
        summary["intervention"] = {"epochs": list(acted), "first": first, "before_selected": any(e <= 0 for e in acted)}
        summary["per_modality_heads"] = heads
        summary["concurrent_jobs"] = jobs
    if input_imbalance is not None:
        own = {k: summary[k] for k in ("shapley", "coalition_values", "imbalance")}
        summary["shapley_mask"] = "feature"
        summary["shapley_by_mask"] = {"feature": own, "input": {**own, "imbalance": input_imbalance}}
    (d / "summary.json").write_text(json.dumps(summary))
    if probe is not None:
        (d / "probe.json").write_text(
            json.dumps({m: {"test_accuracy": a, "val_accuracy": a, "C": 1.0} for m, a in probe.items()})
        )
    if done:
        (d / "done").write_text("")
    return d


def fair_runs(root: Path) -> Path:
    """Two seeds (0, 1) of unimodal audio/visual, baseline (test 0.60, 0.60; probed on seed 0 only) and four
    methods with two trials each; test accuracies of the validation-selected trials:

    - greedy alpha 1: 0.66, 0.72; cross-modal heads (own heads 0.33, 0.36), probed (audio 0.50, 0.54),
      three times baseline's train time;
    - mmcosine scale 10: 0.70, 0.70 (F1 0.65, 0.65); an oracle would pick scale 20 (0.80);
    - agm alpha 0.5: 0.65, 0.65;
    - ogm_ge alpha 0.1 (val mean 0.70 vs 0.65 for alpha 0.5, whose test is 0.90): 0.50, 0.60, i.e. 55.00 ± 7.07;
      on seed 1 its test predictions are baseline's, on seed 0 it first acted in epoch 3, after its selected
      epoch 0.
    """
    for s in (0, 1):
        make_run(root, f"uni-a{s}", "unimodal", s, 0.5, 0.40, hparams={"modality": "audio"})
        make_run(root, f"uni-v{s}", "unimodal", s, 0.5, 0.20, hparams={"modality": "visual"})
        make_run(root, f"base{s}", "baseline", s, 0.5, 0.60, probe={"audio": 0.45, "visual": 0.25} if s == 0 else None)
    make_run(root, "ogm1-0", "ogm_ge", 0, 0.6, 0.50, hparams={"alpha": 0.1}, imbalance=0.30, acted=(3,))
    make_run(root, "ogm1-1", "ogm_ge", 1, 0.8, 0.60, hparams={"alpha": 0.1}, imbalance=0.30, predictions=sha("base1"))
    make_run(root, "ogm5-0", "ogm_ge", 0, 0.9, 0.90, hparams={"alpha": 0.5}, imbalance=0.10, flops=3e9)
    make_run(root, "ogm5-1", "ogm_ge", 1, 0.4, 0.90, hparams={"alpha": 0.5}, imbalance=0.10, flops=3e9)
    for s in (0, 1):
        make_run(root, f"cos10-{s}", "mmcosine", s, 0.7, 0.70, hparams={"scale": 10.0}, f1=0.65)
        make_run(root, f"cos20-{s}", "mmcosine", s, 0.6, 0.80, hparams={"scale": 20.0})
        make_run(root, f"agm5-{s}", "agm", s, 0.7, 0.65, hparams={"alpha": 0.5})
        make_run(root, f"agm10-{s}", "agm", s, 0.6, 0.75, hparams={"alpha": 1.0})
        probe = {"audio": 0.50 + 0.04 * s, "visual": 0.30}
        acc = (0.66, 0.72)[s]
        make_run(root, f"gr1-{s}", "greedy", s, 0.7, acc, hparams={"alpha": 1.0}, heads="cross-modal",
                 train_time=3.0, probe=probe)  # fmt: skip
        make_run(root, f"gr2-{s}", "greedy", s, 0.6, 0.50, hparams={"alpha": 2.0}, heads="cross-modal")
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fair_runs(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def report(runs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rep") / "report"
    write_report(runs, out, oracle=True)
    return out


def _rows(t: Table) -> dict[str, list[str]]:
    """Each row's cell texts by its first cell (the method), or, for tables with a Group column first, its second."""
    k = 1 if t.columns[0] == "Group" else 0
    return {r[k].text: [c.text for c in r] for r in t.rows}


def test_selection_on_mean_validation_and_test_mean_std(runs: Path) -> None:
    col = collect(runs)
    ogm = col.selected["embedded"]["ogm_ge"]
    assert json.loads(ogm.hparams) == {"alpha": 0.1} and ogm.seeds == [0, 1]
    acc = ogm.stat(lambda s: s["test"]["accuracy"])
    assert acc is not None and acc.mean == pytest.approx(0.55) and acc.std == pytest.approx(0.0707107, abs=1e-6)
    assert json.loads(col.oracle["embedded"]["ogm_ge"].hparams) == {"alpha": 0.5}
    assert json.loads(col.selected["embedded"]["mmcosine"].hparams) == {"scale": 10.0}
    assert [r for _, r in col.rows()] == [
        "unimodal (audio)", "unimodal (visual)", "baseline", "greedy", "mmcosine", "agm", "ogm_ge"
    ]  # fmt: skip
    assert col.unfair == [] and len(col.runs) == 22


def test_table2_n_best_marks_by_paired_test_and_group_averages(runs: Path) -> None:
    t = table2(collect(runs))
    assert t.columns == ["Group", "Method", "embedded Acc", "embedded F1", "embedded n", "Flags"]
    rows = {r[1].text: r for r in t.rows}
    acc = {name: (r[2].text, r[2].mark) for name, r in rows.items()}
    # Top accuracy: mmcosine (0.70, 0.70). Paired by seed against it, with one degree of freedom (t is
    # Cauchy there: p = 1 - 2·atan(|t|)/π):
    #   greedy 0.66, 0.72: d = -0.04, +0.02, mean -0.01, sd 0.0424, t = -0.333, p = 0.80 → not worse, bold;
    #   ogm_ge 0.50, 0.60: d = -0.20, -0.10, mean -0.15, sd 0.0707, t = -3, p = 0.205 → not worse, bold;
    #   agm 0.65, 0.65: d = -0.05 on both seeds, std 0 and mean ≠ 0 → p = 0, worse, not bold.
    # Baseline is higher than ogm_ge but a reference: never ranked.
    assert acc == {
        "unimodal (audio)": ("40.00 ± 0.00", ""),
        "unimodal (visual)": ("20.00 ± 0.00", ""),
        "baseline": ("60.00 ± 0.00", ""),
        "greedy": ("69.00 ± 4.24", "best"),
        "mmcosine": ("70.00 ± 0.00", "best"),
        "agm": ("65.00 ± 0.00", ""),
        "ogm_ge": ("55.00 ± 7.07", "best"),
        "optimization avg": ("60.00", ""),
    }
    assert all(r[4].text == "2" for name, r in rows.items() if not name.endswith("avg"))
    # Only the optimization group has two methods: no average row for feed-forward or objective.
    assert [r[1].text for r in t.rows if r[1].text.endswith("avg")] == ["optimization avg"]
    assert t.kinds[-1] == "avg" and rows["optimization avg"][3].text == "59.00"
    assert "paired Student's t-test" in t.note and "α = 0.05" in t.note and "fewer than 2 seeds" in t.note
    best = {(r["row"], r["metric"]): r["best"] for r in t.records if "best" in r}
    assert best[("agm", "accuracy")] is False and best[("ogm_ge", "accuracy")] is True
    assert not any(r["row"] == "baseline" and "best" in r for r in t.records)

    md = to_markdown(t)
    assert "| objective | mmcosine | **70.00 ± 0.00** | **65.00 ± 0.00** | 2 |  |" in md
    assert "| optimization | agm | 65.00 ± 0.00 |" in md and "<u>" not in md
    assert "| *optimization* | *optimization avg* | *60.00* | *59.00* | – |  |" in md
    tex = to_latex(t)
    assert r"\textbf{70.00 $\pm$ 0.00}" in tex and r"\underline" not in tex and r"\footnotesize" in tex


def test_rows_with_fewer_than_two_paired_seeds_are_marked_and_not_tested(tmp_path: Path) -> None:
    for s in (0, 1):
        make_run(tmp_path, f"base{s}", "baseline", s, 0.5, 0.60)
        make_run(tmp_path, f"cos{s}", "mmcosine", s, 0.5, 0.70)
    make_run(tmp_path, "ogm0", "ogm_ge", 0, 0.5, 0.30)  # one seed: cannot be shown worse than mmcosine
    col = collect(tmp_path)
    rows = {r[1].text: r for r in table2(col).rows}
    assert rows["ogm_ge"][2].mark == "best" and rows["ogm_ge"][4].text == "1"
    paired = paired_table(col, "embedded")
    assert paired is not None
    assert _rows(paired)["ogm_ge"] == ["ogm_ge", "optimization", "1", "–", "–", "–", "–", "–", "–"]
    assert "fewer than 2 paired seeds" in paired.note
    rec = next(r for r in paired.records if r["row"] == "ogm_ge" and r["metric"] == "accuracy")
    assert rec["n"] == 1 and rec["seeds"] == "0" and rec["p"] is None


def test_paired_comparison_with_baseline(runs: Path) -> None:
    t = paired_table(collect(runs), "embedded")
    assert t is not None and t.key == "paired_embedded"
    # Baseline is 0.60 on both seeds (F1 0.59). One degree of freedom: the 97.5 % quantile is
    # tan(0.475·π) = 12.7062 and p = 1 - 2·atan(|t|)/π.
    # greedy: d = +0.06, +0.12; mean 0.09, sd 0.042426, se 0.03, t = 3, p = 0.2048;
    #         CI 0.09 ± 12.7062·0.03 = [-0.2912, +0.4712].
    # ogm_ge: d = -0.10, 0.00; mean -0.05, se 0.05, t = -1, p = 0.5; CI -0.05 ± 0.6353 = [-0.6853, +0.5853].
    # mmcosine (+0.10 on both seeds) and agm (+0.05): all differences equal → p = 0, zero-width interval.
    assert _rows(t) == {
        "greedy": ["greedy", "feed-forward", "2", "+9.00", "[-29.12, +47.12]", "0.205", "+9.00", "[-29.12, +47.12]",
                   "0.205"],
        "mmcosine": ["mmcosine", "objective", "2", "+10.00", "[+10.00, +10.00]", "0", "+6.00", "[+6.00, +6.00]", "0"],
        "agm": ["agm", "optimization", "2", "+5.00", "[+5.00, +5.00]", "0", "+5.00", "[+5.00, +5.00]", "0"],
        "ogm_ge": ["ogm_ge", "optimization", "2", "-5.00", "[-68.53, +58.53]", "0.500", "-5.00", "[-68.53, +58.53]",
                   "0.500"],
    }  # fmt: skip
    rec = next(r for r in t.records if r["row"] == "greedy" and r["metric"] == "accuracy")
    assert rec["mean_diff"] == pytest.approx(0.09) and rec["std_diff"] == pytest.approx(0.0424264, abs=1e-6)
    assert rec["ci_low"] == pytest.approx(0.09 - 12.7062047 * 0.03) and rec["t"] == pytest.approx(3.0)
    assert rec["p"] == pytest.approx(0.2048328, abs=1e-6) and rec["df"] == 1 and rec["seeds"] == "0 1"
    csv_lines = to_csv(t).splitlines()
    assert csv_lines[0] == "dataset,group,row,metric,n,seeds,mean_diff,std_diff,ci_low,ci_high,t,df,p,hparams"
    assert "paired Student's t-test" in t.note and "p = 0 if Δ ≠ 0 and 1 if Δ = 0" in t.note


def test_small_p_values_and_datasets_without_baseline(tmp_path: Path) -> None:
    for s, acc in enumerate((0.70, 0.7001, 0.6999)):
        make_run(tmp_path / "a", f"base{s}", "baseline", s, 0.5, 0.60)
        make_run(tmp_path / "a", f"ogm{s}", "ogm_ge", s, 0.5, acc)
        make_run(tmp_path / "b", f"ogm{s}", "ogm_ge", s, 0.5, acc)
    # d = 0.10, 0.1001, 0.0999: mean 0.1, sd 1e-4, t = 0.1 / (1e-4/√3) = 1732 with df 2 → p = 3.3e-7.
    t = paired_table(collect(tmp_path / "a"), "embedded")
    assert t is not None and _rows(t)["ogm_ge"][3:6] == ["+10.00", "[+9.98, +10.02]", "< 0.001"]
    col = collect(tmp_path / "b")
    assert paired_table(col, "embedded") is None
    # Without a baseline no predictions can be compared: not flagged, and the note says so.
    t2 = table2(col)
    assert t2.rows[0][-1].text == "" and "predictions of 3 and interventions of 0 of the methods' 3 runs" in t2.note


def test_flags_for_methods_that_did_nothing(runs: Path) -> None:
    col = collect(runs)
    t = table2(col)
    flags = {r[1].text: r[-1].text for r in t.rows}
    assert flags["ogm_ge"] == (
        "‡ identical to baseline on 1/2 seeds; § no intervention before the selected epoch on 1/2 seeds"
    )
    assert flags["greedy"] == flags["mmcosine"] == flags["agm"] == ""
    assert flags["baseline"] == flags["unimodal (audio)"] == ""
    assert "‡" in t.note and "§" in t.note and "Not checked" not in t.note
    assert col.flags("embedded", "ogm_ge") == Flags(n=2, identical=1, compared=2, no_intervention=1,
                                                    intervention_known=2)  # fmt: skip
    assert col.flags("embedded", "baseline") is None and col.flags("embedded", "unimodal (audio)") is None
    rec = next(r for r in t.records if r["row"] == "ogm_ge" and r["metric"] == "accuracy")
    assert rec["identical_to_baseline"] == 1 and rec["no_intervention_before_selected"] == 1
    tex = to_latex(t)
    assert r"\ddag{} identical to baseline on 1/2 seeds; \S{} no intervention" in tex


def test_flags_count_only_seeds_that_recorded_them(tmp_path: Path) -> None:
    for s in (0, 1, 2):
        make_run(tmp_path, f"base{s}", "baseline", s, 0.5, 0.60)
    # Identical on seed 0; seed 1 written before the fields existed; seed 2 different and acted in time.
    make_run(tmp_path, "ogm0", "ogm_ge", 0, 0.5, 0.60, predictions=sha("base0"), acted=())
    make_run(tmp_path, "ogm1", "ogm_ge", 1, 0.5, 0.60, legacy=True)
    make_run(tmp_path, "ogm2", "ogm_ge", 2, 0.5, 0.60)
    col = collect(tmp_path)
    assert col.flags("embedded", "ogm_ge") == Flags(3, 1, 2, 1, 2)
    t = table2(col)
    assert t.rows[-1][-1].text == (
        "‡ identical to baseline on 1/3 seeds, 1 not recorded; "
        "§ no intervention before the selected epoch on 1/3 seeds, 1 not recorded"
    )
    assert "predictions of 1 and interventions of 1 of the methods' 3 runs" in t.note


def test_runs_written_before_the_new_fields(tmp_path: Path) -> None:
    for s in (0, 1):
        make_run(tmp_path, f"base{s}", "baseline", s, 0.5, 0.60, legacy=True)
        make_run(tmp_path, f"gr{s}", "greedy", s, 0.5, 0.60, legacy=True, probe={"audio": 0.9, "visual": 0.9})
    col = collect(tmp_path)
    t = table2(col)
    assert [r[-1].text for r in t.rows] == ["", ""]
    assert "predictions of 2 and interventions of 2 of the methods' 2 runs" in t.note
    # Without per_modality_heads the heads count as unimodal: head accuracies, no mark, no probe substitution.
    mods = modality_table(col, "embedded")
    assert _rows(mods)["greedy"][1:3] == ["30.00 ± 0.00", "30.00 ± 0.00"] and "†" not in mods.note
    probe = probe_table(col, "embedded")
    assert probe is not None and not any("†" in c.text for r in probe.rows for c in r)
    cost = cost_table(col, "embedded")
    assert "Concurrency: unknown (summary.concurrent_jobs not recorded" in cost.note


def test_cross_modal_heads_are_marked_and_replaced_by_the_probe(runs: Path) -> None:
    col = collect(runs)
    t = modality_table(col, "embedded")
    assert t.columns == ["Method", "Acc audio", "Acc visual", "φ audio", "φ visual", "Imbalance (feature mask)",
                         "Imbalance (input mask)", "n"]  # fmt: skip
    rows = _rows(t)
    # greedy's heads see both modalities: its probes (audio 0.50, 0.54; visual 0.30, 0.30) are shown, marked.
    assert rows["greedy"] == ["greedy", "52.00 ± 2.83 (probe) †", "30.00 ± 0.00 (probe) †", "34.50 ± 2.12",
                              "23.00 ± 1.41", "20.00 ± 0.00", "–", "2"]  # fmt: skip
    assert rows["baseline"][1:3] == ["30.00 ± 0.00", "30.00 ± 0.00"]
    assert "† cross-modal per-modality heads" in t.note and "masked out of the mid-fusion" in t.note
    recs = {(r["row"], r["metric"]): r for r in t.records}
    # The head's own number (0.33, 0.36) stays in the CSV, labelled.
    assert recs[("greedy", "acc_audio")]["mean"] == pytest.approx(0.345)
    assert recs[("greedy", "acc_audio")]["heads"] == "cross-modal"
    assert recs[("greedy", "probe_audio")]["mean"] == pytest.approx(0.52)
    assert ("baseline", "probe_audio") not in recs

    p = probe_table(col, "embedded")
    assert p is not None
    cells = {(r[0].text, r[1].text): [c.text for c in r[2:]] for r in p.rows}
    assert cells[("baseline", "audio")] == ["30.00 ± 0.00", "45.00 ± 0.00 (n=1)", "40.00 ± 0.00", "2"]
    assert cells[("greedy", "audio")] == ["34.50 ± 2.12 †", "52.00 ± 2.83 †", "40.00 ± 0.00", "2"]
    assert "masks the other modalities out" in p.note


def test_eng_format() -> None:
    cases = {
        50.8e9: "50.8 G", 8.47e9: "8.47 G", 3e12: "3.00 T", 512e6: "512 M", 1234.0: "1.23 k", 12.0: "12.0",
        999.7e6: "1.00 G", 999.4e6: "999 M", 1e15: "1.00 P", 2.5e18: "2500 P", 0.5: "0.500", 0.0: "0",
        -4.56e6: "-4.56 M",
    }  # fmt: skip
    assert {x: eng(x) for x in cases} == cases
    assert eng(None) == "–"


def test_cost_table_ratios_concurrency_and_memory_kind(runs: Path, tmp_path: Path) -> None:
    t = cost_table(collect(runs), "embedded")
    assert t.columns[2:] == [
        "n", "FLOPs", "FLOPs × baseline", "FLOPs own", "Train time × baseline", "Train time (s)", "Wall time (s)",
        "Peak memory (MB, process peak RSS)", "Params",
    ]  # fmt: skip
    rows = _rows(t)
    assert rows["greedy"][2:] == ["2", "1.00 G", "1.00×", "1.00 G", "3.00×", "3.0", "2.0", "300", "1,000"]
    assert "One job at a time" in t.note and "ru_maxrss" in t.note
    rec = next(r for r in t.records if r["row"] == "greedy")
    assert rec["train_time_s"] == 3.0 and rec["train_time_x_baseline"] == 3.0 and rec["concurrent_jobs"] == "1"
    assert rec["peak_memory_kind"] == "process peak RSS"

    two = tmp_path / "two"
    for s in (0, 1):
        make_run(two, f"base{s}", "baseline", s, 0.5, 0.6, jobs=2, memory_kind="cuda_max_allocated", train_time=2.0)
        make_run(two, f"ogm{s}", "ogm_ge", s, 0.5, 0.6, jobs=2, memory_kind="cuda_max_allocated", train_time=3.0)
    t = cost_table(collect(two), "embedded")
    assert t.columns[9] == "Peak memory (MB, CUDA max allocated)" and _rows(t)["ogm_ge"][6] == "1.50×"
    assert "Jobs ran 2 at a time: time ratios include contention." in t.note

    mixed = tmp_path / "mixed"
    for s in (0, 1):
        make_run(mixed, f"base{s}", "baseline", s, 0.5, 0.6)
        make_run(mixed, f"ogm{s}", "ogm_ge", s, 0.5, 0.6, jobs=2, memory_kind="cuda_max_allocated")
    make_run(mixed, "cos0", "mmcosine", 0, 0.5, 0.6, legacy=True, memory_kind="unavailable")
    t = cost_table(collect(mixed), "embedded")
    assert "(1 at a time: 2 runs, 2 at a time: 2 runs, unknown: 1 runs): time ratios are not comparable" in t.note
    assert t.columns[9] == "Peak memory (MB)"
    mem = {name: cells[9] for name, cells in _rows(t).items()}
    assert mem == {"baseline": "300 (process peak RSS)", "mmcosine": "300 (kind unavailable)",
                   "ogm_ge": "300 (CUDA max allocated)"}  # fmt: skip


def test_report_files_html_self_contained_and_oracle_labelled(report: Path) -> None:
    names = {p.relative_to(report).as_posix() for p in report.rglob("*") if p.is_file()}
    keys = ("table2", "paired_embedded", "table3", "modalities_embedded", "cost_embedded", "trials_embedded_ogm_ge",
            "probe_embedded", "oracle_table2")  # fmt: skip
    for key in keys:
        assert {f"tables/{key}.md", f"tables/{key}.tex", f"tables/{key}.csv"} <= names
    assert {"figures/fig3_embedded_ogm_ge.png", "figures/fig3_embedded_ogm_ge.svg", "report.json"} <= names
    assert "figures/fig2_embedded.svg" in names
    # Every symbol the tables use (±, ×, Δ, †, ‡, §, …) has a LaTeX spelling: the .tex files are plain ASCII.
    for key in keys:
        assert (report / f"tables/{key}.tex").read_text().isascii(), key
    page = (report / "report.html").read_text()
    refs = re.findall(r"""(?:src|href)\s*=\s*['"]([^'"]*)""", page)
    assert refs and all(r.startswith(("data:", "#")) for r in refs), refs
    assert "<link" not in page and "<script" not in page
    assert "DIAGNOSTIC ONLY" in page and "<b>70.00 ± 0.00</b>" in page and "+9.00" in page
    trials = (report / "tables/trials_embedded_ogm_ge.md").read_text()
    assert "| alpha=0.1 | 30.00 | 55.00 | 70.00 | 2 | selected on val |" in trials
    assert "| alpha=0.5 | 10.00 | 90.00 | 65.00 | 2 | relative balance, absolute balance |" in trials
    cost = (report / "tables/cost_embedded.md").read_text()
    assert "| ogm_ge | optimization | 2 | 1.00 G | 1.00× | 1.00 G | 1.00× |" in cost
    assert "| baseline | 1.00 G |" in (report / "tables/table3.md").read_text()
    manifest = json.loads((report / "report.json").read_text())
    assert manifest["selected"]["embedded"]["ogm_ge"]["hparams"] == {"alpha": 0.1}
    assert not any("Fig. 2" in m for m in manifest["missing"])


def test_notes_render_one_line_each(runs: Path) -> None:
    t = paired_table(collect(runs), "embedded")
    assert t is not None
    lines = t.note.splitlines()
    assert len(lines) == 2
    assert "\n\n".join(lines) in to_markdown(t)
    assert "<p class='note'>" + "<br>".join(map(html.escape, lines)) + "</p>" in to_html(t)
    assert r"\\ All differences equal" in to_latex(t)


def test_unfair_protocols_and_trial_counts_refused(tmp_path: Path) -> None:
    root = fair_runs(tmp_path / "runs")
    make_run(root, "pmr-0", "pmr", 0, 0.5, 0.5, train={**TRAIN, "epochs": 2})
    make_run(root, "pmr-1", "pmr", 1, 0.5, 0.5, train={**TRAIN, "epochs": 2})
    with pytest.raises(BalanceMMError, match=r"^unfair comparison: embedded: the 'train' config section differs .*pmr"):
        write_report(root, tmp_path / "out", plots=False)
    assert not (tmp_path / "out").exists()
    col = write_report(root, tmp_path / "out", plots=False, allow_unfair=True).collection
    assert any("different numbers of trials (agm 2, greedy 2, mmcosine 2, ogm_ge 2, pmr 1)" in u for u in col.unfair)
    assert "Unfair comparison" in (tmp_path / "out/report.html").read_text()


def test_unfinished_skipped_and_each_directory_counted_once(tmp_path: Path) -> None:
    root = fair_runs(tmp_path / "runs")
    make_run(root, "ogm9-0", "ogm_ge", 0, 1.0, 1.0, hparams={"alpha": 0.9}, done=False)
    (root / "nested").mkdir()
    (root / "nested/link").symlink_to(root / "base0", target_is_directory=True)
    col = collect(root)
    assert len(col.runs) == 22 and any("not finished" in n for n in col.notes)
    assert col.selected["embedded"]["baseline"].seeds == [0, 1]


def test_atomic_output(tmp_path: Path, runs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(BalanceMMError, match="not a previous report"):
        write_report(runs, out, plots=False)
    assert (out / "mine.txt").read_text() == "keep"
    out = tmp_path / "rep"
    write_report(runs, out, plots=False)
    before = (out / "report.md").read_text()
    calls = {"n": 0}
    real = Path.write_bytes

    def failing(self: Path, data: bytes) -> int:
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(28, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", failing)
    with pytest.raises(BalanceMMError, match=r"cannot write the report .*No space left"):
        write_report(runs, out, plots=False)
    monkeypatch.undo()
    assert (out / "report.md").read_text() == before  # the previous report is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "rep"]  # no temporary directory left


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], runs: Path) -> None:
    (tmp_path / "empty").mkdir()
    for target, msg in ((tmp_path / "missing", "does not exist"), (tmp_path / "empty", "no run directories")):
        assert main(["report", str(target), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and msg in err and err.startswith("balancemm: error:")
    assert not (tmp_path / "o").exists()
    assert main(["report", str(runs), "--out", str(tmp_path / "o"), "--no-plots"]) == 0
    assert "22 runs" in capsys.readouterr().out and (tmp_path / "o/report.html").is_file()


def test_report_does_not_import_torch(runs: Path, tmp_path: Path) -> None:
    code = (
        "import sys; from balancemm.report import write_report;"
        f"write_report({str(runs)!r}, {str(tmp_path / 'o')!r});"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert (tmp_path / "o/figures/fig3_embedded_ogm_ge.svg").is_file()


def _chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


@pytest.mark.skipif(_chromium() is None, reason="no Chromium binary on this machine (apt-get install chromium)")
def test_html_renders_in_headless_chromium_with_its_inline_figures(report: Path, tmp_path: Path) -> None:
    browser = _chromium()
    assert browser is not None
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--virtual-time-budget=5000"]
    # A copy of the page reports, once loaded, how many tables it has and how many of its inline (data:)
    # figures the browser decoded; the report itself carries no script.
    probe = (
        "<script>window.onload = () => { const ok = [...document.images].filter(i => i.naturalWidth > 0);"
        " document.title = document.querySelectorAll('table').length + '|' + ok.length + '/' + document.images.length;"
        " };</script></body>"
    )
    page = tmp_path / "page.html"
    page.write_text((report / "report.html").read_text().replace("</body>", probe))
    res = subprocess.run([browser, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=60)
    title = re.search(r"<title>(\d+)\|(\d+)/(\d+)</title>", res.stdout)
    assert title is not None, res.stderr[-500:]
    tables, loaded, total = map(int, title.groups())
    assert tables >= 3 and total >= 1 and loaded == total
    shot = tmp_path / "shot.png"
    cmd = [browser, *flags, "--window-size=1200,1600", f"--screenshot={shot}", (report / "report.html").as_uri()]
    subprocess.run(cmd, capture_output=True, timeout=60)
    assert shot.is_file() and shot.stat().st_size > 10_000  # a rendered page, not a blank one


def test_imbalance_is_shown_under_both_masking_rules_and_old_runs_under_their_own(tmp_path: Path) -> None:
    make_run(tmp_path, "b0", "baseline", 0, 0.5, 0.6, imbalance=0.2, input_imbalance=0.5)
    make_run(tmp_path, "b1", "baseline", 1, 0.5, 0.6, imbalance=0.4, input_imbalance=0.7)
    # Written before shapley_by_mask: their top-level numbers are under the config's model.mask.
    make_run(tmp_path, "o0", "ogm_ge", 0, 0.5, 0.6, imbalance=0.3, mask="input")
    make_run(tmp_path, "o1", "ogm_ge", 1, 0.5, 0.6, imbalance=0.1)
    rows = _rows(modality_table(collect(tmp_path), "embedded"))
    assert rows["baseline"][5:7] == ["30.00 ± 14.14", "60.00 ± 14.14"]
    # One seed scored each rule: n = 1 per column, never the input-masked 0.3 shown as a feature-masked value.
    assert rows["ogm_ge"][5:7] == ["10.00 ± 0.00", "30.00 ± 0.00"]


# --- hostile and damaged run directories ----------------------------------------------------------------


def _edit(path: Path, change: Any) -> None:
    """Rewrite the JSON record ``path`` with ``change(record)`` applied in place."""
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


def _set(dotted: str, value: Any) -> Any:
    """A ``change`` for :func:`_edit` that sets the (dotted) field to ``value``, or deletes it for ``...``."""

    def change(record: dict[str, Any]) -> None:
        *parents, last = dotted.split(".")
        for p in parents:
            record = record[p]
        if value is ...:
            del record[last]
        else:
            record[last] = value

    return change


def _report_cli(capsys: pytest.CaptureFixture[str], runs: Path, out: Path, *flags: str) -> tuple[int, str]:
    code = main(["report", str(runs), "--out", str(out), "--no-plots", *flags])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@pytest.mark.parametrize(
    ("file", "dotted", "value"),
    [
        ("summary.json", "dataset", "../../../../x/pwn"),
        ("summary.json", "dataset", "/tmp/pwn"),
        ("summary.json", "method", "a/b"),
        ("summary.json", "modalities", ["audio", "../../v"]),
        ("config.json", "config.method.modality", "../../pwn"),
    ],
)
def test_names_from_run_files_never_become_paths(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], file: str, dotted: str, value: Any
) -> None:
    runs = tmp_path / "a/b/c/d/runs"
    fair_runs(runs)
    # A second dataset's pair of runs, named by the hostile field: its own fairness domain.
    for s in (0, 1):
        d = make_run(runs, f"evil{s}", "unimodal", s, 0.5, 0.5, hparams={"modality": "audio"})
        _edit(d / "summary.json", _set("dataset", "other"))
        _edit(d / file, _set(dotted, value))
    before = {p for p in tmp_path.rglob("*")}
    code, err = _report_cli(capsys, runs, tmp_path / "a/b/c/d/rep")
    assert code == 0
    written = {p for p in tmp_path.rglob("*")} - before
    assert written and all(p.is_relative_to(tmp_path / "a/b/c/d/rep") for p in written)
    assert not list(tmp_path.rglob("*pwn*"))
    assert "2 run directories left out as damaged or implausible" in err and "not a plain name" in err
    notes = json.loads((tmp_path / "a/b/c/d/rep/report.json").read_text())["notes"]
    assert sum(n.startswith(f"rejected {runs.resolve()}/evil") and file in n for n in notes) == 2


def test_the_writer_refuses_a_path_outside_out(tmp_path: Path, runs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from balancemm.report import tables

    monkeypatch.setattr(tables, "all_tables", lambda col, oracle=False: [Table("../../escape", "t", ["a"])])
    with pytest.raises(BalanceMMError, match=r"refusing to write 'tables/\.\./\.\./escape\.md': .* outside --out"):
        write_report(runs, tmp_path / "deep/rep", plots=False)
    assert not list(tmp_path.rglob("escape*")) and not (tmp_path / "deep/rep").exists()


DAMAGE: list[tuple[str, Any, str]] = [
    ("summary.json", b'{"schema": 1, "dataset', "summary.json: not valid JSON (Unterminated string"),
    ("summary.json", b"{}", "summary.json: dataset is missing"),
    ("summary.json", b"[1, 2]", "summary.json: holds [1, 2], not a mapping"),
    ("summary.json", b"\xff\xfe\x00\x01\x89PNG", "summary.json: not valid JSON ('utf-8' codec can't decode"),
    ("config.json", b'{"config": {"run": "\xff"}}', "config.json: not valid JSON ('utf-8' codec can't decode"),
    ("config.json", b"[1]", "config.json: holds [1], not a mapping"),
    ("config.json", b"[" * 100_000, "config.json: not valid JSON"),
    ("summary.json", _set("selection", ...), "summary.json: selection is missing"),
    ("summary.json", _set("test.macro_f1", ...), "summary.json: test.macro_f1 is missing"),
    ("summary.json", _set("seed", "0"), "summary.json: seed is '0', not an integer >= 0"),
    ("summary.json", _set("modalities", "audio"), "summary.json: modalities is 'audio', not a non-empty list"),
    ("summary.json", _set("flops", [1]), "summary.json: flops is [1], not a mapping"),
    ("summary.json", _set("concurrent_jobs", [1]), "summary.json: concurrent_jobs is [1], not an integer >= 1"),
    ("summary.json", _set("selection.metric", None), "summary.json: selection.metric is None, not a string"),
    ("config.json", _set("config.method", [1]), "config.json: config: method is [1], not a mapping"),
    # Implausible numbers: shown as "114.72 ± 49.89" or "nan ± nan" before.
    ("summary.json", _set("test.accuracy", 1.5), "summary.json: test.accuracy is 1.5, not a fraction in [0, 1]"),
    ("summary.json", _set("test.accuracy", math.nan), "summary.json: test.accuracy is nan, not a fraction"),
    ("summary.json", _set("test.macro_f1", -0.1), "summary.json: test.macro_f1 is -0.1, not a fraction"),
    ("summary.json", _set("selection.value", math.inf), "summary.json: selection.value is inf, not a fraction"),
    ("summary.json", _set("test.per_modality.audio.accuracy", 2), "test.per_modality.audio.accuracy is 2, not a"),
    ("summary.json", _set("imbalance", 2.5), "summary.json: imbalance is 2.5, not an imbalance degree in [0, 2]"),
    ("summary.json", _set("shapley.audio", -1.5), "summary.json: shapley.audio is -1.5, not a Shapley value"),
    ("summary.json", _set("flops.total_with_artifacts", -1e9), "flops.total_with_artifacts is -1000000000.0, not a"),
    ("summary.json", _set("train_time_s", "fast"), "summary.json: train_time_s is 'fast', not a finite number"),
    ("summary.json", _set("params.total", True), "summary.json: params.total is True, not a finite number >= 0"),
]


@pytest.mark.parametrize(("file", "damage", "message"), DAMAGE)
def test_damaged_or_implausible_records_leave_the_run_out_with_a_note(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], file: str, damage: Any, message: str
) -> None:
    runs = fair_runs(tmp_path / "runs")
    target = runs / "agm5-1" / file
    if isinstance(damage, bytes):
        target.write_bytes(damage)
    else:
        _edit(target, damage)
    # Without agm's seed 1 the seeds differ between trials: refused, the damaged record named on that line.
    code, err = _report_cli(capsys, runs, tmp_path / "rep")
    assert code == 2 and err.count("\n") == 1 and "unfair comparison" in err
    assert f"{runs.resolve()}/agm5-1: {file}: " in err and message in err and len(err) < 1000
    code, err = _report_cli(capsys, runs, tmp_path / "rep", "--allow-unfair")
    assert code == 0 and "1 run directories left out as damaged or implausible" in err
    report = json.loads((tmp_path / "rep/report.json").read_text())
    rejected = [n for n in report["notes"] if n.startswith("rejected")]
    assert len(rejected) == 1 and rejected[0].startswith(f"rejected {runs.resolve()}/agm5-1: {file}: ")
    assert message in rejected[0]
    assert "nan ±" not in (tmp_path / "rep/report.md").read_text()
    assert report["selected"]["embedded"]["agm"]["seeds"] == [0]


def test_a_damaged_probe_is_ignored_and_the_run_kept(tmp_path: Path) -> None:
    runs = fair_runs(tmp_path / "runs")
    _edit(runs / "gr1-1/probe.json", _set("audio.test_accuracy", 1.5))
    col = collect(runs)
    assert len(col.runs) == 22 and col.selected["embedded"]["greedy"].runs[1].probe is None
    (note,) = [n for n in col.notes if "probe" in n]
    assert note.startswith(f"ignored the probe of {runs.resolve()}/gr1-1: probe.json: audio.test_accuracy is 1.5")


def _dead_pid() -> int:
    """The id of a process that has exited (what a killed ``report`` leaves in its folder names)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_of_killed_reports_are_cleaned_up(tmp_path: Path, runs: Path) -> None:
    out = tmp_path / "rep"
    write_report(runs, out, plots=False)
    dead, alive = _dead_pid(), os.getppid()
    for name in (f".rep.tmp-{dead}", f".rep.old-{dead}", f".rep.tmp-{alive}", ".other.tmp-1"):
        (tmp_path / name / "tables").mkdir(parents=True)
    (tmp_path / f".rep.old-{dead}/report.json").write_text("{}")
    write_report(runs, out, plots=False)
    # A running process's folder and other names are left alone.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f".rep.tmp-{alive}", ".other.tmp-1", "rep"])


def test_a_kill_between_the_two_renames_is_recovered_by_the_next_run(tmp_path: Path, runs: Path) -> None:
    out = tmp_path / "rep"
    write_report(runs, out, plots=False)
    (out / "marker").write_text("the previous report")
    # SIGKILL right after the old report moved aside: no Python cleanup runs, as with `kill -9`.
    code = (
        "import os, signal; from balancemm.report import write_report; real = os.replace\n"
        "def replace(a, b):\n"
        "    real(a, b)\n"
        "    if '.old-' in str(b): os.kill(os.getpid(), signal.SIGKILL)\n"
        "os.replace = replace\n"
        f"write_report({str(runs)!r}, {str(out)!r}, plots=False)\n"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == -9
    assert not out.exists() and len(list(tmp_path.glob(".rep.old-*"))) == 1
    # Even a rerun that fails (here: no runs) puts the previous report back first.
    with pytest.raises(BalanceMMError, match="does not exist"):
        write_report(tmp_path / "missing", out, plots=False)
    assert (out / "marker").read_text() == "the previous report"
    write_report(runs, out, plots=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"] and not (out / "marker").exists()


def test_an_interrupted_swap_puts_the_previous_report_back(
    tmp_path: Path, runs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "rep"
    write_report(runs, out, plots=False)
    (out / "marker").write_text("the previous report")
    real = os.replace

    def interrupted(a: Path, b: Path) -> None:
        if ".rep.tmp-" in str(a):  # Ctrl-C as the new report takes the name
            raise KeyboardInterrupt
        real(a, b)

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_report(runs, out, plots=False)
    monkeypatch.undo()
    assert (out / "marker").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["rep"]


def _evaluated(d: Path, missing: dict[str, float], other: dict[str, float]) -> None:
    """An eval.json with a standard evaluation whose curves over (0, 0.5, 1) run from the run's clean
    accuracy to ``missing[m]`` for m:missing and to ``other[m]`` for m:gaussian, linearly."""
    clean = json.loads((d / "summary.json").read_text())["test"]["accuracy"]
    curves = {
        f"{m}:{kind}": {"severities": [0.0, 0.5, 1.0], "accuracy": [clean, (clean + end) / 2, end]}
        for m in ("audio", "visual")
        for kind, end in (("missing", missing[m]), ("gaussian", other[m]))
    }
    entry = {"key": "k", "request": {}, "standard": True, "clean": {}, "robustness": {"corruptions": curves}}
    (d / "eval.json").write_text(json.dumps({"k": entry, "other": {**entry, "standard": False, "robustness": {}}}))


def test_the_robustness_table_and_figure_come_from_the_standard_evaluations(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    for seed, (base_acc, ogm_acc) in enumerate(((0.8, 0.6), (0.6, 0.6))):
        _evaluated(
            make_run(root, f"b{seed}", "baseline", seed, 0.5, base_acc),
            {"audio": 0.2, "visual": 0.4},
            {"audio": 0.6, "visual": 0.6},
        )
        _evaluated(
            make_run(root, f"o{seed}", "ogm_ge", seed, 0.5, ogm_acc),
            {"audio": 0.3, "visual": 0.5},
            {"audio": 0.5, "visual": 0.5},
        )
    make_run(root, "p0", "pmr", 0, 0.5, 0.7)  # not evaluated: no row
    col = collect(root)
    (table,) = [t for t in all_tables(col) if t.key == "robustness_embedded"]
    rows = _rows(table)
    assert set(rows) == {"baseline", "ogm_ge"}
    # baseline: clean 0.8 / 0.6; audio missing 0.2 on both seeds; a linear curve's AUC is (clean + end)/2, and the
    # modality's curve is the mean of its two kinds: audio ((0.8+0.2)/2 + (0.8+0.6)/2)/2 = 0.6 and 0.5 on seed 1
    assert rows["baseline"][1:5] == ["20.00 ± 0.00", "55.00 ± 7.07", "40.00 ± 0.00", "60.00 ± 7.07"]
    # relative = mean AUC over modalities / clean: (0.6 + 0.65)/2/0.8 = 0.78125 and (0.5 + 0.55)/2/0.6 = 0.875
    assert rows["baseline"][5] == "0.828 ± 0.066"
    # effective: clean means 0.7 and 0.6, mean AUCs 0.575 and 0.525: two methods lie on their own line, gap 0
    assert rows["baseline"][6] == "+0.00" and rows["ogm_ge"][6] == "+0.00" and rows["ogm_ge"][7] == "2"
    # per modality in the CSV: baseline audio 0.6/0.8 and 0.5/0.6 → mean 0.7083
    (rel,) = [r for r in table.records if r["row"] == "baseline" and r["metric"] == "relative_audio"]
    assert rel["mean"] == pytest.approx((0.6 / 0.8 + 0.5 / 0.6) / 2)
    figures = [f.key for f in all_figures(col, all_tables(col))]
    assert "robustness_embedded" in figures
    # A damaged evaluation leaves the run in the report, without its robustness, with a note.
    (root / "o1" / "eval.json").write_text('{"k": {"standard": true, "robustness": {"corruptions": {"depth:x": {}}}}}')
    col = collect(root)
    assert next(n for n in col.notes if "corruptions of" in n).endswith(
        "eval.json: corruption 'depth:x' is not one of this run's modalities; delete eval.json and rerun "
        f"`balancemm eval {(root / 'o1').resolve()}`"
    )
    assert _rows(robustness_table(col, "embedded"))["ogm_ge"][7] == "1"
