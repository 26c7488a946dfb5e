"""Audio profiles: shapes, and numbers worked out by hand or by an independent computation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.signal

from balancemm.data.profiles import AUDIO_PROFILES, audio_profile, kaldi_fbank, kaldi_mel_banks
from balancemm.errors import DataError
from tests.fixtures.media import tone

SHAPES = {
    "ogmge_stft": (257, 188),
    "pmr_spectrogram": (257, 1004),
    "kaldi_fbank": (1024, 128),
    "vggsound_stft": (129, 1251),
}
FLOAT32_EPS = 1.1920928955078125e-07  # 2**-23, Kaldi's log floor


def _noise(seconds: float, sr: int, seed: int = 0) -> np.ndarray:
    return (0.3 * np.random.default_rng(seed).normal(size=round(seconds * sr))).astype(np.float32)


def _mel(f: float) -> float:
    return 1127 * math.log(1 + f / 700)


@pytest.mark.parametrize("name", sorted(SHAPES))
@pytest.mark.parametrize("seconds", [0.3, 12.0])
def test_output_shape_from_any_length(name: str, seconds: float) -> None:
    profile = audio_profile(name)
    out = profile(_noise(seconds, profile.sample_rate))
    assert out.shape == profile.output_shape == SHAPES[name]
    assert out.dtype == np.float32 and np.isfinite(out).all()


def test_registry_and_params() -> None:
    assert set(AUDIO_PROFILES) == set(SHAPES)
    for name, profile in AUDIO_PROFILES.items():
        params = json.loads(json.dumps(profile.params()))
        assert params["name"] == name and params["version"] >= 1 and params["sample_rate"] == profile.sample_rate
        assert "crop" in params and params["description"]
    assert AUDIO_PROFILES["pmr_spectrogram"].params()["noverlap"] == 353
    assert AUDIO_PROFILES["kaldi_fbank"].params()["norm_std"] == 5.141276
    with pytest.raises(DataError, match="unknown audio profile 'fbank'; known: kaldi_fbank, ogmge_stft"):
        audio_profile("fbank")
    with pytest.raises(ValueError, match="non-empty mono"):
        AUDIO_PROFILES["ogmge_stft"](np.zeros((2, 100), dtype=np.float32))


# -- STFT profiles ---------------------------------------------------------------------------------


def _reference_stft_db(x: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    """log(|STFT| + 1e-7) written out: n_fft // 2 zeros each side, periodic Hann, one frame per hop."""
    padded = np.pad(x.astype(np.float64), n_fft // 2)
    starts = np.arange(0, padded.shape[0] - n_fft + 1, hop)
    window = np.hanning(n_fft + 1)[:-1]
    frames = np.stack([padded[s : s + n_fft] * window for s in starts])
    return np.log(np.abs(np.fft.rfft(frames, axis=1)).T + 1e-7)


def test_ogmge_of_silence_is_the_log_floor() -> None:
    out = AUDIO_PROFILES["ogmge_stft"](np.zeros(5000, dtype=np.float32))
    np.testing.assert_allclose(out, math.log(1e-7), rtol=1e-6)  # -16.118


def test_ogmge_tiles_clips_and_matches_a_written_out_stft() -> None:
    profile = AUDIO_PROFILES["ogmge_stft"]
    one_second = _noise(1.0, 22050)
    out = profile(one_second)
    np.testing.assert_array_equal(out, profile(np.tile(one_second, 3)))  # 1 s tiled three times = 3 s
    np.testing.assert_allclose(out, _reference_stft_db(np.clip(np.tile(one_second, 3), -1, 1), 512, 353), atol=1e-4)
    loud = 4 * one_second  # clipping: only the sign of samples beyond ±1 matters
    np.testing.assert_array_equal(profile(loud), profile(np.clip(loud, -1, 1)))


@pytest.mark.parametrize(("name", "bin_index"), [("ogmge_stft", 40), ("vggsound_stft", 20)])
def test_a_tone_at_a_bin_centre_peaks_at_that_bin(name: str, bin_index: int) -> None:
    profile = audio_profile(name)
    n_fft = profile.output_shape[0] * 2 - 2
    freq = bin_index * profile.sample_rate / n_fft  # 1722.66 Hz and 1250 Hz
    out = profile(tone(freq, 4.0, profile.sample_rate))
    assert (out[:, 1:-1].argmax(axis=0) == bin_index).all()


def test_vggsound_crop_is_ogmge_five_second_window_up_to_the_edge_frames() -> None:
    profile = AUDIO_PROFILES["vggsound_stft"]
    assert profile.crop == 626
    wave = _noise(3.0, 16000)  # tiled to 10 s
    full = profile(wave)
    tiled = np.clip(np.tile(wave, 4)[:160_000], -1, 1)
    for start in (0, 150, 625):  # the loader's window start, in frames
        window = _reference_stft_db(tiled[start * 128 : start * 128 + 80_000], 256, 128)
        assert window.shape == (129, 626)
        np.testing.assert_allclose(full[:, start + 1 : start + 625], window[:, 1:-1], atol=1e-4)
        # The first frame of a window inside the clip sees real samples where OGM-GE's sees zero padding.
        assert np.allclose(full[:, start], window[:, 0], atol=1e-4) == (start == 0)


# -- PMR -------------------------------------------------------------------------------------------


def test_pmr_matches_scipy_and_is_z_scored() -> None:
    wave = _noise(2.5, 16000, seed=1) + tone(500, 2.5, 16000)
    out = AUDIO_PROFILES["pmr_spectrogram"](wave)
    assert abs(float(out.mean())) < 1e-5 and abs(float(out.std()) - 1) < 1e-5
    x = np.clip(np.tile(wave.astype(np.float64), 4)[:160_000], -1, 1)
    spec = np.log(scipy.signal.spectrogram(x, 16000, nperseg=512, noverlap=353)[2] + 1e-7)
    np.testing.assert_allclose(out, (spec - spec.mean()) / (spec.std() + 1e-9), atol=1e-5)


# -- Kaldi fbank -----------------------------------------------------------------------------------

# mel(20) = 31.7486, mel(8000) = 2840.0377, Δ = (2840.0377 − 31.7486) / 129 = 21.76968; FFT bins every 31.25 Hz.
MEL_LOW, DELTA = 31.748578, 21.769683


def test_mel_banks_by_hand() -> None:
    banks = kaldi_mel_banks(128, 512, 16000, 20.0, 8000.0)
    assert banks.shape == (128, 257) and not banks[:, 256].any()  # Nyquist bin unused
    # Bank 0 spans mel 31.75–75.29 = 20.0–48.4 Hz: only bin 1 (31.25 Hz, mel 49.22) is inside, on the
    # rising edge at (49.22 − 31.75) / 21.77 = 0.8026.
    assert np.nonzero(banks[0])[0].tolist() == [1]
    assert banks[0, 1] == pytest.approx(0.802640, abs=1e-6)
    # Bank 3 spans 62.96–93.01 Hz, between bins 2 (62.5 Hz) and 3 (93.75 Hz): empty, as in torchaudio
    # (Kaldi itself refuses 128 bins here), so that row of every fbank is log(eps).
    assert not banks[3].any()
    # Bank 127 spans 7670.3–8000 Hz: bins 246 (7687.5 Hz) … 255 (7968.75 Hz), peak near its centre 7833.6 Hz.
    assert np.nonzero(banks[127])[0].tolist() == list(range(246, 256))
    assert int(np.argmax(banks[127])) == 251
    # Centres: mel(20) + (b + 1) Δ → 34.04 Hz for bank 0, 7833.56 Hz for bank 127.
    assert 700 * math.expm1((MEL_LOW + DELTA) / 1127) == pytest.approx(34.0431, abs=1e-3)
    assert 700 * math.expm1((MEL_LOW + 128 * DELTA) / 1127) == pytest.approx(7833.56, abs=1e-2)
    assert _mel(20) == pytest.approx(MEL_LOW, abs=1e-6) and (_mel(8000) - _mel(20)) / 129 == pytest.approx(DELTA)


def test_fbank_frame_count_and_dc_removal() -> None:
    assert kaldi_fbank(np.zeros(399), 16000).shape == (0, 128)
    assert kaldi_fbank(np.zeros(400), 16000).shape == (1, 128)
    dc = kaldi_fbank(np.full(4000, 0.3), 16000)  # each frame's mean is removed: nothing left
    assert dc.shape == (1 + (4000 - 400) // 160, 128) == (23, 128)
    np.testing.assert_allclose(dc, math.log(FLOAT32_EPS))  # -15.9424


@pytest.mark.parametrize("freq", [312.5, 500.0, 1000.0, 3000.0, 6500.0])  # FFT bin centres
def test_a_tone_peaks_in_the_bank_whose_centre_is_nearest(freq: float) -> None:
    energies = kaldi_fbank(tone(freq, 0.5, 16000), 16000).mean(axis=0)
    centres = MEL_LOW + DELTA * np.arange(1, 129)
    assert int(np.argmax(energies)) == int(np.argmin(np.abs(centres - _mel(freq))))


def test_kaldi_profile_pads_cuts_and_normalises() -> None:
    profile = AUDIO_PROFILES["kaldi_fbank"]
    pad_value = 4.503877 / (2 * 5.141276)  # a zero row after normalisation: 0.438012
    floor_value = (math.log(FLOAT32_EPS) + 4.503877) / (2 * 5.141276)  # -1.112419
    silence = profile(np.full(16000, 0.25, dtype=np.float32))  # 1 s: 98 frames, then padding
    np.testing.assert_allclose(silence[:98], floor_value, rtol=1e-6)
    np.testing.assert_allclose(silence[98:], pad_value, rtol=1e-6)
    assert pad_value == pytest.approx(0.438012, abs=1e-6) and floor_value == pytest.approx(-1.112419, abs=1e-6)
    long = _noise(12.0, 16000) + 0.1  # 1198 frames, cut to 1024; the offset is removed first
    expected = (kaldi_fbank(long - long.mean(), 16000)[:1024] + 4.503877) / (2 * 5.141276)
    np.testing.assert_allclose(profile(long), expected, rtol=1e-5, atol=1e-5)
