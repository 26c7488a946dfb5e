"""No method copies host data to the model's device in a training step or an evaluation batch.

On a GPU, a tensor built from Python data or drawn on the host generator inside a step costs a
host→device copy per step. A CPU run has no copies to see, so this test watches for their sources
with a dispatch mode that is active only inside the training steps (``ctx.counted_step``, which every
method wraps around each step, also one that owns its epoch) and around ``predict_coalitions``:

* ``aten.lift_fresh``: a tensor made from Python data (``torch.tensor([...])``, a list used as an
  index). A Python number assigned by indexing into a CPU tensor (``x[i] = 0``) lifts one too, though
  on a GPU it is filled in place; write ``x[i].fill_(0)`` or ``index_fill_`` instead, which lift nothing.
* any operator given ``ctx.generator``, the host generator, that returns more than one number. A 0-dim
  draw is a host decision, read with ``bool()`` or ``float()`` (OPM's coin); anything larger is data for
  the model's device and must come from ``ctx.device_generator``. The test gives the context a device
  generator of its own, so the two can be told apart on a CPU.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import balancemm
from balancemm.context import RunContext, derive_seed
from balancemm.methods import list_methods
from balancemm.metrics.flops import FlopMeter
from balancemm.metrics.shapley import coalitions
from tests.conftest import TinyDataset, build_method, first_batch, train_epochs
from tests.methods.test_all_methods import HPARAMS

# Reach every per-step branch within two epochs: OPM drops features from epoch 0 on every batch.
# With their defaults, AMCo masks (with two modalities) and Greedy curates in epoch 1.
BRANCHES: dict[str, dict[str, Any]] = {"opm": {"modulation_starts": 0, "p_exe": 1.0}}

LIFTS = (torch.ops.aten.lift_fresh, torch.ops.aten.lift_fresh_copy)
PACKAGE = Path(balancemm.__file__).parent


def _caller() -> str:
    """The innermost BalanceMM line on the stack: where the offending tensor was made."""
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename)
        if path.is_relative_to(PACKAGE):
            return f"{path.relative_to(PACKAGE)}:{frame.lineno}: {frame.line}"
    return "<outside balancemm>"


class _HostDataMode(TorchDispatchMode):
    """Records every operator that makes host data for the device (see the module docstring)."""

    def __init__(self, host_seed: int, found: set[str]) -> None:
        super().__init__()
        self.host_seed = host_seed
        self.found = found

    def _host_generator(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        # Each call wraps the generator in a new Python object, so it is recognised by its seed.
        return any(
            isinstance(a, torch.Generator) and a.initial_seed() == self.host_seed for a in (*args, *kwargs.values())
        )

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func._overloadpacket in LIFTS:
            self.found.add(f"{func} (a tensor from Python data) at {_caller()}")
        elif isinstance(out, torch.Tensor) and out.dim() > 0 and self._host_generator(args, kwargs):
            self.found.add(f"{func} on ctx.generator (not ctx.device_generator) at {_caller()}")
        return out


class _StepWatch(FlopMeter):
    """A FLOP meter that counts nothing and watches every training step for host data.

    ``ctx.spawn`` hands the meter to side contexts, so side trainings (G-Blending) are watched too.
    """

    def __init__(self, ctx: RunContext) -> None:
        super().__init__("off")
        self.host_seed = ctx.generator.initial_seed()
        self.found: set[str] = set()

    def watch(self) -> _HostDataMode:
        return _HostDataMode(self.host_seed, self.found)

    @contextmanager
    def step(self, batch_size: int) -> Iterator[None]:
        with super().step(batch_size), self.watch():
            yield


@pytest.mark.parametrize("name", list_methods())
def test_steps_and_evaluation_make_no_host_data(name: str, tiny: TinyDataset) -> None:
    method = build_method(name, tiny, **HPARAMS.get(name, {}), **BRANCHES.get(name, {}))
    ctx = method.ctx
    # A device generator distinct from the host one (on a CPU run they are the same object).
    ctx._device_generator = torch.Generator().manual_seed(derive_seed(ctx.seed, "device copies"))
    assert ctx.device_generator.initial_seed() != ctx.generator.initial_seed()
    watch = ctx.meter = _StepWatch(ctx)
    train_epochs(method, 2)
    assert ctx.step > 0
    method.eval()
    with torch.no_grad(), watch.watch():
        method.predict_coalitions(first_batch(tiny), coalitions(method.model.modalities))
    if watch.found:
        pytest.fail(
            f"{name} makes host data for the device per step or evaluation batch:\n" + "\n".join(sorted(watch.found))
        )
