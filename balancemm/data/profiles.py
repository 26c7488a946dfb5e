"""Named audio preprocessing profiles: the recipes that turn a decoded waveform into the 2-D array an audio
encoder reads, one per recipe in circulation in the modality-imbalance literature.

* ``ogmge_stft``: OGM-GE_CVPR2022's CREMA-D loader (librosa at 22,050 Hz, 3 s, STFT 512/353) → 257×188.
  OGM-GE tiles exactly three times, which falls short of 3 s for clips under 1 s (none in CREMA-D); here the
  clip is tiled as often as needed, so every output has the same shape.
* ``pmr_spectrogram``: Modal-Imbalance-PMR's pickled CREMA-D spectrograms (16 kHz, tiled to 160,000 samples,
  scipy spectrogram 512/353, per-clip z-score) → 257×1004.
* ``kaldi_fbank``: OGM-GE's Kinetics-Sounds script, the AST-style Kaldi filter bank that MMPareto_ICML2024,
  Diagnosing_Relearning_ECCV2024 and BalanceBenchmark also feed for CREMA-D (MLA's ``extract_fbank`` without
  the final normalisation with AudioSet statistics) → 1024 frames × 128 mel bins.
* ``vggsound_stft``: OGM-GE's VGGSound loader → 129×1251 for the whole 10 s, with ``crop = 626``: the loader
  takes a 626-frame window, random in training and centred in evaluation. OGM-GE instead picks a random 5 s
  window of samples (also at test time, so its test numbers are themselves random) and takes its STFT
  (129×626). The two agree except that our window starts on a hop (8 ms) boundary and its first and last
  frame see the neighbouring samples instead of the zero padding of a separately centred STFT.

The STFT profiles are frequency × time; ``kaldi_fbank`` is time × frequency. ``output_shape`` says which.
Nothing here imports librosa, scipy or torchaudio: the STFTs use ``torch.stft`` in float64 with librosa's
conventions, the scipy spectrogram and the Kaldi filter bank are written out in numpy. Each profile's
:meth:`AudioProfile.params` goes into the prepared data's manifest; its ``version`` is bumped whenever a
recipe's output changes, so arrays prepared under an older recipe are recognisable.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch

from balancemm.errors import DataError

_LOG_FLOOR = 1e-7  # the epsilon inside log(|S| + eps) of the OGM-GE and PMR recipes
_KALDI_LOG_FLOOR = float(np.finfo(np.float32).eps)  # Kaldi floors the mel energies at float32 epsilon


def _tile_to(wave: np.ndarray, n: int) -> np.ndarray:
    """Repeat ``wave`` end to end and cut to ``n`` samples (the recipes' ``np.tile`` then slice)."""
    return np.tile(wave, -(-n // wave.shape[0]))[:n]


def _check_wave(wave: np.ndarray) -> np.ndarray:
    wave = np.asarray(wave)
    if wave.ndim != 1 or wave.shape[0] == 0:
        raise ValueError(f"audio profiles take a non-empty mono waveform [N], got shape {wave.shape}")
    return wave.astype(np.float64)


def _librosa_stft_magnitude(wave: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    """``|librosa.stft(wave, n_fft, hop)|`` ``[n_fft // 2 + 1, 1 + N // hop]`` with librosa ≥ 0.10's defaults:
    a periodic Hann window of n_fft samples, frames centred by n_fft // 2 zeros on each side."""
    x = torch.from_numpy(wave)
    window = torch.hann_window(n_fft, periodic=True, dtype=torch.float64)
    spec = torch.stft(x, n_fft, hop, window=window, center=True, pad_mode="constant", return_complex=True)
    return spec.abs().numpy()


def _periodic_tukey(m: int, alpha: float) -> np.ndarray:
    """scipy's ``get_window(("tukey", alpha), m)``: the symmetric Tukey window of m + 1 points minus its last."""
    n = np.arange(m + 1)
    taper = alpha * m / 2  # length of each cosine flank of the (m + 1)-point window
    edge = np.minimum(n, m - n)
    return np.where(edge < taper, 0.5 * (1 - np.cos(np.pi * edge / taper)), 1.0)[:m]


def scipy_spectrogram(wave: np.ndarray, fs: float, nperseg: int, noverlap: int) -> np.ndarray:
    """``scipy.signal.spectrogram(wave, fs, nperseg=nperseg, noverlap=noverlap)[2]`` with scipy's other
    defaults: a periodic Tukey(0.25) window, each segment's mean removed, one-sided power spectral density.

    Returns:
        ``[nperseg // 2 + 1, 1 + (N - nperseg) // (nperseg - noverlap)]`` float64.
    """
    step = nperseg - noverlap
    segments = np.lib.stride_tricks.sliding_window_view(wave, nperseg)[::step]
    window = _periodic_tukey(nperseg, 0.25)
    segments = (segments - segments.mean(axis=1, keepdims=True)) * window
    psd = np.abs(np.fft.rfft(segments, axis=1)) ** 2 / (fs * np.sum(window**2))
    # One-sided density: the energy of the negative frequencies is folded onto the positive ones, except
    # for DC and (n even) Nyquist, which have no mirror.
    psd[:, 1 : (nperseg + 1) // 2] *= 2
    return psd.T


def _mel(freq: np.ndarray | float) -> np.ndarray:
    """Kaldi's mel scale, 1127 ln(1 + f / 700)."""
    return 1127.0 * np.log1p(np.asarray(freq, dtype=np.float64) / 700.0)


def kaldi_mel_banks(num_bins: int, n_fft: int, sample_rate: float, low_freq: float, high_freq: float) -> np.ndarray:
    """Kaldi's triangular mel filters ``[num_bins, n_fft // 2 + 1]`` (the Nyquist column is zero).

    Filter b rises linearly *on the mel axis* from ``mel(low) + b·Δ`` to its centre ``mel(low) + (b + 1)·Δ``
    and falls to ``mel(low) + (b + 2)·Δ``, with Δ = (mel(high) − mel(low)) / (num_bins + 1); FFT bin k sits
    at k · sample_rate / n_fft Hz.
    """
    mel_low, mel_high = _mel(low_freq), _mel(high_freq)
    delta = (mel_high - mel_low) / (num_bins + 1)
    left = mel_low + delta * np.arange(num_bins)[:, None]
    centre, right = left + delta, left + 2 * delta
    bin_mel = _mel(np.arange(n_fft // 2) * sample_rate / n_fft)[None, :]
    banks = np.maximum(0.0, np.minimum((bin_mel - left) / (centre - left), (right - bin_mel) / (right - centre)))
    return np.pad(banks, ((0, 0), (0, 1)))


def kaldi_fbank(
    wave: np.ndarray,
    sample_rate: int,
    num_mel_bins: int = 128,
    frame_length_ms: float = 25.0,
    frame_shift_ms: float = 10.0,
    preemphasis: float = 0.97,
    low_freq: float = 20.0,
    high_freq: float = 0.0,
) -> np.ndarray:
    """Log mel filter-bank energies as ``torchaudio.compliance.kaldi.fbank`` computes them with dither 0,
    window_type "hanning", use_energy False and Kaldi's other defaults.

    Frames of ``frame_length_ms`` every ``frame_shift_ms`` (snip_edges: only whole frames); per frame the
    mean is removed, pre-emphasis applied (the first sample stands in for its missing predecessor), a
    symmetric Hann window applied and the frame zero-padded to the next power of two; the power spectrum
    goes through :func:`kaldi_mel_banks` and the log is floored at float32 epsilon. ``high_freq <= 0``
    counts down from the Nyquist frequency, as in Kaldi. Computed in float64 (torchaudio: float32).

    With 128 bins at 16 kHz, bank 3 (63–93 Hz) falls between two FFT bins and is log(eps) for every input,
    as in torchaudio (Kaldi itself refuses such a bank).

    Returns:
        ``[1 + (N − L) // S, num_mel_bins]`` float64 (frames × mel bins), L and S the frame length and
        shift in samples; zero frames if N < L.
    """
    wave = np.asarray(wave, dtype=np.float64)
    length = int(sample_rate * frame_length_ms / 1000)
    shift = int(sample_rate * frame_shift_ms / 1000)
    n_fft = 1 << (length - 1).bit_length()
    if wave.shape[0] < length:
        return np.zeros((0, num_mel_bins))
    frames = np.lib.stride_tricks.sliding_window_view(wave, length)[::shift]
    frames = frames - frames.mean(axis=1, keepdims=True)
    previous = np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
    frames = (frames - preemphasis * previous) * np.hanning(length)
    power = np.abs(np.fft.rfft(frames, n=n_fft, axis=1)) ** 2
    nyquist = sample_rate / 2
    banks = kaldi_mel_banks(
        num_mel_bins, n_fft, sample_rate, low_freq, high_freq if high_freq > 0 else nyquist + high_freq
    )
    return np.log(np.maximum(power @ banks.T, _KALDI_LOG_FLOOR))


@dataclasses.dataclass(frozen=True, kw_only=True)
class AudioProfile(ABC):
    """A named recipe: ``profile(wave)`` turns a mono waveform at ``sample_rate`` into a float32 2-D array.

    ``crop`` is the number of time frames of the random (training) or centred (evaluation) window the loader
    takes from the stored array; None keeps the whole array.
    """

    recipe: ClassVar[str]

    name: str
    description: str  # one line: where the recipe comes from
    sample_rate: int  # Hz the waveform must be decoded at
    version: int = 1
    crop: int | None = None

    @property
    @abstractmethod
    def output_shape(self) -> tuple[int, int]:
        """The shape of every array ``__call__`` returns."""

    @abstractmethod
    def _compute(self, wave: np.ndarray) -> np.ndarray: ...

    def __call__(self, wave: np.ndarray) -> np.ndarray:
        """``[N]`` mono waveform at ``sample_rate`` (any length ≥ 1) → ``output_shape`` float32."""
        return self.complete(self.compact(wave))

    def compact(self, wave: np.ndarray) -> np.ndarray:
        """What ``data prepare`` stores: the output without the padding :meth:`complete` restores when the
        clip is loaded (the whole output for recipes that pad nothing), float32."""
        return self._compute(_check_wave(wave)).astype(np.float32)

    def complete(self, stored: np.ndarray) -> np.ndarray:
        """A :meth:`compact` array → ``output_shape``; an array already complete is returned as it is."""
        return stored

    def params(self) -> dict[str, Any]:
        """Every parameter of the recipe, JSON-able, for the prepared data's manifest."""
        return {"recipe": self.recipe, **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class StftProfile(AudioProfile):
    """Tile to ``seconds``, clip to [-1, 1], log(|librosa-style STFT| + 1e-7): ``[n_fft // 2 + 1 freq, T time]``."""

    recipe: ClassVar[str] = "stft"

    seconds: float
    n_fft: int
    hop_length: int

    @property
    def samples(self) -> int:
        return round(self.seconds * self.sample_rate)

    @property
    def output_shape(self) -> tuple[int, int]:
        return (self.n_fft // 2 + 1, 1 + self.samples // self.hop_length)

    def _compute(self, wave: np.ndarray) -> np.ndarray:
        x = np.clip(_tile_to(wave, self.samples), -1.0, 1.0)
        return np.log(_librosa_stft_magnitude(x, self.n_fft, self.hop_length) + _LOG_FLOOR)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SpectrogramProfile(AudioProfile):
    """Tile to ``samples``, clip to [-1, 1], log(scipy spectrogram + 1e-7), z-score over the clip:
    ``[nperseg // 2 + 1 freq, T time]``."""

    recipe: ClassVar[str] = "scipy_spectrogram"

    samples: int
    nperseg: int
    noverlap: int
    std_floor: float = 1e-9

    @property
    def output_shape(self) -> tuple[int, int]:
        return (self.nperseg // 2 + 1, 1 + (self.samples - self.nperseg) // (self.nperseg - self.noverlap))

    def _compute(self, wave: np.ndarray) -> np.ndarray:
        x = np.clip(_tile_to(wave, self.samples), -1.0, 1.0)
        spec = np.log(scipy_spectrogram(x, self.sample_rate, self.nperseg, self.noverlap) + _LOG_FLOOR)
        return (spec - spec.mean()) / (spec.std() + self.std_floor)


@dataclasses.dataclass(frozen=True, kw_only=True)
class KaldiFbankProfile(AudioProfile):
    """Remove the mean, :func:`kaldi_fbank`, zero-pad or cut to ``frames``, normalise as
    (x − norm_mean) / (2 · norm_std): ``[frames time, num_mel_bins mel]`` — time first, the orientation
    BalanceBenchmark's and AST's loaders store and read.

    :meth:`compact` leaves the padding out (a 3 s clip has 298 of the 1,024 frames): prepared data stores
    only the clip's own frames, and :meth:`complete` pads them with :attr:`pad_value` when loaded, giving
    the same array bit for bit."""

    recipe: ClassVar[str] = "kaldi_fbank"

    num_mel_bins: int = 128
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    preemphasis: float = 0.97
    low_freq: float = 20.0
    high_freq: float = 0.0  # ≤ 0: offset from Nyquist
    window: str = "hanning"  # symmetric Hann; recorded for the manifest, the only window implemented
    frames: int = 1024
    norm_mean: float = -4.503877
    norm_std: float = 5.141276

    @property
    def output_shape(self) -> tuple[int, int]:
        return (self.frames, self.num_mel_bins)

    @property
    def pad_value(self) -> float:
        """A zero (padding) filter-bank frame after the normalisation."""
        return (0.0 - self.norm_mean) / (2 * self.norm_std)

    def complete(self, stored: np.ndarray) -> np.ndarray:
        short = self.frames - stored.shape[0]
        return np.pad(stored, ((0, short), (0, 0)), constant_values=self.pad_value) if short > 0 else stored

    def _compute(self, wave: np.ndarray) -> np.ndarray:
        fbank = kaldi_fbank(
            wave - wave.mean(),
            self.sample_rate,
            self.num_mel_bins,
            self.frame_length_ms,
            self.frame_shift_ms,
            self.preemphasis,
            self.low_freq,
            self.high_freq,
        )[: self.frames]
        return (fbank - self.norm_mean) / (2 * self.norm_std)


AUDIO_PROFILES: dict[str, AudioProfile] = {
    p.name: p
    for p in (
        StftProfile(
            name="ogmge_stft",
            description="OGM-GE_CVPR2022 CREMA-D loader: 22.05 kHz, tile to 3 s, log|STFT| 512/353",
            sample_rate=22050,
            seconds=3.0,
            n_fft=512,
            hop_length=353,
        ),
        SpectrogramProfile(
            name="pmr_spectrogram",
            description="Modal-Imbalance-PMR CREMA-D pickles: 16 kHz, tile to 10 s, scipy spectrogram, z-score",
            sample_rate=16000,
            samples=160_000,
            nperseg=512,
            noverlap=353,
        ),
        KaldiFbankProfile(
            name="kaldi_fbank",
            description="OGM-GE Kinetics-Sounds script (AST-style Kaldi fbank), as MMPareto/Relearning/BalanceMM",
            sample_rate=16000,
        ),
        StftProfile(
            name="vggsound_stft",
            description="OGM-GE_CVPR2022 VGGSound loader: 16 kHz, tile to 10 s, log|STFT| 256/128, 5 s window",
            sample_rate=16000,
            seconds=10.0,
            n_fft=256,
            hop_length=128,
            crop=626,
        ),
    )
}


_RECIPES: dict[str, type[AudioProfile]] = {c.recipe: c for c in (StftProfile, SpectrogramProfile, KaldiFbankProfile)}


def profile_from_params(params: Mapping[str, Any]) -> AudioProfile | None:
    """The profile whose :meth:`AudioProfile.params` are ``params`` (a prepared manifest's ``profile``), or
    None for arrays made by no recipe of ours (BalancedAV's ``released`` spectrograms)."""
    cls = _RECIPES.get(params.get("recipe", ""))
    if cls is None:
        return None
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in params.items() if k in names})


def audio_profile(name: str) -> AudioProfile:
    """The profile called ``name``; an unknown name is a DataError listing the known ones."""
    try:
        return AUDIO_PROFILES[name]
    except KeyError:
        raise DataError(f"unknown audio profile {name!r}; known: {', '.join(sorted(AUDIO_PROFILES))}") from None
