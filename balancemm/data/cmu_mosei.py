"""CMU-MOSEI (Zadeh et al., ACL 2018) sentiment, as the MulT pickles (Tsai et al., ACL 2019) ship it.

``mosei_senti_data.pkl`` (word-aligned) and ``mosei_senti_data_noalign.pkl`` (unaligned) hold
``{"train" | "valid" | "test": {"text": [N, Tt, 300] GloVe, "audio": [N, Ta, 74] COVAREP,
"vision": [N, Tv, 35] FACET, "labels": [N, 1, 1] sentiment in [-3, 3], "id": ...}}``; the official
split is train / valid / test (16,326 / 1,871 / 4,659). The first real three-modality dataset.

**Labels.** Binary, as BalanceMM trains it. Two Acc-2 conventions are in use:
*non-negative* (score ≥ 0 is positive, every sample counts: BalanceMM's) and *non-zero* (samples
scored exactly 0 are left out, positive = score > 0: MulT / MMSA papers). With ``data.zero:
positive`` (default) the model trains on the non-negative labels and every run reports both: the
usual accuracy is non-negative Acc-2 and ``test.subsets.nonzero`` is non-zero Acc-2 (on the samples
with a non-zero score the two label rules agree, so it is the same predictions scored on fewer
samples). ``data.zero: drop`` removes zero-scored samples from every split.

**Features** are used as released, except that non-finite values (COVAREP has ``-inf``) become 0, as
BalanceMM does. ``vision`` is renamed ``visual`` like every other dataset here.

``balancemm data prepare cmu_mosei --raw DIR --out DIR [--profile unaligned|aligned]`` copies the
pickle into one ``.npy`` per split and modality (memory-mapped when loading, so the 6 GB unaligned
set does not have to fit in memory) plus a manifest. ``data.root`` may also point straight at the
folder holding the pickle (loaded into memory).

**Loading the pickle safely.** Unpickling can call any importable function, so a crafted file would run
its payload on ``data prepare`` or ``train``. :func:`read_pickle` admits only what MulT's pickles are made
of: dicts, lists, tuples, strings, bytes and numbers (pickle opcodes, no import) and numpy arrays, built
from ``numpy.ndarray``, ``numpy.dtype``, ``numpy.core.multiarray._reconstruct``/``scalar`` (or
``numpy._core`` as numpy 2 writes them), ``numpy.core.numeric._frombuffer`` (protocol 5) and, in
protocol 0-2 pickles, ``_codecs.encode`` for latin-1 bytes. Any other global is refused, unloaded.
"""

from __future__ import annotations

import importlib
import pickle
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from balancemm.catalog.datasets import CmuMoseiOptions
from balancemm.data.av import MANIFEST, open_root, read_manifest
from balancemm.data.base import SPLITS, MultimodalDataset, Split, SplitName
from balancemm.data.prepare import ReleasePreparer, claim, versions, write_json
from balancemm.errors import DataError
from balancemm.files import atomic_file
from balancemm.registry import DATASETS

PICKLES = {"unaligned": "mosei_senti_data_noalign.pkl", "aligned": "mosei_senti_data.pkl"}
MODALITY_KEYS = {"audio": "audio", "text": "text", "visual": "vision"}  # ours → the pickle's
SPLIT_KEYS = {"train": "train", "val": "valid", "test": "test"}
CLASSES = ("negative", "non-negative")


class ArraySplit(Split):
    """A split of stacked arrays (memory-mapped or in memory), sliced per batch."""

    def __init__(self, arrays: dict[str, np.ndarray], scores: np.ndarray, rows: np.ndarray, max_len: int) -> None:
        self.modalities = tuple(sorted(arrays))
        self.arrays, self.rows, self.max_len = arrays, rows, max_len
        self.scores = torch.from_numpy(np.asarray(scores[rows], dtype=np.float32))
        self.labels = (self.scores >= 0).long()

    def __getitem__(self, i: int) -> dict[str, Any]:
        inputs = self.get_batch(torch.tensor([i]))
        return {"inputs": {m: x[0] for m, x in inputs.items()}, "label": int(self.labels[i]), "index": i}

    def get_batch(self, index: Tensor) -> dict[str, Tensor]:
        rows = self.rows[index.numpy()]
        out = {}
        for m, arr in self.arrays.items():
            x = np.asarray(arr[rows], dtype=np.float32)
            if self.max_len:
                x = x[:, -self.max_len :]  # MulT pads at the front: the last steps carry the utterance
            out[m] = torch.from_numpy(np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0))
        return out


def _latin1(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as protocol 0-2 pickles use it for bytes (``encode(text, "latin1")``), and nothing else."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode({type(text).__name__}, {str(encoding)[:20]!r}) is not bytes")
    return text.encode("latin1")


#: numpy's private array-rebuilding helpers a pickle of arrays names: (submodule of numpy's core, name).
_NUMPY_HELPERS = {("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer")}
# numpy 1.x pickles name them numpy.core.*, numpy 2 numpy._core.*: the same functions, taken from whichever
# core this numpy has (numpy 2 keeps numpy.core only as a deprecated alias).
_CORE = "numpy._core" if int(np.__version__.split(".")[0]) >= 2 else "numpy.core"


def _allowed(module: str, name: str) -> Any:
    """The object a MulT pickle may name as ``module.name``, or None for anything else."""
    if (module, name) == ("numpy", "ndarray"):
        return np.ndarray
    if (module, name) == ("numpy", "dtype"):
        return np.dtype
    if (module, name) == ("_codecs", "encode"):
        return _latin1
    package, _, sub = module.rpartition(".")
    if package in ("numpy.core", "numpy._core") and (sub, name) in _NUMPY_HELPERS:
        return getattr(importlib.import_module(f"{_CORE}.{sub}"), name)
    return None


class _Refused(pickle.UnpicklingError):
    """A global outside what :class:`_ArraysOnly` admits; the message is its dotted name."""


class _ArraysOnly(pickle.Unpickler):
    """An unpickler that builds containers, numbers and numpy arrays, and refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        found = _allowed(module, name)
        if found is None:
            raise _Refused(f"{module}.{name}"[:120])
        return found


def _check_arrays(data: Any) -> None:
    """Raise ValueError unless ``data`` has every split's numeric feature arrays [N, T, D] and N labels."""
    if not isinstance(data, dict):
        raise ValueError(f"holds a {type(data).__name__}, not a dict of splits")
    for split in SPLIT_KEYS.values():
        block = data.get(split)
        if not isinstance(block, dict):
            raise ValueError(f"no {split!r} split")
        arrays = {key: np.asarray(block.get(key)) for key in (*MODALITY_KEYS.values(), "labels")}
        for key, arr in arrays.items():
            if arr.dtype.kind not in "biuf" or (key != "labels" and arr.ndim != 3):
                raise ValueError(f"{split}.{key} is not a numeric {'array' if key == 'labels' else '[N, T, D] array'}")
        sizes = {key: int(arr.size if key == "labels" else arr.shape[0]) for key, arr in arrays.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"{split}: different numbers of samples {sizes}")


def read_pickle(path: Path) -> dict[str, Any]:
    """MulT's pickle at ``path``, loaded with :class:`_ArraysOnly` (nothing in it runs) and checked."""
    if not path.is_file():
        raise DataError(f"{path}: no such file; CMU-MOSEI needs MulT's {' or '.join(PICKLES.values())}")
    try:
        with open(path, "rb") as f:
            data = _ArraysOnly(f).load()
    except _Refused as exc:
        raise DataError(
            f"{path}: refused to load: the pickle asks for {exc}, which MulT's CMU-MOSEI pickles never hold "
            "(only numpy arrays and plain containers); use the original file"
        ) from None
    except Exception as exc:  # a damaged pickle fails inside pickle or numpy in many ways, each one line
        raise DataError(f"{path}: not a MulT CMU-MOSEI pickle ({type(exc).__name__}: {str(exc)[:200]})") from None
    try:
        _check_arrays(data)
    except ValueError as exc:
        raise DataError(f"{path}: not a MulT CMU-MOSEI pickle ({exc})") from None
    return dict(data)


@DATASETS.register("cmu_mosei")
class CmuMosei(MultimodalDataset):
    """Text, audio and visual feature sequences ``[T, D]``; binary sentiment."""

    Options = CmuMoseiOptions
    name = "cmu_mosei"
    class_names = CLASSES
    num_classes = 2
    preparer: ClassVar[ReleasePreparer]  # set below: one pickle, not clips
    PUBLISHED: ClassVar[dict[str, int]] = {"train": 16326, "val": 1871, "test": 4659}

    def __init__(self, options: CmuMoseiOptions) -> None:
        self.options = options
        root = open_root(
            options.root,
            "point it at the folder holding MulT's mosei_senti_data(_noalign).pkl, "
            "or at the output of `balancemm data prepare cmu_mosei`",
        )
        self.root, self.modalities = root, tuple(sorted(MODALITY_KEYS))
        if (root / MANIFEST).is_file():
            self.layout, self.manifest = "prepared", read_manifest(root, self.name)
            if self.manifest["profile"]["name"] != options.profile:
                raise DataError(
                    f"{root} was prepared from the {self.manifest['profile']['name']} pickle, but data.profile is "
                    f"{options.profile!r}; prepare the other pickle into another --out"
                )
            arrays = {
                s: {m: np.load(root / f"{s}_{m}.npy", mmap_mode="r") for m in (*self.modalities, "scores")}
                for s in SPLITS
            }
        else:
            self.layout, self.manifest = "files", {}
            data = read_pickle(root / PICKLES[options.profile])
            arrays = {
                s: {
                    **{m: np.asarray(data[SPLIT_KEYS[s]][k]) for m, k in MODALITY_KEYS.items()},
                    "scores": np.asarray(data[SPLIT_KEYS[s]]["labels"], dtype=np.float32).reshape(-1),
                }
                for s in SPLITS
            }
        self._splits: dict[str, ArraySplit] = {}
        self.dropped: dict[str, int] = {}
        for s in SPLITS:
            scores = np.asarray(arrays[s]["scores"]).reshape(-1)
            keep = np.flatnonzero(scores != 0) if options.zero == "drop" else np.arange(scores.shape[0])
            self.dropped[s] = int(scores.shape[0] - keep.shape[0])
            feats = {m: arrays[s][m] for m in self.modalities}
            self._splits[s] = ArraySplit(feats, scores, keep, options.max_len)
        first = self._splits["train"][0]["inputs"]
        self.input_shapes = {m: tuple(first[m].shape) for m in self.modalities}

    def split(self, name: SplitName) -> Split:
        return self._splits[name]

    def eval_subsets(self, split: SplitName) -> dict[str, Tensor]:
        if self.options.zero == "drop":
            return {}
        return {"nonzero": torch.nonzero(self._splits[split].scores != 0).flatten()}

    def comparability(self) -> tuple[bool, str]:
        """Published numbers use the full official splits (``balancemm data check``)."""
        sizes = {s: len(self._splits[s]) + self.dropped[s] for s in SPLITS}
        if sizes != self.PUBLISHED:
            return False, f"split sizes {sizes} differ from the official {self.PUBLISHED}"
        if self.options.zero == "drop":
            return True, "official splits; zero-scored samples dropped: compare with non-zero Acc-2 only"
        return True, "official splits: compare accuracy with non-negative Acc-2, test.subsets.nonzero with non-zero"

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update(
            root=str(self.root),
            layout=self.layout,
            profile={"name": self.options.profile, "pickle": PICKLES[self.options.profile]},
            split_source="official MulT train / valid / test",
            acc2={
                "accuracy": "non-negative Acc-2 (score >= 0 is positive, zeros counted)"
                if self.options.zero == "positive"
                else "non-zero Acc-2 (zero-scored samples dropped from every split)",
                "subsets.nonzero": "non-zero Acc-2 (zero-scored test samples left out)",
            },
            zero_scored_dropped=self.dropped,
        )
        return info


class CmuMoseiPreparer(ReleasePreparer):
    """``data prepare cmu_mosei``: the pickle → ``<split>_<modality>.npy`` float32 + ``manifest.json``."""

    dataset = "cmu_mosei"
    default_profile = "unaligned"
    layout = "MulT's mosei_senti_data_noalign.pkl (or mosei_senti_data.pkl for --profile aligned)"

    def prepare_all(
        self, raw: Path, out: Path, *, profile: str, frame_size: int, workers: int, progress: bool
    ) -> dict[str, Any]:
        if profile not in PICKLES:
            raise DataError(f"unknown CMU-MOSEI profile {profile!r}; choose {' or '.join(PICKLES)}")
        data = read_pickle(raw / PICKLES[profile])  # before touching --out
        params = {"dataset": self.dataset, "profile": {"name": profile, "pickle": PICKLES[profile], "version": 1}}
        claim(out, params)
        sizes = {}
        for s, key in SPLIT_KEYS.items():
            named = {m: data[key][k] for m, k in MODALITY_KEYS.items()}
            named["scores"] = np.asarray(data[key]["labels"], dtype=np.float32).reshape(-1)
            for m, arr in named.items():
                with atomic_file(out / f"{s}_{m}.npy") as f:
                    np.save(f, np.asarray(arr, dtype=np.float32))
            sizes[s] = int(named["scores"].shape[0])
            if progress:
                print(f"prepare cmu_mosei: {s} written ({sizes[s]:,} samples)", file=sys.stderr)
        manifest = {
            **params,
            "raw": str(raw),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "software": versions(),
            "sizes": sizes,
            "shapes": {m: list(np.asarray(data["train"][k]).shape[1:]) for m, k in MODALITY_KEYS.items()},
        }
        write_json(out / MANIFEST, manifest)
        return manifest


CmuMosei.preparer = CmuMoseiPreparer()
