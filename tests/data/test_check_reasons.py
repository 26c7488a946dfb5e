"""What prepare learnt about a clip it could not prepare reaches the user: prepare names every clip it left
out, data check repeats prepare's reason, and train warns that a split lacks clips."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path

import pytest

from balancemm.cli import main
from tests.fixtures import av_raw

SMALL = ["data.image_size=32", "model.encoders.audio.width=4", "model.encoders.visual.width=4", "train.epochs=1",
         "train.num_workers=0", "train.batch_size=8", "data.val_fraction=0.25"]  # fmt: skip


@dataclass(frozen=True)
class Broken:
    """A CREMA-D release whose test actor has a truncated video and a video without its audio, prepared."""

    ids: list[str]
    bad_video: Path
    orphan: Path
    out: Path
    err: str  # what prepare printed on stderr


@pytest.fixture(scope="module")
def broken(tmp_path_factory: pytest.TempPathFactory) -> Broken:
    raw = tmp_path_factory.mktemp("raw")
    ids = av_raw.make_cremad_raw(raw)  # the CSVs put the last of 3 actors (ids 24–35) in test
    bad_video = raw / "VideoFlash" / f"{ids[24]}.flv"
    bad_video.write_bytes(bad_video.read_bytes()[: bad_video.stat().st_size // 3])
    (raw / "AudioWAV" / f"{ids[25]}.wav").unlink()
    out = tmp_path_factory.mktemp("prepared") / "cremad"
    argv = ["data", "prepare", "cremad", "--raw", str(raw), "--out", str(out), "--workers", "1"]
    with contextlib.redirect_stderr(io.StringIO()) as err:
        assert main([*argv, "--frame-size", "16", "--profile", "ogmge_stft", "--quiet"]) == 0
    for name in ("train.csv", "test.csv"):
        (out / name).write_bytes((raw / name).read_bytes())
    return Broken(ids, bad_video, raw / "VideoFlash" / f"{ids[25]}.flv", out, err.getvalue())


def test_prepare_names_the_clip_without_its_audio(broken: Broken) -> None:
    assert f"skipped {broken.bad_video}" in broken.err  # named as it failed
    assert f"not prepared: {broken.orphan}: no AudioWAV/{broken.ids[25]}.wav" in broken.err


def test_check_repeats_the_reasons_prepare_recorded(broken: Broken, capsys: pytest.CaptureFixture[str]) -> None:
    ids = broken.ids
    sets = ["data.profile=ogmge_stft", "data.val_fraction=0.25"]  # one validation clip per class
    code = main(["data", "check", "cremad", "--root", str(broken.out), "--set", *sets, "--quiet"])
    lines = capsys.readouterr().out.splitlines()
    assert code == 0 and "  test       10 usable (of 12 listed), 2 missing, 0 unreadable" in lines
    skipped = f"        missing {ids[24]}: skipped by data prepare: {broken.bad_video}: "
    assert any(line.startswith(skipped) for line in lines)
    orphan = f"        missing {ids[25]}: incomplete in the raw release: {broken.orphan}: no AudioWAV/{ids[25]}.wav"
    assert orphan in lines
    assert not any(line.endswith(": no files") for line in lines)


def test_train_warns_that_the_test_split_lacks_clips(
    broken: Broken, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["train", "--method", "baseline", "--dataset", "cremad", "--quiet", "--out", str(tmp_path / "run")]
    assert main([*argv, "--set", f"data.root={broken.out}", "data.profile=ogmge_stft", *SMALL]) == 0
    (warning,) = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warning == (
        "balancemm: warning: 2 listed clips have no data (test 2); "
        f"`balancemm data check cremad --root {broken.out}` names them and says whether results stay comparable "
        "with published numbers"
    )
