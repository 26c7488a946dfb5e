"""BalancedAV (Xia et al., 2023, "Balanced Audiovisual Dataset for Imbalance Analysis"), 30 classes.

Its authors release it pre-processed: a JSON file
``{"labels": [class names], "database": {key: {"subset": "training" | "testing", "label": name}}}``,
one pickled spectrogram ``<key>.pkl`` per clip and one ``<key>.hdf5`` whose dataset ``video`` holds
the clip's frames as encoded JPEG bytes. ``data prepare`` decodes those JPEGs once and stores the
spectrograms unchanged (audio profile ``released``: the release does not document its recipe).
Validation is a seeded carve-out of training (a ``validation`` subset, if present, is used instead).
3 frames are sampled per clip.

Deviation from BalanceMM: its loader (``balancemm/datasets/balance_dataset.py``) compares
``mode == 'training'`` while the mode is ``'train'``, so it never augments training frames; here
training frames are augmented like every other audio-visual dataset.

Files layout (the release as is): ``--set data.root=DIR``, with the JSON in ``DIR`` (``data.json``
names it when there are several), ``DIR/audio/<key>.pkl`` and ``DIR/visual/<key>.hdf5``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from balancemm.catalog.datasets import BalancedAVOptions
from balancemm.data.av import AVDataset, Clip, Listing, load_array, manifest_listing, resolve
from balancemm.data.media import decode_image
from balancemm.data.prepare import Preparer, RawClip, RawRelease
from balancemm.errors import DataError
from balancemm.registry import DATASETS

SUBSETS = {"training": "train", "validation": "val", "testing": "test"}
RELEASED = {
    "name": "released",
    "version": 1,
    "description": "the spectrograms shipped in BalancedAV's .pkl files, stored unchanged (recipe undocumented)",
}


def read_release_json(path: Path) -> tuple[dict[str, list[Clip]], list[str]]:
    try:
        data = json.loads(path.read_text())
        classes = [str(c) for c in data["labels"]]
        database: dict[str, Any] = data["database"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: not BalancedAV's JSON with 'labels' and 'database' ({exc})") from None
    splits: dict[str, list[Clip]] = {}
    for key in sorted(database):
        entry = database[key]
        split = SUBSETS.get(entry.get("subset", ""))
        if split is None or entry.get("label") not in classes:
            raise DataError(f"{path}: entry {key} has subset {entry.get('subset')!r} / label {entry.get('label')!r}")
        splits.setdefault(split, []).append(Clip(key, classes.index(entry["label"])))
    for s in ("train", "test"):
        splits.setdefault(s, [])
    return splits, classes


def find_json(root: Path, name: str) -> Path:
    if name:
        return resolve(root, name)
    found = [p for p in sorted(root.glob("*.json")) if p.name not in ("manifest.json", "prepare.json")]
    if len(found) != 1:
        what = "no" if not found else f"{len(found)}"
        raise DataError(f"{root}: {what} JSON files; name BalancedAV's JSON with --set data.json=FILE")
    return found[0]


class BalancedAVPreparer(Preparer):
    dataset = "balanced_av"
    default_profile = "released"
    layout = "BalancedAV's release: its JSON, <key>.pkl spectrograms and <key>.hdf5 frame files below --raw"

    def scan(self, raw: Path) -> RawRelease:
        splits, classes = read_release_json(find_json(raw, ""))
        pkls = {p.stem: p for p in sorted(raw.rglob("*.pkl"))}
        h5s = {p.stem: p for p in sorted(raw.rglob("*.hdf5"))}

        def locate(clip: Clip) -> RawClip | str:
            if clip.id not in pkls or clip.id not in h5s:
                return f"{raw}: no {clip.id}.{'pkl' if clip.id not in pkls else 'hdf5'} for listed clip"
            return RawClip(clip.id, clip.label, str(h5s[clip.id]), str(pkls[clip.id]))

        return RawRelease.from_listing(splits, classes, "official BalancedAV training/testing subsets", locate)

    def profile_params(self, name: str) -> dict[str, Any]:
        if name != "released":
            raise DataError(f"BalancedAV ships spectrograms, not audio: only --profile released applies, not {name!r}")
        return dict(RELEASED)

    def process(self, clip: RawClip, profile: str, short_side: int) -> dict[str, np.ndarray]:
        import h5py

        audio = load_array(Path(clip.audio))
        try:
            with h5py.File(clip.video, "r") as f:
                frames = [decode_image(bytes(b), short_side, name=clip.video) for b in f["video"]]
        except (OSError, KeyError) as exc:
            raise DataError(f"{clip.video}: unreadable frames file ({exc})") from None
        if not frames:
            raise DataError(f"{clip.video}: no frames in dataset 'video'")
        return {"audio": audio, "frames": np.stack(frames)}


@DATASETS.register("balanced_av")
class BalancedAV(AVDataset):
    Options = BalancedAVOptions
    name = "balanced_av"
    preparer = BalancedAVPreparer()
    PUBLISHED: ClassVar[dict[str, int]] = {}  # no split sizes are reported by the literature we compare with
    PUBLISHED_SOURCE = "the official training/testing subsets"

    def list_clips(self) -> Listing:
        if self.manifest:
            return manifest_listing(self.manifest)
        splits, classes = read_release_json(find_json(self.root, self.options.json))
        return Listing(splits, tuple(classes), "official BalancedAV training/testing subsets", official=True)
