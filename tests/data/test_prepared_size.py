"""Prepared data is no larger than it must be: frames never enlarged, audio without its padding, and the
tensors a model receives unchanged in shape and, for the audio, in every bit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from balancemm.data import create_dataset
from balancemm.data.media import decode_audio
from balancemm.data.prepare import prepare
from balancemm.data.profiles import AUDIO_PROFILES, KaldiFbankProfile, kaldi_fbank, profile_from_params
from tests.fixtures import av_raw

CLIP = "1001_DFA_ANG_XX"


def size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


@pytest.fixture(scope="module")
def cremad(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The CREMA-D fixture prepared with `data prepare`'s defaults (kaldi_fbank, --frame-size 224)."""
    raw = tmp_path_factory.mktemp("raw")
    av_raw.make_cremad_raw(raw)
    out = tmp_path_factory.mktemp("prepared") / "cremad"
    prepare("cremad", raw, out, progress=False)
    return raw, out


def test_prepared_cremad_stays_near_its_raw_size(cremad: tuple[Path, Path]) -> None:
    raw, out = cremad
    media, prepared = size(raw / "AudioWAV") + size(raw / "VideoFlash"), size(out / "clips")
    print(f"CREMA-D fixture: raw media {media:,} B, prepared clips {prepared:,} B, ratio {prepared / media:.2f}")
    assert prepared < 2 * media  # 9.98 × when frames were enlarged and audio padded


def test_frames_are_never_enlarged_and_audio_is_stored_without_padding(cremad: tuple[Path, Path]) -> None:
    _, out = cremad
    with np.load(out / "clips" / f"{CLIP}.npz") as npz:
        assert npz["frames"].shape == (2, av_raw.H, av_raw.W, 3)  # 48 × 64 at --frame-size 224
        assert npz["audio"].shape == (248, 128) and npz["audio"].dtype == np.float32  # 2.5 s, not 1,024 frames
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "balancemm-prepared/2" and manifest["frames"]["max_short_side"] == 224


def test_loaded_tensors_keep_their_shapes_and_the_audio_its_bits(cremad: tuple[Path, Path]) -> None:
    raw, out = cremad
    data = create_dataset("cremad", root=str(out), split="random", test_fraction=1 / 6, val_fraction=0.25)
    test = data.split("test")
    sample, clip = test.load(0, None)["inputs"], test.clips[0].id
    assert tuple(sample["audio"].shape) == (1, 1024, 128) and tuple(sample["visual"].shape) == (2, 3, 224, 224)
    expected = AUDIO_PROFILES["kaldi_fbank"](decode_audio(raw / "AudioWAV" / f"{clip}.wav", 16000))
    assert np.array_equal(sample["audio"][0].numpy(), expected)
    assert data.input_shapes == {"audio": (1, 1024, 128), "visual": (2, 3, 224, 224)}


def test_kaldi_padding_restored_at_load_is_the_recipes_bit_for_bit() -> None:
    profile = AUDIO_PROFILES["kaldi_fbank"]
    assert isinstance(profile, KaldiFbankProfile)
    wave = np.random.default_rng(0).normal(0, 0.1, 16000 * 3)
    # The recipe as it was written before the padding moved to load time: pad with zeros, then normalise.
    fbank = kaldi_fbank(wave - wave.mean(), 16000)[: profile.frames]
    fbank = np.pad(fbank, ((0, profile.frames - fbank.shape[0]), (0, 0)))
    before = ((fbank - profile.norm_mean) / (2 * profile.norm_std)).astype(np.float32)
    stored = profile.compact(wave)
    assert stored.shape == (298, 128)
    assert np.array_equal(profile.complete(stored), before) and np.array_equal(profile(wave), before)
    assert profile.complete(before) is before  # data prepared before this change is already complete


def test_a_manifest_profile_gives_back_its_recipe() -> None:
    for profile in AUDIO_PROFILES.values():
        assert profile_from_params(json.loads(json.dumps(profile.params()))) == profile
    assert profile_from_params({"name": "released", "version": 1}) is None  # BalancedAV's shipped arrays
