"""UPMC Food-101 (Wang, Kumar, Thome, Cord & Precioso, "Recipe recognition with large multimodal food
dataset", ICME workshops 2015): web images of 101 dishes with the title of the recipe page they came
from; image + text, used by MLA and BalanceMM.

**Release** (visiir.lip6.fr): ``images/{train,test}/<class>/<file>.jpg`` and
``texts/{train,test}_titles.csv`` with rows ``<file>,<title>,<class>``. The original CSVs have no
header; BalanceMM reads copies with the header ``Image_path,text,label``: both are accepted (a first
row whose class is not an image folder is a header). Classes are the sorted image sub-folder names
(101), as BalanceMM. File names repeat between train and test (``apple_pie_0.jpg`` is in both), so the
clip id is ``<split>_<file stem>``. The official split is train / test; validation is a seeded,
stratified ``val_fraction`` of train. No split sizes are checked: the paper's could not be confirmed
here.

**Text** (the "profile", ``bert_40``): the title cleaned as BalanceMM does — a leading ``RT`` and ``#``
removed, URLs removed — then BERT-tokenised to exactly 40 ids (``padding="max_length"``,
``truncation=True``: [CLS] … [SEP] then [PAD]) by ``transformers.AutoTokenizer`` loaded from a local
folder (nothing is downloaded): ``data prepare food101 --option tokenizer=DIR``. The manifest records
the folder, the tokenizer class, its vocabulary size and pad id, a SHA-256 of its vocabulary and
configuration files, the length, the cleaning rule and the transformers version. The text encoder
must use the same vocabulary (e.g. ``model.encoders.text.pretrained`` = the folder of the BERT the
tokenizer belongs to).

**Image**: stored decoded, uint8 ``[H, W, 3]``, shorter side ``--frame-size``. The loader gives
``visual [3, S, S]``, ImageNet-normalised: BalanceMM's FOOD-101 augmentation in training (a random
rotation within ±30° with black corners, resize to S × S, horizontal flip with probability 0.5),
resize only in evaluation (:func:`image_to_tensor`). ``text`` is ``[40]`` int64 ids.

**Files layout**: ``data.root`` = the release itself, with ``data.tokenizer=DIR``; titles are tokenised
and images decoded when read.

Deviations from BalanceMM (``balancemm/datasets/food_dataset.py``):

* URLs are removed up to the next whitespace. BalanceMM's pattern ``https?://.*`` also removes
  everything after a URL ("RT #pasta http://x.co yum" → BalanceMM "pasta ", here "pasta yum");
  whitespace is collapsed.
* The rotation interpolates bilinearly (torchvision's RandomRotation default is nearest neighbour) and
  is computed on the stored image (shorter side ``--frame-size``) instead of the original file.
* The visual input is ``[3, S, S]``, not a one-frame clip ``[3, 1, S, S]``.
* Validation is carved from train; BalanceMM has none (it selects on the test set, which it also
  shuffles with an unseeded generator).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from balancemm.catalog.datasets import Food101Options
from balancemm.data.av import (
    IMAGE_EXTENSIONS,
    Chooser,
    Clip,
    ClipDataset,
    ClipReader,
    Listing,
    manifest_listing,
)
from balancemm.data.base import SplitName
from balancemm.data.media import decode_image
from balancemm.data.prepare import Preparer, RawClip, RawRelease
from balancemm.data.transforms import normalise, resize
from balancemm.errors import DataError, first_line
from balancemm.registry import DATASETS

TEXT_PROFILES = {"bert_40": 40}  # name → max_length (BalanceMM's and MLA's 40 tokens)
CLEANING = "leading 'RT ' removed, URLs (http(s)://… up to whitespace) removed, '#' removed, whitespace collapsed"
# The files of a tokenizer folder that decide the ids (vocabularies, merges, normalisation settings).
TOKENIZER_FILES = (
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)
MAX_ROTATION = 30.0  # degrees, BalanceMM's RandomRotation(30)
SPLITS = ("train", "test")
SPLIT_SOURCE = "official UPMC Food-101 train / test (texts/{train,test}_titles.csv)"


def clean_title(text: str) -> str:
    """A recipe title as tokenised: see :data:`CLEANING` (BalanceMM's rule, URLs cut at whitespace)."""
    text = re.sub(r"^RT\s+", "", text)
    text = re.sub(r"https?://\S*", "", text)
    return " ".join(text.replace("#", "").split())


@functools.lru_cache(maxsize=4)
def load_tokenizer(folder: str) -> Any:
    """``AutoTokenizer.from_pretrained(folder)`` from local files only, once per process and folder."""
    where = f"tokenizer folder {folder!r}"
    if not folder:
        raise DataError(
            "food101 needs a local BERT tokenizer folder: --option tokenizer=DIR for data prepare, "
            "data.tokenizer=DIR for the files layout"
        )
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise DataError(f"{where} is not a directory (expected one written by save_pretrained)")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise DataError("food101's text needs the transformers library: pip install 'transformers>=4.40'") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # missing vocabulary, bad JSON…: the exception types vary by version
        raise DataError(f"{where} cannot be loaded as a tokenizer: {first_line(exc)}") from None
    if tokenizer.pad_token_id is None:
        raise DataError(f"{where}: the tokenizer has no padding token, so titles cannot be padded to a fixed length")
    return tokenizer


def tokenize(tokenizer: Any, title: str, max_length: int) -> np.ndarray:
    """A raw title → ``[max_length]`` int64 ids (cleaned, [CLS] … [SEP], padded and truncated)."""
    ids = tokenizer(clean_title(title), padding="max_length", max_length=max_length, truncation=True)["input_ids"]
    return np.asarray(ids, dtype=np.int64)


def text_profile_params(name: str, folder: str) -> dict[str, Any]:
    """The tokenisation recipe ``name`` with the tokenizer in ``folder``, for the manifest."""
    if name not in TEXT_PROFILES:
        raise DataError(f"unknown text profile {name!r}; choose one of {', '.join(TEXT_PROFILES)}")
    tokenizer = load_tokenizer(folder)
    import transformers  # present: load_tokenizer needed it

    path = Path(folder).expanduser().resolve()
    files = [f for f in TOKENIZER_FILES if (path / f).is_file()]
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.encode() + b"\0" + (path / f).read_bytes())
    return {
        "name": name,
        "tokenizer": str(path),
        "tokenizer_class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "vocab_sha256": digest.hexdigest(),
        "hashed_files": files,
        "max_length": TEXT_PROFILES[name],
        "padding": "max_length",
        "truncation": True,
        "cleaning": CLEANING,
        "library": "transformers",
        "library_version": transformers.__version__,
        "version": 1,
    }


# -- the release -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FoodClip(RawClip):
    """A listed image (``video`` is its path) and its recipe title."""

    title: str = ""


def read_titles(path: Path, classes: Iterable[str]) -> list[tuple[str, str, str]]:
    """``<file>,<title>,<class>`` rows (``(file, title, class)``); a header row is skipped.

    A title holding unquoted commas spreads over several fields: the first field is the file, the last
    the class and the ones between are joined back.
    """
    if not path.is_file():
        raise DataError(f"{path}: no such file; expected UPMC Food-101's texts/{{train,test}}_titles.csv")
    known = set(classes)
    rows: list[tuple[str, str, str]] = []
    # errors="replace": a few scraped titles are not valid UTF-8; one odd character must not stop a prepare.
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
        for n, row in enumerate(csv.reader(f), 1):
            if not any(cell.strip() for cell in row):
                continue
            if len(row) < 3:
                raise DataError(f"{path}: row {n} has {len(row)} fields; expected '<file>,<title>,<class>'")
            name, title, label = row[0].strip(), ",".join(row[1:-1]), row[-1].strip()
            if label not in known:
                if not rows and not name.lower().endswith(IMAGE_EXTENSIONS):
                    continue  # a header such as BalanceMM's "Image_path,text,label"
                raise DataError(f"{path}: row {n}: class {label!r} has no folder in images/")
            rows.append((name, title, label))
    return rows


def read_release(root: Path) -> tuple[list[str], dict[str, list[FoodClip]]]:
    """The classes (sorted ``images/`` sub-folders) and every listed row of ``texts/`` by split, its
    image present or not."""
    images = root / "images"
    if not (images / "train").is_dir():
        raise DataError(f"{root}: no images/train/ folder; expected {Food101Preparer.layout}")
    classes = sorted({d.name for s in SPLITS if (images / s).is_dir() for d in (images / s).iterdir() if d.is_dir()})
    index = {c: i for i, c in enumerate(classes)}
    splits = {
        split: [
            FoodClip(f"{split}_{Path(name).stem}", index[label], str(images / split / label / name), title=title)
            for name, title, label in read_titles(root / "texts" / f"{split}_titles.csv", classes)
        ]
        for split in SPLITS
    }
    return classes, splits


class Food101Preparer(Preparer):
    dataset = "food101"
    default_profile = "bert_40"
    layout = "UPMC Food-101: images/{train,test}/<class>/<file>.jpg and texts/{train,test}_titles.csv"

    def __init__(self, tokenizer: str = "") -> None:
        self.tokenizer = tokenizer  # a folder, resolved; plain settings only, so workers can unpickle it

    def configure(self, options: dict[str, str]) -> Food101Preparer:
        unknown = sorted(set(options) - {"tokenizer"})
        if unknown:
            raise DataError(f"data prepare food101 takes only --option tokenizer=DIR (got {', '.join(unknown)})")
        folder = str(Path(options.get("tokenizer", "")).expanduser().resolve()) if options.get("tokenizer") else ""
        load_tokenizer(folder)  # a missing or broken folder fails here, before --out is touched
        return Food101Preparer(folder)

    def scan(self, raw: Path) -> RawRelease:
        classes, splits = read_release(raw)

        def locate(clip: FoodClip) -> RawClip | str:
            return clip if Path(clip.video).is_file() else f"{clip.video}: no such image for a listed title"

        return RawRelease.from_listing(splits, classes, SPLIT_SOURCE, locate)

    def profile_params(self, name: str) -> dict[str, Any]:
        return text_profile_params(name, self.tokenizer)

    def storage(self, frame_size: int) -> dict[str, Any]:
        return {
            "image": {"max_short_side": frame_size, "dtype": "uint8", "layout": "[H, W, 3] RGB, never enlarged"},
            "text": {"dtype": "int64", "layout": "[max_length] token ids, 0-padded"},
        }

    def process(self, clip: RawClip, profile: str, short_side: int) -> dict[str, np.ndarray]:
        """``{"image": [H, W, 3] uint8, "text": [max_length] int64}``."""
        assert isinstance(clip, FoodClip)  # scan made it
        ids = tokenize(load_tokenizer(self.tokenizer), clip.title, TEXT_PROFILES[profile])
        return {"image": decode_image(clip.video, short_side), "text": ids}


class ReleaseReader(ClipReader):
    """The release read directly: the image file, and the title tokenised when read."""

    def __init__(self, clips: dict[str, FoodClip], tokenizer: str, max_length: int) -> None:
        self.clips, self.tokenizer, self.max_length = clips, tokenizer, max_length

    def has(self, clip_id: str, split: SplitName) -> bool:
        return Path(self.clips[clip_id].video).is_file()

    def read(self, clip_id: str, split: SplitName, choose: Chooser) -> dict[str, np.ndarray]:
        clip = self.clips[clip_id]
        ids = tokenize(load_tokenizer(self.tokenizer), clip.title, self.max_length)
        return {"image": decode_image(clip.video), "text": ids}


# -- the loader --------------------------------------------------------------------------------


def rotate(x: Tensor, degrees: float) -> Tensor:
    """``[N, C, H, W]`` rotated counter-clockwise by ``degrees`` about the centre, bilinear, corners 0
    (torchvision's ``rotate(expand=False, fill=0)``, with bilinear instead of its nearest default)."""
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    height, width = x.shape[-2:]
    # affine_grid works in coordinates normalised to [-1, 1] per axis: the aspect ratio enters the shear terms.
    theta = torch.tensor([[c, -s * height / width, 0.0], [s * width / height, c, 0.0]], dtype=x.dtype)
    grid = F.affine_grid(theta.expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def image_to_tensor(image: np.ndarray, size: int, rng: np.random.Generator | None) -> Tensor:
    """``[H, W, 3]`` uint8 RGB → ``[3, size, size]`` float32, ImageNet-normalised.

    Evaluation (``rng=None``): resize to size × size. Training (BalanceMM's FOOD-101 transform): a rotation
    by U(−30°, 30°) with black corners, the resize, then a horizontal flip with probability 0.5.
    """
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image_to_tensor: expected an [H, W, 3] image, got shape {image.shape}")
    x = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)[None]  # a copy: decoded images are read-only
    if rng is not None:
        x = rotate(x, float(rng.uniform(-MAX_ROTATION, MAX_ROTATION)))
    x = resize(x, size)[0]
    if rng is not None and rng.random() < 0.5:
        x = x.flip(-1)
    return normalise(x)


@DATASETS.register("food101")
class Food101(ClipDataset):
    """``text [40]`` int64 token ids and ``visual [3, S, S]`` images."""

    Options = Food101Options
    name = "food101"
    preparer = Food101Preparer()
    MODALITIES = ("text", "visual")
    PROFILE_KIND = "text profile"
    PUBLISHED: ClassVar[dict[str, int]] = {}  # the paper's split sizes could not be confirmed
    PUBLISHED_SOURCE = "the official UPMC Food-101 train / test lists"
    options: Food101Options
    release: tuple[list[str], dict[str, list[FoodClip]]]  # files layout: classes and rows (files_reader)

    def list_clips(self) -> Listing:
        if self.manifest:
            return manifest_listing(self.manifest)
        classes, splits = self.release
        listed = {s: [Clip(c.id, c.label) for c in rows] for s, rows in splits.items()}
        return Listing(listed, tuple(classes), SPLIT_SOURCE, official=True)

    def files_reader(self) -> tuple[ClipReader, dict[str, Any]]:
        opts = self.options
        self.release = read_release(self.root)
        params = text_profile_params(opts.profile, opts.tokenizer)
        params["note"] = "files layout: titles tokenised and images decoded when read"
        clips = {c.id: c for rows in self.release[1].values() for c in rows}
        return ReleaseReader(clips, opts.tokenizer, TEXT_PROFILES[opts.profile]), params

    def to_inputs(self, arrays: dict[str, np.ndarray], rng: np.random.Generator | None) -> dict[str, Tensor]:
        return {
            "text": torch.from_numpy(np.asarray(arrays["text"], dtype=np.int64)),
            "visual": image_to_tensor(arrays["image"], self.options.image_size, rng),
        }
