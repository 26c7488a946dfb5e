"""CMU-MOSEI from the MulT pickle: direct loading, prepare → check → one epoch, both Acc-2 conventions,
and every method on its three modalities (runs, or refuses in one clear line)."""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import balancemm
from balancemm.cli import main
from balancemm.data import Batches, create_dataset
from balancemm.errors import BalanceMMError, DataError
from balancemm.methods import METHODS
from tests.fixtures.mosei_raw import make_mosei_pickle

TINY_ENCODER = ["d_model=8", "layers=1", "heads=2", "feedforward=16"]
SMALL = [
    *(f"model.encoders.{m}.{kv}" for m in ("audio", "text", "visual") for kv in TINY_ENCODER),
    "train.epochs=1",
    "train.batch_size=8",
]


@pytest.fixture(scope="module")
def mosei(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    raw = tmp_path_factory.mktemp("mosei-raw")
    return raw, make_mosei_pickle(raw)


def test_direct_pickle_loading_labels_and_features(mosei: tuple[Path, dict]) -> None:
    raw, data = mosei
    ds = create_dataset("cmu_mosei", root=str(raw))
    assert ds.modalities == ("audio", "text", "visual")
    assert ds.input_shapes == {"audio": (8, 74), "text": (5, 300), "visual": (8, 35)}
    assert [len(ds.split(s)) for s in ("train", "val", "test")] == [16, 6, 8]
    scores = data["test"]["labels"].reshape(-1)
    assert torch.equal(ds.split("test").labels, torch.from_numpy((scores >= 0).astype(np.int64)))
    assert ds.split("test").labels[:2].tolist() == [1, 1]  # a score of exactly 0 counts as positive
    first = ds.split("train")[0]["inputs"]["audio"]
    assert float(first[0, 0]) == 0.0 and torch.isfinite(first).all()  # COVAREP's -inf → 0
    nonzero = ds.eval_subsets("test")["nonzero"]
    assert nonzero.tolist() == list(range(2, 8))


def test_zero_drop_and_max_len(mosei: tuple[Path, dict]) -> None:
    raw, _ = mosei
    ds = create_dataset("cmu_mosei", root=str(raw), zero="drop", max_len=3)
    assert [len(ds.split(s)) for s in ("train", "val", "test")] == [16, 4, 6]
    assert ds.eval_subsets("test") == {} and ds.input_shapes["audio"] == (3, 74)
    ok, why = ds.comparability()
    assert not ok and "differ from the official" in why


def test_prepare_check_and_one_epoch(mosei: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    raw, _ = mosei
    out = tmp_path / "prep"
    assert main(["data", "prepare", "mosei", "--raw", str(raw), "--out", str(out), "--quiet"]) == 0
    assert "prepared cmu_mosei (profile unaligned)" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sizes"] == {"train": 16, "val": 6, "test": 8}
    assert manifest["shapes"] == {"audio": [8, 74], "text": [5, 300], "visual": [8, 35]}
    prepared, direct = create_dataset("cmu_mosei", root=str(out)), create_dataset("cmu_mosei", root=str(raw))
    assert prepared.layout == "prepared"
    a = next(iter(Batches(prepared.split("test"), 8))).inputs
    b = next(iter(Batches(direct.split("test"), 8))).inputs
    assert all(torch.equal(a[m], b[m]) for m in a)
    with pytest.raises(DataError, match="prepared from the unaligned pickle"):
        create_dataset("cmu_mosei", root=str(out), profile="aligned")
    assert main(["data", "check", "cmu_mosei", "--root", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "test        8 usable (of 8 listed)" in printed and "NOT comparable" in printed
    run = tmp_path / "run"
    code = main(["train", "--method", "baseline", "--dataset", "cmu_mosei", "--quiet", "--out", str(run),
                 "--set", f"data.root={out}", *SMALL])  # fmt: skip
    assert code == 0
    summary = json.loads((run / "summary.json").read_text())
    subsets = summary["test"]["subsets"]["nonzero"]
    assert subsets["num_samples"] == 6 and summary["test"]["num_samples"] == 8
    assert "non-negative Acc-2" in summary["dataset_info"]["acc2"]["accuracy"]


def test_aligned_pickle_and_missing_file(tmp_path: Path) -> None:
    make_mosei_pickle(tmp_path / "a", aligned=True)
    ds = create_dataset("cmu_mosei", root=str(tmp_path / "a"), profile="aligned")
    assert ds.input_shapes == {"audio": (5, 74), "text": (5, 300), "visual": (5, 35)}
    with pytest.raises(DataError, match=r"mosei_senti_data_noalign\.pkl: no such file"):
        create_dataset("cmu_mosei", root=str(tmp_path / "a"))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "mosei_senti_data_noalign.pkl").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="not a MulT CMU-MOSEI pickle"):
        create_dataset("cmu_mosei", root=str(tmp_path / "b"))


def test_protocol_preset() -> None:
    cfg = balancemm.resolve_config("baseline", "cmu_mosei")
    assert (cfg.train.optimizer.name, cfg.train.optimizer.lr, cfg.train.epochs) == ("sgd", 1e-2, 70)
    assert {e.name for e in cfg.model.encoders.values()} == {"transformer"}


@pytest.mark.parametrize("method", sorted(METHODS.names()))
def test_every_method_runs_on_three_modalities_or_refuses(
    mosei: tuple[Path, dict], tmp_path: Path, method: str
) -> None:
    raw, _ = mosei
    hp = {"modality": "text"} if method == "unimodal" else {}
    try:
        summary = balancemm.train(
            method, "cmu_mosei", sets=[*SMALL, f"data.root={raw}"], out=tmp_path / "run", progress=False, **hp
        )
    except BalanceMMError as exc:  # a refusal must be one line naming the method's limit
        assert "\n" not in str(exc) and str(exc)
        pytest.skip(f"{method} refuses three modalities: {exc}")
    expected = ["text"] if method == "unimodal" else ["audio", "text", "visual"]
    assert summary["modalities"] == expected and "nonzero" in summary["test"]["subsets"]


class _Payload:
    """Unpickled by a plain ``pickle.load``, this writes ``marker``: what a crafted release file could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, ...]]:
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_pickle_is_refused_without_running_its_payload(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "payload-ran"
    raw = tmp_path / "raw"
    raw.mkdir()
    blob = pickle.dumps({"train": _Payload(marker), "valid": {}, "test": {}})
    (raw / "mosei_senti_data_noalign.pkl").write_bytes(blob)
    refused = r"mosei_senti_data_noalign\.pkl: refused to load: the pickle asks for posix\.system"
    with pytest.raises(DataError, match=refused):
        create_dataset("cmu_mosei", root=str(raw))
    for argv in (
        ["data", "prepare", "cmu_mosei", "--raw", str(raw), "--out", str(tmp_path / "prep"), "--quiet"],
        ["train", "--method", "baseline", "--dataset", "cmu_mosei", "--quiet", "--out", str(tmp_path / "run"),
         "--set", f"data.root={raw}", *SMALL],
    ):  # fmt: skip
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "posix.system" in err and "Traceback" not in err
    assert not marker.exists() and not (tmp_path / "prep").exists() and not (tmp_path / "run").exists()


def test_the_restricted_loader_reads_every_protocol_and_numpy_1_names(mosei: tuple[Path, dict], tmp_path: Path) -> None:
    raw, data = mosei
    expected = create_dataset("cmu_mosei", root=str(raw)).split("test").get_batch(torch.arange(8))
    blobs = {f"p{p}": pickle.dumps(data, protocol=p) for p in (0, 2, 4, 5)}
    # numpy 1.x (MulT's files) names its helpers numpy.core.*, numpy 2 numpy._core.*; protocol 2 writes
    # them as text, so the other spelling is a plain replacement.
    other = (b"numpy._core.", b"numpy.core.") if b"numpy._core." in blobs["p2"] else (b"numpy.core.", b"numpy._core.")
    blobs["other_numpy"] = blobs["p2"].replace(*other)
    for name, blob in blobs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "mosei_senti_data_noalign.pkl").write_bytes(blob)
        got = create_dataset("cmu_mosei", root=str(tmp_path / name)).split("test").get_batch(torch.arange(8))
        assert all(torch.equal(got[m], expected[m]) for m in expected), name


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda data: [1, 2], "holds a list, not a dict of splits"),
        (lambda data: {"train": data["train"]}, "no 'valid' split"),
        (lambda data: {**data, "train": {**data["train"], "text": "abc"}}, "train.text is not a numeric"),
        (lambda data: {**data, "test": {**data["test"], "labels": data["test"]["labels"][:3]}}, "test: different"),
    ],
)
def test_a_pickle_without_the_release_layout_is_one_clear_error(
    mosei: tuple[Path, dict], tmp_path: Path, damage: Any, message: str
) -> None:
    (tmp_path / "mosei_senti_data_noalign.pkl").write_bytes(pickle.dumps(damage(mosei[1])))
    with pytest.raises(DataError, match=f"not a MulT CMU-MOSEI pickle \\({re.escape(message)}"):
        create_dataset("cmu_mosei", root=str(tmp_path))
