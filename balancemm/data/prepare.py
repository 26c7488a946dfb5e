"""``balancemm data prepare``: a raw release → model-ready arrays, restartable and parallel.

Each dataset attaches a :class:`Preparer` that reads its release (which clips, which labels, which
official split) and turns one clip into arrays. This module runs it over every clip:

* **one file per clip**, ``<out>/clips/<id>.npz`` (``audio`` float32, ``frames`` uint8), written to a
  temporary name and renamed, so a killed prepare never leaves a half-written clip that later loads;
* **no larger than the source**: frames are shrunk to the frame size but never enlarged, and audio
  profiles that pad (``kaldi_fbank``) store only the clip's own frames; the loader resizes and pads, so
  the tensors a model sees are the same as from full-size arrays, at a fraction of the disk;
* **restartable**: clips whose file exists are skipped; ``prepare.json`` pins the parameters, so a
  restart with another profile is refused instead of mixing two recipes in one folder;
* **parallel** over clips (spawned worker processes, one torch thread each), with a progress bar;
* **a corrupt or truncated file** is reported in one line naming it, and the others go on;
* ``manifest.json`` is written last, atomically: its presence means "finished". It records the
  profile with all its parameters, the frame settings, the classes, the official split, what failed
  and the software versions, and it is what the loaders and every run's summary read.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np

from balancemm.data.av import CLIPS_DIR, MANIFEST, PARAMS
from balancemm.data.media import decode_audio, decode_frames
from balancemm.data.profiles import audio_profile
from balancemm.errors import DataError
from balancemm.files import PARTIAL, atomic_file, write_atomic

FORMAT = "balancemm-prepared/2"  # 2: frames never enlarged, audio stored without the profile's padding
FRAME_RATE = 1.0  # frames per second kept from each video, the field's convention (OGM-GE's and PMR's scripts)
FRAMES_LAYOUT = "[T, H, W, 3] RGB, shorter side at most max_short_side (smaller sources as they are)"
AUDIO_LAYOUT = "the profile's output_shape, less the padding the loader adds back (AudioProfile.compact)"


@dataclass(frozen=True)
class RawClip:
    """One clip of a raw release: its media files and its label."""

    id: str
    label: int
    video: str  # the video file (frames, and the audio track unless ``audio`` is set)
    audio: str = ""  # a separate audio file (CREMA-D's AudioWAV/*.wav)


class Labelled(Protocol):
    """A listed clip: its id and label (``Clip``, or a ``RawClip`` a listing already located)."""

    @property
    def id(self) -> str: ...

    @property
    def label(self) -> int: ...


L = TypeVar("L", bound=Labelled)


@dataclass
class RawRelease:
    """What :meth:`Preparer.scan` found in a raw release."""

    clips: list[RawClip]
    classes: list[str]
    splits: dict[str, list[tuple[str, int]]]  # official split → (clip id, label), listed clips without media too
    split_source: str
    unmatched: dict[str, str] = field(default_factory=dict)  # listed clip → why it has no media

    @classmethod
    def from_listing(
        cls,
        listed: Mapping[str, Sequence[L]],
        classes: list[str],
        split_source: str,
        locate: Callable[[L], RawClip | str],
    ) -> RawRelease:
        """The release of the official lists ``listed`` (split → clips): each clip once (the first
        listing wins), as ``locate`` finds its media, or under ``unmatched`` with the reason it gives."""
        clips, unmatched, seen = [], {}, set()
        for clip in (c for rows in listed.values() for c in rows):
            if clip.id in seen:
                continue
            seen.add(clip.id)
            found = locate(clip)
            if isinstance(found, str):
                unmatched[clip.id] = found
            else:
                clips.append(found)
        splits = {s: [(c.id, c.label) for c in rows] for s, rows in listed.items()}
        return cls(clips, classes, splits, split_source, unmatched)


class ReleasePreparer(ABC):
    """How one dataset's raw release becomes model-ready data. Attached to the dataset class as
    ``preparer``; instances travel to worker processes, so they hold only plain settings."""

    dataset: str
    default_profile: str
    layout: str  # the raw layout, in words, for error messages and the docs

    def configure(self, options: dict[str, str]) -> ReleasePreparer:
        """A copy set up with ``--option KEY=VALUE`` pairs (e.g. a tokenizer folder); none by default."""
        if options:
            raise DataError(f"data prepare {self.dataset} takes no --option (got {', '.join(sorted(options))})")
        return self

    @abstractmethod
    def prepare_all(
        self, raw: Path, out: Path, *, profile: str, frame_size: int, workers: int, progress: bool
    ) -> dict[str, Any]:
        """Write ``out`` (restartably, manifest last) and return the manifest."""


class Preparer(ReleasePreparer):
    """A release of clips, prepared clip by clip: ``scan`` lists them, ``process`` turns one into arrays."""

    @abstractmethod
    def scan(self, raw: Path) -> RawRelease:
        """List the release's clips; a missing file or folder of the layout is a DataError."""

    def profile_params(self, name: str) -> dict[str, Any]:
        return audio_profile(name).params()

    def storage(self, frame_size: int) -> dict[str, Any]:
        """What each stored array holds, for the manifest (audio-visual clips by default)."""
        return {
            "frames": {"fps": FRAME_RATE, "max_short_side": frame_size, "dtype": "uint8", "layout": FRAMES_LAYOUT},
            "audio": {"dtype": "float32", "layout": AUDIO_LAYOUT},
        }

    def process(self, clip: RawClip, profile: str, short_side: int) -> dict[str, np.ndarray]:
        """``{"audio": float32, "frames": [T, H, W, 3] uint8}`` for one clip: the profile's compact array
        and the frames with their shorter side at most ``short_side``."""
        recipe = audio_profile(profile)
        wave = decode_audio(clip.audio or clip.video, recipe.sample_rate)
        frames = decode_frames(clip.video, FRAME_RATE, short_side)
        return {"audio": recipe.compact(wave), "frames": frames}

    def prepare_all(
        self, raw: Path, out: Path, *, profile: str, frame_size: int, workers: int, progress: bool
    ) -> dict[str, Any]:
        params = {
            "format": FORMAT,
            "dataset": self.dataset,
            "profile": self.profile_params(profile),
            **self.storage(frame_size),
        }
        release = self.scan(raw)  # before touching --out: a wrong --raw leaves nothing behind
        if not release.clips:
            raise DataError(f"{raw}: no clips found; expected {self.layout}")
        claim(out, params)
        clips_dir = out / CLIPS_DIR
        for stale in clips_dir.glob(f"*{PARTIAL}*"):  # left by a killed run
            stale.unlink()
        todo = [c for c in release.clips if not (clips_dir / f"{c.id}.npz").is_file()]
        failed = _run(self, todo, profile, frame_size, clips_dir, workers, progress)
        done = {c.id for c in release.clips if (clips_dir / f"{c.id}.npz").is_file()}
        labels = {c.id: c.label for c in release.clips}
        manifest = {
            **params,
            "raw": str(raw),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "software": versions(),
            "classes": release.classes,
            "clips": [[i, labels[i]] for i in sorted(done)],
            "split_source": release.split_source,
            "splits": {s: [list(row) for row in rows] for s, rows in release.splits.items()},
            "failed": dict(sorted(failed.items())),
            "unmatched": dict(sorted(release.unmatched.items())),
        }
        write_json(out / MANIFEST, manifest)
        return manifest


def prepare(
    dataset: str,
    raw: str | Path,
    out: str | Path,
    *,
    profile: str | None = None,
    frame_size: int = 224,
    workers: int = 1,
    progress: bool = True,
    options: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Prepare ``dataset`` from ``raw`` into ``out``; returns the manifest.

    Args:
        profile: audio profile name (default: the dataset's).
        frame_size: the largest shorter side, in pixels, of the stored frames (smaller frames are stored as
            they are; the loader crops and resizes to the model's input).
        workers: processes decoding clips in parallel (1: in this process).
        options: dataset-specific settings (``--option KEY=VALUE``), see :meth:`Preparer.configure`.
    """
    # The registry, not the data package that imports this module: every dataset registered itself when
    # that package was imported, which importing this module did first.
    from balancemm.registry import DATASETS

    cls = DATASETS.get(dataset)
    preparer: ReleasePreparer | None = getattr(cls, "preparer", None)
    if preparer is None:
        raise DataError(f"dataset {dataset} has nothing to prepare (it needs no raw files)")
    preparer = preparer.configure(dict(options or {}))
    raw, out = Path(raw).expanduser().resolve(), Path(out).expanduser().resolve()
    if not raw.is_dir():
        raise DataError(f"--raw {raw} is not a directory; expected {preparer.layout}")
    if out == raw:
        raise DataError("--out must differ from --raw")
    return preparer.prepare_all(
        raw, out, profile=profile or preparer.default_profile, frame_size=frame_size, workers=workers, progress=progress
    )


def claim(out: Path, params: dict[str, Any]) -> None:
    """Create ``out`` or check that it holds a prepare with the same parameters (a restart)."""
    pinned = out / PARAMS
    if pinned.is_file():
        before = json.loads(pinned.read_text())
        if before != params:
            diff = sorted(k for k in params if before.get(k) != params[k])
            raise DataError(
                f"{out} holds a prepare with different {', '.join(diff)} ({pinned}); "
                "choose another --out, or delete that folder to start over"
            )
        return
    if out.exists() and any(out.iterdir()):
        raise DataError(f"--out {out} is not empty and holds no prepare; choose an empty or new folder")
    (out / CLIPS_DIR).mkdir(parents=True, exist_ok=True)
    write_json(pinned, params)


def _run(
    preparer: Preparer,
    todo: list[RawClip],
    profile: str,
    frame_size: int,
    clips_dir: Path,
    workers: int,
    progress: bool,
) -> dict[str, str]:
    from tqdm import tqdm

    failed: dict[str, str] = {}
    bar = tqdm(total=len(todo), desc=f"prepare {preparer.dataset}", unit="clip", disable=not progress, file=sys.stderr)

    def report(clip_id: str, error: str | None) -> None:
        bar.update(1)
        if error is not None:
            failed[clip_id] = error
            tqdm.write(f"skipped {error}", file=sys.stderr)

    if workers <= 1:
        for clip in todo:
            report(*prepare_clip(preparer, clip, profile, frame_size, clips_dir))
    else:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker) as pool:
            futures = [pool.submit(prepare_clip, preparer, c, profile, frame_size, clips_dir) for c in todo]
            for fut in as_completed(futures):
                report(*fut.result())
    bar.close()
    return failed


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)  # the parallelism is across clips
    try:  # OpenCV (optical flow) has its own thread pool
        import cv2

        cv2.setNumThreads(1)
    except ImportError:
        pass


def prepare_clip(
    preparer: Preparer, clip: RawClip, profile: str, frame_size: int, clips_dir: Path
) -> tuple[str, str | None]:
    """Write one clip atomically; returns ``(id, None)`` or ``(id, "<file>: <reason>")``."""
    try:
        arrays = preparer.process(clip, profile, frame_size)
    except DataError as exc:
        return clip.id, str(exc)
    named: dict[str, Any] = dict(arrays)  # the arrays' names become the npz keys
    with atomic_file(clips_dir / f"{clip.id}.npz") as f:
        np.savez(f, **named)
    return clip.id, None


def write_json(path: Path, data: Any) -> None:
    write_atomic(path, (json.dumps(data, indent=1) + "\n").encode())


def versions() -> dict[str, str]:
    import torch

    from balancemm import __version__

    out = {"balancemm": __version__, "python": platform.python_version(), "numpy": np.__version__}
    out["torch"] = torch.__version__
    for mod in ("av", "PIL", "scipy", "h5py"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            continue
    return out
