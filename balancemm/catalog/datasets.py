"""Every built-in dataset's options (the ``data:`` section of a run config) and what it yields.

Each dataset is listed with its sorted modalities (known before any file is read, so a config is
checked against its encoders without loading data), whether it needs files (``balancemm data
prepare``) and a one-line description. The loaders in ``balancemm/data`` document each option.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from balancemm.registry import DATASET_OPTIONS
from balancemm.schema import rng


@dataclass(frozen=True)
class AVOptions:
    """Options every audio-visual dataset has; each dataset subclasses it to set its own defaults."""

    root: str = ""  # a prepared folder (manifest.json) or an OGM-GE/BalanceMM layout
    layout: Literal["auto", "prepared", "files"] = "auto"  # auto: prepared when root has manifest.json
    # The audio recipe (balancemm.data.profiles). Part of the run's identity: prepared data made with
    # another profile is refused, so two recipes never share a run id. In the files layout it names the
    # recipe of the stored arrays and turns .wav files into arrays.
    profile: str = "kaldi_fbank"
    audio_dir: str = "audio"  # files layout: <root>/<audio_dir>/<id>.{npy,pt,pkl,wav}; {split} → train|test
    visual_dir: str = "visual"  # files layout: <root>/<visual_dir>/<id>/*.jpg or <id>.hdf5
    frames: int = field(default=3, metadata=rng(ge=1, le=16))  # frames sampled per clip
    image_size: int = field(default=224, metadata=rng(ge=8))
    val_fraction: float = field(default=0.1, metadata=rng(gt=0, lt=0.5))  # carved from train when no official val
    seed: int = field(default=0, metadata=rng(ge=0))  # the validation carve-out (and seeded splits)


@dataclass(frozen=True)
class BalancedAVOptions(AVOptions):
    profile: str = "released"
    json: str = ""  # the release's JSON, relative to root; "" = the only *.json in root
    frames: int = field(default=3, metadata=rng(ge=1, le=16))


@dataclass(frozen=True)
class CmuMoseiOptions:
    root: str = ""  # a prepared folder, or the folder holding the MulT pickle
    # Which pickle: "unaligned" (BalanceMM's default) or "aligned" (word-aligned, 50 steps each).
    profile: Literal["unaligned", "aligned"] = "unaligned"
    zero: Literal["positive", "drop"] = "positive"  # samples scored 0: non-negative Acc-2, or left out
    max_len: int = field(default=0, metadata=rng(ge=0))  # keep the last max_len steps (0 = all)


@dataclass(frozen=True)
class CremadOptions(AVOptions):
    audio_dir: str = "AudioWAV"
    visual_dir: str = "Image-01-FPS"
    frames: int = field(default=2, metadata=rng(ge=1, le=3))
    split: Literal["csv", "random", "speaker"] = "csv"
    train_csv: str = "train.csv"  # relative to root, or absolute
    test_csv: str = "test.csv"
    test_fraction: float = field(default=0.1, metadata=rng(gt=0, lt=0.5))  # random / speaker splits


@dataclass(frozen=True)
class EmbeddedOptions:
    seed: int = field(default=0, metadata=rng(ge=0))  # builds the data and the splits
    audio_informativeness: float = field(default=0.5, metadata=rng(ge=0, le=1))
    visual_informativeness: float = field(default=0.5, metadata=rng(ge=0, le=1))
    text_informativeness: float = field(default=0.5, metadata=rng(ge=0, le=1))  # embedded3 only
    val_fraction: float = field(default=0.2, metadata=rng(gt=0, lt=0.5))
    test_fraction: float = field(default=0.2, metadata=rng(gt=0, lt=0.5))


@dataclass(frozen=True)
class Food101Options:
    root: str = ""  # a prepared folder (manifest.json) or the UPMC release itself
    layout: Literal["auto", "prepared", "files"] = "auto"  # auto: prepared when root has manifest.json
    # The tokenisation recipe; prepared data made with another one is refused.
    profile: Literal["bert_40"] = "bert_40"
    tokenizer: str = ""  # files layout: a local tokenizer folder (titles are tokenised when read)
    image_size: int = field(default=224, metadata=rng(ge=8))
    val_fraction: float = field(default=0.1, metadata=rng(gt=0, lt=0.5))  # carved from train
    seed: int = field(default=0, metadata=rng(ge=0))  # the validation carve-out


@dataclass(frozen=True)
class KineticsSoundsOptions(AVOptions):
    train_list: str = "my_train.txt"  # relative to root, or absolute (files layout)
    test_list: str = "my_test.txt"


@dataclass(frozen=True)
class Ucf101Options:
    root: str = ""  # a prepared folder (manifest.json) or pre-extracted frame/flow folders
    layout: Literal["auto", "prepared", "files"] = "auto"  # auto: prepared when root has manifest.json
    # The flow recipe (balancemm.data.flow); prepared data made with another one is refused.
    profile: Literal["tvl1", "farneback"] = "tvl1"
    split_index: int = field(default=1, metadata=rng(ge=1, le=3))  # official split 1, 2 or 3
    lists_dir: str = "ucfTrainTestlist"  # files layout: classInd.txt, trainlist0N.txt, testlist0N.txt
    visual_dir: str = "rgb"  # files layout: <root>/<visual_dir>/<clip>/*.jpg
    flow_u_dir: str = "flow/u"  # files layout: <root>/<flow_u_dir>/<clip>/*.jpg
    flow_v_dir: str = "flow/v"
    frames: int = field(default=3, metadata=rng(ge=1, le=16))  # RGB frames per clip
    flow_frames: int = field(default=3, metadata=rng(ge=1, le=16))  # flow fields per clip
    image_size: int = field(default=224, metadata=rng(ge=8))
    val_fraction: float = field(default=0.1, metadata=rng(gt=0, lt=0.5))  # of the training groups
    seed: int = field(default=0, metadata=rng(ge=0))  # which groups go to validation


@dataclass(frozen=True)
class VGGSoundOptions(AVOptions):
    profile: str = "vggsound_stft"
    audio_dir: str = "audio/{split}"
    visual_dir: str = "video/{split}"
    csv: str = "vggsound.csv"  # relative to root, or absolute (files layout)


# name, options, modalities (sorted), and how `balancemm list` shows it
DATASET_OPTIONS.register(
    "balanced_av",
    modalities=("audio", "visual"),
    needs_files=True,
    description="BalancedAV: audio + visual, 30 classes",
)(BalancedAVOptions)
DATASET_OPTIONS.register(
    "cmu_mosei", aliases=("mosei",), modalities=("audio", "text", "visual"), needs_files=True, description="CMU-MOSEI"
)(CmuMoseiOptions)
DATASET_OPTIONS.register(
    "cremad",
    modalities=("audio", "visual"),
    needs_files=True,
    description="CREMA-D: audio + visual, 6 emotions (raw release)",
)(CremadOptions)
DATASET_OPTIONS.register(
    "embedded", modalities=("audio", "visual"), description="digits (visual) + synthesised tones (audio)"
)(EmbeddedOptions)
DATASET_OPTIONS.register(
    "embedded3", modalities=("audio", "text", "visual"), description="embedded + a synthetic word-vector text modality"
)(EmbeddedOptions)
DATASET_OPTIONS.register(
    "food101",
    aliases=("food",),
    modalities=("text", "visual"),
    needs_files=True,
    description="UPMC Food-101: image + recipe title, 101 dishes",
)(Food101Options)
DATASET_OPTIONS.register(
    "kinetics_sounds",
    aliases=("ks",),
    modalities=("audio", "visual"),
    needs_files=True,
    description="Kinetics-Sounds: audio + visual, 31 classes",
)(KineticsSoundsOptions)
DATASET_OPTIONS.register(
    "ucf101",
    aliases=("ucf",),
    modalities=("flow", "visual"),
    needs_files=True,
    description="UCF-101: RGB + optical flow, 101 actions",
)(Ucf101Options)
DATASET_OPTIONS.register(
    "vggsound",
    aliases=("vgg",),
    modalities=("audio", "visual"),
    needs_files=True,
    description="VGGSound: audio + visual, 309 classes",
)(VGGSoundOptions)
