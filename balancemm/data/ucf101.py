"""UCF-101 (Soomro, Zamir & Shah, arXiv:1212.0402, 2012): 13,320 YouTube clips of 101 actions, as RGB
frames + optical flow (BalanceMM's and the Valuate paper's two "modalities").

**Release** (crcv.ucf.edu): ``UCF101.rar`` → ``UCF-101/<Class>/v_<Class>_gXX_cYY.avi`` (320 × 240, 25 fps,
1–71 s, 7.2 s on average) and ``UCF101TrainTestSplits-RecognitionTask.zip`` →
``ucfTrainTestlist/`` with ``classInd.txt`` (``1 ApplyEyeMakeup``), ``trainlist0N.txt``
(``ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1``) and ``testlist0N.txt`` (no label) for N = 1, 2, 3.
The clip id is the file stem. Labels are classInd's numbers minus one, taken from the list line's class
folder (the file names do not always spell the class as classInd does: ``v_HandStandPushups_…`` is
filed under ``HandstandPushups``).

**Splits.** Three official splits (``data.split_index``, default 1, the one papers report): 9,537 / 3,783,
9,586 / 3,734 and 9,624 / 3,696 clips. ``data prepare`` stores all three in the manifest. The clips come
in 25 groups (``gXX``: same actor and background), and each official split keeps groups apart between
train and test (split 1 tests on groups 1–7). A validation split carved clip by clip would share
groups with training and overrate every model, so it is carved **by group**: ``val_fraction`` of the
training groups (at least one), drawn with ``data.seed``, go to validation for every class.

**Prepare** (``data prepare ucf101 --raw DIR``; ``--profile tvl1`` (default) or ``farneback``): the video
is decoded at its native rate (PyAV) and the frames of the 1-fps rule of
:func:`balancemm.data.media.decode_frames` are kept (about 7 per clip, as the ~6-frame RGB folders of
BalanceMM), shorter side ``--frame-size``, stored as ``frames`` uint8 ``[T, H, W, 3]``. For each kept
frame the flow towards the next decoded frame (1/25 s later) is computed at the stored size with the
profile's recipe (:mod:`balancemm.data.flow`) and stored as ``flow`` uint8 ``[T, H, W, 2]``, quantised
as dense_flow does (±20 px). The video's very last frame has no successor and is never kept. TV-L1
costs about a second per frame pair at 224 px (UCF-101 has about 100,000 pairs: a day of one core),
Farnebäck about 40 times less; ``--workers`` spreads the clips over cores.

**Files layout** (``data.root`` without a manifest; the pre-extracted folders in circulation, BalanceMM's
``visual_path`` / ``flow_path_u`` / ``flow_path_v``): ``<root>/rgb/<clip>/*.jpg`` and
``<root>/flow/u/<clip>/*.jpg``, ``<root>/flow/v/<clip>/*.jpg`` (greyscale, quantised with some bound)
plus ``<root>/ucfTrainTestlist/``; images are sorted by name. Options ``visual_dir``, ``flow_u_dir``,
``flow_v_dir``, ``lists_dir``. The profile is recorded as ``as_stored``: the tool that made the flow is
not known.

**Loader**: ``visual`` ``[frames, 3, S, S]`` exactly as the audio-visual datasets
(:func:`balancemm.data.transforms.frames_to_tensor`: segment rule, random resized crop + flip in
training, ImageNet normalisation); ``flow`` ``[flow_frames, 2, S, S]`` float flow / bound ∈ [−1, 1], its
frames drawn by the same segment rule independently of the RGB ones, and the same geometric
augmentation with a flip that negates u (:func:`balancemm.data.flow.flow_to_tensor`).

Deviations from BalanceMM (``balancemm/datasets/ucf101_dataset.py``):

* Classes are numbered as classInd.txt numbers them; BalanceMM sorts the names case-sensitively, which
  moves a few classes (``JumpRope`` before ``JumpingJack``): other class indices, same accuracies.
* RGB frames: the segment rule over all stored frames, with a random resized crop in training;
  BalanceMM assumes six files per folder (``frame_0000k.jpg``, test frames 1, 3, 5) and only resizes
  and flips.
* Flow: zero-centred flow / bound, and a flip that mirrors u and v together and negates u (see
  :mod:`balancemm.data.flow`); BalanceMM feeds [0, 1] greyscale and flips u and v independently.
* Validation is carved by group from train; BalanceMM validates (and selects models) on the test set.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from balancemm.catalog.datasets import Ucf101Options
from balancemm.data.av import Chooser, Clip, ClipDataset, ClipReader, Listing, image_files, resolve, rows_of
from balancemm.data.base import SplitName
from balancemm.data.flow import FLOW_BOUND, flow_profile, flow_to_tensor, frame_flow
from balancemm.data.kinetics_sounds import index_videos
from balancemm.data.media import decode_frame_pairs, decode_image
from balancemm.data.prepare import FRAME_RATE, FRAMES_LAYOUT, Preparer, RawClip, RawRelease
from balancemm.data.transforms import frame_indices, frames_to_tensor
from balancemm.errors import DataError
from balancemm.registry import DATASETS

VIDEOS_DIR = "UCF-101"
LISTS_DIR = Ucf101Options.lists_dir  # the official release's folder of split lists
SPLIT_SIZES = {1: (9537, 3783), 2: (9586, 3734), 3: (9624, 3696)}  # official (train, test) per split
GROUP = re.compile(r"_g(\d+)_c\d+$")  # v_<Class>_g08_c01


def group_of(clip_id: str) -> int:
    """The group number of a clip id ``v_<Class>_gXX_cYY``."""
    m = GROUP.search(clip_id)
    if m is None:
        raise DataError(f"clip {clip_id}: no _gXX_cYY group in its name; UCF-101's validation is carved by group")
    return int(m.group(1))


def read_class_index(path: Path) -> list[str]:
    """``classInd.txt`` (``<number> <Class>`` lines, numbered from 1) → class names in number order."""
    if not path.is_file():
        raise DataError(f"{path}: no such file; expected UCF-101's ucfTrainTestlist/classInd.txt")
    numbered = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or not parts[0].isdigit():
            raise DataError(f"{path}:{n}: expected '<number> <Class>', got {line!r}")
        numbered[int(parts[0])] = parts[1]
    if sorted(numbered) != list(range(1, len(numbered) + 1)):
        raise DataError(f"{path}: class numbers are not 1…{len(numbered)}")
    return [numbered[i] for i in range(1, len(numbered) + 1)]


def read_split_list(path: Path, classes: list[str]) -> list[Clip]:
    """``trainlist0N.txt`` (``Class/v_….avi <number>``) or ``testlist0N.txt`` (``Class/v_….avi``) → clips.

    The label comes from the class folder (exact, else case-insensitive); a number, where given, must agree.
    """
    if not path.is_file():
        raise DataError(f"{path}: no such split list; expected UCF-101's ucfTrainTestlist/")
    index = {c: i for i, c in enumerate(classes)}
    folded = {c.lower(): i for i, c in enumerate(classes)}
    clips = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        folder, _, name = parts[0].replace("\\", "/").rpartition("/")
        label = index.get(folder, folded.get(folder.lower()))
        if label is None or len(parts) > 2 or (len(parts) == 2 and parts[1] != str(label + 1)):
            raise DataError(
                f"{path}:{n}: expected '<Class>/<video>.avi [number]' with a class of classInd.txt, got {line!r}"
            )
        clips.append(Clip(Path(name).stem, label))
    return clips


def list_key(split: str, n: int) -> str:
    """The manifest's name of an official list: ``trainlist01``, ``testlist03``, …"""
    return f"{split}list{n:02d}"


def read_lists(folder: Path) -> tuple[list[str], dict[int, dict[str, list[Clip]]]]:
    """classInd.txt and every official split present in ``folder``: ``{N: {"train": …, "test": …}}``."""
    if not folder.is_dir():
        raise DataError(
            f"{folder}: no such folder; expected UCF-101's ucfTrainTestlist/ (classInd.txt, trainlist01.txt…)"
        )
    classes = read_class_index(folder / "classInd.txt")
    splits = {}
    for n in SPLIT_SIZES:
        files = {s: folder / f"{list_key(s, n)}.txt" for s in ("train", "test")}
        present = [p.is_file() for p in files.values()]
        if any(present) and not all(present):
            absent = next(p for p in files.values() if not p.is_file())
            raise DataError(f"{absent}: missing, while the other list of split {n} is there")
        if all(present):
            splits[n] = {s: read_split_list(p, classes) for s, p in files.items()}
    if not splits:
        raise DataError(f"{folder}: no trainlist0N.txt / testlist0N.txt pair")
    return classes, splits


class Ucf101Preparer(Preparer):
    dataset = "ucf101"
    default_profile = "tvl1"
    layout = "UCF-101/<Class>/v_<Class>_gXX_cYY.avi and ucfTrainTestlist/ (classInd.txt, trainlist0N / testlist0N)"

    def scan(self, raw: Path) -> RawRelease:
        videos_dir = raw / VIDEOS_DIR
        if not videos_dir.is_dir():
            raise DataError(f"{raw}: no {VIDEOS_DIR}/ folder; expected {self.layout}")
        classes, splits = read_lists(raw / LISTS_DIR)
        videos = index_videos(videos_dir)
        folded = {stem.lower(): p for stem, p in videos.items()}

        def locate(clip: Clip) -> RawClip | str:
            video = videos.get(clip.id, folded.get(clip.id.lower()))
            if video is None:
                return f"{videos_dir}: no video file for listed clip {clip.id}"
            return RawClip(clip.id, clip.label, str(video))

        listed = {list_key(s, n): lists[s] for n, lists in splits.items() for s in ("train", "test")}
        return RawRelease.from_listing(listed, classes, "official UCF-101 split lists", locate)

    def profile_params(self, name: str) -> dict[str, Any]:
        return flow_profile(name).params()

    def storage(self, frame_size: int) -> dict[str, Any]:
        frames = {"fps": FRAME_RATE, "max_short_side": frame_size, "dtype": "uint8", "layout": FRAMES_LAYOUT}
        flow = {"dtype": "uint8", "layout": "[T, H, W, 2] (u, v) to the next native frame", "bound": FLOW_BOUND}
        return {"frames": frames, "flow": flow}

    def process(self, clip: RawClip, profile: str, short_side: int) -> dict[str, np.ndarray]:
        """``{"frames": [T, H, W, 3] uint8, "flow": [T, H, W, 2] uint8}`` (flow from frame t to its successor)."""
        recipe = flow_profile(profile)
        frames, successors = decode_frame_pairs(clip.video, FRAME_RATE, short_side)
        flow = np.stack([frame_flow(a, b, recipe) for a, b in zip(frames, successors, strict=True)])
        return {"frames": frames, "flow": flow}


class FrameFolderReader(ClipReader):
    """Pre-extracted frames: ``<visual_dir>/<clip>/*.jpg`` RGB, ``<flow_u_dir>/<clip>/*.jpg`` and
    ``<flow_v_dir>/<clip>/*.jpg`` greyscale flow components, each sorted by name."""

    def __init__(self, visual: Path, flow_u: Path, flow_v: Path) -> None:
        self.visual, self.flow_u, self.flow_v = visual, flow_u, flow_v

    def has(self, clip_id: str, split: SplitName) -> bool:
        # Directory tests only; an empty folder is reported by name when the clip is read.
        return all((d / clip_id).is_dir() for d in (self.visual, self.flow_u, self.flow_v))

    def read(self, clip_id: str, split: SplitName, choose: Chooser) -> dict[str, np.ndarray]:
        rgb, u, v = (image_files(d / clip_id) for d in (self.visual, self.flow_u, self.flow_v))
        if not rgb or not u:
            raise DataError(f"{(self.visual if not rgb else self.flow_u) / clip_id}: no images for clip {clip_id}")
        if len(u) != len(v):
            raise DataError(f"{self.flow_u / clip_id}: {len(u)} u images but {len(v)} in {self.flow_v / clip_id}")
        rows = {key: rows_of(choose, key, n) for key, n in (("frames", len(rgb)), ("flow", len(u)))}
        try:
            frames = np.stack([decode_image(rgb[i]) for i in rows["frames"]])
            # The jpgs are greyscale: decode_image's RGB copy has three equal channels.
            flow = np.stack(
                [np.stack([decode_image(u[i])[..., 0], decode_image(v[i])[..., 0]], -1) for i in rows["flow"]]
            )
        except ValueError as exc:  # np.stack of images of different sizes
            raise DataError(f"{self.visual / clip_id}: images of different sizes ({exc})") from None
        return {"frames": frames, "flow": flow}


@DATASETS.register("ucf101")
class Ucf101(ClipDataset):
    """RGB frames ``visual [frames, 3, S, S]`` and optical flow ``flow [flow_frames, 2, S, S]``."""

    Options = Ucf101Options
    name = "ucf101"
    preparer = Ucf101Preparer()
    MODALITIES = ("flow", "visual")
    PROFILE_KIND = "flow profile"
    # The sizes depend on data.split_index (SPLIT_SIZES), so comparability() checks them itself.
    PUBLISHED: ClassVar[dict[str, int]] = {}
    PUBLISHED_SOURCE = "the official UCF-101 split lists"
    options: Ucf101Options
    val_groups: list[int]  # the training groups carve_val held out

    def list_clips(self) -> Listing:
        n = self.options.split_index
        source = f"official split {n} ({list_key('train', n)}.txt / {list_key('test', n)}.txt)"
        if self.manifest:
            rows = self.manifest["splits"]
            if list_key("train", n) not in rows:
                raise DataError(
                    f"{self.root} was prepared from a release without {list_key('train', n)}.txt; "
                    f"choose data.split_index from {sorted({int(k[-2:]) for k in rows})}"
                )
            splits = {s: [Clip(str(i), int(y)) for i, y in rows[list_key(s, n)]] for s in ("train", "test")}
            return Listing(splits, tuple(self.manifest["classes"]), source, official=True)
        classes, lists = read_lists(resolve(self.root, self.options.lists_dir))
        if n not in lists:
            raise DataError(f"{resolve(self.root, self.options.lists_dir)}: no {list_key('train', n)}.txt")
        return Listing(lists[n], tuple(classes), source, official=True)

    def files_reader(self) -> tuple[ClipReader, dict[str, Any]]:
        opts = self.options
        dirs = [resolve(self.root, d) for d in (opts.visual_dir, opts.flow_u_dir, opts.flow_v_dir)]
        for d, key in zip(dirs, ("visual_dir", "flow_u_dir", "flow_v_dir"), strict=True):
            if not d.is_dir():
                raise DataError(f"{d}: no such folder; set data.{key} to the folder of per-clip image folders")
        params = {
            "name": "as_stored",
            "note": f"flow jpgs as stored in {opts.flow_u_dir} / {opts.flow_v_dir}, quantised by an unknown tool "
            "(dense_flow's bound is 20 px); read as stored / 127.5 - 1",
        }
        return FrameFolderReader(*dirs), params

    def carve_val(self, train: list[Clip]) -> tuple[list[Clip], list[Clip]]:
        """Whole groups, seeded: ``val_fraction`` of the training groups (at least one, never all)."""
        groups = sorted({group_of(c.id) for c in train})
        if len(groups) < 2:
            raise DataError(f"{self.root}: the training clips come from {len(groups)} group; validation needs two")
        g = torch.Generator().manual_seed(self.options.seed)
        order = [groups[i] for i in torch.randperm(len(groups), generator=g).tolist()]
        n_val = min(len(groups) - 1, max(1, round(self.options.val_fraction * len(groups))))
        self.val_groups = sorted(order[:n_val])
        held = set(self.val_groups)
        return [c for c in train if group_of(c.id) not in held], [c for c in train if group_of(c.id) in held]

    def choose(self, key: str, n: int, rng: np.random.Generator | None) -> list[int] | None:
        counts = {"frames": self.options.frames, "flow": self.options.flow_frames}
        return frame_indices(n, counts[key], rng) if key in counts else None

    def to_inputs(self, arrays: dict[str, np.ndarray], rng: np.random.Generator | None) -> dict[str, Tensor]:
        size = self.options.image_size
        return {
            "flow": flow_to_tensor(arrays["flow"], size, rng),
            "visual": frames_to_tensor(arrays["frames"], size, rng),
        }

    def comparability(self) -> tuple[bool, str]:
        ok, why = super().comparability()  # the split's origin and the missing clips
        n = self.options.split_index
        train, test = SPLIT_SIZES[n]
        listed = (self.listed.get("train"), self.listed.get("test"))
        if listed == (train, test):
            return ok, why if not ok else f"official split {n}, sizes as published ({train:,} / {test:,})"
        problem = (
            f"the split lists differ in size from official split {n} "
            f"(train {listed[0]} vs {train:,}, test {listed[1]} vs {test:,})"
        )
        return False, problem if ok else f"{problem}; {why}"

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "frames": self.options.frames,
            "flow_frames": self.options.flow_frames,
            "split_index": self.options.split_index,
            "val_groups": self.val_groups,
        }
