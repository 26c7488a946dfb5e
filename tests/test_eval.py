"""``balancemm eval``: corruptions, robustness metrics, and re-evaluating a finished run."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

import balancemm
from balancemm.cli import main
from balancemm.context import derive_seed
from balancemm.data.batch import Batch
from balancemm.data.corruptions import Corruption, corrupt, default_corruptions, parse_corruption
from balancemm.engine import artifacts, corrupted
from balancemm.engine.corrupted import eval_run, evaluate_corrupted, input_scales
from balancemm.engine.evaluate import evaluate
from balancemm.metrics.robustness import auc, curve_summary, effective_robustness
from tests.conftest import TinyDataset, build_method, first_batch, train_epochs

# -- the metrics ---------------------------------------------------------------------------------------


def test_auc_is_the_trapezoid_mean_and_relative_divides_by_the_clean_accuracy() -> None:
    # (0.5·(0.8 + 0.6)/2 + 0.5·(0.6 + 0.2)/2) / 1 = 0.35 + 0.2
    assert auc([0.0, 0.5, 1.0], [0.8, 0.6, 0.2]) == pytest.approx(0.55)
    # over [0.5, 1] only: (0.6 + 0.2)/2
    assert auc([0.5, 1.0], [0.6, 0.2]) == pytest.approx(0.4)
    assert auc([0.3], [0.7]) == 0.7
    assert curve_summary([0.0, 0.5, 1.0], [0.8, 0.6, 0.2]) == pytest.approx({"auc": 0.55, "relative": 0.6875})
    assert curve_summary([0.5, 1.0], [0.6, 0.2])["relative"] is None  # no clean point on the grid
    with pytest.raises(ValueError, match="increase"):
        auc([0.5, 0.5], [0.1, 0.2])


def test_effective_robustness_is_the_gap_to_the_line_fitted_across_methods() -> None:
    # mean clean 0.7, mean robust 0.5, slope Σ(dx·dy)/Σdx² = 0.06/0.08 = 0.75: the line gives 0.35, 0.5, 0.65
    gaps = effective_robustness([0.5, 0.7, 0.9], [0.3, 0.6, 0.6])
    assert gaps == pytest.approx([-0.05, 0.1, -0.05])
    assert effective_robustness([0.6, 0.6], [0.2, 0.4]) == pytest.approx([-0.1, 0.1])  # flat line at the mean


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: auc([0.0, 1.0], [0.5]), "auc needs one accuracy per severity, and at least one"),
        (lambda: auc([], []), "auc needs one accuracy per severity, and at least one"),
        (lambda: effective_robustness([0.5], [0.1, 0.2]), "effective_robustness needs one robust value per clean"),
        (lambda: effective_robustness([], []), "effective_robustness needs one robust value per clean"),
    ],
)
def test_the_robustness_metrics_refuse_mismatched_or_empty_input(call: Any, message: str) -> None:
    with pytest.raises(ValueError) as err:
        call()
    assert str(err.value).startswith(message)


# -- the corruptions -----------------------------------------------------------------------------------


def _batch_of(inputs: dict[str, torch.Tensor]) -> Batch:
    """A batch of these inputs ``{m: [B, ...]}`` (sorted modalities), labels 0, every modality present."""
    rows = next(iter(inputs.values())).shape[0]
    mods = tuple(sorted(inputs))
    return Batch(
        inputs,
        torch.zeros(rows, dtype=torch.long),
        torch.arange(rows),
        torch.ones(rows, len(mods), dtype=torch.bool),
        mods,
    )


def test_the_corruption_specs_and_their_defaults() -> None:
    mods = ("audio", "text", "visual")
    assert [c.name for c in default_corruptions(mods)] == [
        "audio:missing",
        "audio:gaussian",
        "audio:time_mask",
        "text:missing",
        "text:gaussian",
        "text:token_drop",
        "visual:missing",
        "visual:gaussian",
        "visual:blur",
    ]
    assert parse_corruption("visual", mods) == default_corruptions(("visual",))
    assert parse_corruption("audio:missing", mods) == [Corruption("audio", "missing")]
    for text, message in (
        ("depth:missing", "unknown modality 'depth'"),
        ("audio:fog", "unknown corruption 'fog'"),
        ("visual:time_mask", "time_mask applies to audio, not visual"),
    ):
        with pytest.raises(ValueError, match=message):
            parse_corruption(text, mods)


def test_missing_removes_the_modality_from_a_share_of_rows_and_touches_nothing_else() -> None:
    data = TinyDataset()
    batch = first_batch(data)
    column = batch.modalities.index("audio")
    gone = corrupt(batch, Corruption("audio", "missing"), 1.0, 0.0, torch.Generator().manual_seed(0))
    assert not gone.present[:, column].any() and gone.present[:, 1 - column].all()
    assert gone.inputs is batch.inputs  # on features only: the inputs are the same tensors
    none = corrupt(batch, Corruption("audio", "missing"), 0.0, 0.0, torch.Generator().manual_seed(0))
    assert none.present.all()
    half = corrupt(batch, Corruption("audio", "missing"), 0.5, 0.0, torch.Generator().manual_seed(3))
    expected = torch.rand(len(batch), generator=torch.Generator().manual_seed(3)) >= 0.5
    assert torch.equal(half.present[:, column], expected)


def test_gaussian_noise_is_severity_times_sigma_times_the_seeded_draw() -> None:
    data = TinyDataset()
    batch = first_batch(data)
    x = batch.inputs["visual"]
    noisy = corrupt(batch, Corruption("visual", "gaussian"), 0.5, 2.0, torch.Generator().manual_seed(7))
    draw = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(noisy.inputs["visual"] - x, 0.5 * 2.0 * draw)
    assert noisy.inputs["audio"] is batch.inputs["audio"]
    with pytest.raises(ValueError, match="outside"):
        corrupt(batch, Corruption("visual", "gaussian"), 1.5, 1.0, torch.Generator())


def test_time_masking_zeroes_one_contiguous_block_of_the_time_axis_per_row() -> None:
    x = torch.ones(4, 3, 10)  # [B, F, T]
    batch = _batch_of({"audio": x})
    out = corrupt(batch, Corruption("audio", "time_mask"), 0.3, 1.0, torch.Generator().manual_seed(0)).inputs["audio"]
    for row in out:
        assert torch.equal(row[0], row[1]) and torch.equal(row[0], row[2])  # whole time steps, every frequency
        zeros = (row[0] == 0).nonzero().flatten()
        assert zeros.numel() == 3 and int(zeros[-1] - zeros[0]) == 2  # round(0.3 · 10) steps, contiguous
    gone = corrupt(batch, Corruption("audio", "time_mask"), 1.0, 1.0, torch.Generator()).inputs["audio"]
    assert not gone.any()


def test_blur_spreads_a_point_with_the_gaussian_of_its_severity() -> None:
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 4, 4] = 1.0
    batch = _batch_of({"visual": x})
    out = corrupt(batch, Corruption("visual", "blur"), 0.5, 1.0, torch.Generator()).inputs["visual"]
    # σ = 0.5 · 8/4 = 1 pixel, radius 3: the normalised kernel's centre is 1/(1 + 2(e^-½ + e^-2 + e^-4.5)) = 0.399050
    assert float(out[0, 0, 4, 4]) == pytest.approx(0.399050**2, abs=1e-6)
    assert float(out.sum()) == pytest.approx(1.0, abs=1e-6)  # the point is far enough from the border
    flat = torch.full((2, 3, 5, 7), 0.25)
    same = corrupt(_batch_of({"visual": flat}), Corruption("visual", "blur"), 1.0, 1.0, torch.Generator()).inputs[
        "visual"
    ]
    torch.testing.assert_close(same, flat)  # a uniform image has nothing to blur
    assert torch.equal(corrupt(batch, Corruption("visual", "blur"), 0.0, 1.0, torch.Generator()).inputs["visual"], x)


def test_token_dropout_zeroes_vectors_or_ids() -> None:
    vectors = torch.ones(2, 6, 4)
    ids = torch.arange(1, 13).view(2, 6)
    for x in (vectors, ids):
        batch = _batch_of({"text": x})
        out = corrupt(batch, Corruption("text", "token_drop"), 0.5, 1.0, torch.Generator().manual_seed(1))
        dropped = torch.rand(2, 6, generator=torch.Generator().manual_seed(1)) < 0.5
        y = out.inputs["text"]
        kept = y.ne(0) if x.dim() == 2 else y.ne(0).all(-1)
        assert torch.equal(kept, ~dropped)
        assert not corrupt(batch, Corruption("text", "token_drop"), 1.0, 1.0, torch.Generator()).inputs["text"].any()


# -- scoring a method ----------------------------------------------------------------------------------


def _batches(data: TinyDataset) -> list[Batch]:
    return [first_batch(data, 8), first_batch(data, 16)]


@pytest.mark.parametrize("modalities", [2, 3])
def test_a_missing_modality_scores_the_shapley_coalition_without_it(modalities: int) -> None:
    data = TinyDataset(num_modalities=modalities)
    method = build_method("baseline", data)
    batches = _batches(data)
    clean = evaluate(method, batches, data.num_classes)
    scales = input_scales(batches, data.modalities)
    chosen = [Corruption(m, "missing") for m in data.modalities]
    robust = evaluate_corrupted(method, batches, chosen, [0.0, 1.0], seed=0, scales=scales)
    assert robust["num_samples"] == clean["num_samples"] == 24
    assert robust["clean_accuracy"] == clean["accuracy"]
    for m in data.modalities:
        without = "+".join(x for x in data.modalities if x != m)
        curve = robust["corruptions"][f"{m}:missing"]
        assert curve["accuracy"] == [clean["accuracy"], clean["coalition_values"][without]]


def test_the_encoders_run_once_per_batch_and_severity_and_only_where_a_corruption_changes_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = TinyDataset()
    method = build_method("baseline", data)
    calls = {m: 0 for m in data.modalities}
    for m, encoder in method.model.encoders.items():
        real = encoder.forward

        def counted(x: torch.Tensor, m: str = m, real=real) -> torch.Tensor:  # type: ignore[no-untyped-def]
            calls[m] += 1
            return real(x)

        monkeypatch.setattr(encoder, "forward", counted)
    batches = _batches(data)
    chosen = [Corruption("audio", "missing"), Corruption("audio", "gaussian"), Corruption("visual", "missing")]
    evaluate_corrupted(method, batches, chosen, [0.0, 0.5, 1.0], seed=0, scales={"audio": 1.0, "visual": 1.0})
    # per batch: one clean pass of each encoder, and audio again for each noisy severity (0.5 and 1); missing
    # re-runs only the fusion
    assert calls == {"audio": 2 * 3, "visual": 2 * 1}


def test_a_method_with_its_own_prediction_is_scored_by_it() -> None:
    data = TinyDataset()
    method = build_method("mla", data)
    batches = _batches(data)
    robust = evaluate_corrupted(method, batches, [Corruption("visual", "missing")], [0.0, 1.0], seed=0, scales={})
    with torch.no_grad():
        method.eval()
        right = sum(int((method.predict(b.with_only(["audio"])).logits.argmax(1) == b.label).sum()) for b in batches)
    assert robust["corruptions"]["visual:missing"]["accuracy"][1] == right / 24


# -- a finished run ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "run"
    balancemm.train("baseline", "embedded", out=out, sets=["train.epochs=1"])
    return out


def test_eval_stores_its_result_and_the_same_evaluation_is_computed_once(
    finished: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    summary = json.loads((run / "summary.json").read_text())
    assert main(["eval", str(run), "--corrupt", "audio:missing", "visual", "--severities", "0,0.5,1"]) == 0
    printed = capsys.readouterr().out
    assert "audio:missing" in printed and "visual:blur" in printed
    stored = json.loads((run / "eval.json").read_text())
    (entry,) = stored.values()
    assert entry["request"]["corruptions"] == ["audio:missing", "visual:missing", "visual:gaussian", "visual:blur"]
    assert entry["clean"]["accuracy"] == summary["test"]["accuracy"]  # the selected weights, on the test split
    assert entry["robustness"]["clean_accuracy"] == summary["test"]["accuracy"]
    full = entry["robustness"]["corruptions"]["audio:missing"]["accuracy"][-1]
    assert full == summary["coalition_values"]["visual"]  # the Shapley metric's v({visual})

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("computed again")

    monkeypatch.setattr(corrupted, "evaluate_corrupted", never)
    again = eval_run(run, corruptions=["audio:missing", "visual"], severities=[1, 0.5, 0])
    assert again == entry  # the same request however it is spelled: severities sorted, specs expanded


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--corrupt", "audio:fog"], "unknown corruption 'fog'"),
        (["--corrupt", "depth"], "unknown modality 'depth'"),
        (["--severities", "0,1.5"], "every severity must be in [0, 1]"),
        (["--split", "train"], "--split train: evaluate on val or test"),
        (["--dataset", "embedded3"], "dataset embedded3 has modalities audio, text, visual; the run was trained on"),
        (["--set", "train.epochs=3"], "eval --set takes data.* keys only"),
    ],
)
def test_bad_requests_are_one_line_and_write_nothing(
    finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    assert main(["eval", str(run), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (run / "eval.json").exists()


def test_unfinished_missing_and_damaged_runs_are_one_line(
    finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["eval", str(tmp_path / "nowhere")]) == 2
    assert "is not a run directory" in capsys.readouterr().err
    unfinished = tmp_path / "unfinished"
    shutil.copytree(finished, unfinished)
    (unfinished / "done").unlink()
    assert main(["eval", str(unfinished)]) == 2
    assert "is not a finished run (no done marker)" in capsys.readouterr().err
    assert not (unfinished / "eval.json").exists()
    damaged = tmp_path / "damaged"
    shutil.copytree(finished, damaged)
    (damaged / "eval.json").write_text('{"x": 1}')
    assert main(["eval", str(damaged)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "eval.json is not a BalanceMM evaluation file" in err
    assert (damaged / "eval.json").read_text() == '{"x": 1}'


def test_a_sweep_with_robustness_evaluates_each_finished_run_once(
    finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from balancemm.config import resolve_config
    from balancemm.layout import RunFiles, default_out, standard_eval
    from balancemm.sweep import is_done
    from balancemm.sweep.spec import Job

    root = tmp_path / "runs"
    cfg = resolve_config("baseline", "embedded", sets=["train.epochs=1"])
    out = default_out(cfg, root)
    out.parent.mkdir(parents=True)
    shutil.copytree(finished, out)  # the same config: the sweep finds it trained
    assert is_done(Job(cfg, out, 0)) and not is_done(Job(cfg, out, 0, robustness=True))
    args = ["sweep", "--methods", "baseline", "--seeds", "1", "--set", "train.epochs=1", "--root", str(root)]
    assert main([*args, "--robustness", "--quiet"]) == 0
    entry = standard_eval(RunFiles(out))
    assert entry is not None and entry["request"]["corruptions"] == [
        c.name for c in default_corruptions(("audio", "visual"))
    ]
    assert is_done(Job(cfg, out, 0, robustness=True))
    before = (out / "eval.json").read_bytes()
    assert main([*args, "--robustness"]) == 0
    printed = capsys.readouterr()
    assert "1 already finished" in printed.err + printed.out
    assert (out / "eval.json").read_bytes() == before


def test_other_data_is_another_evaluation_beside_the_first(finished: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    first = eval_run(run, corruptions=["audio:missing"], severities=[0, 1])
    same = eval_run(run, dataset="embedded", corruptions=["audio:missing"], severities=[0, 1])
    assert same["key"] == first["key"]  # naming the run's own dataset changes nothing
    other = eval_run(run, sets=["data.seed=1"], corruptions=["audio:missing"], severities=[0, 1])
    assert other["key"] != first["key"] and other["request"]["data"]["seed"] == 1
    assert not first["standard"] and not other["standard"]
    # another draw of the embedded data: other test samples, other numbers, both stored
    assert other["clean"]["predictions_sha256"] != first["clean"]["predictions_sha256"]
    assert set(json.loads((run / "eval.json").read_text())) == {first["key"], other["key"]}


def test_input_scales_are_the_population_std_of_float_inputs_only() -> None:
    ids = torch.tensor([[1, 2], [3, 4]])
    x = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    batches = [_batch_of({"audio": ids[:1], "visual": x[:1]}), _batch_of({"audio": ids[1:], "visual": x[1:]})]
    # token ids (audio here) have no scale; the float modality after them still gets one: mean 3, var 3.5
    scales = input_scales(batches, ("audio", "visual"))
    assert set(scales) == {"visual"} and scales["visual"] == pytest.approx(3.5**0.5)


def test_each_corruption_and_severity_draws_from_its_own_documented_seed() -> None:
    data = TinyDataset(n=300)  # many rows and strong noise on a trained model: another draw scores differently
    method = build_method("baseline", data)
    train_epochs(method, 2)
    method.eval()
    batches = [first_batch(data, 300)]
    chosen = [Corruption("audio", "gaussian"), Corruption("visual", "gaussian")]

    def accuracy(c: Corruption, seed: int) -> float:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            return (
                sum(
                    int((method.predict(corrupt(b, c, 1.0, 3.0, g)).logits.argmax(1) == b.label).sum()) for b in batches
                )
                / 300
            )

    robust = evaluate_corrupted(method, batches, chosen, [1.0], seed=3, scales={"audio": 3.0, "visual": 3.0})
    for c in chosen:
        # the generator of (corruption, severity) is seeded with derive_seed(seed, "corrupt", name, severity)
        expected = accuracy(c, derive_seed(3, "corrupt", c.name, 1.0))
        assert robust["corruptions"][c.name]["accuracy"] == [expected], c.name
        assert expected != accuracy(c, derive_seed(3, "corrupt", "other", 1.0))  # the test can tell seeds apart


def test_the_stored_key_and_the_standard_flag(finished: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    made: list[str] = []
    real = corrupted.create_dataset

    def counted(name: str, options: object) -> object:
        made.append(name)
        return real(name, options)

    monkeypatch.setattr(corrupted, "create_dataset", counted)
    monkeypatch.setattr(artifacts, "create_dataset", counted)  # where the run is loaded
    standard = eval_run(run)
    assert standard["standard"] is True and made == ["embedded"]  # the dataset is built once, not again to load
    request = standard["request"]
    assert standard["key"] == hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()[:16]
    assert eval_run(run, split="val")["standard"] is False
    assert eval_run(run, severities=[0.0, 1.0])["standard"] is False


def test_another_dataset_starts_from_its_own_protocol_not_from_the_runs_data() -> None:
    from balancemm.config import resolve_config

    cfg = resolve_config("baseline", "embedded", sets=["data.seed=5"])
    assert corrupted._eval_config(cfg, "embedded3", []).data == resolve_config("baseline", "embedded3").data
    assert corrupted._eval_config(cfg, None, ["data.val_fraction=0.3"]).data.seed == 5  # the run's, edited


def test_gaussian_noise_on_inputs_without_a_scale_is_one_line(
    finished: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    monkeypatch.setattr(corrupted, "input_scales", lambda batches, modalities: {"visual": 1.0})  # audio as ids
    assert main(["eval", str(run), "--corrupt", "audio:gaussian", "visual:gaussian"]) == 2
    assert capsys.readouterr().err == (
        "balancemm: error: --corrupt audio:gaussian: gaussian noise needs float inputs (token ids: token_drop)\n"
    )
    assert not (run / "eval.json").exists()


def test_a_config_without_the_datasets_facts_is_damage(
    finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    saved = json.loads((run / "config.json").read_text())
    del saved["dataset"]
    (run / "config.json").write_text(json.dumps(saved))
    assert main(["eval", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"balancemm: error: {run / 'config.json'} has no dataset facts (num_classes)")
    assert not (run / "eval.json").exists()


def test_a_run_that_predicts_with_its_artifacts_is_evaluated_with_them(tmp_path: Path) -> None:
    # ReconBoost from pre-trained learners predicts with the unimodal runs' own heads until its first stage:
    # a loaded run gets them back from beside it, as training did, and scores what training scored.
    out = tmp_path / "runs" / "rb"
    summary = balancemm.train("reconboost", "embedded", out=out, sets=["train.epochs=1"], pretrained=True)
    result = eval_run(out, corruptions=["audio:missing"], severities=[0, 1])
    assert result["clean"]["accuracy"] == summary["test"]["accuracy"]
    assert result["robustness"]["corruptions"]["audio:missing"]["accuracy"][-1] == summary["coalition_values"]["visual"]
    for artifact in (tmp_path / "runs").iterdir():
        if artifact.name.startswith("unimodal-"):
            shutil.rmtree(artifact)
    with pytest.raises(balancemm.errors.DataError, match="is missing or unfinished: the unimodal run"):
        eval_run(out, corruptions=["visual:missing"], severities=[0, 1])
