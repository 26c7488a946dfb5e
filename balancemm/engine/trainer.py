"""The one training loop of BalanceMM.

``fit`` builds data, model, method and optimiser from a resolved config, trains for the protocol's
epochs calling the method's hooks, selects the epoch with the best validation score, evaluates the
test split once on that checkpoint, and writes the run directory (``engine/rundir.py``).

Everything a user can get wrong (names, config values, data paths, modality counts) is checked before
the run directory is created, so bad input never leaves one behind. A run killed at any point and
started again with the same config resumes from ``checkpoints/last.pt`` and ends with the same numbers
as an uninterrupted run: the checkpoint holds the model, the method's state, optimiser, scheduler, RNG
states (the host's, the device's and the method's generators), the fp16 loss scale, FLOP counts and
the selection state; the data order of each epoch is derived from (seed, epoch), not from a
generator that advances across epochs.

Every method hook runs inside the run's autocast (``train.precision``); see ``balancemm/precision.py``.
"""

from __future__ import annotations

import platform
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode
from tqdm.auto import tqdm

from balancemm import __version__
from balancemm.config import OptimizerConfig, RunConfig, SchedulerConfig
from balancemm.context import RunContext, derive_seed
from balancemm.data import SPLITS, Batches, MultimodalDataset, SamplePlan, SplitName, create_dataset
from balancemm.data.loader import close_loaders
from balancemm.device import deterministic_setup, device_environment, resolve_device, resolve_precision
from balancemm.distributed import World, barrier, gather_objects
from balancemm.engine.artifacts import Artifacts
from balancemm.engine.evaluate import evaluate
from balancemm.engine.rundir import BEST, RunDir
from balancemm.errors import BalanceMMError, ConfigError, NonFiniteLossError
from balancemm.files import DamagedFile
from balancemm.layout import SCHEMA_VERSION, Schema, write_json
from balancemm.methods import METHODS, Method
from balancemm.metrics.flops import FlopMeter
from balancemm.models import ModelSpec, MultimodalClassifier, build_model
from balancemm.precision import Precision

# A run whose mean training loss in an epoch exceeds this multiple of its first epoch's is diverging,
# even while every loss stays finite (NonFiniteLossError catches the rest). Across the 162 runs of a
# 30-epoch bench on the embedded data no method went above 1.1 times its first epoch's loss.
LOSS_GROWTH_LIMIT = 1e3
# The start of the warning of a data-parallel run whose last global batch cannot give every rank a row.
DROPPED = "the last global batch of an epoch is left out"
# What last.pt must hold (the keys of Trainer._state).
LAST: Schema = {
    "epoch": int,
    "config_hash": str,
    "method": dict,
    "optimizer": dict,
    "scheduler": dict,
    "rng": dict,
    "generator": torch.Tensor,
    "precision": dict,
    "step": int,
    "best": dict,
    "flops": dict,
    "train_time_s": float,
    "wall_time_s": float,
    "used_val": bool,
    "loss_check": dict,
    "warnings": list,
}


def build_optimizer(cfg: OptimizerConfig, params: Any) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(cfg: SchedulerConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    if cfg.name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, cfg.step_size, cfg.gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def environment(device: torch.device, precision: str) -> dict[str, str]:
    return {
        "balancemm": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        **device_environment(device),
        "precision": precision,
        "threads": str(torch.get_num_threads()),
        "platform": sys.platform,
    }


def speed_up(model: MultimodalClassifier, *, channels_last: bool, compile: bool) -> None:
    """``train.channels_last`` and ``train.compile``, applied to the encoders in place.

    Channels-last converts only encoders with 2-D convolutions (their 4-D kernels; activations follow
    the kernels' layout). Compiling replaces each encoder's ``forward`` on the instance, so parameter
    names, checkpoints and resume are unchanged, and FLOP counting still sees every operator (counted
    steps run uncompiled, see :func:`_compiled`; the counts equal an uncompiled run's).
    """
    for encoder in model.encoders.values():
        if channels_last and any(isinstance(m, torch.nn.Conv2d) for m in encoder.modules()):
            encoder.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        if compile:
            encoder.forward = _compiled(encoder.forward)


def _compiled(forward: Callable[..., Any]) -> Callable[..., Any]:
    """``forward`` compiled, except while a dispatch mode (the FLOP counter) is active: torch.compile
    cannot trace under one, and a frame it once declined is never compiled again; so counted steps
    run the plain forward and every other step the compiled one."""
    compiled = torch.compile(forward)

    def run(*args: Any, **kwargs: Any) -> Any:
        return (forward if _get_current_dispatch_mode() is not None else compiled)(*args, **kwargs)

    return run


def _rng_state(device: torch.device, ctx: RunContext) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
        state["method_device"] = ctx.device_generator.get_state()
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device, ctx: RunContext) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
        ctx.device_generator.set_state(state["method_device"])


def _peak_memory_mb(device: torch.device) -> tuple[float | None, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    try:
        import resource
    except ImportError:  # not on Windows
        return None, "unavailable"
    # ru_maxrss is in kilobytes on Linux but in bytes on macOS.
    unit = 2**20 if sys.platform == "darwin" else 2**10
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / unit, "process_max_rss"


def _hatch(method: Method) -> str | None:
    """The escape hatch a method overrides, which then owns FLOP attribution for the epoch."""
    cls = type(method)
    if cls.train_epoch is not Method.train_epoch:
        return "train_epoch"
    if cls.training_step is not Method.training_step:
        return "training_step"
    return None


class Trainer:
    """Owns one run: call :meth:`fit` once."""

    def __init__(
        self,
        cfg: RunConfig,
        out: str | Path,
        *,
        device: str = "auto",
        progress: bool = True,
        dataset: MultimodalDataset | None = None,
        concurrent_jobs: int | None = 1,
        world: World | None = None,
    ) -> None:
        self.cfg = cfg
        # A data-parallel run: every rank trains, rank 0 alone writes the run directory and speaks.
        self.world = world or World()
        # How many jobs shared this machine while it trained (a sweep's --jobs; None: unknown, e.g. a
        # cluster): the report says when times were measured under contention.
        self.concurrent_jobs = concurrent_jobs
        self.device = resolve_device(device)
        if self.world.distributed and self.device.type == "cuda":
            self.device = torch.device("cuda", self.world.local_rank)
        self._refuse_distributed_misfits()
        # Before anything runs on the device: deterministic cuBLAS must be set up before it starts.
        deterministic_setup(self.device, cfg.train.deterministic)
        self.precision = resolve_precision(cfg.train.precision, self.device)
        self.progress = progress and self.world.main
        self.run = RunDir(out)
        self.run_id = cfg.digest()[:12]
        self.method_entry = METHODS.entry(cfg.run.method)
        self._refuse_another_config()
        # Everything below may fail on user input; nothing is written to disk until fit().
        self.data = dataset if dataset is not None else create_dataset(cfg.run.dataset, cfg.data)
        spec = self._model_spec()
        self.method = self._build_method(spec)
        self.optimizer = build_optimizer(cfg.train.optimizer, self.method.trainable_parameters())
        self.ctx.attach_optimizer(self.optimizer, self.method)
        self.scheduler = build_scheduler(cfg.train.scheduler, self.optimizer)
        self.best: dict[str, Any] = {"epoch": -1, "value": float("-inf")}  # selection state
        # The first epoch's training loss, and the epoch it was found to have grown too much (_check_loss).
        self.loss_check: dict[str, Any] = {"first": None, "flagged_at": None}
        self.warnings: list[str] = []  # what the summary flags about this run
        self.train_time = 0.0  # seconds in training epochs, summed over resumed segments
        self._wall_before = 0.0  # wall seconds of earlier segments of a resumed run
        self._started = time.perf_counter()

    # -- building --------------------------------------------------------------------------------

    def _refuse_distributed_misfits(self) -> None:
        train, ranks = self.cfg.train, self.world.size
        if train.batch_size % ranks:
            raise ConfigError(
                f"train.batch_size={train.batch_size} is the global batch and must divide by the {ranks} "
                f"processes; choose a multiple of {ranks}"
            )
        if train.sync_bn and self.device.type != "cuda":
            raise ConfigError("train.sync_bn synchronises BatchNorm across GPUs; on a CPU set train.sync_bn=false")

    def _refuse_another_config(self) -> None:
        existing = self.run.config_hash()
        if existing is not None and existing != self.cfg.digest():
            raise ConfigError(
                f"{self.run.path} holds a run with a different config (hash {existing[:12]}); "
                "choose another --out or delete that directory"
            )

    def _model_spec(self) -> ModelSpec:
        """The model the method asks for, after checking it supports the dataset's modality count."""
        cfg = self.cfg
        method_cls = METHODS.get(cfg.run.method)
        needs, n_mod = method_cls.needs_for(cfg.method), len(self.data.modalities)
        if n_mod < needs.min_modalities or (needs.max_modalities is not None and n_mod > needs.max_modalities):
            most = needs.max_modalities if needs.max_modalities is not None else "any number of"
            raise ConfigError(
                f"method {cfg.run.method} supports {needs.min_modalities} to {most} modalities, "
                f"but dataset {cfg.run.dataset} has {n_mod}"
            )
        spec = ModelSpec.from_config(cfg.model, self.data.input_shapes, self.data.num_classes)
        return method_cls.model_spec(spec, cfg.method)

    def _build_method(self, spec: ModelSpec) -> Method:
        """Model (seeded), context and method on the device, with the speed switches applied."""
        cfg, train = self.cfg, self.cfg.train
        method_cls = METHODS.get(cfg.run.method)
        torch.manual_seed(derive_seed(cfg.run.seed, "init"))
        model = build_model(spec)
        if train.sync_bn and self.world.distributed:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        root = self.run.path.parent
        self.artifacts = Artifacts(cfg, root, spec.modalities, self.data, self.device, self._fit_artifact)
        self.meter = FlopMeter(train.flops, train.flops_sample_steps)
        self.ctx = RunContext(
            spec.modalities,
            seed=cfg.run.seed,
            num_epochs=train.epochs,
            device=self.device,
            dataset=self.data,
            needs=method_cls.needs_for(cfg.method),
            batch_size=train.batch_size,
            eval_batch_size=train.eval_batch_size,
            optimizer_factory=lambda ps: build_optimizer(train.optimizer, ps),
            grad_clip=train.grad_clip,
            meter=self.meter,
            num_workers=train.num_workers,
            artifact_loader=self.artifacts.load,
            precision=Precision(self.precision, self.device.type),
            world=self.world,
        )
        method: Method = method_cls(model, self.ctx, cfg.method).to(self.device)
        speed_up(model, channels_last=train.channels_last, compile=train.compile)
        return method

    # -- helpers ---------------------------------------------------------------------------------

    def _batches(self, split: SplitName, epoch: int | None = None, plan: SamplePlan | None = None) -> Batches:
        """A split's batches: shuffled for training, with the order derived from (seed, epoch), so a
        resumed epoch sees exactly the same batches; in split order for evaluation."""
        shuffled = epoch is not None
        order = torch.Generator().manual_seed(derive_seed(self.cfg.run.seed, "order", epoch)) if shuffled else None
        return self.ctx.batching(self.data.split(split), shuffle=shuffled, generator=order, plan=plan)

    def _fit_artifact(self, cfg: RunConfig, out: Path) -> dict[str, Any]:
        """Train (or reuse) the run an artifact is, in ``out``, on this run's data, device and console."""
        return Trainer(
            cfg, out, device=str(self.device), progress=self.progress, dataset=self.data, world=self.world
        ).fit()

    def _say(self, text: str) -> None:
        if self.progress:
            tqdm.write(text, file=sys.stderr)

    def _warn(self, text: str) -> None:
        """One line on the console, also with --quiet (no progress bars is not no news), and in the summary."""
        self.warnings.append(text)
        if self.world.main:
            tqdm.write(f"balancemm: warning: {text}", file=sys.stderr)

    def _state(self, epoch: int) -> dict[str, Any]:
        return {
            "epoch": epoch,
            "config_hash": self.cfg.digest(),
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": _rng_state(self.device, self.ctx),
            "generator": self.ctx.generator.get_state(),
            "precision": self.ctx.precision.state_dict(),
            "step": self.ctx.step,
            "best": self.best,
            "flops": self.meter.state_dict(),
            "train_time_s": self.train_time,
            "wall_time_s": self._wall(),
            "used_val": self.ctx.used_val,
            "loss_check": self.loss_check,
            "warnings": self.warnings,
        }

    def _wall(self) -> float:
        return self._wall_before + time.perf_counter() - self._started

    def _resume_point(self) -> dict[str, Any] | None:
        """last.pt, verified and in this run's precision; None when there is no checkpoint yet."""
        if not self.run.last.is_file():
            return None
        state = self.run.load(self.run.last, LAST)
        saved = state["precision"].get("name")
        if saved != self.precision:
            raise ConfigError(
                f"{self.run.path} was trained in {saved} and this device runs {self.precision}; resume it "
                f"with --set train.precision={saved} on a device that supports it, or choose another --out"
            )
        return state

    def _restore(self, state: dict[str, Any]) -> None:
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"], self.device, self.ctx)
        self.ctx.generator.set_state(state["generator"])
        self.ctx.precision.load_state_dict(state["precision"])
        self.ctx.step = state["step"]
        self.best = state["best"]
        self.meter.load_state_dict(state["flops"])
        self.train_time = state["train_time_s"]
        self._wall_before = state["wall_time_s"]
        self.ctx.used_val = state["used_val"]
        self.loss_check = dict(state["loss_check"])
        self.warnings = list(state["warnings"])

    @contextmanager
    def _hook(self, name: str, *, counted: bool = True) -> Iterator[None]:
        """Around a method hook: the run's autocast, its FLOP phase, and counting unless told not to."""
        with self.meter.counting() if counted else nullcontext(), self.ctx.hook_phase(name), self.ctx.autocast():
            yield

    # -- the loop --------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        """Train, select on validation, test once, write the run directory; return the summary.

        The run directory is locked for the whole of it: a second process is refused, not trained twice.
        """
        finished = self._finished()
        if finished is not None:
            return finished
        if not self.world.main:
            barrier(self.world)  # rank 0 has opened the run directory
            return self._fit()
        self._open_run()
        with self.run.locked():
            barrier(self.world)
            # Another process may have finished the run since the first look.
            finished = self._finished()
            return finished if finished is not None else self._fit()

    def _finished(self) -> dict[str, Any] | None:
        """The summary of the run, if it is complete."""
        run = self.run
        if not (run.done.is_file() and run.summary.is_file()):
            return None
        summary = run.read_summary()
        self._say(f"{run.path} is already complete; not training again")
        return summary

    def _fit(self) -> dict[str, Any]:
        run, cfg = self.run, self.cfg
        if self.world.main:
            run.failed.unlink(missing_ok=True)
        self._say_environment()
        try:
            # The resume point and the records are checked before anything is trained (teachers too).
            state = self._resume_point()
            start = 0 if state is None else int(state["epoch"]) + 1
            # Also without a checkpoint: a kill in the first epoch can leave its validation record.
            if self.world.main:
                run.truncate_records(start - 1)
            # Artifacts (e.g. teachers) are whole runs of their own: prepared outside the FLOP meter
            # and reported separately in the summary.
            self.artifacts.prepare(self.ctx.needs.artifacts)
            torch.manual_seed(derive_seed(cfg.run.seed, "train"))
            with self._hook("on_fit_start"):
                self.method.on_fit_start()
            if state is not None:
                self._restore(state)
                self._say(f"resuming after epoch {start - 1} from {run.last}")
            self._train_epochs(start)
            return self._finish()
        except NonFiniteLossError as exc:
            if self.world.main:
                run.mark_failed(str(exc))
            raise
        except BalanceMMError:
            raise
        except Exception as exc:
            if self.world.main:
                run.mark_failed(f"{type(exc).__name__}: {exc}")
            raise
        finally:
            close_loaders([self.data.split(s) for s in SPLITS])

    def _open_run(self) -> None:
        """Create (or reopen) the run directory with the config, the environment and the dataset's facts."""
        # For prepared data the dataset's facts include the audio profile with all its parameters, so
        # a run records exactly which preprocessing it saw.
        self.run.create(
            {
                "config": self.cfg.to_dict(),
                "config_hash": self.cfg.digest(),
                "run_id": self.run_id,
                "environment": environment(self.device, self.precision),
                "dataset": self.data.describe(),
            }
        )

    def _say_environment(self) -> None:
        env = environment(self.device, self.precision)
        gpu = f" {env['gpu']}," if "gpu" in env else ""
        self._say(
            f"balancemm {env['balancemm']} | torch {env['torch']} | python {env['python']} | "
            f"{env['device']}{gpu} {env['precision']} ({env['threads']} threads) | run {self.run.path}"
        )
        self._started = time.perf_counter()

    def _train_epochs(self, start: int) -> None:
        epochs = self.cfg.train.epochs
        writer = _tensorboard(self.run.tensorboard, start) if self.world.main else None
        bar = tqdm(
            range(start, epochs),
            desc="epochs",
            initial=start,
            total=epochs,
            disable=not self.progress,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        for epoch in bar:
            # The rate this epoch trains at: the scheduler steps at the epoch's end.
            lr = self.optimizer.param_groups[0]["lr"]
            logs = self._train_epoch(epoch)
            self._check_loss(epoch, logs)
            val = evaluate(self.method, self._batches("val"), self.data.num_classes)
            self._write_epoch(epoch, val, logs, lr, writer)
            self._select(epoch, val)
            if self.world.main:
                self.run.save(self.run.last, self._state(epoch))
            # The cross-entropy when the method logs one, else its first loss term (AUG logs only per-modality
            # terms, and its own scalars come first in name order).
            terms = [v for k, v in logs.items() if k.startswith("loss/")]
            loss = logs.get("loss/ce", terms[0] if terms else 0.0)
            bar.set_postfix_str(f"loss {loss:.3f} val acc {100 * val['accuracy']:.1f}")
        if writer is not None:
            writer.close()

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        """One epoch of the method's hooks; returns the means of what was logged during it."""
        method, ctx, meter = self.method, self.ctx, self.meter
        ctx.epoch = epoch
        method.train()
        t0 = time.perf_counter()
        with self._hook("on_epoch_start"):
            plan = method.on_epoch_start(epoch)
        batches = self._batches("train", epoch, plan)
        if batches.dropped and not any(w.startswith(DROPPED) for w in self.warnings):
            self._warn(
                f"{DROPPED} ({batches.dropped} rows, fewer than the {self.world.size} processes) in epoch {epoch}; "
                "a train.batch_size that leaves a larger remainder keeps every row"
            )
        inner = tqdm(
            batches,
            desc=f"epoch {epoch}",
            leave=False,
            disable=not self.progress,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        # Each step decides whether it is counted (sampled mode), also in a method that owns the epoch;
        # in exact mode such a method is counted whole, including any work between its steps.
        hatch = _hatch(method)
        with self._hook(hatch or "other", counted=hatch == "train_epoch" and meter.mode == "exact"):
            method.train_epoch(epoch, inner)
        with self._hook("on_epoch_end"):
            method.on_epoch_end(epoch)
        meter.end_epoch()
        with warnings.catch_warnings():
            # The schedule is a per-epoch clock; a method that trains with its own optimisers at
            # ctx.lr (ReconBoost's stages) never steps the run's, and torch would warn about that.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            self.scheduler.step()
        self.train_time += time.perf_counter() - t0
        return ctx.pop_logs()

    def _check_loss(self, epoch: int, logs: dict[str, float]) -> None:
        """Warn (once) when the epoch's training loss exceeds LOSS_GROWTH_LIMIT × the first epoch's.

        The loss is the sum of the magnitudes of the epoch's mean loss terms (``loss/*`` in the records),
        so terms of either sign count; the first epoch with a positive loss sets the reference.
        """
        loss, check = sum(abs(v) for k, v in logs.items() if k.startswith("loss/")), self.loss_check
        if check["first"] is None:
            check["first"] = loss if loss > 0 else None
        elif loss > LOSS_GROWTH_LIMIT * check["first"] and check["flagged_at"] is None:
            check["flagged_at"] = epoch
            self._warn(
                f"the training loss grew from {check['first']:.3g} in the first epoch to {loss:.3g} in epoch "
                f"{epoch} (more than {LOSS_GROWTH_LIMIT:.0f}×): training diverged and the results are probably "
                "meaningless; lower train.optimizer.lr"
            )

    def _write_epoch(self, epoch: int, val: dict[str, Any], logs: dict[str, float], lr: float, writer: Any) -> None:
        """The epoch's line in results.jsonl (with the learning rate it trained at) and its TensorBoard scalars."""
        record = self._record("val", epoch, val)
        record["train"] = logs
        record["lr"] = lr
        if self.world.main:
            self.run.append_record(record)
        if writer is None:
            return
        scalars = [("val/accuracy", val["accuracy"]), ("val/macro_f1", val["macro_f1"]), ("val/loss", val["loss"])]
        if val.get("imbalance") is not None:
            scalars.append(("val/imbalance", val["imbalance"]))
        for key, value in scalars + [(f"train/{k}", v) for k, v in logs.items()]:
            writer.add_scalar(key, value, epoch)
        writer.flush()

    def _select(self, epoch: int, val: dict[str, Any]) -> None:
        """Keep the weights of the best epoch on validation (the first one on a tie)."""
        score = val[self.cfg.train.select_metric]
        if score > self.best["value"]:
            self.best = {"epoch": epoch, "value": score}
            if self.world.main:
                self.run.save(
                    self.run.best,
                    {"epoch": epoch, "config_hash": self.cfg.digest(), "method": self.method.state_dict()},
                )

    def _record(self, split: str, epoch: int, metrics: dict[str, Any]) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "schema": SCHEMA_VERSION,
            "run_id": self.run_id,
            "config_hash": cfg.digest(),
            "method": cfg.run.method,
            "dataset": cfg.run.dataset,
            "seed": cfg.run.seed,
            "epoch": epoch,
            "split": split,
            **metrics,
            "train_time_s": self.train_time,
            "flops_cumulative": self._global_flops()["total"] if self.meter.enabled else None,
        }

    # -- the end ---------------------------------------------------------------------------------

    def _finish(self) -> dict[str, Any]:
        """Test the selected epoch once, then write the summary and the done marker."""
        test, subsets = self._test()
        summary = self._summary(test, subsets)
        if self.world.main:
            write_json(self.run.summary, summary)
            self.run.mark_done()
        return summary

    def _test(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Load the selected epoch's weights; score the test split, and its named subsets (no Shapley)."""
        run, method = self.run, self.method
        barrier(self.world)  # rank 0 has saved the last selected weights
        best = run.load(run.best, BEST)
        if best["epoch"] != self.best["epoch"]:
            raise DamagedFile(
                run.best,
                f"holds epoch {best['epoch']}, but {run.last.name} selected epoch {self.best['epoch']}",
                run.remedy(run.best),
            )
        method.load_state_dict(best["method"])
        test = evaluate(method, self._batches("test"), self.data.num_classes)
        test["shapley_by_mask"] = self._shapley_by_mask(test)
        record = self._record("test", self.best["epoch"], test)
        if self.world.main:
            run.append_record(record)
        subsets = {}
        for name, rows in self.data.eval_subsets("test").items():
            batches = self.ctx.batching(self.data.split("test"), subset=rows)
            scored = evaluate(method, batches, self.data.num_classes, shapley=False)
            subsets[name] = {k: scored[k] for k in ("num_samples", "accuracy", "macro_f1")}
        return test, subsets

    def _shapley_by_mask(self, test: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """Shapley values, coalition values and imbalance degree under both masking rules.

        The run's own rule (``model.mask``, feature masking by default: one encoder pass per batch) is the
        one validation and the top-level summary fields use. The paper's toolkit zeroes absent modalities'
        *inputs* before the encoders, which can give a quite different imbalance degree, so the single test
        evaluation scores that rule too and both can be set beside the paper's figures.
        """
        model, keys = self.method.model, ("shapley", "coalition_values", "imbalance")
        out = {model.mask: {k: test[k] for k in keys}}
        if len(model.modalities) > 1:  # one modality: no imbalance to compare
            other = "input" if model.mask == "feature" else "feature"
            with model.masking(other):
                scored = evaluate(self.method, self._batches("test"), self.data.num_classes)
            out[other] = {k: scored[k] for k in keys}
        return dict(sorted(out.items()))

    def _summary(self, test: dict[str, Any], subsets: dict[str, Any]) -> dict[str, Any]:
        cfg, method = self.cfg, self.method
        peak, peak_kind = _peak_memory_mb(self.device)
        precision = self.ctx.precision
        return {
            "schema": SCHEMA_VERSION,
            "status": "complete",
            "run_id": self.run_id,
            "config_hash": cfg.digest(),
            "method": cfg.run.method,
            "method_group": self.method_entry.meta.get("group"),
            "dataset": cfg.run.dataset,
            "seed": cfg.run.seed,
            "modalities": list(method.model.modalities),
            "selected_epoch": self.best["epoch"],
            "selection": {"split": "val", "metric": cfg.train.select_metric, "value": self.best["value"]},
            "used_validation_in_training": self.ctx.used_val,
            "test": {
                **{
                    k: test[k]
                    for k in ("num_samples", "loss", "accuracy", "macro_f1", "per_modality", "predictions_sha256")
                },
                **({"subsets": subsets} if subsets else {}),
            },
            "intervention": self._intervention(),
            "per_modality_heads": "cross-modal" if method.model.mid_fusion is not None else "unimodal",
            "shapley": test["shapley"],
            "coalition_values": test["coalition_values"],
            "imbalance": test["imbalance"],
            "shapley_mask": method.model.mask,
            "shapley_by_mask": test["shapley_by_mask"],
            "flops": self._flops(),
            "precision": {
                "name": precision.name,
                "requested": cfg.train.precision,
                "loss_scale": precision.scale if precision.scaled else None,
                "skipped_steps": precision.skipped if precision.scaled else None,
            },
            "artifacts": self.artifacts.runs,
            "train_time_s": self.train_time,
            "wall_time_s": self._wall(),
            "concurrent_jobs": self.concurrent_jobs,
            "peak_memory_mb": peak,
            "peak_memory_kind": peak_kind,
            "params": {
                "total": sum(p.numel() for p in method.parameters()),
                "per_modality": {
                    m: sum(p.numel() for p in method.model.modality_parameters(m)) for m in method.model.modalities
                },
            },
            "dataset_info": self.data.describe(),
            "environment": environment(self.device, self.precision),
            "distributed": {"world_size": self.world.size, "backend": self.world.backend},
            "warnings": self.warnings,
        }

    def _intervention(self) -> dict[str, Any]:
        """The epochs in which the method's schedule changed training, and whether one came by the
        selected epoch: if none did, the selected weights are plain training under another name."""
        epochs = [e for e in range(self.cfg.train.epochs) if self.method.acts_in(e)]
        return {
            "epochs": epochs,
            "first": epochs[0] if epochs else None,
            "before_selected": bool(epochs) and epochs[0] <= self.best["epoch"],
        }

    def _global_flops(self) -> dict[str, Any]:
        """The FLOP counts of every rank added up (each rank counts its own shards): the run's training cost."""
        by_phase: dict[str, int] = {}
        extrapolated = 0
        for part in gather_objects((dict(self.meter.by_phase), self.meter.extrapolated), self.world):
            for phase, flops in part[0].items():
                by_phase[phase] = by_phase.get(phase, 0) + flops
            extrapolated += part[1]
        return {"total": sum(by_phase.values()), "by_phase": by_phase, "extrapolated": extrapolated}

    def _flops(self) -> dict[str, Any]:
        cfg, on = self.cfg, self.meter.enabled
        artifacts = {k: a["flops"] for k, a in self.artifacts.runs.items()}
        counted = self._global_flops()
        return {
            "counting": cfg.train.flops,
            "sample_steps": cfg.train.flops_sample_steps if cfg.train.flops == "sampled" else None,
            "total": counted["total"] if on else None,
            "extrapolated": counted["extrapolated"] if on else None,
            "by_phase": dict(sorted(counted["by_phase"].items())) if on else {},
            "artifacts": artifacts,
            "total_with_artifacts": counted["total"] + sum(f or 0 for f in artifacts.values()) if on else None,
        }


def _tensorboard(path: Path, purge_step: int) -> Any:
    """A SummaryWriter, or None when TensorBoard is not installed (scalars are also in results.jsonl)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(path), purge_step=purge_step if purge_step > 0 else None)
