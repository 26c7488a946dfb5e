"""VGGSound (Chen et al., ICASSP 2020): 10 s YouTube clips of 309 audible classes.

The official ``vggsound.csv`` has rows ``<youtube_id>,<start_seconds>,<label>,<train|test>``; the
clip id here is ``<youtube_id>_<start>`` as written in the CSV (BalanceMM's folder names). Whatever
is still on YouTube is what a user has, so ``data check`` reports how many listed clips are missing.
Validation is a seeded carve-out of train. Classes are indexed in sorted order (BalanceMM indexes
them by first appearance in the CSV: the indices differ, the accuracies do not).

Raw layout for ``data prepare``: ``vggsound.csv`` at the top of ``--raw`` and one video per clip
anywhere below it, named ``<youtube_id>_<start>.mp4`` or with the start zero-padded to 6 digits
(the usual downloaders' ``<id>_000030.mp4``). Audio: ``vggsound_stft`` (OGM-GE: 16 kHz, 10 s,
STFT 256/128, a 5 s window per sample). 3 frames of the 1-fps frames.

Files layout (BalanceMM): ``<root>/vggsound.csv``, ``<root>/audio/{train,test}/<id>.npy`` and
``<root>/video/{train,test}/<id>/*.jpg`` (``data.audio_dir`` / ``data.visual_dir`` with ``{split}``).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import ClassVar

from balancemm.catalog.datasets import VGGSoundOptions
from balancemm.data.av import AVDataset, Clip, Listing, manifest_listing, resolve
from balancemm.data.kinetics_sounds import index_videos
from balancemm.data.prepare import Preparer, RawClip, RawRelease
from balancemm.errors import DataError
from balancemm.registry import DATASETS


def read_csv(path: Path) -> tuple[dict[str, list[tuple[str, str]]], list[str], dict[str, str]]:
    """``({split: [(clip id, class name)]}, sorted classes, {clip id: start as written})``."""
    if not path.is_file():
        raise DataError(f"{path}: no such file; VGGSound needs its official vggsound.csv")
    rows: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
    starts: dict[str, str] = {}
    with open(path, encoding="utf-8", newline="") as f:
        for n, row in enumerate(csv.reader(f), 1):
            if len(row) < 4 or row[3].strip() not in rows:
                if n == 1:
                    continue  # a header line
                raise DataError(f"{path}:{n}: expected '<youtube_id>,<start>,<label>,<train|test>', got {row}")
            ytid, start, label, split = (x.strip() for x in row[:4])
            clip_id = f"{ytid}_{start}"
            rows[split].append((clip_id, label))
            starts[clip_id] = start
    classes = sorted({label for split in rows.values() for _, label in split})
    return rows, classes, starts


class VGGSoundPreparer(Preparer):
    dataset = "vggsound"
    default_profile = "vggsound_stft"
    layout = "vggsound.csv and one <youtube_id>_<start>.mp4 per clip below --raw"

    def scan(self, raw: Path) -> RawRelease:
        rows, classes, starts = read_csv(raw / "vggsound.csv")
        videos = index_videos(raw)

        def locate(clip: Clip) -> RawClip | str:
            ytid = clip.id[: -len(starts[clip.id]) - 1]
            stems = (clip.id, f"{ytid}_{int(starts[clip.id]):06d}")
            path = next((videos[s] for s in stems if s in videos), None)
            return (
                f"{raw}: no video file for listed clip {clip.id}"
                if path is None
                else RawClip(clip.id, clip.label, str(path))
            )

        listed = {s: [Clip(i, classes.index(y)) for i, y in r] for s, r in rows.items()}
        return RawRelease.from_listing(listed, classes, "official vggsound.csv train/test", locate)


@DATASETS.register("vggsound")
class VGGSound(AVDataset):
    Options = VGGSoundOptions
    name = "vggsound"
    preparer = VGGSoundPreparer()
    # The official CSV lists 183,730 train / 15,446 test clips (the full release, before link rot).
    PUBLISHED: ClassVar[dict[str, int]] = {"train": 183730, "test": 15446}
    PUBLISHED_SOURCE = "the official vggsound.csv (183,730 / 15,446)"

    def list_clips(self) -> Listing:
        if self.manifest:
            return manifest_listing(self.manifest)
        rows, classes, _ = read_csv(resolve(self.root, self.options.csv))
        splits = {s: [Clip(i, classes.index(y)) for i, y in r] for s, r in rows.items()}
        return Listing(splits, tuple(classes), f"official {self.options.csv} train/test", official=True)
