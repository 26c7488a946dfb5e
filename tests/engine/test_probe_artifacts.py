"""Linear probes and artifacts (a run's frozen unimodal runs), checked on tiny runs of an in-memory dataset."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

from balancemm.config import RunConfig, RunSection, resolve_config
from balancemm.context import Batching, Needs, RunContext
from balancemm.data import DATASETS
from balancemm.engine import artifacts, probe
from balancemm.engine.artifacts import Artifacts, load_run, unimodal_config
from balancemm.engine.trainer import Trainer
from balancemm.errors import ConfigError, DataError
from balancemm.layout import default_out
from balancemm.methods import METHODS
from balancemm.methods.ogm_ge import OGMGE
from balancemm.models.fusions.mmtm import MidFusionSpec
from tests.conftest import TinyDataset, tiny_model

SMALL = [
    "train.epochs=2",
    "train.batch_size=8",
    "model.encoders.audio.channels=[4,6]",
    "model.encoders.visual.channels=[4,6]",
]


def trained(cfg: RunConfig, out: Path, data: TinyDataset) -> dict[str, Any]:
    return Trainer(cfg, out, progress=False, dataset=data).fit()


@dataclass(frozen=True)
class SizedOptions:
    num_classes: int = 3


class Sized(TinyDataset):
    """A registered TinyDataset whose class count is a data option: only a config's ``data`` section
    rebuilds the dataset a run trained on (the model's head has one row per class)."""

    Options: ClassVar[type] = SizedOptions
    name: ClassVar[str] = "sized"

    def __init__(self, options: SizedOptions = SizedOptions()) -> None:
        super().__init__(num_classes=options.num_classes)


@contextmanager
def sized_dataset() -> Iterator[None]:
    encoders = {m: {"name": "cnn"} for m in ("audio", "visual")}
    with DATASETS.temporary():
        DATASETS.register("sized", modalities=("audio", "visual"), protocol={"model": {"encoders": encoders}})(Sized)
        yield


# -- probes ---------------------------------------------------------------------------------------


def test_probe_features_are_the_encoders_pooled_output_on_every_row() -> None:
    data = TinyDataset(n=20)
    model = tiny_model(data).train()
    got = probe.features(model, data, "val", "visual")
    split = data.split("val")
    assert not model.training and got.dtype == np.float32 and got.shape == (20, 6)
    with torch.no_grad():
        batch = next(iter(probe.Batching()(split, batch_size=20)))
        expected = model.encode(batch, only=["visual"])["visual"]
    np.testing.assert_array_equal(got, expected.numpy())


def test_probe_features_run_only_the_probed_encoder_in_batches_of_batch_size(monkeypatch: pytest.MonkeyPatch) -> None:
    # The probe of a large split must not hold it in one batch, nor pay for the other modalities' encoders.
    data = TinyDataset(n=probe.BATCH_SIZE + 8)
    model = tiny_model(data)
    made: list[tuple[int, int | None]] = []

    class Recorded(Batching):
        def __call__(self, split: Any, **kw: Any) -> Any:
            made.append((self.num_workers, kw.get("batch_size")))
            return Batching()(split, **kw)  # in the main process: an in-memory split needs no workers

    monkeypatch.setattr(probe, "Batching", Recorded)
    passes = {m: 0 for m in data.modalities}
    for m, encoder in model.encoders.items():
        encoder.register_forward_hook(lambda *_, m=m: passes.__setitem__(m, passes[m] + 1))
    assert probe.features(model, data, "test", "audio", num_workers=3).shape == (probe.BATCH_SIZE + 8, 6)
    assert made == [(3, probe.BATCH_SIZE)]  # the run's loader workers, BATCH_SIZE rows a batch
    assert passes == {"audio": 2, "visual": 0}


def test_probe_features_of_a_mid_fusion_model_see_their_modality_alone() -> None:
    # With MMTM the visual branch is gated by audio's squeezed features unless audio is masked out.
    data = TinyDataset(n=20)
    model = tiny_model(data, mid_fusion=MidFusionSpec(2)).eval()
    got = probe.features(model, data, "val", "visual")
    with torch.no_grad():
        batch = next(iter(Batching()(data.split("val"), batch_size=20)))
        alone = model.encode(batch.with_only(["visual"]), only=["visual"])["visual"]
        mixed = model.encode(batch, only=["visual"])["visual"]
    np.testing.assert_array_equal(got, alone.numpy())
    assert not torch.allclose(alone, mixed)  # the masking is visible on this model


class ScriptedClassifier:
    """Stands in for LogisticRegression: its first score (validation) is scripted per C, a later one (test)
    is 100 + C; it records what it was fitted on."""

    val_score: ClassVar[dict[float, float]] = {}
    seen: ClassVar[list[tuple[float, int, np.ndarray]]] = []

    def __init__(self, C: float, max_iter: int) -> None:
        self.C, self.scored = C, 0

    def fit(self, x: np.ndarray, y: np.ndarray) -> ScriptedClassifier:
        ScriptedClassifier.seen.append((self.C, len(y), x))
        return self

    def score(self, x: np.ndarray, y: np.ndarray) -> float:
        assert len(x) == len(y) and len(y) > 0  # scored against the split's own labels
        self.scored += 1
        return self.val_score[self.C] if self.scored == 1 else 100 + self.C


def test_the_probe_keeps_the_first_c_with_the_best_validation_score(monkeypatch: pytest.MonkeyPatch) -> None:
    import sklearn.linear_model

    monkeypatch.setattr(sklearn.linear_model, "LogisticRegression", ScriptedClassifier)
    ScriptedClassifier.seen.clear()
    ScriptedClassifier.val_score.update({0.01: 0.25, 0.1: 0.5, 1.0: 0.5, 10.0: 0.125})
    real, workers = probe.features, []

    def features(*args: Any) -> Any:
        workers.append(args[4])
        return real(*args)

    monkeypatch.setattr(probe, "features", features)
    data = TinyDataset()
    got = probe.linear_probe(tiny_model(data), data, "audio")
    assert got == {"modality": "audio", "test_accuracy": 100.1, "val_accuracy": 0.5, "C": 0.1}
    assert workers == [0, 0, 0]  # unless told otherwise, the features are read in this process
    assert [c for c, _, _ in ScriptedClassifier.seen] == list(probe.C_GRID) == [0.01, 0.1, 1.0, 10.0]
    _, rows, x = ScriptedClassifier.seen[0]  # the training features, standardised on themselves
    assert rows == 24
    np.testing.assert_allclose(x.mean(0), 0, atol=1e-6)
    np.testing.assert_allclose(x.std(0)[x.std(0) > 0], 1, atol=1e-5)


def test_the_probe_of_a_run_reads_its_selected_weights_and_merges_probe_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sklearn.linear_model

    import balancemm

    monkeypatch.setattr(sklearn.linear_model, "LogisticRegression", ScriptedClassifier)
    ScriptedClassifier.val_score.update({c: 0.5 for c in probe.C_GRID})
    run = tmp_path / "r"

    with sized_dataset():  # a registered dataset, which the probe rebuilds from the run's config
        balancemm.train("baseline", "sized", out=run, sets=[*SMALL, "train.epochs=1"])
        (run / "probe.json").write_text(json.dumps({"visual": {"kept": True}}))
        got = probe.probe_run(run, "audio", device="cpu")
        assert got == {"audio": {"modality": "audio", "test_accuracy": 100.01, "val_accuracy": 0.5, "C": 0.01}}
        assert json.loads((run / "probe.json").read_text()) == {"visual": {"kept": True}, **got}
        with pytest.raises(ConfigError, match=r"has no modality 'text'; its modalities: audio, visual"):
            probe.probe_run(run, "text", device="cpu")
        (run / "probe.json").write_text("[1]")
        with pytest.raises(Exception, match="is not a JSON object"):
            probe.probe_run(run, "audio", device="cpu")


# -- artifacts ------------------------------------------------------------------------------------


def test_a_unimodal_config_is_the_same_protocol_on_one_modality() -> None:
    cfg = resolve_config("ogm_ge", sets=[*SMALL, "run.seed=5"])
    uni = unimodal_config(cfg, "visual")
    assert uni.run == RunSection("unimodal", "embedded", 5) and uni.method.modality == "visual"
    assert (uni.data, uni.model, uni.train) == (cfg.data, cfg.model, cfg.train)


def test_artifacts_are_trained_once_reused_and_served_frozen(tmp_path: Path) -> None:
    data = TinyDataset()
    cfg = resolve_config("umt", sets=SMALL)
    fits: list[tuple[str, Path]] = []

    def fit(c: RunConfig, out: Path) -> dict[str, Any]:
        fits.append((c.method.modality, out))
        torch.rand(3)  # a training draws from the global generator ...
        return trained(c, out, data)

    arts = Artifacts(cfg, tmp_path, ("audio", "visual"), data, torch.device("cpu"), fit)
    with pytest.raises(KeyError, match=r"artifact unimodal:audio was not prepared; declare it in needs\.artifacts"):
        arts.load("unimodal", "audio")
    with pytest.raises(ValueError, match="unknown artifact kind 'teacher'; known: unimodal"):
        arts.prepare(("teacher",))
    torch.manual_seed(0)
    arts.prepare(("unimodal",))
    assert torch.equal(torch.rand(2), torch.rand(2, generator=torch.Generator().manual_seed(0)))  # ... not ours
    paths = {m: default_out(unimodal_config(cfg, m), tmp_path) for m in ("audio", "visual")}
    assert fits == [("audio", paths["audio"]), ("visual", paths["visual"])]
    for m in ("audio", "visual"):
        summary = json.loads((paths[m] / "summary.json").read_text())
        assert arts.runs[f"unimodal:{m}"] == {
            "run": str(paths[m]),
            "reused": False,
            "flops": summary["flops"]["total"],
            "test_accuracy": summary["test"]["accuracy"],
        }
    again = Artifacts(cfg, tmp_path, ("audio", "visual"), data, torch.device("cpu"), fit)
    again.prepare(("unimodal",))
    assert again.runs["unimodal:audio"]["reused"] is True

    model = arts.load("unimodal", "visual")
    assert arts.load("unimodal", "visual") is model and model.modalities == ("visual",)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    best = torch.load(paths["visual"] / "checkpoints" / "best.pt", weights_only=True)["method"]
    for name, value in model.state_dict().items():
        assert torch.equal(value, best[f"model.{name}"]), name


def test_an_unknown_artifact_kind_is_named_with_every_known_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(artifacts, "KINDS", ("unimodal", "frozen"))
    arts = Artifacts(resolve_config("umt", sets=SMALL), tmp_path, ("audio",), TinyDataset(), torch.device("cpu"), None)
    with pytest.raises(ValueError) as err:
        arts.prepare(("teacher",))
    assert str(err.value) == "unknown artifact kind 'teacher'; known: unimodal, frozen"


@pytest.mark.parametrize("device", ["cpu", "cuda:1"])
def test_artifacts_train_on_forked_generators_of_the_run_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, device: str
) -> None:
    # On a GPU a teacher's training must leave the run's device generator as it found it too (the host
    # one is always forked); fork_rng is recorded, so the GPU case runs on any machine.
    forked: list[list[torch.device]] = []

    @contextmanager
    def fork_rng(devices: list[torch.device]) -> Iterator[None]:
        forked.append(list(devices))
        yield

    monkeypatch.setattr(torch.random, "fork_rng", fork_rng)
    summary = {"flops": {"total": 7}, "test": {"accuracy": 0.5}}
    where = torch.device(device)
    arts = Artifacts(
        resolve_config("umt", sets=SMALL), tmp_path, ("audio", "visual"), TinyDataset(), where, lambda c, o: summary
    )
    arts.prepare(("unimodal",))
    assert forked == ([[where], [where]] if where.type == "cuda" else [[], []])


class Gated(OGMGE):
    """OGM-GE whose needs depend on a hyper-parameter, as ReconBoost's do."""

    @classmethod
    def needs_for(cls, hp: Any) -> Needs:
        return Needs(val=hp.alpha > 0.2)


def test_loading_a_run_needs_its_selected_weights(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        load_run(tmp_path)
    assert str(err.value) == f"{tmp_path} has no checkpoints/best.pt; is it a finished BalanceMM run?"
    data = TinyDataset()
    sets = [*SMALL, "method.alpha=0.3"]
    with METHODS.temporary():
        METHODS.register("gated", group="optimization")(Gated)
        trained(resolve_config("gated", sets=sets), tmp_path / "r", data)
        cfg, method = load_run(tmp_path / "r", data)
        assert cfg == resolve_config("gated", sets=sets) and method.hp == cfg.method and method.hp.alpha == 0.3
    assert isinstance(method, Gated) and isinstance(method.ctx, RunContext)
    # The context is the run's: its modalities, and the needs of the run's hyper-parameters.
    assert method.ctx.modalities == ("audio", "visual") and method.ctx.needs == Needs(val=True)
    best = torch.load(tmp_path / "r" / "checkpoints" / "best.pt", weights_only=True)["method"]
    assert all(torch.equal(v, best[k]) for k, v in method.state_dict().items())
    (tmp_path / "r" / "config.json").unlink()
    with pytest.raises(DataError):
        load_run(tmp_path / "r", data)


def test_a_run_is_loaded_and_probed_on_the_data_its_config_describes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run, devices, probed = tmp_path / "r", [], []

    def resolve_device(device: str) -> torch.device:
        devices.append(device)
        return torch.device("meta")  # stands in for a GPU: a device the model is not built on

    def linear_probe(model: Any, data: Any, modality: str, num_workers: int) -> dict[str, Any]:
        probed.append((next(model.parameters()).device, data.num_classes, modality, num_workers))
        return {"modality": modality}

    monkeypatch.setattr(probe, "resolve_device", resolve_device)
    monkeypatch.setattr(probe, "linear_probe", linear_probe)
    with sized_dataset():
        sets = [*SMALL, "train.epochs=1", "train.num_workers=2", "data.num_classes=4"]
        cfg = resolve_config("baseline", "sized", sets=sets)
        Trainer(cfg, run, progress=False).fit()
        # Without a dataset at hand, load_run builds the run's own (4 classes, not the default 3).
        loaded, method = load_run(run)
        assert loaded == cfg
        best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)["method"]
        assert all(torch.equal(v, best[k]) for k, v in method.state_dict().items())
        got = probe.probe_run(run, device="cuda:1")
    assert got == {m: {"modality": m} for m in ("audio", "visual")}
    meta = torch.device("meta")
    assert devices == ["cuda:1"] and probed == [(meta, 4, "audio", 2), (meta, 4, "visual", 2)]
    assert json.loads((run / "probe.json").read_text()) == got
