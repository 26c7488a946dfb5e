"""Data-parallel runs: which process this is among how many, and the few collectives a run needs.

A run on N processes (``balancemm train --nproc N``, or ``torchrun``) is meant to be the same algorithm as
one process on the global batch:

* every rank derives the same epoch order from (seed, epoch) and takes one contiguous shard of each global
  batch (:func:`shard_bounds`), so the ranks' shards, concatenated in rank order, are the one-process batch;
* gradients are averaged over ranks, each rank's weighted by its share of the global batch (the last batch
  of an epoch may not divide evenly), so every rank steps with the global batch's gradient;
* a batch statistic a method computes (a score, a prototype, a coefficient) is summed or gathered over the
  ranks with :func:`all_sum` / :func:`all_gather_rows`, so every rank computes the same value.

On one process (``World()``) every collective returns its input unchanged, at no cost. The backend is NCCL
for GPUs and gloo for CPUs; the process group comes from torch's usual environment variables (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), which torchrun and ``--nproc`` set.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from balancemm.errors import ConfigError


@dataclass(frozen=True)
class World:
    """This process's place in a run: ``rank`` of ``size`` processes (``local_rank`` on its node)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None on one process

    @property
    def main(self) -> bool:
        """Rank 0 writes the run directory and speaks on the console."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def launched_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) when it is not set."""
    try:
        values = tuple(int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    except ValueError:
        raise ConfigError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets them)") from None
    rank, size, local = values
    if size < 1 or not 0 <= rank < size or local < 0:
        raise ConfigError(f"inconsistent launch environment: RANK={rank}, WORLD_SIZE={size}, LOCAL_RANK={local}")
    return rank, size, local


def start(device_type: str) -> World:
    """Join the process group torchrun set up (NCCL on GPUs, gloo on CPUs); one process needs none."""
    rank, size, local = launched_world()
    if size == 1:
        return World()
    backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)  # NCCL's collectives run on the current device
    elif "OMP_NUM_THREADS" not in os.environ:
        # CPU ranks of a node share its cores: each takes its part instead of all of them (torchrun sets
        # OMP_NUM_THREADS=1 for several workers; --nproc and a user's own setting are respected the same way).
        workers = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(workers, 1)))
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return World(rank, size, local, backend)


def stop(world: World) -> None:
    """Leave the process group (after a last barrier, so no rank exits while another still talks)."""
    if world.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def shard_bounds(n: int, rank: int, size: int) -> tuple[int, int]:
    """The contiguous rows ``[start, end)`` of ``n`` that rank ``rank`` of ``size`` holds: the first
    ``n % size`` ranks hold one row more, as ``torch.tensor_split`` splits (ranks may hold none)."""
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _on_backend(t: Tensor, world: World) -> Tensor:
    """``t`` where the backend can reduce it: NCCL only reduces GPU tensors (host counters travel there)."""
    if world.backend == "nccl" and t.device.type != "cuda":
        return t.detach().to(torch.device("cuda", torch.cuda.current_device()))
    return t.detach().clone()


def all_sum(t: Tensor, world: World) -> Tensor:
    """The sum of ``t`` over all ranks (a new tensor on ``t``'s device; ``t`` is untouched)."""
    if not world.distributed:
        return t
    out = _on_backend(t, world)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(t.device)


def gather_objects(obj: Any, world: World) -> list[Any]:
    """Every rank's ``obj`` (small, picklable: logged scalars, FLOP counts), in rank order."""
    if not world.distributed:
        return [obj]
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def all_gather_rows(t: Tensor, world: World) -> Tensor:
    """Every rank's ``t`` concatenated along dim 0 in rank order; the ranks may hold different row counts."""
    if not world.distributed:
        return t
    local = _on_backend(t, world)
    rows = torch.tensor([t.shape[0]], device=local.device)
    counts = [torch.zeros_like(rows) for _ in range(world.size)]
    dist.all_gather(counts, rows)
    most = int(max(int(c) for c in counts))
    padded = torch.zeros((most, *t.shape[1:]), dtype=t.dtype, device=local.device)
    padded[: t.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world.size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(c)] for p, c in zip(parts, counts, strict=True)]).to(t.device)


def broadcast_(tensors: Iterable[Tensor], world: World, src: int = 0) -> None:
    """Overwrite ``tensors`` in place with rank ``src``'s: one broadcast per dtype and device, of the
    tensors flattened into one (a model's BatchNorm buffers are many small tensors, and on a CPU each
    collective costs far more than the bytes it moves)."""
    if not world.distributed:
        return
    groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for group in groups.values():
        flat = _on_backend(torch.cat([t.detach().reshape(-1) for t in group]), world)
        dist.broadcast(flat, src)
        offset = 0
        for t in group:
            # Through .data: a write autograd does not see, as DDP's own buffer broadcast, so a graph built
            # before the step (MLA's, AUG's per-modality steps) still holds valid running statistics.
            t.data.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def barrier(world: World) -> None:
    """Wait until every rank gets here."""
    if world.distributed:
        dist.barrier()
