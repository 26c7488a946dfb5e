"""``balancemm report``: reading run records, the validation selection rule, fairness checks, rendering, atomicity.

Run directories are written by hand in the real format (config.json + summary.json + done, the fields of
``Trainer._finish``), with known validation/test numbers so that the expected table cells are computed here.
"""

from __future__ import annotations

import json
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
from balancemm.report.tables import table2, to_latex, to_markdown

GROUP = {"baseline": "reference", "unimodal": "reference", "ogm_ge": "optimization", "agm": "optimization",
         "mmcosine": "objective"}  # fmt: skip
TRAIN = {"batch_size": 64, "epochs": 1, "flops": "sampled", "optimizer": {"lr": 0.02, "name": "sgd"}}


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
) -> Path:
    """One run directory; ``val`` is the selection value, ``acc``/``f1`` the test accuracy/macro-F1 (fractions)."""
    hp = dict(hparams or {})
    mods = [hp["modality"]] if method == "unimodal" else ["audio", "visual"]
    d = root / name
    d.mkdir(parents=True)
    config = {
        "run": {"method": method, "dataset": "embedded", "seed": seed},
        "method": hp,
        "data": {"seed": 0},
        "model": {"fusion": "concat"},
        "train": train or TRAIN,
    }
    (d / "config.json").write_text(json.dumps({"config": config, "config_hash": name, "run_id": name}))
    f1 = acc - 0.01 if f1 is None else f1
    summary = {
        "schema": 1, "status": "complete", "run_id": name, "config_hash": name, "method": method,
        "method_group": GROUP[method], "dataset": "embedded", "seed": seed, "modalities": mods, "selected_epoch": 0,
        "selection": {"split": "val", "metric": "accuracy", "value": val}, "used_validation_in_training": False,
        "test": {"num_samples": 360, "loss": 1.0, "accuracy": acc, "macro_f1": f1,
                 "per_modality": {m: {"accuracy": acc / 2, "macro_f1": f1 / 2} for m in mods}},
        "shapley": {m: acc / (i + 2) for i, m in enumerate(mods)}, "coalition_values": {"empty": 0.1},
        "imbalance": None if method == "unimodal" else imbalance,
        "flops": {"counting": "sampled", "total": flops, "total_with_artifacts": flops, "by_phase": {},
                  "artifacts": {}, "extrapolated": 0, "sample_steps": 3},
        "artifacts": {}, "train_time_s": 1.0, "wall_time_s": 2.0, "peak_memory_mb": 300.0,
        "peak_memory_kind": "rss", "params": {"total": 1000, "per_modality": {m: 400 for m in mods}},
    }  # fmt: skip
    (d / "summary.json").write_text(json.dumps(summary))
    if done:
        (d / "done").write_text("")
    return d


def fair_runs(root: Path) -> Path:
    """Two seeds of: unimodal audio/visual, baseline, ogm_ge and mmcosine with two trials each.

    ogm_ge: alpha 0.1 has val mean 0.70 (test 0.50, 0.60); alpha 0.5 has val mean 0.65 (test 0.90, 0.90):
    validation selects alpha 0.1 (test 55.00 ± 7.07), an oracle would pick alpha 0.5.
    """
    for s in (0, 1):
        make_run(root, f"uni-a{s}", "unimodal", s, 0.5, 0.40, hparams={"modality": "audio"})
        make_run(root, f"uni-v{s}", "unimodal", s, 0.5, 0.20, hparams={"modality": "visual"})
        make_run(root, f"base{s}", "baseline", s, 0.5, 0.60)
    make_run(root, "ogm1-0", "ogm_ge", 0, 0.6, 0.50, hparams={"alpha": 0.1}, imbalance=0.30)
    make_run(root, "ogm1-1", "ogm_ge", 1, 0.8, 0.60, hparams={"alpha": 0.1}, imbalance=0.30)
    make_run(root, "ogm5-0", "ogm_ge", 0, 0.9, 0.90, hparams={"alpha": 0.5}, imbalance=0.10, flops=3e9)
    make_run(root, "ogm5-1", "ogm_ge", 1, 0.4, 0.90, hparams={"alpha": 0.5}, imbalance=0.10, flops=3e9)
    for s in (0, 1):
        make_run(root, f"cos10-{s}", "mmcosine", s, 0.7, 0.70, hparams={"scale": 10.0}, f1=0.65)
        make_run(root, f"cos20-{s}", "mmcosine", s, 0.6, 0.80, hparams={"scale": 20.0})
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fair_runs(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def report(runs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rep") / "report"
    write_report(runs, out, oracle=True)
    return out


def test_selection_on_mean_validation_and_test_mean_std(runs: Path) -> None:
    col = collect(runs)
    ogm = col.selected["embedded"]["ogm_ge"]
    assert json.loads(ogm.hparams) == {"alpha": 0.1} and ogm.seeds == [0, 1]
    acc = ogm.stat(lambda s: s["test"]["accuracy"])
    assert acc is not None and acc.mean == pytest.approx(0.55) and acc.std == pytest.approx(0.0707107, abs=1e-6)
    assert json.loads(col.oracle["embedded"]["ogm_ge"].hparams) == {"alpha": 0.5}
    assert json.loads(col.selected["embedded"]["mmcosine"].hparams) == {"scale": 10.0}
    assert [r for _, r in col.rows()] == [
        "unimodal (audio)", "unimodal (visual)", "baseline", "mmcosine", "ogm_ge"
    ]  # fmt: skip
    assert col.unfair == [] and len(col.runs) == 14


def test_table2_marks_and_group_averages(runs: Path) -> None:
    t = table2(collect(runs))
    cells = {r[1].text: r for r in t.rows}
    # Accuracy: mmcosine 70.00 best, baseline 60.00 second; ogm_ge 55.00 unmarked.
    assert cells["mmcosine"][2].text == "70.00 ± 0.00" and cells["mmcosine"][2].mark == "best"
    assert cells["baseline"][2].mark == "second" and cells["ogm_ge"][2].text == "55.00 ± 7.07"
    assert cells["ogm_ge"][2].mark == "" and cells["optimization avg"][2].mark == ""
    assert cells["optimization avg"][2].text == "55.00" and cells["objective avg"][3].text == "65.00"
    assert t.kinds[[r[1].text for r in t.rows].index("objective avg")] == "avg"
    md = to_markdown(t)
    assert "| objective | mmcosine | **70.00 ± 0.00** |" in md and "<u>60.00 ± 0.00</u>" in md
    assert "| *optimization* | *optimization avg* | *55.00* | *54.00* |" in md
    tex = to_latex(t)
    assert r"\textbf{70.00 $\pm$ 0.00}" in tex and r"\underline{60.00 $\pm$ 0.00}" in tex


def test_report_files_html_self_contained_and_oracle_labelled(report: Path) -> None:
    names = {p.relative_to(report).as_posix() for p in report.rglob("*") if p.is_file()}
    for key in ("table2", "table3", "modalities_embedded", "cost_embedded", "trials_embedded_ogm_ge"):
        assert {f"tables/{key}.md", f"tables/{key}.tex", f"tables/{key}.csv"} <= names
    assert {"figures/fig3_embedded_ogm_ge.png", "figures/fig3_embedded_ogm_ge.svg", "report.json"} <= names
    page = (report / "report.html").read_text()
    refs = re.findall(r"""(?:src|href)\s*=\s*['"]([^'"]*)""", page)
    assert refs and all(r.startswith(("data:", "#")) for r in refs), refs
    assert "<link" not in page and "<script" not in page
    assert "DIAGNOSTIC ONLY" in page and "<b>70.00 ± 0.00</b>" in page
    trials = (report / "tables/trials_embedded_ogm_ge.md").read_text()
    assert "| alpha=0.1 | 30.00 | 55.00 | 70.00 | selected on val |" in trials
    assert "| alpha=0.5 | 10.00 | 90.00 | 65.00 | relative balance, absolute balance |" in trials
    cost = (report / "tables/cost_embedded.md").read_text()
    assert "| ogm_ge | optimization | 1e+09 | 1.00× |" in cost
    manifest = json.loads((report / "report.json").read_text())
    assert manifest["selected"]["embedded"]["ogm_ge"]["hparams"] == {"alpha": 0.1}
    assert "Fig. 2" in " ".join(manifest["missing"])  # no probe.json in these runs


def test_unfair_protocols_and_trial_counts_refused(tmp_path: Path) -> None:
    root = fair_runs(tmp_path / "runs")
    make_run(root, "agm-0", "agm", 0, 0.5, 0.5, train={**TRAIN, "epochs": 2})
    make_run(root, "agm-1", "agm", 1, 0.5, 0.5, train={**TRAIN, "epochs": 2})
    with pytest.raises(BalanceMMError, match=r"^unfair comparison: embedded: the 'train' config section differs .*agm"):
        write_report(root, tmp_path / "out", plots=False)
    assert not (tmp_path / "out").exists()
    col = write_report(root, tmp_path / "out", plots=False, allow_unfair=True).collection
    assert any("different numbers of trials (agm 1, mmcosine 2, ogm_ge 2)" in u for u in col.unfair)
    assert "Unfair comparison" in (tmp_path / "out/report.html").read_text()


def test_unfinished_skipped_and_each_directory_counted_once(tmp_path: Path) -> None:
    root = fair_runs(tmp_path / "runs")
    make_run(root, "ogm9-0", "ogm_ge", 0, 1.0, 1.0, hparams={"alpha": 0.9}, done=False)
    (root / "nested").mkdir()
    (root / "nested/link").symlink_to(root / "base0", target_is_directory=True)
    col = collect(root)
    assert len(col.runs) == 14 and any("not finished" in n for n in col.notes)
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
    assert "14 runs" in capsys.readouterr().out and (tmp_path / "o/report.html").is_file()


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
