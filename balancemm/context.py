"""RunContext: the only door from a method to the run.

The trainer builds one per run and hands it to the method. Methods never touch the trainer, the
loaders, loggers or file paths; they ask the context. Two rules are enforced here:

1. ``batches("test")`` raises: no method ever sees the test split.
2. ``batches("val")`` raises unless the method declared ``needs.val``.

The engine owns the run, so the context sits below both the methods and the engine: the methods and the
engine import it, it imports neither. :class:`Batching` is the one way batches of a run are built, by
the context for the method and by the trainer for evaluation, so the run's loader settings (batch sizes,
device, workers) are never forgotten.
"""

from __future__ import annotations

import copy
import hashlib
import math
import typing
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from balancemm.data.base import MultimodalDataset, Split, SplitName
from balancemm.data.batch import Batch, SamplePlan
from balancemm.data.loader import Batches
from balancemm.distributed import World, all_gather_rows, all_sum, broadcast_, gather_objects, shard_bounds
from balancemm.errors import NonFiniteLossError
from balancemm.metrics.flops import FlopMeter
from balancemm.precision import Precision

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


def derive_seed(seed: int, *names: object) -> int:
    """A stable 63-bit seed from the run seed and a purpose name (DomainBed-style hashing)."""
    digest = hashlib.sha256(repr((seed, *names)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@dataclass(frozen=True)
class Needs:
    """What a method requires from the run, checked before training starts.

    Attributes:
        val: reads the validation split during training (G-Blending, LFM, Relearning); the run's
            summary records it.
        min_modalities, max_modalities: the modality counts the method supports.
        artifacts: runs the trainer prepares before ``on_fit_start`` and ``ctx.artifact`` serves;
            ``"unimodal"`` = a frozen unimodal model per modality trained with the same protocol.
    """

    val: bool = False
    min_modalities: int = 2
    max_modalities: int | None = None
    artifacts: tuple[str, ...] = ()


@contextmanager
def eval_mode(module: nn.Module, grad: bool = False) -> Iterator[None]:
    """Eval mode (and no gradients unless ``grad``) inside; every submodule's mode is restored on exit."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        with torch.set_grad_enabled(grad):
            yield
    finally:
        for m, training in modes.items():
            m.train(training)


@dataclass(frozen=True)
class Batching:
    """How a run builds batches: its batch sizes, its device and its loader workers.

    Calling it gives :class:`~balancemm.data.loader.Batches` of a split, shuffled with the training
    batch size or in split order with the evaluation batch size (unless ``batch_size`` says otherwise),
    always on the run's device (pinned memory on a GPU) and read by the run's persistent workers.
    """

    batch_size: int = 64
    eval_batch_size: int = 256
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    num_workers: int = 0
    #: (rank, ranks) of a data-parallel run: each rank reads its shard (see ``Batches``).
    shard: tuple[int, int] = (0, 1)
    #: sees every batch handed out (the run context keeps the share of the latest).
    observer: Callable[[Batch], None] | None = field(default=None, compare=False)

    def __call__(
        self,
        split: Split,
        *,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        plan: SamplePlan | None = None,
        subset: Tensor | None = None,
        batch_size: int | None = None,
    ) -> Batches:
        if batch_size is None:
            batch_size = self.batch_size if shuffle else self.eval_batch_size
        return Batches(
            split,
            batch_size,
            shuffle=shuffle,
            generator=generator,
            plan=plan,
            subset=subset,
            device=self.device,
            num_workers=self.num_workers,
            persistent=True,  # the run's loader pool: no worker start-up per call (the trainer closes it)
            shard=self.shard,
            observer=self.observer,
        )


class DataAccessError(RuntimeError):
    """A method asked for data it may not see (a bug in the method, not a user error)."""


@dataclass
class _Mean:
    total: float = 0.0
    count: int = 0


class RunContext:
    """What a method may know and do during a run.

    Attributes:
        epoch, step, num_epochs: progress (0-based epoch; ``step`` counts optimiser steps).
        modalities: the model's sorted modality names.
        generator: seeded per run; the only source of method randomness (GE noise, sampling).
        device_generator: the same for randomness drawn where the model lives (OGM-GE's gradient
            noise), so no step copies random numbers from the host; it is ``generator`` itself on a CPU.
        device: where the model lives.
        precision: autocast and loss scaling (``train.precision``); methods take gradients through
            :meth:`backward` and :meth:`grad`, which always leave true (unscaled) gradients.
        world: this process's rank among the run's (one process: ``World()``). In a data-parallel run
            every batch a method gets is this rank's shard of the global batch; :meth:`backward` and
            :meth:`grad` leave the global batch's gradients on every rank, and :meth:`all_sum` /
            :meth:`gather` turn a statistic of the shard into the global batch's (see ``methods/base.py``).
        share: the fraction of its global batch that the latest batch handed out holds (1 on one process).
    """

    def __init__(
        self,
        modalities: tuple[str, ...],
        *,
        seed: int = 0,
        num_epochs: int = 1,
        device: torch.device | str = "cpu",
        dataset: MultimodalDataset | None = None,
        needs: Needs | None = None,
        batch_size: int = 64,
        eval_batch_size: int = 256,
        optimizer_factory: OptimizerFactory | None = None,
        grad_clip: float = 0.0,
        meter: FlopMeter | None = None,
        num_workers: int = 0,
        artifact_loader: Callable[[str, str], nn.Module] | None = None,
        precision: Precision | None = None,
        world: World | None = None,
    ) -> None:
        self.modalities = modalities
        self.seed = seed
        self.num_epochs = num_epochs
        self.device = torch.device(device)
        self.epoch = 0
        self.step = 0
        self.generator = torch.Generator().manual_seed(derive_seed(seed, "method"))
        self._device_generator = (
            None
            if self.device.type == "cpu"
            else torch.Generator(device=self.device).manual_seed(derive_seed(seed, "method", "device"))
        )
        self.precision = precision or Precision("fp32", self.device.type)
        self.optimizer: torch.optim.Optimizer | None = None
        self._module: nn.Module | None = None
        self._checked = False  # the current step's gradients were found finite (fp16)
        self._dataset = dataset
        self._needs = needs or Needs()
        self.world = world or World()
        self.share = 1.0
        shard = (self.world.rank, self.world.size)
        observer = self._saw if self.world.distributed else None
        self.batching = Batching(batch_size, eval_batch_size, self.device, num_workers, shard, observer)
        self._optimizer_factory = optimizer_factory
        self._grad_clip = grad_clip
        self.meter = meter or FlopMeter("off")
        self._logs: defaultdict[str, _Mean] = defaultdict(_Mean)
        self._artifact_loader = artifact_loader
        self.used_val = False

    def spawn(self, optimizer: torch.optim.Optimizer) -> RunContext:
        """A context for a side model (G-Blending's per-head trainings): same data, generator, FLOP
        meter, precision, artifacts and rules, its own optimiser and step counter, and logs that do not
        reach the run's."""
        child = copy.copy(self)  # everything of the run, shared: the same objects, not copies of them
        # A method replaced on this instance only (a test's spy on the run's steps) is not the child's.
        for name in [k for k in vars(child) if callable(getattr(type(child), k, None))]:
            delattr(child, name)
        child.step, child.optimizer, child._module, child._checked = 0, None, None, False
        if child.world.distributed:
            # The child's batches tell the child their share (its backward passes weigh by it).
            child.batching = replace(self.batching, observer=child._saw)
        child._logs = defaultdict(_Mean)
        child.used_val = False
        child.attach_optimizer(optimizer)
        return child

    @property
    def device_generator(self) -> torch.Generator:
        return self.generator if self._device_generator is None else self._device_generator

    @property
    def needs(self) -> Needs:
        return self._needs

    def artifact(self, kind: str, modality: str) -> nn.Module:
        """A frozen artifact the method declared in ``needs.artifacts`` (e.g. a unimodal teacher)."""
        if kind not in self._needs.artifacts or self._artifact_loader is None:
            raise DataAccessError(f"artifact {kind!r} was not declared in needs.artifacts")
        return self._artifact_loader(kind, modality)

    # -- optimisation ----------------------------------------------------------------------------

    def attach_optimizer(self, optimizer: torch.optim.Optimizer, module: nn.Module | None = None) -> None:
        """Called by the trainer: the protocol's optimiser over every trainable parameter, and the
        method itself, whose parameters loss scaling must reach."""
        self.optimizer = optimizer
        if module is not None:
            self._module = module

    def _optimizer(self, optimizer: torch.optim.Optimizer | None) -> torch.optim.Optimizer:
        """``optimizer``, or the run's when None."""
        optimizer = optimizer or self.optimizer
        if optimizer is None:
            raise RuntimeError("no optimiser attached to this context")
        return optimizer

    def _grad_params(self) -> list[nn.Parameter]:
        """Every parameter a backward pass can give a gradient: the method's and the optimiser's."""
        found: dict[int, nn.Parameter] = {}
        sources = [self._module.parameters()] if self._module is not None else []
        if self.optimizer is not None:
            sources.append(p for g in self.optimizer.param_groups for p in g["params"])
        for source in sources:
            for p in source:
                if p.requires_grad:
                    found.setdefault(id(p), p)
        return list(found.values())

    def autocast(self) -> AbstractContextManager[None]:
        """The run's autocast (``train.precision``); the trainer opens it around every hook."""
        return typing.cast(AbstractContextManager[None], self.precision.autocast())

    def backward(self, loss: Tensor, **kwargs: Any) -> None:
        """``loss.backward(**kwargs)`` under the run's precision: outside autocast, loss-scaled in fp16,
        and the gradients it leaves in ``.grad`` are true ones, whatever was accumulated before.

        In a data-parallel run the gradient this pass adds is averaged over the ranks, each weighted by
        its share of the global batch, so every rank holds the global batch's gradient afterwards.
        """
        distributed = self.world.distributed
        params = self._grad_params() if self.precision.scaled or distributed else []
        before = {id(p): p.grad.detach().clone() for p in params if p.grad is not None} if distributed else {}
        self.precision.backward(loss, params if self.precision.scaled else [], **kwargs)
        if distributed:
            self._sync_grads(params, before)

    def grad(
        self, outputs: Tensor | Sequence[Tensor], inputs: Sequence[Tensor], **kwargs: Any
    ) -> tuple[Tensor | None, ...]:
        """``torch.autograd.grad`` under the run's precision: true gradients, also in fp16; in a
        data-parallel run, the global batch's (as :meth:`backward`)."""
        grads = self.precision.grad(outputs, inputs, **kwargs)
        if not self.world.distributed:
            return grads
        like = [inputs] if isinstance(inputs, Tensor) else list(inputs)  # autograd takes one tensor too
        return tuple(self._global_sum([self.share * g if g is not None else None for g in grads], like))

    def _sync_grads(self, params: list[nn.Parameter], before: dict[int, Tensor]) -> None:
        """Replace the gradient each of ``params`` gained in this rank's pass by the ranks' weighted sum."""
        added = [
            None if p.grad is None else self.share * (p.grad - before[id(p)] if id(p) in before else p.grad)
            for p in params
        ]
        for p, total in zip(params, self._global_sum(added, params), strict=True):
            if total is not None:
                p.grad = total + before[id(p)] if id(p) in before else total

    def _global_sum(self, tensors: list[Tensor | None], like: Sequence[Tensor]) -> list[Tensor | None]:
        """The sum over ranks of each tensor, in one collective; a tensor that is None on every rank stays
        None, one that is None on some ranks counts as zeros there (a branch only some shards took).

        Which tensors some rank holds travels in the same collective as the values (a flag per tensor at
        the end): one all-reduce per backward pass, whatever the number of parameters."""
        present = torch.tensor([t is not None for t in tensors], dtype=torch.float32, device=self.device)
        parts = [
            (t if t is not None else torch.zeros_like(x)).reshape(-1).float()
            for t, x in zip(tensors, like, strict=True)
        ]
        flat = all_sum(torch.cat([*parts, present]), self.world)
        held = (flat[-len(tensors) :] > 0).tolist() if tensors else []  # one read back to the host
        out: list[Tensor | None] = []
        offset = 0
        for x, h in zip(like, held, strict=True):
            out.append(flat[offset : offset + x.numel()].view_as(x).to(x.dtype) if h else None)
            offset += x.numel()
        return out

    def _saw(self, batch: Batch) -> None:
        self.share = batch.share

    # -- collectives -------------------------------------------------------------------------------

    def all_sum(self, t: Tensor) -> Tensor:
        """``t`` summed over the ranks (``t`` itself on one process): a sum over this rank's rows becomes
        the sum over the global batch's, so every rank computes the same statistic."""
        return all_sum(t, self.world)

    def global_mean(self, t: Tensor) -> Tensor:
        """The mean over the rows of ``t`` ``[n_r, ...]`` of every rank (``t.mean(0)`` on one process):
        the global batch's mean, whatever share of it each rank holds."""
        if not self.world.distributed:
            return t.mean(0)
        rows = torch.tensor(t.shape[0], dtype=t.dtype, device=t.device)
        return self.all_sum(t.sum(0)) / self.all_sum(rows)

    def rows_in_global_batch(self, batch: Batch) -> tuple[int, int, int]:
        """``(start, end, size)``: this rank holds rows ``start:end`` of its global batch of ``size`` rows
        (``(0, len(batch), len(batch))`` on one process). Per-row randomness drawn for all ``size`` rows
        from ``ctx.generator`` and sliced to ``start:end`` is the one process's draw, row for row."""
        if not self.world.distributed:
            return 0, len(batch), len(batch)
        size = round(len(batch) / batch.share)
        start, end = shard_bounds(size, self.world.rank, self.world.size)
        return start, end, size

    def gather(self, t: Tensor) -> Tensor:
        """``[n_r, ...]`` rows of every rank concatenated in rank order (``t`` itself on one process): a
        per-row quantity of the shard becomes the global batch's, in its order."""
        return all_gather_rows(t, self.world)

    def overflowed(self, optimizer: torch.optim.Optimizer | None = None) -> bool:
        """Whether a gradient of this step overflowed under fp16 loss scaling (the step must then be
        skipped with :meth:`skip_step`); always false in fp32 and bf16, at no cost."""
        optimizer = self._optimizer(optimizer)
        if not self.precision.scaled:
            self._checked = True
            return False
        params = [p for g in optimizer.param_groups for p in g["params"]]
        self._checked = self.precision.finite(params)
        return not self._checked

    def skip_step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Drop this step's gradients after an fp16 overflow: no update, a smaller loss scale."""
        optimizer = self._optimizer(optimizer)
        optimizer.zero_grad(set_to_none=True)
        self._end_step(overflow=True)

    def _end_step(self, overflow: bool) -> None:
        if self.world.distributed and self._module is not None:
            # Running statistics (BatchNorm) see only the shard: rank 0's are every rank's, as DDP does.
            broadcast_(self._module.buffers(), self.world)
        self.precision.update(overflow)
        if self.precision.scaled:
            self.log(**{"amp/skipped_steps": float(overflow), "amp/loss_scale": self.precision.scale})
        self._checked = False
        self.step += 1

    def optimizer_step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Clip (if the protocol says so), step, zero the gradients, count the step.

        Under fp16 a step whose gradients overflowed is skipped instead (and still counted: ``step``
        counts the loop's steps, so schedules keyed on it do not shift).

        ``optimizer`` defaults to the run's; a method that trains in stages with its own optimisers
        (ReconBoost) passes one from :meth:`new_optimizer`, so clipping and step counting still apply.
        """
        optimizer = self._optimizer(optimizer)
        if not self._checked and self.overflowed(optimizer):
            self.skip_step(optimizer)
            return
        with self.precision.full_precision():
            if self._grad_clip > 0:
                params = [p for g in optimizer.param_groups for p in g["params"]]
                torch.nn.utils.clip_grad_norm_(params, self._grad_clip)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self._end_step(overflow=False)

    @property
    def lr(self) -> float:
        """The run optimiser's current learning rate (after the protocol's schedule)."""
        if self.optimizer is None:
            raise RuntimeError("no optimiser attached to this context")
        return float(self.optimizer.param_groups[0]["lr"])

    def new_optimizer(self, params: Iterable[nn.Parameter], lr: float | None = None) -> torch.optim.Optimizer:
        """A fresh optimiser with the protocol's recipe (ReconBoost stages, G-Blending side models);
        ``lr`` replaces the recipe's initial rate (e.g. ``ctx.lr`` to follow the schedule)."""
        if self._optimizer_factory is None:
            raise RuntimeError("no optimiser recipe attached to this context")
        optimizer = self._optimizer_factory(params)
        if lr is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr
        return optimizer

    # -- data ------------------------------------------------------------------------------------

    def _split(self, split: SplitName) -> Split:
        """The split itself, after the access rules: test refused, validation only if declared."""
        if split == "test":
            raise DataAccessError("methods may not read the test split; it is only for the final report")
        if split == "val":
            if not self._needs.val:
                raise DataAccessError("this method did not declare needs.val, so it may not read validation data")
            self.used_val = True
        if self._dataset is None:
            raise RuntimeError("no dataset attached to this context")
        return self._dataset.split(split)

    def batches(
        self,
        split: SplitName,
        *,
        shuffle: bool = False,
        subset: Tensor | None = None,
        plan: SamplePlan | None = None,
    ) -> Batches:
        """Batches of the training split (or validation, if declared). The test split is refused."""
        return self.batching(self._split(split), shuffle=shuffle, generator=self.generator, plan=plan, subset=subset)

    def split_size(self, split: SplitName) -> int:
        """Number of rows of a split the method may read (same access rules as :meth:`batches`)."""
        return len(self._split(split))

    def rows(self, split: SplitName, index: Tensor) -> Batch:
        """One batch holding exactly the rows ``index`` of a split (same access rules as :meth:`batches`)."""
        return next(iter(self.batching(self._split(split), subset=index, batch_size=max(int(index.numel()), 1))))

    def eval_mode(self, module: nn.Module, grad: bool = False) -> AbstractContextManager[None]:
        """Eval mode and no gradients inside (``grad=True`` keeps them, e.g. for a Hessian-vector
        product with BatchNorm on running statistics); the previous modes are restored on exit."""
        return eval_mode(module, grad)

    # -- accounting ------------------------------------------------------------------------------

    def counted_step(self, batch_size: int) -> AbstractContextManager[None]:
        """Wrap one training step of ``batch_size`` rows so its FLOPs are counted (or extrapolated)."""
        return self.meter.step(batch_size)

    def phase(self, name: str) -> AbstractContextManager[None]:
        """Attribute the FLOPs of the enclosed code to ``name`` in the cost table, including the hooks
        of any side model trained inside (the phase is sticky)."""
        return self.meter.phase(name, sticky=True)

    def hook_phase(self, name: str) -> AbstractContextManager[None]:
        """The template's own phases (forward, losses, …): yield to an enclosing method phase."""
        return self.meter.phase(name)

    def mean_loss(self, per_sample: Callable[[Batch], Tensor], split: SplitName) -> float:
        """Mean over every sample of a split of ``per_sample(batch) → [B]`` (no gradients); in a
        data-parallel run each rank reads its part of the split and the sums are added over the ranks.

        The caller chooses the mode, typically inside ``eval_mode(module)``.
        """
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in self.batches(split):
                total += float(per_sample(batch).sum())
                count += len(batch)
        if self.world.distributed:
            total, count = self.all_sum(torch.tensor([total, count], dtype=torch.float64)).tolist()
        return total / max(count, 1)

    def log(self, **scalars: float | Tensor) -> None:
        """Record scalars; the trainer writes their per-epoch means into the run records."""
        for key, value in scalars.items():
            entry = self._logs[key]
            entry.total += float(value)
            entry.count += 1

    def check_finite(self, losses: Mapping[str, Tensor]) -> dict[str, float]:
        """Stop the run if any loss term is NaN or infinite; return the terms as floats for logging."""
        stacked = torch.stack([v.detach().float() for v in losses.values()])
        values = stacked.tolist()
        out = dict(zip(losses, values, strict=True))
        # Every rank stops together: a term that is not finite on any rank is not finite in the sum.
        seen = dict(zip(losses, self.all_sum(stacked).tolist(), strict=True)) if self.world.distributed else out
        for name, value in seen.items():
            if not math.isfinite(value):
                raise NonFiniteLossError(
                    f"loss term {name!r} became {value} at epoch {self.epoch}, step {self.step}; "
                    "lower the learning rate or check the inputs"
                )
        for name, value in out.items():
            self.log(**{f"loss/{name}": value})
        return out

    def pop_logs(self) -> dict[str, float]:
        """Per-epoch means of everything logged since the last call (over every rank's values)."""
        sums = {k: (v.total, v.count) for k, v in self._logs.items() if v.count}
        self._logs.clear()
        merged: dict[str, tuple[float, int]] = {}
        for part in gather_objects(sums, self.world):
            for key, (total, count) in part.items():
                t, c = merged.get(key, (0.0, 0))
                merged[key] = (t + total, c + count)
        return {k: t / c for k, (t, c) in sorted(merged.items())}
