"""Test-time corruptions of one modality, each with a severity from 0 (clean) to 1 (the modality gone).

A corruption is applied to a batch that the data layer has already built, never to files, and only to
evaluation batches (``balancemm eval``). Every kind is seeded: the same generator state gives the same
corrupted batch. The severity scale is chosen so that 1 removes what the modality carries, whatever the
modality, and values in between remove a proportional share of it:

=============  ===========================  ===================================================================
kind           modalities                   at severity s
=============  ===========================  ===================================================================
``missing``    any                          each row loses the modality with probability s (s = 1: every
                                            row), by the model's masking policy, the one the Shapley metric uses
``gaussian``   any with float inputs        x + s·σ·ε, ε ~ N(0, 1), σ the modality's input standard deviation
                                            over the evaluated split: s = 1 is a signal-to-noise ratio of 0 dB
``time_mask``  audio (time on the last      a contiguous block of round(s·T) of the T time steps, at a random
               axis, spectrograms)          position per row, set to 0 (SpecAugment's time masking)
``blur``       visual, flow (H, W on the    a Gaussian blur of the last two axes with standard deviation
               last two axes)               s·min(H, W)/4 pixels (replicated borders); s = 1 leaves about a
                                            uniform image
``token_drop`` text (tokens on axis -2 of   each token dropped with probability s: its vector set to 0, or its
               vectors, or on the last      id set to 0 (the padding id of BERT's vocabularies)
               axis of integer ids)
=============  ===========================  ===================================================================

``missing`` acts on features (``batch.present``) and needs no new encoder pass; the others act on the
inputs of the one modality, so only that modality's encoder runs again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from balancemm.data.batch import Batch

#: Each corruption kind and the modality names it applies to (None: every modality).
KINDS: dict[str, frozenset[str] | None] = {
    "missing": None,
    "gaussian": None,
    "time_mask": frozenset({"audio"}),
    "blur": frozenset({"visual", "flow"}),
    "token_drop": frozenset({"text"}),
}
#: The corruption of each kind of modality besides ``missing`` and ``gaussian``.
NATIVE: dict[str, str] = {"audio": "time_mask", "visual": "blur", "flow": "blur", "text": "token_drop"}


@dataclass(frozen=True)
class Corruption:
    """One modality corrupted one way; ``name`` (``"audio:missing"``) is how results are keyed."""

    modality: str
    kind: str

    @property
    def name(self) -> str:
        return f"{self.modality}:{self.kind}"

    @property
    def on_features(self) -> bool:
        """Whether it acts on the pooled features (no encoder pass of its own)."""
        return self.kind == "missing"


def default_corruptions(modalities: tuple[str, ...]) -> list[Corruption]:
    """Every modality missing, under Gaussian noise and under its own corruption (if it has one)."""
    out = []
    for m in modalities:
        out += [Corruption(m, "missing"), Corruption(m, "gaussian")]
        if m in NATIVE:
            out.append(Corruption(m, NATIVE[m]))
    return out


def parse_corruption(text: str, modalities: tuple[str, ...]) -> list[Corruption]:
    """``"audio:missing"`` → one corruption; ``"audio"`` → that modality's defaults; ``"all"`` → everyone's.

    Raises:
        ValueError: an unknown modality or kind, or a kind that does not apply to the modality.
    """
    if text == "all":
        return default_corruptions(modalities)
    modality, _, kind = text.partition(":")
    if modality not in modalities:
        raise ValueError(f"--corrupt {text}: unknown modality {modality!r}; the run's: {', '.join(modalities)}")
    if not kind:
        return default_corruptions((modality,))
    if kind not in KINDS:
        raise ValueError(f"--corrupt {text}: unknown corruption {kind!r}; one of {', '.join(KINDS)}")
    applies = KINDS[kind]
    if applies is not None and modality not in applies:
        raise ValueError(f"--corrupt {text}: {kind} applies to {', '.join(sorted(applies))}, not {modality}")
    return [Corruption(modality, kind)]


def corrupt(batch: Batch, corruption: Corruption, severity: float, scale: float, generator: torch.Generator) -> Batch:
    """``batch`` with ``corruption`` at ``severity`` ∈ [0, 1]; ``scale`` is σ, the modality's input std.

    Random draws are made on the CPU from ``generator`` (one draw per row, in row order), so a corrupted
    batch does not depend on the device.
    """
    if not 0.0 <= severity <= 1.0:
        raise ValueError(f"severity {severity} is outside [0, 1]")
    m, rows = corruption.modality, len(batch)
    if corruption.kind == "missing":
        gone = torch.rand(rows, generator=generator) < severity
        present = batch.present.clone()
        present[:, batch.modalities.index(m)] &= ~gone.to(present.device)
        return replace(batch, present=present)
    x = batch.inputs[m]
    if corruption.kind == "gaussian":
        if not x.is_floating_point():
            raise ValueError(f"gaussian noise needs float inputs; {m} holds {x.dtype} (token ids: use token_drop)")
        noise = torch.randn(x.shape, generator=generator).to(x.device, x.dtype)
        y = x + severity * scale * noise
    elif corruption.kind == "time_mask":
        y = _time_mask(x, severity, generator)
    elif corruption.kind == "blur":
        y = _blur(x, severity)
    else:
        y = _token_drop(x, severity, generator)
    return replace(batch, inputs={**batch.inputs, m: y})


def _time_mask(x: Tensor, severity: float, generator: torch.Generator) -> Tensor:
    """Zero ``round(s·T)`` contiguous steps of the last axis of each row ``x`` ``[B, ..., T]``."""
    steps = x.shape[-1]
    width = round(severity * steps)
    if width == 0:
        return x
    start = torch.randint(0, steps - width + 1, (x.shape[0],), generator=generator)
    t = torch.arange(steps)
    masked = (t >= start[:, None]) & (t < start[:, None] + width)  # [B, T]
    keep = (~masked).view(x.shape[0], *([1] * (x.dim() - 2)), steps).to(x.device, x.dtype)
    return x * keep


def _blur(x: Tensor, severity: float) -> Tensor:
    """A Gaussian blur of the last two axes (H, W) of ``x`` ``[B, ..., H, W]``, σ = s·min(H, W)/4."""
    height, width = x.shape[-2:]
    sigma = severity * min(height, width) / 4
    if sigma == 0:
        return x
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(x.device, x.dtype)
    flat = F.pad(x.reshape(-1, 1, height, width), (radius,) * 4, mode="replicate")  # replicated borders
    flat = F.conv2d(flat, kernel.view(1, 1, 1, -1))  # separable: along W, then along H
    flat = F.conv2d(flat, kernel.view(1, 1, -1, 1))
    return flat.reshape(x.shape)


def _token_drop(x: Tensor, severity: float, generator: torch.Generator) -> Tensor:
    """Drop each token with probability s: ids ``[B, T]`` become 0, vectors ``[B, T, d]`` become 0."""
    tokens = x.shape[-1] if not x.is_floating_point() else x.shape[-2]
    dropped = torch.rand(x.shape[0], tokens, generator=generator) < severity
    if x.is_floating_point():
        return x * (~dropped).unsqueeze(-1).to(x.device, x.dtype)
    return x.masked_fill(dropped.to(x.device), 0)
