"""UCF-101: raw release → ``data prepare`` → ``data check`` → one training epoch; the flow recipe and its
storage with hand-checked numbers; group-wise validation; the pre-extracted frame/flow folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import balancemm.data.ucf101  # noqa: F401  (registers ucf101)
from balancemm.cli import main
from balancemm.data import create_dataset
from balancemm.data.flow import FLOW_BOUND, dequantise, flow_to_tensor, quantise
from balancemm.data.media import MediaError, decode_frame_pairs, decode_frames
from balancemm.data.ucf101 import group_of
from balancemm.errors import DataError
from tests.fixtures import ucf_food_raw as fx

SMALL = [
    "data.image_size=32",
    "model.encoders.flow.width=4",
    "model.encoders.visual.width=4",
    "train.epochs=1",
    "train.num_workers=0",
    "train.batch_size=8",
    "data.val_fraction=0.25",  # one of the four training groups of the fixture
]
TINY = {"val_fraction": 0.25}


@pytest.fixture(scope="module")
def ucf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    raw = tmp_path_factory.mktemp("ucf-raw")
    fx.make_ucf_raw(raw)
    out = tmp_path_factory.mktemp("ucf-prep") / "prepared"
    assert main(["data", "prepare", "ucf101", "--raw", str(raw), "--out", str(out), "--frame-size", "32",
                 "--workers", "1", "--quiet"]) == 0  # fmt: skip
    return raw, out


# -- flow storage and transform, by hand ------------------------------------------------------------


def test_flow_quantisation_and_dequantisation_by_hand() -> None:
    assert FLOW_BOUND == 20
    # 255 · (v + 20) / 40, rounded half up: +20 → 255, 0 → 127.5 → 128, 10 → 191.25 → 191, clipped at ±20
    q = quantise(np.array([20.0, 0.0, -25.0, -20.0, 10.0, 25.0, -0.1]))
    assert q.dtype == np.uint8 and q.tolist() == [255, 128, 0, 0, 191, 255, 127]  # -0.1 → 126.86 → 127
    # q / 127.5 − 1 = flow / bound: 255 → 1, 0 → −1, 128 → 0.5 / 127.5, 191 → 0.498
    d = dequantise(np.array([255, 0, 128, 191], dtype=np.uint8))
    assert d.dtype == np.float32
    assert np.allclose(d, [1.0, -1.0, 1 / 255, 191 / 127.5 - 1], atol=1e-6)
    # the round trip is within half a quantisation step (20 / 127.5 / 2 px)
    v = np.linspace(-20, 20, 101)
    assert np.abs(dequantise(quantise(v)) * FLOW_BOUND - v).max() <= FLOW_BOUND / 255 + 1e-5


def test_a_horizontal_flip_negates_u() -> None:
    # A constant field u = +5 px, v = 0: stored 159 and 128 (255 · 25 / 40 = 159.375 → 159).
    stored = quantise(np.broadcast_to(np.array([5.0, 0.0]), (16, 12, 20, 2)))
    assert stored[0, 0, 0].tolist() == [159, 128]
    u, v = 159 / 127.5 - 1, 128 / 127.5 - 1  # 0.2471 ≈ 5 / 20 and 0.0039
    evaluated = flow_to_tensor(stored, 8, None)
    assert evaluated.shape == (16, 2, 8, 8) and torch.allclose(evaluated[:, 0], torch.tensor(u))
    trained = flow_to_tensor(stored, 8, np.random.default_rng(0))
    signs = trained[:, 0].mean(dim=(1, 2))
    # every frame is either unflipped (u) or flipped (−u); v is never negated; both happen in 16 frames
    assert torch.allclose(signs.abs(), torch.tensor(u), atol=1e-5) and {bool(s > 0) for s in signs} == {True, False}
    assert torch.allclose(trained[:, 1], torch.tensor(v), atol=1e-5)


def test_the_flip_mirrors_the_field() -> None:
    # u = +5 px on the left half, 0 on the right: left to right, u never increases. Negating u without
    # mirroring would give −5 then 0 (increasing); mirroring and negating gives 0 then −5 (non-increasing).
    field = np.zeros((32, 6, 12, 2))
    field[:, :, :6, 0] = 5.0
    out = flow_to_tensor(quantise(field), 12, np.random.default_rng(1))[:, 0]
    columns = out.mean(dim=1)  # [T, W]
    assert torch.all(columns[:, 1:] <= columns[:, :-1] + 1e-4)
    flipped = columns.mean(dim=1) < 0
    assert 0 < int(flipped.sum()) < 32


def test_frame_pairs_follow_the_one_fps_rule(tmp_path: Path) -> None:
    video = tmp_path / "v_YoYo_g01_c01.avi"
    fx.write_avi(video, fx.ucf_frames(2, 0, n=25))  # 2.5 s at 10 fps
    frames, successors = decode_frame_pairs(video, 1.0, 32)
    native = decode_frames(video, 10.0, 32)  # every frame
    assert np.array_equal(frames, decode_frames(video, 1.0, 32)) and np.array_equal(frames, native[[0, 10, 20]])
    assert np.array_equal(successors, native[[1, 11, 21]])
    # 11 frames: decode_frames keeps 0 s and 1.0 s, but the last frame has no successor and is left out
    fx.write_avi(video, fx.ucf_frames(2, 0, n=11))
    frames, successors = decode_frame_pairs(video, 1.0, 32)
    assert len(decode_frames(video, 1.0, 32)) == 2 and len(frames) == len(successors) == 1
    fx.write_avi(video, fx.ucf_frames(2, 0, n=1))
    with pytest.raises(MediaError, match="fewer than two video frames"):
        decode_frame_pairs(video, 1.0, 32)


# -- prepare → check → train ------------------------------------------------------------------------


def test_prepare_stores_frames_flow_and_the_recipe(ucf: tuple[Path, Path]) -> None:
    _, out = ucf
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dataset"] == "ucf101" and len(manifest["clips"]) == 18 and manifest["failed"] == {}
    profile = manifest["profile"]
    assert profile["name"] == "tvl1" and profile["bound"] == 20.0 and profile["version"] == 1
    assert profile["library"] == "opencv-contrib-python-headless" and profile["library_version"]
    assert profile["algorithm"] == "cv2.optflow.DualTVL1OpticalFlow_create"
    assert profile["parameters"] == {
        "tau": 0.25, "lambda": 0.15, "theta": 0.3, "nscales": 5, "warps": 5, "epsilon": 0.01,
        "inner_iterations": 30, "outer_iterations": 10, "scale_step": 0.8, "gamma": 0.0, "median_filtering": 5,
        "use_initial_flow": False,
    }  # fmt: skip
    assert manifest["classes"] == list(fx.UCF_CLASSES)
    assert set(manifest["splits"]) == {"trainlist01", "testlist01", "trainlist02", "testlist02"}
    # The label comes from the list's class folder: HandstandPushups (2nd) although the file says HandStand.
    assert dict(manifest["splits"]["testlist01"])["v_HandStandPushups_g01_c01"] == 1
    for clip, (dy, dx) in zip(("v_ApplyEyeMakeup_g03_c01", "v_HandStandPushups_g03_c01", "v_YoYo_g03_c01"),
                              fx.UCF_MOTION, strict=True):  # fmt: skip
        with np.load(out / "clips" / f"{clip}.npz") as npz:
            # 2 s at 10 fps → the frames at 0 s and 1 s; 48 × 64 → shorter side 32 (32 × 43)
            assert npz["frames"].shape == (2, 32, 43, 3) and npz["frames"].dtype == np.uint8
            assert npz["flow"].shape == (2, 32, 43, 2) and npz["flow"].dtype == np.uint8
            # 2 px per frame at 48 px is 4/3 px at 32 px: stored 127.5 ± 255 · (4/3) / 40 = 127.5 ± 8.5;
            # the still component is 0 → 127.5, give or take a grey level of flow noise
            for comp, motion in zip(np.moveaxis(npz["flow"], -1, 0), (dx, dy), strict=True):
                expected = 127.5 + 8.5 * np.sign(motion)
                assert abs(float(np.median(comp)) - expected) <= (0 if motion else 1)


def test_check_and_one_epoch(ucf: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, out = ucf
    assert main(["data", "check", "ucf101", "--root", str(out), "--set", "data.val_fraction=0.25", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "ucf101 at" in printed and "profile tvl1" in printed and "official split 1" in printed
    assert "train       9 usable (of 12 listed, 3 of them carved into val)" in printed
    assert "NOT comparable" in printed and "differ in size from official split 1 (train 12 vs 9,537" in printed
    code = main(["train", "--method", "baseline", "--dataset", "ucf101", "--quiet", "--out", str(tmp_path / "run"),
                 "--set", f"data.root={out}", *SMALL])  # fmt: skip
    assert code == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    info = summary["dataset_info"]
    assert info["sizes"] == {"train": 9, "val": 3, "test": 6} and info["profile"]["name"] == "tvl1"
    assert info["split_index"] == 1 and len(info["val_groups"]) == 1


def test_validation_holds_out_whole_groups(ucf: tuple[Path, Path]) -> None:
    _, out = ucf
    chosen = []
    for seed in (0, 0, 1, 2, 3):
        data = create_dataset("ucf101", root=str(out), image_size=16, seed=seed, **TINY)
        groups = {s: {group_of(c.id) for c in data.split(s).clips} for s in ("train", "val", "test")}
        assert len(groups["val"]) == 1 and not groups["val"] & groups["train"]
        assert groups["test"] == {1, 2} and len(groups["train"]) == 3
        assert {c.label for c in data.split("val").clips} == {0, 1, 2}  # a group holds every class
        chosen.append(data.val_groups)
    assert chosen[0] == chosen[1] and len({g[0] for g in chosen}) > 1  # seeded, and the seed matters
    assert group_of("v_YoYo_g25_c07") == 25
    with pytest.raises(DataError, match="no _gXX_cYY group"):
        group_of("some_clip")


def test_inputs_other_splits_and_profile_mismatch(ucf: tuple[Path, Path]) -> None:
    _, out = ucf
    data = create_dataset("ucf101", root=str(out), image_size=24, frames=3, flow_frames=2, **TINY)
    sample = data.split("test")[0]["inputs"]
    assert sample["visual"].shape == (3, 3, 24, 24) and sample["flow"].shape == (2, 2, 24, 24)
    assert sample["flow"].dtype == torch.float32 and sample["flow"].abs().max() <= 1.0
    assert data.input_shapes == {"flow": (2, 2, 24, 24), "visual": (3, 3, 24, 24)}
    second = create_dataset("ucf101", root=str(out), split_index=2, **TINY)
    assert {group_of(c.id) for c in second.split("test").clips} == {3, 4}
    with pytest.raises(DataError, match=r"without trainlist03\.txt; choose data\.split_index from \[1, 2\]"):
        create_dataset("ucf101", root=str(out), split_index=3, **TINY)
    with pytest.raises(DataError, match=r"prepared with flow profile 'tvl1'.*--profile farneback"):
        create_dataset("ucf101", root=str(out), profile="farneback", **TINY)


def test_corrupt_video_is_named_and_the_rest_prepared(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = tmp_path / "raw"
    fx.make_ucf_raw(raw)
    bad = raw / "UCF-101" / "YoYo" / "v_YoYo_g04_c01.avi"
    bad.write_bytes(b"RIFF not a video")
    (raw / "UCF-101" / "YoYo" / "v_YoYo_g05_c01.avi").unlink()  # listed, no video
    code = main(["data", "prepare", "ucf", "--raw", str(raw), "--out", str(tmp_path / "out"), "--workers", "1",
                 "--frame-size", "16", "--profile", "farneback", "--quiet"])  # fmt: skip
    assert code == 0
    err = capsys.readouterr()
    assert err.err.count("skipped") == 1 and f"skipped {bad}" in err.err
    assert "16 clips" in err.out and "1 failed, 1 listed without media" in err.out
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert list(manifest["failed"]) == ["v_YoYo_g04_c01"] and list(manifest["unmatched"]) == ["v_YoYo_g05_c01"]
    assert manifest["profile"]["parameters"]["winsize"] == 15
    data = create_dataset("ucf101", root=str(tmp_path / "out"), profile="farneback", **TINY)
    assert sorted(data.missing["train"]) == ["v_YoYo_g04_c01", "v_YoYo_g05_c01"]


def test_missing_lists_are_one_line_and_leave_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "raw" / "UCF-101").mkdir(parents=True)
    code = main(["data", "prepare", "ucf101", "--raw", str(tmp_path / "raw"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "ucfTrainTestlist" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


# -- the pre-extracted frame and flow folders -----------------------------------------------------------


def test_frame_and_flow_folders(tmp_path: Path) -> None:
    rows = fx.make_ucf_frame_folders(tmp_path, u_value=200, v_value=100)
    data = create_dataset("ucf101", root=str(tmp_path), image_size=32, **TINY)
    assert data.layout == "files" and data.describe()["profile"]["name"] == "as_stored"
    assert len(data.split("test")) == len(rows["test"]) == 6
    sample = data.split("test")[0]["inputs"]
    assert sample["visual"].shape == (3, 3, 32, 32) and sample["flow"].shape == (3, 2, 32, 32)
    # constant greyscale jpgs: u = 200 / 127.5 − 1 = 0.569, v = 100 / 127.5 − 1 = −0.216 (JPEG keeps flat grey)
    assert torch.allclose(sample["flow"][:, 0], torch.tensor(200 / 127.5 - 1), atol=2 / 255)
    assert torch.allclose(sample["flow"][:, 1], torch.tensor(100 / 127.5 - 1), atol=2 / 255)
    again = data.split("test")[0]["inputs"]
    assert torch.equal(sample["visual"], again["visual"]) and torch.equal(sample["flow"], again["flow"])
    # a v folder with fewer images than u is named
    clip = data.split("test").clips[0].id
    sorted((tmp_path / "flow" / "v" / clip).iterdir())[-1].unlink()
    with pytest.raises(DataError, match=r"5 u images but 4"):
        data.split("test")[0]


def test_protocol_preset() -> None:
    from balancemm.config import resolve_config

    cfg = resolve_config("baseline", "ucf101")
    t, opt = cfg.train, cfg.train.optimizer
    assert (opt.name, opt.lr, opt.momentum, opt.weight_decay) == ("sgd", 1e-2, 0.9, 1e-4)
    assert (t.scheduler.name, t.scheduler.step_size, t.scheduler.gamma) == ("step", 30, 0.1)
    assert (t.epochs, t.batch_size, t.eval_batch_size, t.num_workers) == (70, 64, 64, 4)
    assert {m: e.name for m, e in cfg.model.encoders.items()} == {"flow": "resnet18", "visual": "resnet18"}
    assert cfg.model.fusion == "concat" and cfg.data.profile == "tvl1" and cfg.data.split_index == 1
