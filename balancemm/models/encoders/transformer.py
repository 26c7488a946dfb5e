"""A Transformer over feature sequences, BalanceMM's CMU-MOSEI encoder.

BalanceMM's ``Transformer_`` (``balancemm/encoders/VisionTransformer_encoder.py``), itself the
unimodal branch of MulT (Tsai et al., "Multimodal Transformer for Unaligned Multimodal Language
Sequences", ACL 2019): a kernel-1 ``Conv1d`` projects each time step's D features to d_model, a
post-norm ``nn.TransformerEncoder`` (ReLU feed-forward) mixes the time steps, and the hidden state of
the last step is the sequence's feature. On CMU-MOSEI it encodes text (300-d GloVe), audio (74-d
COVAREP) and visual (35-d Facet) sequences, each to 1024-d.

Input per sample ``[T, D]`` (time first). Layout inside: ``enter`` projects to a channel-first map
``[B, d_model, T]``; each stage is one encoder layer from and to that layout (MMTM squeezes every
dim but dim 1, so Greedy gates d_model channels over time); ``exit`` pools time away.

Deviations from BalanceMM:

* Batch-first tensors instead of sequence-first; the same computation.
* The layers are held one by one (a ``ModuleList``), not inside an ``nn.TransformerEncoder``, so each
  is a stage. Without a final norm or a mask, ``nn.TransformerEncoder`` runs exactly these layers in
  turn, so the model is the same.
* ``pooling: mean`` (mean over time) and ``positional: sinusoidal`` are options. BalanceMM adds no
  positional encoding, which leaves the Transformer blind to order (only the "last" pooling sees any);
  MulT adds sinusoidal positions to the (√d-scaled) projection. ``sinusoidal`` adds the fixed table of
  Vaswani et al. (sin on even channels, cos on odd) without the √d scale. Defaults are BalanceMM's.
* Like BalanceMM there is no padding mask: the inputs are dense float features without a pad symbol.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from balancemm.catalog.models import SequenceTransformerOptions
from balancemm.models.encoders.base import Encoder
from balancemm.registry import ENCODERS


def sinusoidal_positions(length: int, dim: int) -> Tensor:
    """The fixed position table of Vaswani et al. (2017), channel-first: ``[dim, length]``."""
    t = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(t * freq)
    table[:, 1::2] = torch.cos(t * freq)[:, : dim // 2]  # an odd dim has one cosine channel fewer
    return table.T


class ChannelFirstLayer(nn.Module):
    """One Transformer encoder layer on channel-first maps: ``[B, d, T]`` → ``[B, d, T]``."""

    def __init__(self, layer: nn.TransformerEncoderLayer) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, h: Tensor) -> Tensor:
        return self.layer(h.transpose(1, 2)).transpose(1, 2)


@ENCODERS.register("transformer")
class SequenceTransformer(Encoder):
    """``[B, T, D]`` feature sequences → ``[B, d_model]``."""

    Options = SequenceTransformerOptions
    positions: Tensor | None

    def __init__(self, input_shape: tuple[int, ...], options: SequenceTransformerOptions | None = None) -> None:
        super().__init__()
        options = options or SequenceTransformerOptions()
        if len(input_shape) != 2:
            raise ValueError(f"transformer takes [T, D] feature sequences (time first), got {input_shape}")
        length, dim = input_shape
        self.pooling = options.pooling
        self.proj = nn.Conv1d(dim, options.d_model, kernel_size=1, bias=False)
        self.layers = nn.ModuleList(
            ChannelFirstLayer(
                nn.TransformerEncoderLayer(
                    options.d_model,
                    options.heads,
                    options.feedforward,
                    options.dropout,
                    activation="relu",
                    batch_first=True,
                )
            )
            for _ in range(options.layers)
        )
        # A fixed table, not a parameter; non-persistent so checkpoints do not depend on the option.
        table = sinusoidal_positions(length, options.d_model) if options.positional == "sinusoidal" else None
        self.register_buffer("positions", table, persistent=False)
        self.num_features = options.d_model

    def enter(self, x: Tensor) -> Tensor:
        """``[B, T, D]`` → projected ``[B, d_model, T]``."""
        h = self.proj(x.transpose(1, 2))
        return h if self.positions is None else h + self.positions

    def stages(self) -> list[nn.Module]:
        return list(self.layers)

    def exit(self, h: Tensor, batch_size: int) -> Tensor:
        """``[B, d_model, T]`` → ``[B, d_model]``: the last time step, or the mean over time."""
        return h[:, :, -1] if self.pooling == "last" else h.mean(dim=2)
