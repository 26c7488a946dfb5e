"""The one training loop of BalanceMM.

``fit`` builds data, model, method and optimiser from a resolved config, trains for the protocol's
epochs calling the method's hooks, selects the epoch with the best validation score, evaluates the
test split once on that checkpoint, and writes the run directory (``engine/rundir.py``).

Everything a user can get wrong (names, config values, data paths, modality counts) is checked before
the run directory is created, so bad input never leaves one behind. A run killed at any point and
started again with the same config resumes from ``checkpoints/last.pt`` and ends with the same numbers
as an uninterrupted run: the checkpoint holds the model, the method's state, optimiser, scheduler, RNG
states, FLOP counts and the selection state; the data order of each epoch is derived from
(seed, epoch), not from a generator that advances across epochs.
"""

from __future__ import annotations

import platform
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from balancemm import __version__
from balancemm.config import OptimizerConfig, RunConfig, SchedulerConfig
from balancemm.data import Batches, MultimodalDataset, SamplePlan, SplitName, create_dataset
from balancemm.engine.artifacts import Artifacts
from balancemm.engine.evaluate import evaluate
from balancemm.engine.rundir import RunDir, read_json, write_json
from balancemm.errors import BalanceMMError, ConfigError, NonFiniteLossError
from balancemm.methods import METHODS, Method, RunContext
from balancemm.methods.context import derive_seed
from balancemm.metrics.flops import FlopMeter
from balancemm.models import ModelSpec, build_model

SCHEMA = 1


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


def resolve_device(device: str) -> torch.device:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise ConfigError(f"unknown device {device!r}; use cpu or cuda")
    return torch.device(device)


def environment(device: torch.device) -> dict[str, str]:
    return {
        "balancemm": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "threads": str(torch.get_num_threads()),
        "platform": sys.platform,
    }


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _peak_memory_mb(device: torch.device) -> tuple[float | None, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    try:
        import resource
    except ImportError:  # not on Windows
        return None, "unavailable"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_max_rss"


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
        device: str = "cpu",
        progress: bool = True,
        dataset: MultimodalDataset | None = None,
    ) -> None:
        self.cfg = cfg
        self.device = resolve_device(device)
        self.progress = progress
        self.run = RunDir(out)
        self.run_id = cfg.digest()[:12]
        method_cls = METHODS.get(cfg.run.method)
        self.method_entry = METHODS.entry(cfg.run.method)
        existing = self.run.config_hash()
        if existing is not None and existing != cfg.digest():
            raise ConfigError(
                f"{self.run.path} holds a run with a different config (hash {existing[:12]}); "
                "choose another --out or delete that directory"
            )
        # Everything below may fail on user input; nothing is written to disk until fit().
        self.data = dataset if dataset is not None else create_dataset(cfg.run.dataset, cfg.data)
        needs, n_mod = method_cls.needs_for(cfg.method), len(self.data.modalities)
        if n_mod < needs.min_modalities or (needs.max_modalities is not None and n_mod > needs.max_modalities):
            most = needs.max_modalities if needs.max_modalities is not None else "any number of"
            raise ConfigError(
                f"method {cfg.run.method} supports {needs.min_modalities} to {most} modalities, "
                f"but dataset {cfg.run.dataset} has {n_mod}"
            )
        spec = ModelSpec.from_config(cfg.model, self.data.input_shapes, self.data.num_classes)
        spec = method_cls.model_spec(spec, cfg.method)
        torch.use_deterministic_algorithms(True, warn_only=self.device.type != "cpu")
        torch.manual_seed(derive_seed(cfg.run.seed, "init"))
        model = build_model(spec)
        self.artifacts = Artifacts(cfg, self.run.path.parent, spec.modalities, self.data, self.device, progress)
        self.meter = FlopMeter(cfg.train.flops, cfg.train.flops_sample_steps)
        train = cfg.train
        self.ctx = RunContext(
            spec.modalities,
            seed=cfg.run.seed,
            num_epochs=train.epochs,
            device=self.device,
            dataset=self.data,
            needs=needs,
            batch_size=train.batch_size,
            eval_batch_size=train.eval_batch_size,
            optimizer_factory=lambda ps: build_optimizer(train.optimizer, ps),
            grad_clip=train.grad_clip,
            meter=self.meter,
            num_workers=train.num_workers,
            artifact_loader=self.artifacts.load,
        )
        self.method: Method = method_cls(model, self.ctx, cfg.method).to(self.device)
        self.optimizer = build_optimizer(train.optimizer, self.method.trainable_parameters())
        self.ctx.attach_optimizer(self.optimizer)
        self.scheduler = build_scheduler(train.scheduler, self.optimizer)
        self.best: dict[str, Any] = {"epoch": -1, "value": float("-inf")}  # selection state
        self.train_time = 0.0  # seconds in training epochs, summed over resumed segments
        self._wall_before = 0.0  # wall seconds of earlier segments of a resumed run
        self._started = time.perf_counter()

    # -- helpers ---------------------------------------------------------------------------------

    def _eval_batches(self, split: SplitName) -> Batches:
        train = self.cfg.train
        return Batches(self.data.split(split), train.eval_batch_size, device=self.device, num_workers=train.num_workers)

    def _train_batches(self, epoch: int, plan: SamplePlan | None) -> Batches:
        # The order is derived from (seed, epoch), so a resumed epoch sees exactly the same batches.
        train = self.cfg.train
        order = torch.Generator().manual_seed(derive_seed(self.cfg.run.seed, "order", epoch))
        return Batches(
            self.data.split("train"),
            train.batch_size,
            shuffle=True,
            generator=order,
            plan=plan,
            device=self.device,
            num_workers=train.num_workers,
        )

    def _say(self, text: str) -> None:
        if self.progress:
            tqdm.write(text, file=sys.stderr)

    def _state(self, epoch: int) -> dict[str, Any]:
        return {
            "epoch": epoch,
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": _rng_state(self.device),
            "generator": self.ctx.generator.get_state(),
            "step": self.ctx.step,
            "best": self.best,
            "flops": self.meter.state_dict(),
            "train_time_s": self.train_time,
            "wall_time_s": self._wall(),
            "used_val": self.ctx.used_val,
        }

    def _wall(self) -> float:
        return self._wall_before + time.perf_counter() - self._started

    def _restore(self, state: dict[str, Any]) -> int:
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"], self.device)
        self.ctx.generator.set_state(state["generator"])
        self.ctx.step = state["step"]
        self.best = state["best"]
        self.meter.load_state_dict(state["flops"])
        self.train_time = state["train_time_s"]
        self._wall_before = state["wall_time_s"]
        self.ctx.used_val = state["used_val"]
        return int(state["epoch"]) + 1

    # -- the loop --------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        """Train, select on validation, test once, write the run directory; return the summary."""
        run, cfg, method, ctx = self.run, self.cfg, self.method, self.ctx
        if run.done.is_file() and run.summary.is_file():
            self._say(f"{run.path} is already complete; not training again")
            return dict(read_json(run.summary))
        env = environment(self.device)
        # The dataset's facts sit beside the config: for prepared data, the audio profile with all its
        # parameters, so a run records exactly which preprocessing it saw.
        run.create(
            {
                "config": cfg.to_dict(),
                "config_hash": cfg.digest(),
                "run_id": self.run_id,
                "environment": env,
                "dataset": self.data.describe(),
            }
        )
        self._say(
            f"balancemm {env['balancemm']} | torch {env['torch']} | python {env['python']} | "
            f"{env['device']} ({env['threads']} threads) | run {run.path}"
        )
        self._started = time.perf_counter()
        try:
            # Artifacts (e.g. teachers) are whole runs of their own: prepared outside the FLOP meter
            # and reported separately in the summary.
            self.artifacts.prepare(self.ctx.needs.artifacts)
            torch.manual_seed(derive_seed(cfg.run.seed, "train"))
            with self.meter.counting(), ctx.hook_phase("on_fit_start"):
                method.on_fit_start()
            start = 0
            if run.last.is_file():
                start = self._restore(run.load(run.last))
                run.truncate_records(start - 1)
                self._say(f"resuming after epoch {start - 1} from {run.last}")
            self._train_epochs(start)
            return self._finish()
        except NonFiniteLossError as exc:
            run.mark_failed(str(exc))
            raise
        except BalanceMMError:
            raise
        except Exception as exc:
            run.mark_failed(f"{type(exc).__name__}: {exc}")
            raise

    def _train_epochs(self, start: int) -> None:
        cfg, method, ctx, run = self.cfg, self.method, self.ctx, self.run
        epochs = cfg.train.epochs
        writer = _tensorboard(run.tensorboard, start)
        hatch = _hatch(method)
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
            ctx.epoch = epoch
            method.train()
            t0 = time.perf_counter()
            meter = self.meter
            with meter.counting(), ctx.hook_phase("on_epoch_start"):
                plan = method.on_epoch_start(epoch)
            batches = self._train_batches(epoch, plan)
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
            whole = hatch == "train_epoch" and meter.mode == "exact"
            with meter.counting() if whole else nullcontext(), ctx.hook_phase(hatch or "other"):
                method.train_epoch(epoch, inner)
            with meter.counting(), ctx.hook_phase("on_epoch_end"):
                method.on_epoch_end(epoch)
            meter.end_epoch()
            with warnings.catch_warnings():
                # The schedule is a per-epoch clock; a method that trains with its own optimisers at
                # ctx.lr (ReconBoost's stages) never steps the run's, and torch would warn about that.
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
                self.scheduler.step()
            self.train_time += time.perf_counter() - t0
            val = evaluate(method, self._eval_batches("val"), self.data.num_classes)
            logs = ctx.pop_logs()
            record = self._record("val", epoch, val)
            record["train"] = logs
            record["lr"] = self.optimizer.param_groups[0]["lr"]
            run.append_record(record)
            if writer is not None:
                for key, value in [
                    ("val/accuracy", val["accuracy"]),
                    ("val/macro_f1", val["macro_f1"]),
                    ("val/loss", val["loss"]),
                ] + [(f"train/{k}", v) for k, v in logs.items()]:
                    writer.add_scalar(key, value, epoch)
                if val.get("imbalance") is not None:
                    writer.add_scalar("val/imbalance", val["imbalance"], epoch)
                writer.flush()
            score = val[cfg.train.select_metric]
            if score > self.best["value"]:
                self.best = {"epoch": epoch, "value": score}
                run.save(run.best, {"epoch": epoch, "method": method.state_dict()})
            run.save(run.last, self._state(epoch))
            bar.set_postfix_str(
                f"loss {logs.get('loss/ce', next(iter(logs.values()), 0.0)):.3f} val acc {100 * val['accuracy']:.1f}"
            )
        if writer is not None:
            writer.close()

    def _record(self, split: str, epoch: int, metrics: dict[str, Any]) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "schema": SCHEMA,
            "run_id": self.run_id,
            "config_hash": cfg.digest(),
            "method": cfg.run.method,
            "dataset": cfg.run.dataset,
            "seed": cfg.run.seed,
            "epoch": epoch,
            "split": split,
            **metrics,
            "train_time_s": self.train_time,
            "flops_cumulative": self.meter.total if self.meter.enabled else None,
        }

    def _finish(self) -> dict[str, Any]:
        run, cfg, method = self.run, self.cfg, self.method
        best = run.load(run.best)
        if best["epoch"] != self.best["epoch"]:
            raise RuntimeError(f"{run.best} holds epoch {best['epoch']}, expected {self.best['epoch']}")
        method.load_state_dict(best["method"])
        test = evaluate(method, self._eval_batches("test"), self.data.num_classes)
        run.append_record(self._record("test", self.best["epoch"], test))
        subsets = {}
        for name, rows in self.data.eval_subsets("test").items():
            batches = Batches(self.data.split("test"), self.cfg.train.eval_batch_size, subset=rows, device=self.device)
            scored = evaluate(method, batches, self.data.num_classes, shapley=False)
            subsets[name] = {k: scored[k] for k in ("num_samples", "accuracy", "macro_f1")}
        peak, peak_kind = _peak_memory_mb(self.device)
        params = sum(p.numel() for p in method.parameters())
        summary = {
            "schema": SCHEMA,
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
                **{k: test[k] for k in ("num_samples", "loss", "accuracy", "macro_f1", "per_modality")},
                **({"subsets": subsets} if subsets else {}),
            },
            "shapley": test["shapley"],
            "coalition_values": test["coalition_values"],
            "imbalance": test["imbalance"],
            "flops": {
                "counting": cfg.train.flops,
                "sample_steps": cfg.train.flops_sample_steps if cfg.train.flops == "sampled" else None,
                "total": self.meter.total if self.meter.enabled else None,
                "extrapolated": self.meter.extrapolated if self.meter.enabled else None,
                "by_phase": dict(sorted(self.meter.by_phase.items())) if self.meter.enabled else {},
                "artifacts": {k: a["flops"] for k, a in self.artifacts.runs.items()},
                "total_with_artifacts": (self.meter.total + sum(a["flops"] or 0 for a in self.artifacts.runs.values()))
                if self.meter.enabled
                else None,
            },
            "artifacts": self.artifacts.runs,
            "train_time_s": self.train_time,
            "wall_time_s": self._wall(),
            "peak_memory_mb": peak,
            "peak_memory_kind": peak_kind,
            "params": {
                "total": params,
                "per_modality": {
                    m: sum(p.numel() for p in method.model.modality_parameters(m)) for m in method.model.modalities
                },
            },
            "dataset_info": self.data.describe(),
            "environment": environment(self.device),
        }
        write_json(run.summary, summary)
        run.mark_done()
        return summary


def _tensorboard(path: Path, purge_step: int) -> Any:
    """A SummaryWriter, or None when TensorBoard is not installed (scalars are also in results.jsonl)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(path), purge_step=purge_step if purge_step > 0 else None)
