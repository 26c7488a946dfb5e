"""CREMA-D (Cao et al., IEEE TAC 2014): 7,442 audio-visual clips of 91 actors, 6 emotions.

Release (github.com/CheyneyComputerScience/CREMA-D, git-lfs): ``AudioWAV/<id>.wav`` and
``VideoFlash/<id>.flv`` with ids ``<actor>_<sentence>_<emotion>_<level>``, e.g. ``1001_DFA_ANG_XX``;
the label is the emotion code. There is no official split (docs/datasets.md, "Splits"):

* ``split: csv`` (default): OGM-GE's ``train.csv`` / ``test.csv`` (6,698 / 744, random, all actors
  on both sides), which almost every paper uses; rows ``<id>,<EMO>``, other codes skipped as in OGM-GE.
* ``split: random``: a seeded stratified split, ``test_fraction`` of all clips (MLA-style; its numbers
  are not comparable with the OGM-GE split).
* ``split: speaker``: seeded and speaker-independent: whole actors go to test (and to validation),
  since the actor is in the file name.

Validation is a seeded carve-out of train (Relearning holds out 744 of 6,698, about our 10 %).
Frames: 1 (OGM-GE), 2 (MMPareto, Relearning, BalanceMM: the default) or 3 (PMR) of the 1-fps
frames. Audio profiles: ``kaldi_fbank`` (default: MMPareto, Relearning, BalanceMM's ``.pt``),
``ogmge_stft`` (OGM-GE's loader), ``pmr_spectrogram`` (PMR's pickles).

Files layout (OGM-GE / BalanceMM): ``<root>/AudioWAV/<id>.wav`` (or ``.pt``/``.pkl``/``.npy``
arrays), ``<root>/Image-01-FPS/<id>/*.jpg``; set ``data.audio_dir`` / ``data.visual_dir`` otherwise.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import ClassVar

import torch

from balancemm.catalog.datasets import CremadOptions
from balancemm.data.av import AVDataset, Clip, Listing, resolve
from balancemm.data.base import stratified_split
from balancemm.data.prepare import Preparer, RawClip, RawRelease
from balancemm.errors import DataError
from balancemm.registry import DATASETS

# OGM-GE's class order (its stat.csv), used by every paper of the lineage.
EMOTIONS = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")
CLIP_ID = re.compile(r"^(\d{4})_[A-Z]{3}_(NEU|HAP|SAD|FEA|DIS|ANG)_[A-Z]{2}$")


def label_of(clip_id: str) -> int | None:
    m = CLIP_ID.match(clip_id)
    return EMOTIONS.index(m.group(2)) if m else None


class CremadPreparer(Preparer):
    dataset = "cremad"
    default_profile = "kaldi_fbank"
    layout = "the CREMA-D release: AudioWAV/<id>.wav and VideoFlash/<id>.flv"

    def scan(self, raw: Path) -> RawRelease:
        audio_dir, video_dir = raw / "AudioWAV", raw / "VideoFlash"
        for d in (audio_dir, video_dir):
            if not d.is_dir():
                raise DataError(f"{raw}: no {d.name}/ folder; expected {self.layout}")
        wavs = {p.stem: p for p in audio_dir.glob("*.wav") if CLIP_ID.match(p.stem)}
        flvs = {p.stem: p for p in video_dir.glob("*.flv") if CLIP_ID.match(p.stem)}
        clips, unmatched = [], {}
        for clip_id in sorted(wavs.keys() | flvs.keys()):
            if clip_id not in flvs:
                unmatched[clip_id] = f"{wavs[clip_id]}: no VideoFlash/{clip_id}.flv"
            elif clip_id not in wavs:
                unmatched[clip_id] = f"{flvs[clip_id]}: no AudioWAV/{clip_id}.wav"
            else:
                label = label_of(clip_id)
                assert label is not None
                clips.append(RawClip(clip_id, label, str(flvs[clip_id]), str(wavs[clip_id])))
        return RawRelease(clips, list(EMOTIONS), {}, "none (CREMA-D has no official split)", unmatched)


@DATASETS.register("cremad")
class Cremad(AVDataset):
    Options = CremadOptions
    name = "cremad"
    preparer = CremadPreparer()
    PUBLISHED: ClassVar[dict[str, int]] = {"train": 6698, "test": 744}
    PUBLISHED_SOURCE = "OGM-GE's train.csv / test.csv (6,698 / 744)"

    def list_clips(self) -> Listing:
        opts = self.options
        if opts.split == "csv":
            splits = {
                s: self._read_csv(resolve(self.root, p))
                for s, p in (("train", opts.train_csv), ("test", opts.test_csv))
            }
            return Listing(splits, EMOTIONS, f"OGM-GE CSV files ({opts.train_csv}, {opts.test_csv})", official=True)
        clips = self._all_clips()
        g = torch.Generator().manual_seed(opts.seed)
        if opts.split == "random":
            labels = torch.tensor([c.label for c in clips])
            train, test = stratified_split(labels, (1 - opts.test_fraction, opts.test_fraction), g)
            splits = {"train": [clips[i] for i in train.tolist()], "test": [clips[i] for i in test.tolist()]}
            source = f"seeded stratified random split (seed {opts.seed}, test {opts.test_fraction:.0%})"
            return Listing(splits, EMOTIONS, source, official=False)
        # Speaker-independent: actors, not clips, are drawn; validation actors come from the training ones.
        actors = sorted({c.id[:4] for c in clips})
        order = [actors[i] for i in torch.randperm(len(actors), generator=g).tolist()]
        n_test = max(1, round(opts.test_fraction * len(actors)))
        n_val = max(1, round(opts.val_fraction * (len(actors) - n_test)))
        test_actors, val_actors = set(order[:n_test]), set(order[n_test : n_test + n_val])
        splits = {
            "train": [c for c in clips if c.id[:4] not in test_actors | val_actors],
            "val": [c for c in clips if c.id[:4] in val_actors],
            "test": [c for c in clips if c.id[:4] in test_actors],
        }
        source = f"seeded speaker-independent split (seed {opts.seed}: {n_test} test, {n_val} validation actors)"
        return Listing(splits, EMOTIONS, source, official=False)

    def _all_clips(self) -> list[Clip]:
        if self.manifest:
            return [Clip(i, int(y)) for i, y in self.manifest["clips"]]
        folder = resolve(self.root, self.options.audio_dir)
        if not folder.is_dir():
            raise DataError(f"{folder}: no such folder; set data.audio_dir to the folder of per-clip audio files")
        ids = sorted({p.stem for p in folder.iterdir() if label_of(p.stem) is not None})
        return [Clip(i, label_of(i) or 0) for i in ids]

    @staticmethod
    def _read_csv(path: Path) -> list[Clip]:
        if not path.is_file():
            raise DataError(
                f"{path}: no such split file; put OGM-GE's train.csv/test.csv there, pass --set "
                "data.train_csv=PATH data.test_csv=PATH, or use --set data.split=random (or speaker)"
            )
        clips = []
        with open(path, encoding="utf-8-sig", newline="") as f:  # OGM-GE's files carry a BOM and CRLF
            for row in csv.reader(f):
                if len(row) >= 2 and row[1].strip() in EMOTIONS:
                    clips.append(Clip(row[0].strip(), EMOTIONS.index(row[1].strip())))
        if not clips:
            raise DataError(f"{path}: no '<clip>,<EMO>' rows with EMO in {', '.join(EMOTIONS)}")
        return clips
