"""Data layer: the embedded dataset (deterministic, cached, split cleanly, dial works), batches, plans."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from balancemm.data import Batches, SamplePlan, create_dataset
from balancemm.data.base import stratified_split
from balancemm.data.embedded import EmbeddedOptions, build_embedded
from tests.conftest import TinyDataset


def test_embedded_shapes_and_splits() -> None:
    d = create_dataset("embedded")
    assert d.modalities == ("audio", "visual") and d.num_classes == 10
    sizes = {s: len(d.split(s)) for s in ("train", "val", "test")}
    assert sum(sizes.values()) == 1797 and sizes["test"] >= 350 and sizes["val"] >= 350
    assert d.input_shapes == {"audio": (32, 32), "visual": (1, 8, 8)}
    assert create_dataset("embedded3").modalities == ("audio", "text", "visual")


def test_splits_are_disjoint_stratified_and_cover_everything() -> None:
    labels = torch.arange(100) % 4
    parts = stratified_split(labels, (0.6, 0.2, 0.2), torch.Generator().manual_seed(0))
    allrows = torch.cat(parts)
    assert allrows.unique().numel() == 100 == allrows.numel()
    for p in parts:
        counts = torch.bincount(labels[p], minlength=4)
        assert int(counts.max() - counts.min()) <= 1


def test_embedded_is_deterministic_and_seed_dependent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BALANCEMM_CACHE", str(tmp_path))
    opts = EmbeddedOptions(seed=3)
    t0 = time.perf_counter()
    a = build_embedded(opts, ("audio", "visual"))
    built = time.perf_counter() - t0
    files = list((tmp_path / "embedded").glob("*.pt"))
    assert len(files) == 1
    t0 = time.perf_counter()
    b = build_embedded(opts, ("audio", "visual"))
    assert time.perf_counter() - t0 < built  # cached
    os.remove(files[0])
    c = build_embedded(opts, ("audio", "visual"))  # rebuilt from scratch: identical
    for m in ("audio", "visual"):
        assert torch.equal(a["inputs"][m], b["inputs"][m]) and torch.equal(a["inputs"][m], c["inputs"][m])
    other = build_embedded(EmbeddedOptions(seed=4), ("audio", "visual"))
    assert not torch.equal(a["inputs"]["audio"], other["inputs"]["audio"])


def test_a_damaged_cache_file_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BALANCEMM_CACHE", str(tmp_path))
    good = build_embedded(EmbeddedOptions(), ("audio", "visual"))
    (cache,) = (tmp_path / "embedded").glob("*.pt")
    cache.write_bytes(b"truncated")
    again = build_embedded(EmbeddedOptions(), ("audio", "visual"))
    assert torch.equal(good["inputs"]["audio"], again["inputs"]["audio"])


def _centroid_accuracy(informativeness: float, modality: str) -> float:
    d = create_dataset("embedded", **{f"{modality}_informativeness": informativeness})
    tr, te = d.split("train"), d.split("test")
    feat = (lambda x: x.mean(2)) if modality == "audio" else (lambda x: x.flatten(1))
    xtr, xte = feat(tr.inputs[modality]), feat(te.inputs[modality])
    centroids = torch.stack([xtr[tr.labels == c].mean(0) for c in range(10)])
    pred = torch.cdist(xte, centroids).argmin(1)
    return float((pred == te.labels).float().mean())


@pytest.mark.parametrize("modality", ["audio", "visual"])
def test_informativeness_dial_moves_a_simple_classifier(modality: str) -> None:
    low, high = _centroid_accuracy(0.0, modality), _centroid_accuracy(1.0, modality)
    assert high > low + 0.1


def test_batches_keep_the_last_partial_batch_and_shuffle_reproducibly() -> None:
    split = TinyDataset(n=10).split("train")
    sizes = [len(b) for b in Batches(split, 4)]
    assert sizes == [4, 4, 2]
    order = [
        torch.cat([b.index for b in Batches(split, 4, shuffle=True, generator=torch.Generator().manual_seed(s))])
        for s in (1, 1, 2)
    ]
    assert torch.equal(order[0], order[1]) and not torch.equal(order[0], order[2])
    assert sorted(order[0].tolist()) == list(range(10))


def test_sample_plan_appends_rows_with_their_masks() -> None:
    data = TinyDataset(n=6)
    plan = SamplePlan(torch.tensor([0, 0, 5]), torch.tensor([[True, False], [False, True], [True, False]]))
    batches = list(Batches(data.split("train"), 4, plan=plan))
    index = torch.cat([b.index for b in batches])
    present = torch.cat([b.present for b in batches])
    assert index.tolist() == [0, 1, 2, 3, 4, 5, 0, 0, 5]
    assert present[:6].all() and present[6:].tolist() == plan.extra_present.tolist()  # type: ignore[union-attr]
    first = batches[0]
    assert torch.equal(first.inputs["audio"], data.split("train").inputs["audio"][:4])  # type: ignore[attr-defined]


def test_sample_plan_weights_resample_in_proportion() -> None:
    data = TinyDataset(n=6)
    weights = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 1.0])
    b = Batches(data.split("train"), 10, plan=SamplePlan(weights=weights), generator=torch.Generator().manual_seed(0))
    assert next(iter(b)).index.tolist() == [5] * 6


def test_collated_path_matches_in_memory_path() -> None:
    split = TinyDataset(n=7).split("train")

    class NoFastPath(type(split)):  # type: ignore[misc]
        def get_batch(self, index: torch.Tensor) -> None:  # type: ignore[override]
            return None

    slow = NoFastPath(split.inputs, split.labels)  # type: ignore[attr-defined]
    for fast_b, slow_b in zip(Batches(split, 3), Batches(slow, 3), strict=True):
        assert torch.equal(fast_b.index, slow_b.index) and torch.equal(fast_b.label, slow_b.label)
        for m in split.modalities:
            assert torch.equal(fast_b.inputs[m], slow_b.inputs[m])


def test_with_only_masks_by_name() -> None:
    data = TinyDataset(3)
    b = next(iter(Batches(data.split("train"), 4)))
    only = b.with_only(["text"])
    assert only.present.tolist() == [[False, True, False]] * 4
    assert only.present_of("text").all() and not only.present_of("audio").any()
    with pytest.raises(KeyError):
        b.with_only(["depth"])


def test_the_embedded_data_does_not_depend_on_the_thread_count(tmp_path: Path) -> None:
    # Built in fresh processes with 1 and 2 threads and separate caches: the same bytes, so a run's numbers
    # never depend on which process (a 1-thread sweep worker, a 2-thread `train`) built the cache.
    code = (
        "import hashlib, sys, torch; torch.set_num_threads(int(sys.argv[1])); import balancemm;"
        "d = balancemm.create_dataset('embedded3'); h = hashlib.sha256();"
        "[h.update(d.split(s).inputs[m].numpy().tobytes()) for s in ('train', 'val', 'test') for m in d.modalities];"
        "print(h.hexdigest())"
    )
    digests = []
    for threads in (1, 2):
        env = dict(os.environ, BALANCEMM_CACHE=str(tmp_path / f"cache{threads}"))
        res = subprocess.run([sys.executable, "-c", code, str(threads)], capture_output=True, text=True, env=env)
        assert res.returncode == 0, res.stderr
        digests.append(res.stdout.strip())
    assert digests[0] == digests[1]
