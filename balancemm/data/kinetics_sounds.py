"""Kinetics-Sounds (Arandjelović & Zisserman, ICCV 2017): Kinetics-400 clips whose class is audible.

What is still downloadable gives 31 classes in the GeWu-Lab lineage (OGM-GE's lists below). The
split everyone uses is OGM-GE's ``my_train.txt`` / ``my_test.txt`` (14,799 / 2,597), lines
``<clip>,<frames>,<label>`` where the clip id is ``<youtube_id>_<start>_<end>`` (train) or
``<youtube_id>_<start>`` (test). Validation is a seeded carve-out of train (BML_TPAMI2024's
1,320-clip validation list is not public).

Raw layout for ``data prepare``: the two lists at the top of ``--raw`` and one video file per clip
anywhere below it, named ``<clip>.mp4`` (or .mkv/.webm/.avi/.flv). When videos sit in per-class
folders (the Kinetics downloaders' layout) those folder names become the class names; otherwise the
classes are named by index. 10 s clips → about 10 frames at 1 fps, 3 sampled; audio is the Kaldi
filterbank recipe of OGM-GE's KS script (``kaldi_fbank``, 1,024 × 128).

Files layout (BalanceMM): ``<root>/my_train.txt`` etc. (or lines ``name … label``, space
separated), ``<root>/audio/<clip>.npy`` and ``<root>/visual/<clip>/frame_*.jpg``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import ClassVar

from balancemm.catalog.datasets import KineticsSoundsOptions
from balancemm.data.av import AVDataset, Clip, Listing, manifest_listing, resolve
from balancemm.data.prepare import Preparer, RawClip, RawRelease
from balancemm.errors import DataError
from balancemm.registry import DATASETS

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".flv")


def read_list(path: Path) -> list[Clip]:
    """OGM-GE's ``<clip>,<frames>,<label>`` lines or BalanceMM's ``name … label`` (space separated)."""
    if not path.is_file():
        raise DataError(f"{path}: no such split list; Kinetics-Sounds needs OGM-GE's my_train.txt / my_test.txt")
    clips = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        parts = line.split(",") if "," in line else line.split()
        try:
            clips.append(Clip(parts[0].strip(), int(parts[-1])))
        except (ValueError, IndexError):
            raise DataError(f"{path}:{n}: expected '<clip>,<frames>,<label>', got {line!r}") from None
    return clips


def index_videos(raw: Path) -> dict[str, Path]:
    """Every video file below ``raw`` by file stem (sorted walk, so duplicates resolve the same way)."""
    found: dict[str, Path] = {}
    for p in sorted(raw.rglob("*")):
        if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file():
            found.setdefault(p.stem, p)
    return found


def class_names(raw: Path, clips: list[RawClip], n_classes: int) -> list[str]:
    """Per-class folder names when the videos are filed by class, else ``class_<i>``."""
    votes: dict[int, Counter[str]] = {}
    for c in clips:
        parent = Path(c.video).parent
        if parent != raw:
            votes.setdefault(c.label, Counter())[parent.name.replace("_", " ")] += 1
    names = [votes[i].most_common(1)[0][0] if i in votes else f"class_{i}" for i in range(n_classes)]
    return names if len(set(names)) == n_classes else [f"class_{i}" for i in range(n_classes)]


class KineticsSoundsPreparer(Preparer):
    dataset = "kinetics_sounds"
    default_profile = "kaldi_fbank"
    layout = "OGM-GE's my_train.txt / my_test.txt and one <clip>.mp4 per listed clip below --raw"

    def scan(self, raw: Path) -> RawRelease:
        listed = {"train": read_list(raw / "my_train.txt"), "test": read_list(raw / "my_test.txt")}
        videos = index_videos(raw)

        def locate(clip: Clip) -> RawClip | str:
            path = videos.get(clip.id)
            return (
                f"{raw}: no video file for listed clip {clip.id}"
                if path is None
                else RawClip(clip.id, clip.label, str(path))
            )

        release = RawRelease.from_listing(listed, [], "OGM-GE my_train.txt / my_test.txt", locate)
        n_classes = 1 + max(c.label for rows in listed.values() for c in rows)
        release.classes = class_names(raw, release.clips, n_classes)  # from where the matched videos are filed
        return release


@DATASETS.register("kinetics_sounds")
class KineticsSounds(AVDataset):
    Options = KineticsSoundsOptions
    name = "kinetics_sounds"
    preparer = KineticsSoundsPreparer()
    PUBLISHED: ClassVar[dict[str, int]] = {"train": 14799, "test": 2597}
    PUBLISHED_SOURCE = "OGM-GE's my_train.txt / my_test.txt (14,799 / 2,597)"

    def list_clips(self) -> Listing:
        if self.manifest:
            return manifest_listing(self.manifest)
        opts = self.options
        splits = {
            "train": read_list(resolve(self.root, opts.train_list)),
            "test": read_list(resolve(self.root, opts.test_list)),
        }
        n_classes = 1 + max(c.label for rows in splits.values() for c in rows)
        classes = tuple(f"class_{i}" for i in range(n_classes))
        return Listing(splits, classes, f"split lists {opts.train_list} / {opts.test_list}", official=True)
