"""The embedded default dataset: real handwritten digits + synthesised audio (+ a synthetic text).

Needs no download: the visual modality is scikit-learn's 1,797 real 8×8 handwritten digits; the audio
modality is rendered per sample from the digit's class; the optional third modality is a sequence of
word vectors. Everything is built deterministically from ``data.seed`` in a few seconds and cached.

Why it shows the imbalance phenomenon (the paper's Fig. 2):

* **audio is fast but incomplete.** Each class owns a pitch; classes come in pairs (0/1, 2/3, …)
  whose pitches sit close together, so audio always tells the pair but only partly the digit
  within it. The audio encoder convolves over time with the frequency bins as channels, so the pitch
  is nearly linearly readable: it is learned in a few epochs.
* **visual is slow but complementary.** The digit images are noisy and jittered; a 2-D CNN needs
  many more epochs to read them, and they are what resolves the within-pair ambiguity.

Trained jointly, audio quickly drives the loss down on most rows; the visual encoder then learns only
what audio cannot do (within-pair distinctions) and ends up well below the same encoder trained
alone, while the fused model still beats either modality alone.

The imbalance dial is each modality's ``*_informativeness`` in [0, 1]:

* audio: the within-pair pitch separation in units of the pitch jitter (0 = audio tells only the
  pair, 1 = nearly the digit);
* visual: the noise level (1 = clean digits, 0 = Gaussian noise of 0.7 × the ink contrast);
* text: the probability that the sequence contains its own class keyword (otherwise another
  class's keyword), so its Bayes accuracy is about ``p + (1 - p) / 10``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from balancemm.catalog.datasets import EmbeddedOptions
from balancemm.data.base import InMemorySplit, MultimodalDataset, Split, SplitName, stratified_split
from balancemm.errors import DataError
from balancemm.files import DamagedFile, load_checked, remove_partials, save_checked
from balancemm.registry import DATASETS

_SAMPLE_RATE = 4000  # Hz
_SAMPLES = 2000  # 0.5 s
_N_FFT = 64
_HOP = 62  # 33 frames → cropped to 32
_GROUP_PITCH = (350.0, 600.0, 900.0, 1250.0, 1650.0)  # Hz, one per class pair
_JITTER = 0.6  # semitones of random pitch jitter per sample
_TEXT_LEN, _TEXT_DIM, _N_DISTRACTORS = 8, 16, 30
_KEYWORD_NORM = 3.0  # keywords stand out from the unit-norm filler words


def _cache_dir() -> Path:
    root = os.environ.get("BALANCEMM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "balancemm"
    )
    return Path(root) / "embedded"


def _render_audio(labels: Tensor, informativeness: float, g: torch.Generator) -> Tensor:
    """Log-spectrograms ``[N, 32 bins, 32 frames]`` of one chirped tone per sample."""
    n = labels.numel()
    base = torch.tensor(_GROUP_PITCH)[labels // 2]
    # Within-pair offset: ±separation/2 semitones; separation scales with the jitter it must beat.
    separation = 4.0 * _JITTER * informativeness
    sign = (labels % 2).float() * 2 - 1
    semitones = sign * separation / 2 + _JITTER * torch.randn(n, generator=g)
    f0 = base * 2 ** (semitones / 12)
    t = torch.arange(_SAMPLES) / _SAMPLE_RATE
    onset = 0.15 * torch.rand(n, 1, generator=g)
    length = 0.2 + 0.15 * torch.rand(n, 1, generator=g)
    slope = 0.6 * torch.rand(n, 1, generator=g) - 0.3  # relative pitch change per second
    rel = ((t - onset) / length).clamp(0, 1)
    envelope = torch.sin(math.pi * rel) ** 2
    freq = f0[:, None] * (1 + slope * (t - onset).clamp(min=0))
    phase = 2 * math.pi * torch.cumsum(freq, dim=1) / _SAMPLE_RATE
    harmonic = torch.where(2 * freq < _SAMPLE_RATE / 2, 0.3 * torch.sin(2 * phase), 0.0)
    wave = envelope * (torch.sin(phase) + harmonic) + 0.3 * torch.randn(n, _SAMPLES, generator=g)
    spec = torch.stft(wave, _N_FFT, _HOP, window=torch.hann_window(_N_FFT), return_complex=True).abs()
    return torch.log(spec[:, 1:33, :32] + 1e-3)


def _render_visual(images: Tensor, informativeness: float, g: torch.Generator) -> Tensor:
    """Noisy, randomly shifted digits ``[N, 1, 8, 8]``."""
    n = images.shape[0]
    padded = torch.nn.functional.pad(images / 16.0, (1, 1, 1, 1))
    dx = torch.randint(0, 3, (n,), generator=g)
    dy = torch.randint(0, 3, (n,), generator=g)
    rows = (dy[:, None] + torch.arange(8))[:, :, None].expand(n, 8, 8)
    cols = (dx[:, None] + torch.arange(8))[:, None, :].expand(n, 8, 8)
    shifted = padded[torch.arange(n)[:, None, None], rows, cols]
    noise = 0.7 * (1 - informativeness) * torch.randn(n, 8, 8, generator=g)
    return (shifted + noise)[:, None]


def _render_text(labels: Tensor, informativeness: float, g: torch.Generator) -> Tensor:
    """Sequences of word vectors ``[N, 16 dims, 8 tokens]``: filler words and one class keyword."""
    n = labels.numel()
    vocab = torch.nn.functional.normalize(torch.randn(10 + _N_DISTRACTORS, _TEXT_DIM, generator=g), dim=1)
    vocab[:10] *= _KEYWORD_NORM
    tokens = 10 + torch.randint(0, _N_DISTRACTORS, (n, _TEXT_LEN), generator=g)
    honest = torch.rand(n, generator=g) < informativeness
    other = (labels + torch.randint(1, 10, (n,), generator=g)) % 10
    keyword = torch.where(honest, labels, other)
    position = torch.randint(0, _TEXT_LEN, (n,), generator=g)
    tokens[torch.arange(n), position] = keyword
    seq = vocab[tokens] + 0.2 * torch.randn(n, _TEXT_LEN, _TEXT_DIM, generator=g)
    return seq.transpose(1, 2).contiguous()


def _construct(options: EmbeddedOptions, modalities: tuple[str, ...]) -> dict[str, Any]:
    """Every tensor of the dataset, built from ``options.seed`` (no cache)."""
    from sklearn.datasets import load_digits  # heavy import, only on a cache miss

    digits = load_digits()
    labels = torch.as_tensor(digits.target, dtype=torch.long)
    images = torch.as_tensor(digits.images, dtype=torch.float32)
    g = torch.Generator().manual_seed(options.seed)
    raw = {
        "audio": _render_audio(labels, options.audio_informativeness, g),
        "visual": _render_visual(images, options.visual_informativeness, g),
    }
    if "text" in modalities:
        raw["text"] = _render_text(labels, options.text_informativeness, g)
    test_frac, val_frac = options.test_fraction, options.val_fraction
    train, val, test = stratified_split(labels, (1 - val_frac - test_frac, val_frac, test_frac), g)
    # Standardise with train statistics only, so nothing about val/test leaks into the inputs.
    inputs = {}
    for m in modalities:
        x = raw[m]
        mean, std = x[train].mean(), x[train].std()
        inputs[m] = ((x - mean) / std).float()
    return {"inputs": inputs, "labels": labels, "splits": {"train": train, "val": val, "test": test}}


def build_embedded(options: EmbeddedOptions, modalities: tuple[str, ...]) -> dict[str, Any]:
    """Build (or load from cache) every tensor of the dataset: inputs, labels and split indices."""
    # The cache key covers this file's source, so a changed construction never reuses a stale cache.
    source = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
    key = json.dumps({"source": source, "modalities": modalities, **asdict(options)}, sort_keys=True)
    path = _cache_dir() / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
    remove_partials(path.parent)  # those of builds killed while writing
    if path.is_file():
        cached = _load_cache(path, modalities)
        if cached is not None:
            return cached
    # One thread: reductions (the audio rendering's, the standardisation's) round differently with more,
    # so the data, and every number trained on it, would depend on whether a 1-thread sweep worker or a
    # 2-thread `train` happened to build the cache first.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        built = _construct(options, modalities)
    finally:
        torch.set_num_threads(threads)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_checked(built, path)  # atomic: a concurrent or killed build never leaves a half-written cache
    except OSError as exc:
        raise DataError(
            f"cannot write the dataset cache in {path.parent} ({exc.strerror or exc}); "
            "set BALANCEMM_CACHE to a writable directory"
        ) from None
    return built


def _load_cache(path: Path, modalities: tuple[str, ...]) -> dict[str, Any] | None:
    """The cached dataset, or None (after a one-line warning) when the cache is damaged or not one:
    it is then rebuilt, never trusted, since it would change every later run's numbers."""
    try:
        cached = load_checked(path)
    except DamagedFile as exc:
        problem = exc.problem
    else:
        parts = cached if isinstance(cached, dict) else {}
        inputs, splits = parts.get("inputs"), parts.get("splits")
        if isinstance(inputs, dict) and isinstance(splits, dict):
            tensors = [parts.get("labels"), *(inputs.get(m) for m in modalities), *splits.values()]
            if set(splits) == {"train", "val", "test"} and all(isinstance(t, Tensor) for t in tensors):
                return parts
        problem = "does not hold the embedded dataset"
    print(f"balancemm: warning: the dataset cache {path} {problem}; rebuilding it", file=sys.stderr)
    return None


@DATASETS.register("embedded")
class Embedded(MultimodalDataset):
    """Audio + visual, the embedded default (see the module docstring)."""

    Options: ClassVar[type] = EmbeddedOptions
    name: ClassVar[str] = "embedded"
    _modalities: ClassVar[tuple[str, ...]] = ("audio", "visual")

    def __init__(self, options: EmbeddedOptions | None = None) -> None:
        self.options = options or EmbeddedOptions()
        self.modalities = self._modalities
        built = build_embedded(self.options, self.modalities)
        self.num_classes = 10
        self.class_names = tuple(str(c) for c in range(10))
        self.input_shapes = {m: tuple(built["inputs"][m].shape[1:]) for m in self.modalities}
        self._splits = {
            name: InMemorySplit({m: built["inputs"][m][rows] for m in self.modalities}, built["labels"][rows])
            for name, rows in built["splits"].items()
        }

    def split(self, name: SplitName) -> Split:
        return self._splits[name]


@DATASETS.register("embedded3")
class Embedded3(Embedded):
    """Audio + text + visual: the 3-modality variant of the embedded dataset."""

    name: ClassVar[str] = "embedded3"
    _modalities: ClassVar[tuple[str, ...]] = ("audio", "text", "visual")
