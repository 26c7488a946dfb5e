"""Raw fixture → ``data prepare`` → ``data check`` → one training epoch, for the four audio-visual
datasets, plus the OGM-GE / BalanceMM layouts, the splits, restarts and corrupt files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import balancemm
from balancemm.cli import main
from balancemm.data import Batches, create_dataset
from balancemm.data.check import check
from balancemm.data.prepare import prepare
from balancemm.errors import DataError
from balancemm.methods import METHODS
from tests.fixtures import av_raw

SMALL = [
    "data.image_size=32",
    "model.encoders.audio.width=4",
    "model.encoders.visual.width=4",
    "train.epochs=1",
    "train.num_workers=0",
    "train.batch_size=8",
    "data.val_fraction=0.25",  # one validation clip per class of the tiny fixtures
]
TINY = {"val_fraction": 0.25}


def train_cli(dataset: str, root: Path, out: Path, *extra: str) -> dict:
    code = main(["train", "--method", "baseline", "--dataset", dataset, "--quiet", "--out", str(out), "--set",
                 f"data.root={root}", *SMALL, *extra])  # fmt: skip
    assert code == 0
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def cremad(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    raw = tmp_path_factory.mktemp("cremad-raw")
    av_raw.make_cremad_raw(raw)
    out = tmp_path_factory.mktemp("cremad-prep") / "prepared"
    prepare("cremad", raw, out, profile="ogmge_stft", frame_size=32, progress=False)
    return raw, out


# -- CREMA-D ----------------------------------------------------------------------------------------


def test_cremad_prepare_writes_arrays_and_a_manifest(cremad: tuple[Path, Path]) -> None:
    _, out = cremad
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dataset"] == "cremad" and len(manifest["clips"]) == 36 and manifest["failed"] == {}
    assert manifest["profile"]["name"] == "ogmge_stft" and manifest["profile"]["sample_rate"] == 22050
    assert manifest["frames"]["max_short_side"] == 32 and manifest["classes"][0] == "NEU"
    assert manifest["splits"] == {}  # CREMA-D has no official split
    with np.load(out / "clips" / "1001_DFA_ANG_XX.npz") as npz:
        assert npz["audio"].shape == (257, 188) and npz["audio"].dtype == np.float32
        # 2 s at 10 fps → frames at 0 s and 1 s; 48 × 64 → shorter side 32
        assert npz["frames"].shape == (2, 32, 43, 3) and npz["frames"].dtype == np.uint8
    assert dict(manifest["clips"])["1001_DFA_ANG_XX"] == 5  # ANG is class 5 in OGM-GE's order


def test_cremad_csv_split_check_and_one_epoch(cremad: tuple[Path, Path], tmp_path: Path) -> None:
    raw, out = cremad
    for name in ("train.csv", "test.csv"):  # users copy OGM-GE's CSVs beside the prepared data
        (out / name).write_bytes((raw / name).read_bytes())
    report = check("cremad", str(out), {"profile": "ogmge_stft", **TINY}, progress=False)
    assert report["splits"]["test"]["present"] == 12 and report["splits"]["test"]["missing"] == {}
    assert report["splits"]["train"]["present"] + report["splits"]["val"]["present"] == 24
    assert not report["comparable"] and "differ in size" in report["why"]  # 24 / 12, not 6,698 / 744
    summary = train_cli("cremad", out, tmp_path / "run", "data.profile=ogmge_stft")
    info = summary["dataset_info"]
    assert info["profile"]["name"] == "ogmge_stft" and info["layout"] == "prepared"
    assert info["sizes"]["test"] == 12 and info["frames"] == 2
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["config"]["data"]["profile"] == "ogmge_stft"
    assert config["dataset"]["profile"] == {**info["profile"], "n_fft": 512, "hop_length": 353}


def test_profile_mismatch_and_missing_csv_are_one_clear_error(cremad: tuple[Path, Path], tmp_path: Path) -> None:
    _, out = cremad
    with pytest.raises(DataError, match=r"prepared with audio profile 'ogmge_stft'.*--profile kaldi_fbank"):
        create_dataset("cremad", root=str(out), profile="kaldi_fbank")
    with pytest.raises(DataError, match=r"no such split file.*data\.split=random"):
        create_dataset("cremad", root=str(out), profile="ogmge_stft", train_csv=str(tmp_path / "none.csv"), **TINY)


def test_cremad_speaker_split_keeps_actors_apart(cremad: tuple[Path, Path]) -> None:
    _, out = cremad
    data = create_dataset("cremad", root=str(out), profile="ogmge_stft", split="speaker", test_fraction=0.3)
    actors = {s: {c.id[:4] for c in data.split(s).clips} for s in ("train", "val", "test")}
    assert len(actors["test"]) == 1 and len(actors["val"]) == 1 and len(actors["train"]) == 1
    assert not (actors["train"] & actors["test"]) and not (actors["val"] & actors["test"])
    assert "speaker-independent" in data.describe()["split_source"]


def test_random_split_is_seeded_and_validation_never_touches_test(cremad: tuple[Path, Path]) -> None:
    _, out = cremad
    ids = []
    for seed in (0, 0, 1):
        data = create_dataset("cremad", root=str(out), profile="ogmge_stft", split="random", seed=seed,
                              test_fraction=1 / 6, **TINY)  # fmt: skip
        test = {c.id for c in data.split("test").clips}
        val = {c.id for c in data.split("val").clips}
        assert not test & val and len(test) == 6  # one clip per class
        ids.append(sorted(test))
    assert ids[0] == ids[1] and ids[0] != ids[2]


def test_prepare_restarts_and_refuses_another_profile(cremad: tuple[Path, Path], tmp_path: Path) -> None:
    raw, _ = cremad
    out = tmp_path / "prep"
    prepare("cremad", raw, out, profile="ogmge_stft", frame_size=16, progress=False)
    # Simulate a prepare killed mid-clip: one clip gone, a partial file left, no manifest.
    victim = out / "clips" / "1002_IEO_SAD_XX.npz"
    victim.unlink()
    (out / "clips" / "1003_DFA_NEU_XX.npz.partial999").write_bytes(b"half")
    (out / "manifest.json").unlink()
    with pytest.raises(DataError, match="unfinished prepare"):
        create_dataset("cremad", root=str(out), profile="ogmge_stft", **TINY)
    before = {p.name: p.stat().st_mtime_ns for p in (out / "clips").glob("*.npz")}
    manifest = prepare("cremad", raw, out, profile="ogmge_stft", frame_size=16, progress=False)
    assert victim.is_file() and len(manifest["clips"]) == 36
    assert not list((out / "clips").glob("*.partial*"))
    assert all((out / "clips" / n).stat().st_mtime_ns == t for n, t in before.items())  # not redone
    with pytest.raises(DataError, match="different profile"):
        prepare("cremad", raw, out, profile="kaldi_fbank", frame_size=16, progress=False)


def test_corrupt_media_is_named_and_the_rest_prepared(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = tmp_path / "raw"
    ids = av_raw.make_cremad_raw(raw, actors=2)
    bad_video = raw / "VideoFlash" / f"{ids[0]}.flv"
    bad_video.write_bytes(bad_video.read_bytes()[: bad_video.stat().st_size // 3])  # truncated
    (raw / "AudioWAV" / f"{ids[1]}.wav").write_bytes(b"RIFF garbage")
    (raw / "AudioWAV" / f"{ids[2]}.wav").unlink()  # a video without its audio
    code = main(["data", "prepare", "cremad", "--raw", str(raw), "--out", str(tmp_path / "out"), "--workers", "2",
                 "--frame-size", "16", "--profile", "ogmge_stft", "--quiet"])  # fmt: skip
    assert code == 0
    captured = capsys.readouterr()
    assert f"skipped {bad_video}" in captured.err and f"{ids[1]}.wav" in captured.err
    assert (
        "prepared cremad (profile ogmge_stft)" in captured.out
        and "21 clips" in captured.out
        and "2 failed, 1 listed without media" in captured.out
    )
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert set(manifest["failed"]) == {ids[0], ids[1]} and set(manifest["unmatched"]) == {ids[2]}
    # check names what the split lists but the prepared data lacks
    for name in ("train.csv", "test.csv"):
        (tmp_path / "out" / name).write_bytes((raw / name).read_bytes())
    code = main(["data", "check", "cremad", "--root", str(tmp_path / "out"), "--set", "data.profile=ogmge_stft",
                 "data.split=random", "data.test_fraction=0.25", "data.val_fraction=0.34", "--quiet"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "NOT comparable" in out and "not the published one" in out


def test_bad_raw_folder_is_one_line_and_leaves_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "raw").mkdir()
    code = main(["data", "prepare", "cremad", "--raw", str(tmp_path / "raw"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "no AudioWAV/ folder" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_cremad_ogmge_layout_reads_wav_and_sorted_jpegs(tmp_path: Path) -> None:
    av_raw.make_cremad_ogmge_layout(tmp_path)
    data = create_dataset("cremad", root=str(tmp_path), profile="ogmge_stft", image_size=32, frames=3, **TINY)
    assert data.layout == "files" and len(data.split("test")) == 12
    sample = data.split("test")[0]
    assert sample["inputs"]["audio"].shape == (1, 257, 188)  # wav → OGM-GE's STFT on the fly
    assert sample["inputs"]["visual"].shape == (3, 3, 32, 32)
    again = data.split("test")[0]
    assert torch.equal(sample["inputs"]["visual"], again["inputs"]["visual"])  # evaluation is deterministic


def test_augmentation_is_seeded_per_epoch(cremad: tuple[Path, Path]) -> None:
    _, out = cremad
    data = create_dataset("cremad", root=str(out), profile="ogmge_stft", image_size=24, split="random", **TINY)
    train = data.split("train")

    def first(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return next(iter(Batches(train, 4, shuffle=True, generator=g))).inputs["visual"]

    assert torch.equal(first(0), first(0)) and not torch.equal(first(0), first(1))
    evaluated = next(iter(Batches(train, 4))).inputs["visual"]
    assert torch.equal(evaluated, next(iter(Batches(train, 4))).inputs["visual"])


# -- Kinetics-Sounds ----------------------------------------------------------------------------------


def test_kinetics_sounds_raw_to_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw, out = tmp_path / "raw", tmp_path / "prep"
    rows = av_raw.make_ks_raw(raw)
    assert main(["data", "prepare", "ks", "--raw", str(raw), "--out", str(out), "--workers", "1",
                 "--frame-size", "32", "--quiet"]) == 0  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["profile"]["name"] == "kaldi_fbank"
    assert manifest["classes"] == list(av_raw.KS_CLASSES)  # from the per-class folders
    assert [c for c, _ in manifest["splits"]["test"]] == [c for c, _ in rows["test"]]
    with np.load(out / "clips" / f"{rows['train'][0][0]}.npz") as npz:
        # 3 s of audio: its 300 filter-bank frames are stored, the padding to 1,024 is added when loaded
        assert npz["audio"].shape == (300, 128) and npz["frames"].shape == (3, 32, 43, 3)
    assert main(["data", "check", "kinetics_sounds", "--root", str(out), "--set", "data.val_fraction=0.25",
                 "--quiet"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert (
        "kinetics_sounds at" in printed and "train       9 usable (of 12 listed, 3 of them carved into val)" in printed
    )
    assert "test        6 usable (of 6 listed), 0 missing, 0 unreadable" in printed
    summary = train_cli("kinetics_sounds", out, tmp_path / "run")
    assert summary["dataset_info"]["sizes"] == {"train": 9, "val": 3, "test": 6}


def test_kinetics_sounds_balancemm_layout(tmp_path: Path) -> None:
    rows = av_raw.make_ks_balancemm_layout(tmp_path)
    data = create_dataset("kinetics_sounds", root=str(tmp_path), image_size=32, **TINY)
    assert data.layout == "files" and len(data.split("test")) == len(rows["test"])
    sample = data.split("test")[0]
    assert sample["inputs"]["audio"].shape == (1, 1024, 128) and sample["inputs"]["visual"].shape == (3, 3, 32, 32)


# -- VGGSound -----------------------------------------------------------------------------------------


def test_vggsound_raw_to_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw, out = tmp_path / "raw", tmp_path / "prep"
    av_raw.make_vggsound_raw(raw)
    (raw / "video" / "v0t1_000011.mp4").unlink()  # a clip no longer on YouTube
    assert main(["data", "prepare", "vgg", "--raw", str(raw), "--out", str(out), "--frame-size", "32", "--quiet"]) == 0
    assert main(["data", "check", "vgg", "--root", str(out), "--set", "data.val_fraction=0.25", "--quiet"]) == 0
    assert "1 missing" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["classes"] == sorted(av_raw.VGG_CLASSES) and list(manifest["unmatched"]) == ["v0t1_11"]
    data = create_dataset("vggsound", root=str(out), image_size=32, **TINY)
    assert data.missing["test"] == ["v0t1_11"]
    assert data.split("test")[0]["inputs"]["audio"].shape == (1, 129, 626)  # 5 s of the stored 10 s
    summary = train_cli("vggsound", out, tmp_path / "run")
    assert summary["dataset_info"]["profile"]["name"] == "vggsound_stft"
    ok, why = data.comparability()
    assert not ok and "1 test clips are missing" in why


def test_vggsound_balancemm_layout_with_split_folders(tmp_path: Path) -> None:
    av_raw.make_vggsound_balancemm_layout(tmp_path)
    data = create_dataset("vggsound", root=str(tmp_path), image_size=32, **TINY)
    test = data.split("test")
    assert len(test) == 4 and test.clips[0].id == "v0t0_10"
    # the centred 626-frame window of a constant array keeps the class value
    assert float(test[0]["inputs"]["audio"].mean()) == float(test.clips[0].label)


# -- BalancedAV ---------------------------------------------------------------------------------------


def test_balanced_av_release_to_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw, out = tmp_path / "raw", tmp_path / "prep"
    av_raw.make_balanced_av_raw(raw)
    with pytest.raises(DataError, match="only --profile released"):
        prepare("balanced_av", raw, tmp_path / "x", profile="kaldi_fbank", progress=False)
    assert not (tmp_path / "x").exists()
    assert main(["data", "prepare", "balanced_av", "--raw", str(raw), "--out", str(out), "--frame-size", "32",
                 "--workers", "1", "--quiet"]) == 0  # fmt: skip
    assert main(["data", "check", "balanced_av", "--root", str(out), "--set", "data.val_fraction=0.25",
                 "--quiet"]) == 0  # fmt: skip
    assert "comparable with published numbers" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["profile"]["name"] == "released" and len(manifest["clips"]) == 18
    with np.load(out / "clips" / "piano_te1.npz") as npz:
        assert npz["audio"].shape == (257, 188) and npz["frames"].shape == (9, 32, 43, 3)
    summary = train_cli("balanced_av", out, tmp_path / "run")
    assert summary["dataset_info"]["sizes"]["test"] == 6
    # the release itself is also a files layout the loader reads directly
    direct = create_dataset("balanced_av", root=str(raw), image_size=32, **TINY)
    assert direct.split("test")[0]["inputs"]["visual"].shape == (3, 3, 32, 32)


def test_protocol_presets_follow_the_paper() -> None:
    from balancemm.config import resolve_config

    for name, lr, opt, bs, epochs, step in (
        ("cremad", 1e-3, "sgd", 64, 70, 30),
        ("kinetics_sounds", 1e-3, "sgd", 64, 70, 30),
        ("balanced_av", 5e-3, "sgd", 64, 70, 30),
        ("vggsound", 1e-3, "adamw", 32, 30, 10),
    ):
        cfg = resolve_config("baseline", name)
        t = cfg.train
        assert (t.optimizer.lr, t.optimizer.name, t.batch_size, t.epochs, t.scheduler.step_size) == (
            lr, opt, bs, epochs, step)  # fmt: skip
        assert t.optimizer.weight_decay == (1e-3 if opt == "adamw" else 1e-4) and t.scheduler.gamma == 0.1
        assert {e.name for e in cfg.model.encoders.values()} == {"resnet18"}
    assert resolve_config("baseline", "cremad").data.frames == 2
    assert resolve_config("baseline", "kinetics_sounds").data.frames == 3


@pytest.mark.skipif(not Path("../shared/data/splits/cremad/train.csv").is_file(), reason="reference splits absent")
def test_reads_the_real_ogmge_split_files() -> None:
    from balancemm.data.cremad import Cremad
    from balancemm.data.kinetics_sounds import read_list

    train = Cremad._read_csv(Path("../shared/data/splits/cremad/train.csv"))
    test = Cremad._read_csv(Path("../shared/data/splits/cremad/test.csv"))
    assert (len(train), len(test)) == (6698, 744)
    counts = np.bincount([c.label for c in test], minlength=6)  # NEU HAP SAD FEA DIS ANG
    assert counts.tolist() == [114, 123, 140, 133, 129, 105]
    ks = read_list(Path("../shared/data/splits/kinetics_sounds/my_train.txt"))
    assert len(ks) == 14799 and max(c.label for c in ks) == 30


@pytest.fixture(scope="module")
def cremad_alike(cremad: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The prepared CREMA-D fixture, on disk as prepared, with every clip's arrays replaced by those of one
    clip: labels, CSVs and layout are the fixture's, but no input tells one clip from another."""
    raw, out = cremad
    alike = tmp_path_factory.mktemp("cremad-alike") / "prepared"
    shutil.copytree(out, alike)
    for name in ("train.csv", "test.csv"):
        (alike / name).write_bytes((raw / name).read_bytes())
    clips = sorted((alike / "clips").glob("*.npz"))
    assert len(clips) == 36
    for clip in clips[1:]:
        shutil.copyfile(clips[0], clip)
    return alike


@pytest.mark.parametrize("method", sorted(METHODS.names()))
def test_every_method_trains_on_prepared_cremad(cremad_alike: Path, tmp_path: Path, method: str) -> None:
    """The real-data path (collated batches, augmentation seeds, ResNet-18 on frames) under every method."""
    hp = {"modality": "audio"} if method == "unimodal" else {}
    sets = [*SMALL, f"data.root={cremad_alike}", "data.profile=ogmge_stft"]
    summary = balancemm.train(method, "cremad", sets=sets, out=tmp_path / "run", progress=False, **hp)
    assert summary["dataset"] == "cremad"
    # The fixture has 3 actors × 2 sentences × 6 emotions = 36 clips; the CSVs put the last actor's 12 in test
    # and val_fraction 0.25 takes 6 of the other 24 (one per emotion) for validation.
    assert summary["dataset_info"]["sizes"] == {"train": 18, "val": 6, "test": 12}
    test = summary["test"]
    assert test["num_samples"] == 12
    # Every clip has the same inputs, so the model, whatever it learnt, gives every test clip the same logits
    # and predicts one class c for all 12. The test actor has 2 clips of each emotion, so exactly 2 are right
    # whichever c it is: accuracy 2/12 = 1/6; F1_c = 2·2/(2·2 + 10 + 0) = 2/7 and F1 = 0 for the other five
    # classes, macro-F1 = (2/7)/6 = 1/21. The same holds for each modality's own logits and for every
    # coalition of the Shapley evaluation, so every v(S) is 1/6 and every Shapley value 0.
    assert test["accuracy"] == pytest.approx(1 / 6, abs=1e-12)
    assert test["macro_f1"] == pytest.approx(1 / 21, abs=1e-12)
    for m, scores in test["per_modality"].items():
        assert scores == {"accuracy": pytest.approx(1 / 6, abs=1e-12), "macro_f1": pytest.approx(1 / 21, abs=1e-12)}, m
    assert all(v == pytest.approx(1 / 6, abs=1e-12) for v in summary["coalition_values"].values())
    assert all(phi == pytest.approx(0.0, abs=1e-12) for phi in summary["shapley"].values())
