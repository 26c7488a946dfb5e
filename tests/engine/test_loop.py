"""The training loop, number by number, on a tiny in-memory dataset: what ``fit`` reads, writes and returns.

Each run here takes a fraction of a second (24 rows per split, 4- and 6-channel encoders), so these tests
can pin every field of the summary and the records exactly; the runs on the embedded data are in
test_trainer.py and test_resume.py.
"""

from __future__ import annotations

import hashlib
import json
import resource
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
import torch
import torch.nn.functional as F

from balancemm import __version__
from balancemm.config import OptimizerConfig, SchedulerConfig, resolve_config
from balancemm.context import Batching, Needs, derive_seed, eval_mode
from balancemm.data import SamplePlan
from balancemm.distributed import World
from balancemm.engine import trainer as loop
from balancemm.engine.evaluate import evaluate
from balancemm.engine.trainer import LAST, Trainer, build_optimizer, build_scheduler, environment, speed_up
from balancemm.errors import ConfigError, NonFiniteLossError
from balancemm.files import DamagedFile
from balancemm.methods import METHODS
from balancemm.methods.baseline import Baseline
from balancemm.models import build_model
from tests.conftest import TinyDataset, build_method, interrupted_at

SMALL = [
    "train.epochs=3",
    "train.batch_size=8",
    "train.eval_batch_size=16",
    "model.encoders.audio.channels=[4,6]",
    "model.encoders.visual.channels=[4,6]",
]


def make(tmp_path: Path, method: str = "baseline", sets: tuple[str, ...] = (), data: Any = None, **kw: Any) -> Trainer:
    cfg = resolve_config(method, sets=[*SMALL, *sets])
    return Trainer(cfg, tmp_path / "r", progress=kw.pop("progress", False), dataset=data or TinyDataset(), **kw)


def records(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]


def scripted_validation(monkeypatch: pytest.MonkeyPatch, **values: list[float]) -> None:
    """Validation scores overwritten epoch by epoch (the real evaluation runs); the test split keeps its own."""
    real, calls = loop.evaluate, {"val": 0}
    epochs = len(next(iter(values.values())))

    def evaluate(*args: Any, **kwargs: Any) -> dict[str, Any]:
        out, k = real(*args, **kwargs), calls["val"]
        calls["val"] += 1
        return {**out, **{key: v[k] for key, v in values.items()}} if k < epochs else out

    monkeypatch.setattr(loop, "evaluate", evaluate)


class Watched(Baseline):
    """Baseline that logs what the loop hands it: the step counter, one draw from each random source,
    a loss term the test chooses per epoch, and whether it read the validation split."""

    fake_loss: ClassVar[dict[int, float]] = {}
    reads_val_in: ClassVar[int | None] = None
    acting: ClassVar[tuple[int, ...] | None] = None
    fail: ClassVar[tuple[int, BaseException] | None] = None
    plan: ClassVar[SamplePlan | None] = None
    first_draw: ClassVar[list[float]] = []
    runs_model: ClassVar[bool] = False

    def on_fit_start(self) -> None:
        Watched.first_draw.append(torch.rand(1).item())

    def on_epoch_start(self, epoch: int) -> SamplePlan | None:
        if Watched.fail is not None and Watched.fail[0] == epoch:
            raise Watched.fail[1]
        if Watched.reads_val_in == epoch:
            next(iter(self.ctx.batches("val")))
        if Watched.runs_model:
            with self.ctx.eval_mode(self.model):
                self.model(next(iter(self.ctx.batches("train"))))
        return Watched.plan

    def on_epoch_end(self, epoch: int) -> None:
        self.ctx.log(
            step=self.ctx.step,
            host=torch.rand(1).item(),
            method=torch.rand(1, generator=self.ctx.generator).item(),
            **{"loss/fake": Watched.fake_loss.get(epoch, 0.0)},
        )

    def acts_in(self, epoch: int) -> bool:
        return Watched.acting is not None and epoch in Watched.acting


@pytest.fixture
def watched() -> Any:
    Watched.fake_loss, Watched.reads_val_in, Watched.acting, Watched.fail, Watched.plan = {}, None, None, None, None
    Watched.first_draw, Watched.needs, Watched.runs_model = [], Needs(), False
    with METHODS.temporary():
        METHODS.register("watched", group="reference")(Watched)
        yield Watched


# -- the pieces -----------------------------------------------------------------------------------


def test_optimisers_and_schedules_follow_the_config() -> None:
    def params() -> list[torch.nn.Parameter]:
        return [torch.nn.Parameter(torch.zeros(2))]

    sgd = build_optimizer(OptimizerConfig("sgd", lr=0.3, momentum=0.7, weight_decay=0.01), params())
    assert type(sgd) is torch.optim.SGD
    assert (sgd.defaults["lr"], sgd.defaults["momentum"], sgd.defaults["weight_decay"]) == (0.3, 0.7, 0.01)
    adamw = build_optimizer(OptimizerConfig("adamw", lr=0.2, weight_decay=0.05), params())
    assert type(adamw) is torch.optim.AdamW and (adamw.defaults["lr"], adamw.defaults["weight_decay"]) == (0.2, 0.05)
    adam = build_optimizer(OptimizerConfig("adam", lr=0.1, weight_decay=0.02), params())
    assert type(adam) is torch.optim.Adam and (adam.defaults["lr"], adam.defaults["weight_decay"]) == (0.1, 0.02)

    def rates(cfg: SchedulerConfig) -> list[float]:
        opt = torch.optim.SGD(params(), lr=1.0)
        sched = build_scheduler(cfg, opt)
        out = []
        for _ in range(5):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    assert rates(SchedulerConfig("step", step_size=2, gamma=0.5)) == [1.0, 1.0, 0.5, 0.5, 0.25]
    assert rates(SchedulerConfig("none", step_size=1, gamma=0.5)) == [1.0] * 5


def test_environment_and_peak_memory_on_the_cpu() -> None:
    import platform

    env = environment(torch.device("cpu"), "bf16")
    assert env == {
        "balancemm": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": "cpu",
        "precision": "bf16",
        "threads": str(torch.get_num_threads()),
        "platform": sys.platform,
    }
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak, kind = loop._peak_memory_mb(torch.device("cpu"))
    assert kind == "process_max_rss" and peak is not None
    unit = 2**20 if sys.platform == "darwin" else 2**10
    assert before / unit <= peak <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / unit


def test_peak_memory_reads_the_platforms_unit(monkeypatch: pytest.MonkeyPatch) -> None:
    # ru_maxrss counts kilobytes on Linux and bytes on macOS; 3 MiB either way.
    usage = {"darwin": 3 * 2**20, "linux": 3 * 2**10}
    for platform, maxrss in usage.items():
        monkeypatch.setattr(sys, "platform", platform)
        monkeypatch.setattr(resource, "getrusage", lambda who, maxrss=maxrss: SimpleNamespace(ru_maxrss=maxrss))
        assert loop._peak_memory_mb(torch.device("cpu")) == (3.0, "process_max_rss"), platform


def test_the_escape_hatch_a_method_overrides_is_named() -> None:
    class Step(Baseline):
        def training_step(self, batch: Any) -> Any:
            return super().training_step(batch)

    class Epoch(Step):
        def train_epoch(self, epoch: int, batches: Any) -> None:
            super().train_epoch(epoch, batches)

    method = object.__new__
    assert loop._hatch(method(Baseline)) is None
    assert loop._hatch(method(Step)) == "training_step"
    assert loop._hatch(method(Epoch)) == "train_epoch"


def test_speed_switches_apply_to_convolutional_encoders(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.conftest import tiny_model

    model = tiny_model(TinyDataset())
    speed_up(model, channels_last=True, compile=False)
    kernels = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert kernels and all(k.is_contiguous(memory_format=torch.channels_last) and k.dim() == 4 for k in kernels)
    # 1-D convolutions (the audio encoder's) have no channels-last layout and stay as they were.
    assert all(m.weight.is_contiguous() for m in model.modules() if isinstance(m, torch.nn.Conv1d))

    # torch.compile's result runs every step except those under a dispatch mode (the FLOP counter).
    calls: list[str] = []

    def compile(f: Any) -> Any:
        def compiled(*args: Any, **kwargs: Any) -> Any:
            calls.append("compiled")
            return f(*args, **kwargs)

        return compiled

    monkeypatch.setattr(torch, "compile", compile)
    model = tiny_model(TinyDataset())
    plain = model.encoders["audio"].forward
    speed_up(model, channels_last=False, compile=True)
    assert "forward" in vars(model.encoders["audio"]) and model.encoders["visual"].forward != plain
    x = torch.randn(2, 4, 6)
    assert torch.equal(model.encoders["audio"](x), plain(x)) and calls == ["compiled"]
    from balancemm.metrics.flops import FlopMeter

    meter = FlopMeter("exact")
    with meter.counting():
        model.encoders["audio"](x)
    assert calls == ["compiled"] and meter.total > 0


def test_the_loss_check_warns_once_when_the_loss_grows_a_thousandfold(tmp_path: Path) -> None:
    t = make(tmp_path)
    t._check_loss(0, {"loss/ce": 0.0, "train_accuracy": 5.0})  # no positive loss yet: no reference
    assert t.loss_check == {"first": None, "flagged_at": None}
    t._check_loss(1, {"loss/ce": 2.0, "loss/aux": -1.0, "train_accuracy": 0.5})  # |terms| summed
    assert t.loss_check == {"first": 3.0, "flagged_at": None}
    t._check_loss(2, {"loss/ce": 3000.0})  # exactly the limit is not over it
    assert t.loss_check["flagged_at"] is None and t.warnings == []
    t._check_loss(3, {"loss/ce": 3000.5})
    t._check_loss(4, {"loss/ce": 1e9})  # once only
    assert t.loss_check == {"first": 3.0, "flagged_at": 3}
    assert t.warnings == [
        "the training loss grew from 3 in the first epoch to 3e+03 in epoch 3 (more than 1000×): training "
        "diverged and the results are probably meaningless; lower train.optimizer.lr"
    ]


def test_the_checkpoint_state_is_exactly_what_resuming_reads(tmp_path: Path) -> None:
    t = make(tmp_path)
    state = t._state(0)
    assert set(state) == set(LAST)
    assert list(state["rng"]) == ["torch"]  # a CPU run has no device generator to save
    assert torch.equal(state["rng"]["torch"], torch.get_rng_state())
    assert state["config_hash"] == t.cfg.digest() and state["epoch"] == 0 and state["step"] == 0


def test_the_run_context_gets_the_training_config(tmp_path: Path) -> None:
    sets = ("train.eval_batch_size=5", "train.grad_clip=2.5", "train.optimizer.name=adamw", "run.seed=4")
    t = make(tmp_path, sets=sets)
    ctx = t.ctx
    assert ctx.batching == Batching(8, 5, torch.device("cpu"), 0)
    assert (ctx._grad_clip, ctx.num_epochs, ctx.seed) == (2.5, 3, 4)
    assert ctx.needs == Needs() and ctx.device == torch.device("cpu") and ctx.precision.name == "fp32"
    assert ctx.meter is t.meter and ctx.optimizer is t.optimizer
    assert type(t.optimizer) is torch.optim.AdamW and type(ctx.new_optimizer(t.method.parameters())) is (
        torch.optim.AdamW
    )
    assert t.run_id == t.cfg.digest()[:12] and t.concurrent_jobs == 1


def test_the_model_is_initialised_from_the_seed_and_training_from_another(tmp_path: Path, watched: Any) -> None:
    t = make(tmp_path, "watched", sets=("run.seed=3",))
    torch.manual_seed(derive_seed(3, "init"))
    expected = build_model(t._model_spec())
    for (name, p), q in zip(t.method.model.state_dict().items(), expected.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    t.fit()
    training = torch.Generator().manual_seed(derive_seed(3, "train"))
    assert watched.first_draw == [torch.rand(1, generator=training).item()]


def test_each_epoch_has_its_own_order_from_the_seed_and_evaluation_none(tmp_path: Path) -> None:
    t = make(tmp_path, sets=("run.seed=2",))
    split = t.data.split("train")

    def rows(batches: Any) -> list[int]:
        return [i for b in batches for i in b.index.tolist()]

    for epoch in (0, 1):
        order = torch.Generator().manual_seed(derive_seed(2, "order", epoch))
        assert rows(t._batches("train", epoch)) == rows(t.ctx.batching(split, shuffle=True, generator=order))
    assert rows(t._batches("train", 0)) != rows(t._batches("train", 1))
    assert rows(t._batches("val")) == list(range(24))


def test_evaluation_adds_up_every_batch() -> None:
    # Batches of 7, 7 and 6 rows score as the 20 rows in one batch: no batch is dropped or counted alone.
    data = TinyDataset(n=20)
    method = build_method("baseline", data)
    split = data.split("test")
    whole = next(iter(Batching()(split, batch_size=20)))
    with eval_mode(method):
        out = method.predict(whole)
    got = evaluate(method, Batching()(split, batch_size=7), 3)
    assert got["num_samples"] == 20
    assert got["loss"] == pytest.approx(F.cross_entropy(out.logits, whole.label).item(), rel=1e-6)
    assert got["accuracy"] == pytest.approx((out.logits.argmax(1) == whole.label).double().mean().item())
    for m, logits in out.unimodal_logits.items():
        accuracy = (logits.argmax(1) == whole.label).double().mean().item()
        assert got["per_modality"][m]["accuracy"] == pytest.approx(accuracy), m
    predicted = out.logits.argmax(1).to(torch.int64).numpy().astype("<i8")
    assert got["predictions_sha256"] == hashlib.sha256(predicted.tobytes()).hexdigest()


def test_data_parallel_evaluation_sums_every_ranks_counts() -> None:
    # Two ranks that scored the same rows: every count doubles, every rate is what one rank found, and the
    # predictions are both ranks' in rank order.
    data = TinyDataset(n=20)
    method = build_method("baseline", data)
    batches = list(Batching()(data.split("test"), batch_size=7))
    alone = evaluate(method, batches, 3)
    ctx = method.ctx
    ctx.world = World(0, 2)
    ctx.all_sum = lambda t: 2 * t  # type: ignore[method-assign]
    ctx.gather = lambda t: torch.cat([t, t])  # type: ignore[method-assign]
    both = evaluate(method, batches, 3)
    digest, count = "predictions_sha256", "num_samples"
    assert {k: v for k, v in both.items() if k not in (digest, count)} == {
        k: v for k, v in alone.items() if k not in (digest, count)
    }
    assert both[count] == 40
    with eval_mode(method):
        predicted = torch.cat([method.predict(b).logits.argmax(1) for b in batches]).numpy().astype("<i8")
    assert both[digest] == hashlib.sha256(predicted.tobytes() * 2).hexdigest()


def test_a_rank_other_than_the_first_waits_for_it_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    waits: list[World] = []
    monkeypatch.setattr(loop, "barrier", waits.append)
    t = make(tmp_path)
    t.world = World(1, 2)
    monkeypatch.setattr(t, "_fit", lambda: {"rank": 1})
    assert t.fit() == {"rank": 1}
    # Rank 0 creates the run directory; rank 1 waits for it on the run's process group.
    assert waits == [World(1, 2)] and not (tmp_path / "r").exists()


def test_the_epoch_bar_of_a_resumed_run_starts_at_its_first_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bars: list[tuple[list[int], int, int]] = []

    class Stop(Exception):
        pass

    def tqdm(epochs: range, **kw: Any) -> Any:
        bars.append((list(epochs), kw.get("initial", 0), kw["total"]))
        raise Stop  # the bar is all this test looks at

    monkeypatch.setattr(loop, "tqdm", tqdm)
    monkeypatch.setattr(loop, "_tensorboard", lambda path, start: None)
    with pytest.raises(Stop):
        make(tmp_path)._train_epochs(2)
    assert bars == [([2], 2, 3)]  # shows 2/3 done, not 0/3


def test_an_epoch_trains_on_the_sample_plan_its_method_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, watched: Any
) -> None:
    extra = torch.full((9,), 5)
    watched.plan = SamplePlan(extra_index=extra, extra_present=torch.tensor([[True, False]]).expand(9, 2))
    t = make(tmp_path, "watched")
    rows: list[int] = []
    real = t.method.train_epoch

    def train_epoch(epoch: int, batches: Any) -> None:
        batches = list(batches)
        rows.extend(i for b in batches for i in b.index.tolist())
        real(epoch, batches)

    monkeypatch.setattr(t.method, "train_epoch", train_epoch)
    t._train_epoch(0)
    assert sorted(rows) == sorted([*range(24), *[5] * 9]) and t.ctx.step == 5  # 33 rows, batches of 8


def test_rows_left_out_of_a_data_parallel_epoch_are_warned_about_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    t = make(tmp_path)
    t.world = World(0, 4)
    t.warnings.append("an earlier warning")
    real = t._batches

    def dropping(split: Any, epoch: int | None = None, plan: Any = None) -> Any:
        batches = real(split, epoch, plan)
        batches.dropped = 3  # as a last global batch of 3 rows on 4 ranks
        return batches

    monkeypatch.setattr(t, "_batches", dropping)
    for epoch in (0, 1, 2):
        t._train_epoch(epoch)
    message = (
        f"{loop.DROPPED} (3 rows, fewer than the 4 processes) in epoch 0; a train.batch_size that leaves a "
        "larger remainder keeps every row"
    )
    assert t.warnings == ["an earlier warning", message]
    assert capsys.readouterr().err == f"balancemm: warning: {message}\n"


@pytest.mark.parametrize(("mask", "other"), [("feature", "input"), ("input", "feature")])
def test_the_test_split_is_scored_under_both_masking_rules(tmp_path: Path, mask: str, other: str) -> None:
    t = make(tmp_path, sets=(f"model.mask={mask}",))
    model, keys = t.method.model, ("shapley", "coalition_values", "imbalance")
    test = evaluate(t.method, t._batches("test"), 3)
    with model.masking(other):
        scored = evaluate(t.method, t._batches("test"), 3)
    by_mask = t._shapley_by_mask(test)
    assert by_mask == {mask: {k: test[k] for k in keys}, other: {k: scored[k] for k in keys}}
    assert list(by_mask) == ["feature", "input"] and model.mask == mask


# -- a whole run ----------------------------------------------------------------------------------


def test_a_run_writes_these_records_and_this_summary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scripted_validation(monkeypatch, accuracy=[0.5, 0.75, 0.75])
    data = TinyDataset()
    sets = ("train.optimizer.lr=0.04", "train.scheduler.step_size=1", "train.scheduler.gamma=0.5", "train.flops=exact")
    t = make(tmp_path, sets=sets, data=data, concurrent_jobs=3)
    s = t.fit()
    run = tmp_path / "r"
    saved = json.loads((run / "config.json").read_text())
    assert saved == {
        "config": t.cfg.to_dict(),
        "config_hash": t.cfg.digest(),
        "run_id": t.run_id,
        "environment": environment(torch.device("cpu"), "fp32"),
        "dataset": data.describe(),
    }
    recs = records(run)
    val, test = recs[:3], recs[3]
    common = {"schema": 1, "run_id": t.run_id, "config_hash": t.cfg.digest(), "method": "baseline"}
    common |= {"dataset": "embedded", "seed": 0}
    for epoch, r in enumerate(val):
        assert {k: r[k] for k in common} == common and (r["epoch"], r["split"]) == (epoch, "val")
        assert set(r["train"]) == {"loss/ce", "train_accuracy"} and r["train_time_s"] > 0
    # Each record has the rate its epoch trained at (the step schedule halves it after each epoch).
    assert [r["lr"] for r in val] == [0.04, 0.02, 0.01]
    assert [r["accuracy"] for r in val] == [0.5, 0.75, 0.75]
    assert val[0]["flops_cumulative"] < val[1]["flops_cumulative"] < val[2]["flops_cumulative"] == s["flops"]["total"]
    assert {k: test[k] for k in common} == common and (test["epoch"], test["split"]) == (1, "test")
    assert "train" not in test and "lr" not in test

    # The test split is scored once, on epoch 1's weights (the tie at epoch 2 keeps the earlier one).
    assert torch.load(run / "checkpoints/best.pt", weights_only=True)["epoch"] == 1
    again = evaluate(t.method, t._batches("test"), 3)
    assert {k: test[k] for k in again} == again
    kept = ("num_samples", "loss", "accuracy", "macro_f1", "per_modality", "predictions_sha256")
    assert s["test"] == {k: again[k] for k in kept}
    assert s["test"]["num_samples"] == 24
    model = t.method.model
    with model.masking("input"):  # the paper's rule, scored beside the run's own
        by_input = evaluate(t.method, t._batches("test"), 3)
    shapley = ("shapley", "coalition_values", "imbalance")
    fixed = {
        "schema": 1,
        "status": "complete",
        "run_id": t.run_id,
        "config_hash": t.cfg.digest(),
        "method": "baseline",
        "method_group": "reference",
        "dataset": "embedded",
        "seed": 0,
        "modalities": ["audio", "visual"],
        "selected_epoch": 1,
        "selection": {"split": "val", "metric": "accuracy", "value": 0.75},
        "used_validation_in_training": False,
        "intervention": {"epochs": [], "first": None, "before_selected": False},
        "per_modality_heads": "unimodal",
        "shapley": again["shapley"],
        "coalition_values": again["coalition_values"],
        "imbalance": again["imbalance"],
        "shapley_mask": "feature",
        "shapley_by_mask": {"feature": {k: again[k] for k in shapley}, "input": {k: by_input[k] for k in shapley}},
        "precision": {"name": "fp32", "requested": "auto", "loss_scale": None, "skipped_steps": None},
        "artifacts": {},
        "concurrent_jobs": 3,
        "peak_memory_kind": "process_max_rss",
        "params": {
            "total": sum(p.numel() for p in t.method.parameters()),
            "per_modality": {m: sum(p.numel() for p in model.modality_parameters(m)) for m in ("audio", "visual")},
        },
        "dataset_info": data.describe(),
        "environment": environment(torch.device("cpu"), "fp32"),
        "warnings": [],
    }
    assert {k: s[k] for k in fixed} == fixed
    assert s["params"]["per_modality"]["audio"] > 0 and s["params"]["total"] > sum(s["params"]["per_modality"].values())
    flops = s["flops"]
    assert flops["counting"] == "exact" and flops["sample_steps"] is None and flops["extrapolated"] == 0
    assert flops["total"] == sum(flops["by_phase"].values()) == flops["total_with_artifacts"] > 0
    assert list(flops["by_phase"]) == sorted(flops["by_phase"]) and flops["artifacts"] == {}
    assert 0 < s["train_time_s"] <= s["wall_time_s"] and s["peak_memory_mb"] > 0
    assert json.loads((run / "summary.json").read_text()) == s and (run / "done").is_file()


def test_sampled_flop_counting_is_described_in_the_summary(tmp_path: Path) -> None:
    s = make(tmp_path, sets=("train.flops_sample_steps=2", "train.epochs=1")).fit()
    flops = s["flops"]
    assert (flops["counting"], flops["sample_steps"]) == ("sampled", 2)
    assert flops["total"] == sum(flops["by_phase"].values()) and flops["extrapolated"] > 0
    off = make(tmp_path / "off", sets=("train.flops=off", "train.epochs=1")).fit()["flops"]
    assert off == {
        "counting": "off",
        "sample_steps": None,
        "total": None,
        "extrapolated": None,
        "by_phase": {},
        "artifacts": {},
        "total_with_artifacts": None,
    }
    assert records(tmp_path / "off" / "r")[0]["flops_cumulative"] is None


def test_selection_reads_the_configured_metric(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scripted_validation(monkeypatch, accuracy=[0.9, 0.1, 0.2], macro_f1=[0.1, 0.3, 0.2])
    s = make(tmp_path, sets=("train.select_metric=macro_f1",)).fit()
    assert s["selected_epoch"] == 1 and s["selection"] == {"split": "val", "metric": "macro_f1", "value": 0.3}


def test_the_intervention_is_the_epochs_the_method_acts_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, watched: Any
) -> None:
    watched.acting = (1, 2)
    scripted_validation(monkeypatch, accuracy=[0.2, 0.5, 0.4])
    s = make(tmp_path, "watched").fit()
    assert s["intervention"] == {"epochs": [1, 2], "first": 1, "before_selected": True}
    scripted_validation(monkeypatch, accuracy=[0.6, 0.5, 0.4])
    s = make(tmp_path / "b", "watched").fit()
    assert s["intervention"] == {"epochs": [1, 2], "first": 1, "before_selected": False}


def test_tensorboard_gets_the_records_scalars(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[Any] = []

    class Writer:
        def __init__(self, path: Path, purge_step: int) -> None:
            self.path, self.purge_step, self.flushes, self.closed = path, purge_step, 0, False
            self.scalars: list[tuple[str, float, int]] = []
            made.append(self)

        def add_scalar(self, key: str, value: float, step: int) -> None:
            self.scalars.append((key, value, step))

        def flush(self) -> None:
            self.flushes += 1

        def close(self) -> None:
            self.closed = True

    monkeypatch.setattr(loop, "_tensorboard", Writer)
    with interrupted_at(monkeypatch, 2), pytest.raises(KeyboardInterrupt):
        make(tmp_path).fit()
    make(tmp_path).fit()
    first, second = made
    assert (first.path, first.purge_step, second.purge_step) == (tmp_path / "r" / "tb", 0, 2)
    assert not first.closed and second.closed and (first.flushes, second.flushes) == (2, 1)
    for r in records(tmp_path / "r")[:3]:
        writer = first if r["epoch"] < 2 else second
        got = {k: v for k, v, step in writer.scalars if step == r["epoch"]}
        assert got == {
            "val/accuracy": r["accuracy"],
            "val/macro_f1": r["macro_f1"],
            "val/loss": r["loss"],
            "val/imbalance": r["imbalance"],
            **{f"train/{k}": v for k, v in r["train"].items()},
        }


def test_tensorboard_is_told_where_a_resumed_run_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tensorboard = pytest.importorskip("torch.utils.tensorboard")
    monkeypatch.setattr(tensorboard, "SummaryWriter", lambda path, purge_step: (path, purge_step))
    assert loop._tensorboard(tmp_path, 0) == (str(tmp_path), None)
    assert loop._tensorboard(tmp_path, 3) == (str(tmp_path), 3)


def test_named_test_subsets_are_scored_on_the_selected_weights(tmp_path: Path) -> None:
    even = torch.arange(0, 24, 2)

    class WithSubsets(TinyDataset):
        def eval_subsets(self, split: Any) -> dict[str, torch.Tensor]:
            return {"even": even} if split == "test" else {}

    t = make(tmp_path, data=WithSubsets())
    s = t.fit()
    scored = evaluate(t.method, t.ctx.batching(t.data.split("test"), subset=even), 3, shapley=False)
    assert s["test"]["subsets"] == {"even": {k: scored[k] for k in ("num_samples", "accuracy", "macro_f1")}}
    assert scored["num_samples"] == 12


# -- resuming, failing, refusing ----------------------------------------------------------------------


@pytest.mark.parametrize("warn_at", [1, 2])
def test_a_resumed_run_continues_every_piece_of_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, watched: Any, warn_at: int
) -> None:
    # Epoch 0 sets the loss reference, epoch `warn_at` grows past it; validation is read in epoch 0 only;
    # the logged draws show the host and method generators, the logged step the step counter.
    watched.fake_loss, watched.reads_val_in = {0: 1.0, 1: 1.0, 2: 1.0, warn_at: 1e5}, 0
    watched.needs = Needs(val=True)
    whole = make(tmp_path / "whole", "watched").fit()
    with interrupted_at(monkeypatch, 2), pytest.raises(KeyboardInterrupt):
        make(tmp_path / "cut", "watched").fit()
    before = torch.load(tmp_path / "cut" / "r" / "checkpoints" / "last.pt", weights_only=False)
    resumed = make(tmp_path / "cut", "watched").fit()
    for key in ("test", "shapley", "selected_epoch", "selection", "flops", "used_validation_in_training"):
        assert resumed[key] == whole[key], key
    assert whole["used_validation_in_training"] and len(whole["warnings"]) == 1
    assert resumed["warnings"] == whole["warnings"]
    cut, full = records(tmp_path / "cut" / "r"), records(tmp_path / "whole" / "r")
    assert [r.get("train") for r in cut] == [r.get("train") for r in full]
    assert resumed["train_time_s"] > before["train_time_s"] and resumed["wall_time_s"] > before["wall_time_s"]


def test_a_checkpoint_trained_in_another_precision_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with interrupted_at(monkeypatch, 1), pytest.raises(KeyboardInterrupt):
        make(tmp_path).fit()
    t = make(tmp_path)
    t.precision = "bf16"  # as on a device that runs the same "auto" config in bf16
    with pytest.raises(ConfigError) as err:
        t.fit()
    assert str(err.value) == (
        f"{tmp_path / 'r'} was trained in fp32 and this device runs bf16; resume it with --set "
        "train.precision=fp32 on a device that supports it, or choose another --out"
    )


def test_a_best_checkpoint_of_another_epoch_is_damage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scripted_validation(monkeypatch, accuracy=[0.5, 0.6, 0.1])  # epoch 2, after the resume, selects nothing
    with interrupted_at(monkeypatch, 2), pytest.raises(KeyboardInterrupt):
        make(tmp_path).fit()
    t = make(tmp_path)
    best = t.run.load(t.run.best)
    t.run.save(t.run.best, {**best, "epoch": 7})
    with pytest.raises(DamagedFile) as err:
        t.fit()
    # Deleting best.pt and running again would not bring the selected weights back: the remedy says so.
    remedy = t.run.remedy(t.run.best)
    assert remedy.startswith("the selected epoch's weights are lost: ")
    assert str(err.value) == f"{t.run.best} holds epoch 7, but last.pt selected epoch 1; {remedy}"


def test_failures_are_marked_and_cleared_by_a_run_that_succeeds(tmp_path: Path, watched: Any) -> None:
    run = tmp_path / "r"
    watched.fail = (1, RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        make(tmp_path, "watched").fit()
    assert (run / "failed").read_text() == "RuntimeError: boom\n" and not (run / "done").exists()
    # The user's own mistakes (BalanceMMError) are said, not recorded as a failed run.
    watched.fail = (1, ConfigError("bad"))
    with pytest.raises(ConfigError):
        make(tmp_path, "watched").fit()
    assert not (run / "failed").exists()
    watched.fail = (2, NonFiniteLossError("loss term 'x' became nan"))
    with pytest.raises(NonFiniteLossError):
        make(tmp_path, "watched").fit()
    assert (run / "failed").read_text() == "loss term 'x' became nan\n"
    watched.fail = None
    s = make(tmp_path, "watched").fit()
    assert not (run / "failed").exists() and (run / "done").is_file() and s["status"] == "complete"


def test_a_finished_run_is_returned_and_another_config_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    first = make(tmp_path).fit()
    capsys.readouterr()
    assert make(tmp_path, progress=True).fit() == first
    assert capsys.readouterr().err.strip() == f"{tmp_path / 'r'} is already complete; not training again"
    with pytest.raises(ConfigError) as err:
        make(tmp_path, sets=("train.epochs=2",))
    assert str(err.value) == (
        f"{tmp_path / 'r'} holds a run with a different config (hash {first['config_hash'][:12]}); "
        "choose another --out or delete that directory"
    )


def test_the_console_names_the_environment(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import platform

    make(tmp_path, sets=("train.epochs=1",), progress=True).fit()
    lines = capsys.readouterr().err.splitlines()
    assert (
        f"balancemm {__version__} | torch {torch.__version__} | python {platform.python_version()} | "
        f"cpu fp32 ({torch.get_num_threads()} threads) | run {tmp_path / 'r'}"
    ) in lines


def test_the_console_names_the_gpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import platform

    # The device's facts as on a GPU machine, so the line is checked on any machine.
    facts = {"device": "cuda:0", "gpu": "NVIDIA H100 80GB HBM3", "cuda": "12.4"}
    monkeypatch.setattr(loop, "device_environment", lambda device: facts)
    make(tmp_path, progress=True)._say_environment()
    assert capsys.readouterr().err.splitlines() == [
        f"balancemm {__version__} | torch {torch.__version__} | python {platform.python_version()} | "
        f"cuda:0 NVIDIA H100 80GB HBM3, fp32 ({torch.get_num_threads()} threads) | run {tmp_path / 'r'}"
    ]


@pytest.mark.parametrize("bounds", [(3, None), (1, 1)])
def test_a_method_refuses_a_modality_count_it_does_not_support(
    tmp_path: Path, watched: Any, bounds: tuple[int, int | None]
) -> None:
    watched.needs = Needs(min_modalities=bounds[0], max_modalities=bounds[1])
    with pytest.raises(ConfigError) as err:
        make(tmp_path, "watched")
    most = "any number of" if bounds[1] is None else bounds[1]
    assert str(err.value) == f"method watched supports {bounds[0]} to {most} modalities, but dataset embedded has 2"
    assert not (tmp_path / "r").exists()
    watched.needs = Needs(min_modalities=2, max_modalities=2)
    make(tmp_path, "watched")  # the bounds are inclusive


def test_a_one_sample_split_scores_its_coalitions_out_of_one() -> None:
    # v(S) is a fraction of the samples: with one sample every coalition is worth 0 or 1, never a half.
    data = TinyDataset(n=1)
    got = evaluate(build_method("baseline", data), Batching()(data.split("test")), 3)
    assert got["num_samples"] == 1 and set(got["coalition_values"].values()) <= {0.0, 1.0}
    assert got["accuracy"] in (0.0, 1.0) and got["coalition_values"]["audio+visual"] == got["accuracy"]


def test_a_resumed_run_says_where_it_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    with interrupted_at(monkeypatch, 2), pytest.raises(KeyboardInterrupt):
        make(tmp_path, progress=True).fit()
    capsys.readouterr()
    make(tmp_path, progress=True).fit()
    assert f"resuming after epoch 1 from {tmp_path / 'r' / 'checkpoints' / 'last.pt'}" in capsys.readouterr().err


def test_work_in_a_hook_is_counted_under_the_hooks_name(tmp_path: Path, watched: Any) -> None:
    # The cost table names each hook's FLOPs (a method's own phase aside): here a forward pass at epoch start.
    watched.runs_model = True
    phases = make(tmp_path, "watched").fit()["flops"]["by_phase"]
    assert phases.get("on_epoch_start", 0) > 0, phases
