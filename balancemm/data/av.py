"""Datasets read clip by clip, and what the audio-visual ones (CREMA-D, Kinetics-Sounds, VGGSound,
BalancedAV) share.

A dataset root is one of two kinds:

* **prepared** by ``balancemm data prepare`` (:mod:`balancemm.data.prepare`): ``manifest.json`` plus
  ``clips/<id>.npz`` holding the clip's arrays — for audio-visual data ``audio`` (the profile's array,
  float32, without the padding of short clips, added back here) and ``frames`` (every 1-fps frame,
  decoded, ``[T, H, W, 3]`` uint8, the shorter side shrunk at prepare time but never enlarged). A
  sample costs one file read and a resize: no media decoding per epoch.
* a **layout users already have** (OGM-GE / BalanceMM): for audio-visual data one audio file per clip
  (``.npy``, ``.pt``, ``.pkl``, or ``.wav`` turned into the profile's array on the fly, as OGM-GE's
  CREMA-D loader does) and one folder of frame images per clip (or BalancedAV's ``.hdf5`` of JPEG
  bytes). Frame files are sorted by name, so the frames chosen never depend on the filesystem's
  listing order.

:class:`ClipDataset` holds the layout logic for any modalities; :class:`AVDataset` adds the audio-visual
sample: ``frames`` frames picked with the segment rule of
:func:`balancemm.data.transforms.frame_indices`, ImageNet-style transforms (random resized crop + flip
in training, resize in evaluation), the audio array with a leading channel axis, and for profiles with
a ``crop`` (VGGSound) a time window (random in training, centred otherwise).
"""

from __future__ import annotations

import functools
import json
import os
import pickle
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from balancemm.data.base import SPLITS, MultimodalDataset, Split, SplitName, stratified_split
from balancemm.data.media import decode_audio, decode_image
from balancemm.data.profiles import AUDIO_PROFILES, AudioProfile, profile_from_params
from balancemm.data.transforms import frame_indices, frames_to_tensor
from balancemm.errors import DataError

MANIFEST = "manifest.json"
PARAMS = "prepare.json"  # written when a prepare starts; alone, it marks an unfinished prepare
CLIPS_DIR = "clips"
MODALITIES = ("audio", "visual")
AUDIO_EXTENSIONS = (".npy", ".pt", ".pkl", ".wav")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class Clip:
    """One labelled clip of a split."""

    id: str
    label: int


# (stored array name, its length along axis 0) → the rows to load, or None for the whole array
Chooser = Callable[[str, int], "list[int] | None"]


class ClipReader(ABC):
    """Where the arrays of a clip come from (a prepared root or a user's layout)."""

    @abstractmethod
    def has(self, clip_id: str, split: SplitName) -> bool:
        """Whether the clip's files exist (listing only; readability is checked when read)."""

    @abstractmethod
    def read(self, clip_id: str, split: SplitName, choose: Chooser) -> dict[str, np.ndarray]:
        """The clip's stored arrays by name (``audio``, ``frames``, …), frame-like ones cut to ``choose``."""


class PreparedReader(ClipReader):
    """Clips written by ``balancemm data prepare``: ``<root>/clips/<id>.npz``."""

    def __init__(self, root: Path) -> None:
        self.clips = root / CLIPS_DIR

    def path(self, clip_id: str) -> Path:
        return self.clips / f"{clip_id}.npz"

    def has(self, clip_id: str, split: SplitName) -> bool:
        return self.path(clip_id).is_file()

    def read(self, clip_id: str, split: SplitName, choose: Chooser) -> dict[str, np.ndarray]:
        path = self.path(clip_id)
        out = {}
        try:
            with np.load(path) as npz:
                for key in npz.files:
                    arr = npz[key]
                    rows = choose(key, arr.shape[0])
                    out[key] = arr if rows is None else arr[rows]
        except (OSError, ValueError, KeyError) as exc:
            raise DataError(f"{path}: unreadable prepared clip ({exc}); rerun `balancemm data prepare`") from None
        return out


class LayoutReader(ClipReader):
    """A user's OGM-GE / BalanceMM layout: ``audio_dir/<id>.<ext>`` and ``visual_dir/<id>/`` images
    (or ``visual_dir/<id>.hdf5`` with a ``video`` dataset of encoded frames, BalancedAV's release).

    ``{split}`` in a directory is replaced by ``train`` / ``test`` (VGGSound keeps them apart).
    ``profile`` turns ``.wav`` audio into the model's array when read; other formats are loaded as stored.
    """

    def __init__(self, root: Path, audio_dir: str, visual_dir: str, profile: Any | None) -> None:
        self.root, self.audio_dir, self.visual_dir, self.profile = root, audio_dir, visual_dir, profile
        self._audio: dict[tuple[str, str], Path] = {}

    def _dir(self, template: str, split: SplitName) -> Path:
        # The validation split is carved from train, so its files live where train's do.
        name = template.replace("{split}", "test" if split == "test" else "train")
        return self.root / name

    def audio_path(self, clip_id: str, split: SplitName) -> Path | None:
        key = (clip_id, split)
        if key not in self._audio:
            base = self._dir(self.audio_dir, split)
            found = next((base / f"{clip_id}{e}" for e in AUDIO_EXTENSIONS if (base / f"{clip_id}{e}").is_file()), None)
            if found is None:
                return None
            self._audio[key] = found
        return self._audio[key]

    def frame_source(self, clip_id: str, split: SplitName) -> Path:
        base = self._dir(self.visual_dir, split)
        h5 = base / f"{clip_id}.hdf5"
        return h5 if h5.is_file() else base / clip_id

    def has(self, clip_id: str, split: SplitName) -> bool:
        if self.audio_path(clip_id, split) is None:
            return False
        # A directory test only: listing every clip's folder would make opening a 200k-clip
        # layout slow; an empty folder is reported by name when the clip is read.
        return self.frame_source(clip_id, split).exists()

    def read(self, clip_id: str, split: SplitName, choose: Chooser) -> dict[str, np.ndarray]:
        path = self.audio_path(clip_id, split)
        if path is None:
            raise DataError(f"{self._dir(self.audio_dir, split)}: no audio file for clip {clip_id}")
        if path.suffix == ".wav":
            if self.profile is None:
                raise DataError(f"{path}: .wav audio needs an audio profile; set data.profile")
            audio = self.profile(decode_audio(path, self.profile.sample_rate))
        else:
            audio = load_array(path)
        src = self.frame_source(clip_id, split)
        if src.suffix == ".hdf5":
            import h5py

            try:
                with h5py.File(src, "r") as f:
                    video = f["video"]
                    frames = [
                        decode_image(bytes(video[i]), name=str(src)) for i in rows_of(choose, "frames", len(video))
                    ]
            except (OSError, KeyError) as exc:
                raise DataError(f"{src}: unreadable frames file ({exc})") from None
        else:
            files = image_files(src)
            if not files:
                raise DataError(f"{src}: no frame images (.jpg/.png) for clip {clip_id}")
            frames = [decode_image(files[i]) for i in rows_of(choose, "frames", len(files))]
        return {"audio": audio, "frames": np.stack(frames)}


def rows_of(choose: Chooser, key: str, n: int) -> list[int]:
    """The rows of the stored array ``key`` (length n) that ``choose`` picks; every row when it picks none."""
    rows = choose(key, n)
    return list(range(n)) if rows is None else rows


def image_files(folder: Path) -> list[Path]:
    """A clip's frame images, sorted by name (never in the filesystem's listing order)."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)


def load_array(path: Path) -> np.ndarray:
    """A stored spectrogram as float32 ``[F, T]`` (a leading singleton axis is dropped)."""
    try:
        if path.suffix == ".npy":
            arr = np.load(path)
        elif path.suffix == ".pt":
            arr = torch.load(path, map_location="cpu", weights_only=True).numpy()
        else:  # .pkl: PMR's and BalancedAV's spectrograms; pickles only from the user's own data
            with open(path, "rb") as f:
                arr = np.asarray(pickle.load(f))
    except Exception as exc:  # any failure to read a user's file is reported the same way
        raise DataError(f"{path}: unreadable audio array ({type(exc).__name__}: {exc})") from None
    arr = np.asarray(arr, dtype=np.float32)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise DataError(f"{path}: expected a 2-D spectrogram, got shape {arr.shape}")
    return arr


class ClipSplit(Split):
    """One split of clips read through a :class:`ClipReader` and turned into model inputs by its dataset
    (:meth:`ClipDataset.choose` picks frames, :meth:`ClipDataset.to_inputs` makes the tensors)."""

    def __init__(self, clips: Sequence[Clip], reader: ClipReader, name: SplitName, dataset: ClipDataset) -> None:
        self.clips = list(clips)
        self.reader, self.name, self.dataset = reader, name, dataset
        self.modalities = dataset.modalities
        self.labels = torch.tensor([c.label for c in self.clips], dtype=torch.long)
        self.augments = name == "train"

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.load(i, None)

    def load(self, i: int, seed: int | None) -> dict[str, Any]:
        rng = np.random.default_rng(seed) if seed is not None else None
        clip = self.clips[i]
        arrays = self.reader.read(clip.id, self.name, lambda key, n: self.dataset.choose(key, n, rng))
        return {"inputs": self.dataset.to_inputs(arrays, rng), "label": clip.label, "index": i}


@dataclass(frozen=True)
class Listing:
    """What a dataset root holds: labelled clips per official split, before files are checked."""

    splits: dict[str, list[Clip]]  # "train", "test" and optionally "val"
    classes: tuple[str, ...]
    source: str  # where the split comes from, in words (recorded in every run)
    official: bool  # the split the literature reports on (not a seeded one of ours)


class ClipDataset(MultimodalDataset):
    """Base of the datasets read clip by clip (audio-visual, RGB + flow, image + text).

    Subclasses declare ``MODALITIES``, the published split sizes, ``list_clips`` (the labelled clips of
    each split), ``files_reader`` (the user-layout reader), ``to_inputs`` (stored arrays → tensors)
    and, for frame-like arrays, ``choose``. This class does the rest: prepared or files layout,
    profile check, missing-file accounting, the validation carve-out, ``describe`` and the
    comparability verdict of ``balancemm data check``.

    Options every subclass has: ``root``, ``layout``, ``profile``, ``val_fraction``, ``seed``.
    """

    MODALITIES: ClassVar[tuple[str, ...]]
    PUBLISHED: ClassVar[dict[str, int]]  # split sizes of the comparison literature
    PUBLISHED_SOURCE: ClassVar[str]
    PROFILE_KIND: ClassVar[str] = "audio profile"  # what ``data.profile`` names, for messages

    @classmethod
    def locate(cls, options: Any) -> tuple[Path, str, dict[str, Any]]:
        """``data.root`` checked without listing or reading a clip: the root, its layout (``prepared`` or
        ``files``) and, if prepared, its manifest, which must be this dataset's under ``data.profile``.
        Cheap, so a sweep checks every root this way before it starts a job."""
        root = open_root(
            options.root,
            f"prepare the data with `balancemm data prepare {cls.name} --raw DIR --out DIR` and pass "
            "--set data.root=DIR (or point it at the layout you already have)",
        )
        layout = options.layout
        if layout == "auto":
            layout = "prepared" if (root / MANIFEST).is_file() else "files"
        manifest: dict[str, Any] = {}
        if layout == "prepared":
            manifest = read_manifest(root, cls.name)
            profile = manifest["profile"]["name"]
            if options.profile != profile:
                raise DataError(
                    f"{root} was prepared with {cls.PROFILE_KIND} {profile!r}, but data.profile is "
                    f"{options.profile!r}; prepare again with --profile {options.profile} into another --out"
                )
        return root, layout, manifest

    def __init__(self, options: Any) -> None:
        self.options = options
        self.root, self.layout, self.manifest = self.locate(options)
        self.modalities = self.MODALITIES
        if self.layout == "prepared":
            self.profile_params: dict[str, Any] = self.manifest["profile"]
            reader: ClipReader = PreparedReader(self.root)
        else:
            reader, self.profile_params = self.files_reader()
        listing = self.list_clips()
        self.class_names = listing.classes
        self.num_classes = len(listing.classes)
        self.split_source, self.official_split = listing.source, listing.official
        self.missing: dict[str, list[str]] = {}
        self.listed = {name: len(clips) for name, clips in listing.splits.items()}
        kept: dict[str, list[Clip]] = {}
        for name, clips in listing.splits.items():
            kept[name] = [c for c in clips if reader.has(c.id, _split_of(name))]
            have = {c.id for c in kept[name]}
            self.missing[name] = [c.id for c in clips if c.id not in have]
        if "val" not in kept:  # a seeded carve-out of train, never of test
            kept["train"], kept["val"] = self.carve_val(kept["train"])
            self.missing["val"] = []
        for name in SPLITS:
            if not kept[name]:
                raise DataError(
                    f"{self.root}: no {name} clips found ({len(self.missing[name])} listed, none with their files); "
                    f"run `balancemm data check {self.name} --root {self.root}`"
                )
        self._splits = {name: ClipSplit(kept[name], reader, name, self) for name in SPLITS}
        first = self._splits["train"][0]["inputs"]
        self.input_shapes = {m: tuple(first[m].shape) for m in self.modalities}

    # -- what subclasses provide -------------------------------------------------------------

    @abstractmethod
    def list_clips(self) -> Listing:
        """The labelled clips of each split (prepared: from the manifest; files: from the user's lists)."""

    @abstractmethod
    def files_reader(self) -> tuple[ClipReader, dict[str, Any]]:
        """The reader of the user's own layout and the profile facts to record for it."""

    @abstractmethod
    def to_inputs(self, arrays: dict[str, np.ndarray], rng: np.random.Generator | None) -> dict[str, Tensor]:
        """A clip's stored arrays → ``{modality: tensor}``; ``rng`` None = evaluation (deterministic)."""

    def choose(self, key: str, n: int, rng: np.random.Generator | None) -> list[int] | None:
        """Rows of the stored array ``key`` (of length n) to load; None = all (not frame-like)."""
        return None

    def why_missing(self, clip_id: str) -> str:
        """Why a listed clip has no data: for prepared data, the reason ``data prepare`` recorded."""
        if not self.manifest:
            return "no files"
        failed, unmatched = self.manifest.get("failed", {}), self.manifest.get("unmatched", {})
        if clip_id in failed:
            return f"skipped by data prepare: {failed[clip_id]}"
        if clip_id in unmatched:
            return f"incomplete in the raw release: {unmatched[clip_id]}"
        return "not in the raw release that data prepare read"

    def carve_val(self, train: list[Clip]) -> tuple[list[Clip], list[Clip]]:
        """Stratified, seeded ``val_fraction`` of train (``data.seed``)."""
        labels = torch.tensor([c.label for c in train])
        g = torch.Generator().manual_seed(self.options.seed)
        keep, val = stratified_split(labels, (1 - self.options.val_fraction, self.options.val_fraction), g)
        return [train[i] for i in keep.tolist()], [train[i] for i in val.tolist()]

    # -- the dataset protocol ------------------------------------------------------------------

    def split(self, name: SplitName) -> Split:
        return self._splits[name]

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update(
            root=str(self.root),
            layout=self.layout,
            split_source=self.split_source,
            profile=self.profile_params,
            missing={k: len(v) for k, v in self.missing.items()},
        )
        if self.manifest:
            info["prepared"] = {k: v for k, v in self.manifest.items() if k in ("frames", "created", "software")}
        return info

    def comparability(self) -> tuple[bool, str]:
        """Whether results on this data can be set beside the literature's (``balancemm data check``)."""
        problems = []
        if not self.official_split:
            problems.append(f"the split is not the published one ({self.split_source})")
        elif any(self.listed.get(s) != n for s, n in self.PUBLISHED.items()):
            sizes = ", ".join(f"{s} {self.listed.get(s)} vs {n:,}" for s, n in self.PUBLISHED.items())
            problems.append(f"the split lists differ in size from the published ones ({sizes})")
        miss_test = len(self.missing["test"])
        if miss_test:
            problems.append(f"{miss_test} test clips are missing; published numbers use all of them")
        miss_train, listed_train = len(self.missing["train"]), self.listed["train"]
        if miss_train > 0.01 * listed_train:
            problems.append(f"{miss_train} of {listed_train} training clips are missing (over 1%)")
        if problems:
            return False, "; ".join(problems)
        if not self.PUBLISHED:
            return True, f"{self.PUBLISHED_SOURCE}, complete (no published sizes to compare the lists with)"
        return True, f"split and sizes match {self.PUBLISHED_SOURCE}"


class AVDataset(ClipDataset):
    """Audio + visual clips: ``audio [1, F, T]`` (a time window if the profile crops) and ``visual
    [frames, 3, size, size]`` (segment-rule frames, augmented in training, ImageNet-normalised)."""

    MODALITIES = MODALITIES

    def files_reader(self) -> tuple[ClipReader, dict[str, Any]]:
        opts = self.options
        profile = AUDIO_PROFILES.get(opts.profile)
        reader = LayoutReader(self.root, opts.audio_dir, opts.visual_dir, profile)
        params = profile.params() if profile is not None else {"name": opts.profile}
        params["note"] = f"files layout: arrays as stored in {opts.audio_dir}; .wav files go through this recipe"
        return reader, params

    def choose(self, key: str, n: int, rng: np.random.Generator | None) -> list[int] | None:
        return frame_indices(n, self.options.frames, rng) if key == "frames" else None

    @functools.cached_property
    def stored_audio(self) -> AudioProfile | None:
        """The recipe of prepared audio, which pads what ``data prepare`` stored compactly; None otherwise
        (a files layout's arrays are used as stored, its .wav files come out of the recipe complete)."""
        return profile_from_params(self.profile_params) if self.layout == "prepared" else None

    def to_inputs(self, arrays: dict[str, np.ndarray], rng: np.random.Generator | None) -> dict[str, Tensor]:
        audio = arrays["audio"]
        if self.stored_audio is not None:
            audio = self.stored_audio.complete(audio)
        crop = self.profile_params.get("crop")
        if crop is not None and audio.shape[-1] > crop:
            spare = audio.shape[-1] - crop
            start = int(rng.integers(0, spare + 1)) if rng is not None else spare // 2
            audio = audio[..., start : start + crop]
        return {
            "audio": torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32)).unsqueeze(0),
            "visual": frames_to_tensor(arrays["frames"], self.options.image_size, rng),
        }

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "frames": self.options.frames}


def _split_of(name: str) -> SplitName:
    return "test" if name == "test" else "train"


def open_root(root: str, hint: str) -> Path:
    """``data.root`` as a path, checked: set (else ``hint`` says how), a directory, not an unfinished prepare."""
    if not root:
        raise DataError(f"data.root is not set: {hint}")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(f"data.root {path} is not a directory")
    if (path / PARAMS).is_file() and not (path / MANIFEST).is_file():
        raise DataError(
            f"{path} is an unfinished prepare (no {MANIFEST}); rerun the same `balancemm data prepare` "
            "command to finish it"
        )
    return path


def read_manifest(root: Path, dataset: str) -> dict[str, Any]:
    path = root / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable manifest ({exc}); prepare the data again") from None
    if manifest.get("dataset") != dataset:
        raise DataError(f"{root} holds prepared {manifest.get('dataset')!r} data, not {dataset!r}")
    return manifest


def manifest_listing(manifest: Mapping[str, Any]) -> Listing:
    """The official splits a prepare recorded (``{split: [[id, label], ...]}``)."""
    splits = {name: [Clip(str(i), int(y)) for i, y in rows] for name, rows in manifest["splits"].items()}
    return Listing(splits, tuple(manifest["classes"]), manifest["split_source"], official=True)


def resolve(root: Path, path: str) -> Path:
    """A user path from the config: absolute, or relative to the dataset root."""
    p = Path(os.path.expanduser(path))
    return p if p.is_absolute() else root / p
