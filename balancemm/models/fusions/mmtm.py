"""MMTM mid-fusion: multimodal transfer modules between encoder stages, for any number of modalities.

Joze, Shaban, Iuzzolino, Koishida. "MMTM: Multimodal Transfer Module for CNN Fusion." CVPR 2020, in
the form Wu et al. (ICML 2022, nyukat/greedy_multimodal_learning ``src/balanced_mmtm.py``) use for
balanced multimodal learning (docs/methods/greedy.md). Not a registered fusion: the
late fusion head is still one of ``FUSIONS``; :class:`MidFusion` sits inside the encoders.

One block, for feature maps F_m ``[B·T_m, d_m, *S_m]`` of M modalities:

1. squeeze     s_m = mean of F_m over every non-channel dim (space and, for frames folded into the
               batch by ``Encoder.enter``, time): ``[B, d_m]``; s = [s_0; …; s_{M−1}] ``[B, Σd]``
2. joint       e = ReLU(W_sq s + b_sq), W_sq: Σd → ⌊2Σd/ratio⌋
3. excitation  g_m = σ(W_m e + b_m), W_m: ⌊2Σd/ratio⌋ → d_m
4. output      F_m ⊙ g_m, broadcast over space and over the folded frames of each sample.

The "2" of the official bottleneck 2(d_0 + d_1)/ratio is kept as a constant for M modalities rather
than read as M: the joint layer then compresses the concatenated squeeze vector by the same factor
(ratio/2) whatever M is, and its size grows linearly with the number of modalities instead of as M².
For M = 2 both readings give the official size.

Running average of each gate (the curation target), over every *training* forward call since
construction: ḡ_m ← (mean_batch g_m + ḡ_m·t)/(t + 1), detached, one buffer per block holding
[ḡ_0; …; ḡ_{M−1}] (so each modality's average is its own gate, sized d_m; the official code updates
modality 1's average with modality 0's gate and sizes it d_0). The batch mean can be replaced
(:meth:`MidFusion.averaging`): a data-parallel run folds in the global batch's mean, not the shard's.

Curation (the Greedy re-balancing step): the cared modality c gets ḡ_c broadcast over the batch
instead of g_c, so its features stop depending on the other modalities; the others keep g_m.

Absent modalities (``batch.present``, feature masking): an absent modality's squeezed vector s_m is
zeroed for that row, so it contributes nothing to the other modalities' gates, exactly as its zeroed
pooled feature contributes nothing to the head. Its own gated maps are computed but its pooled
feature is zeroed by the classifier afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn

from balancemm.models.encoders.base import Encoder


def stage_channels(encoder: Encoder, input_shape: tuple[int, ...]) -> list[int]:
    """Channels (dim 1) of each stage's output map, from one no-grad eval-mode pass on a zero sample.

    Read from a pass rather than from the encoder's options so that any encoder exposing
    ``enter``/``stages`` works; the pass changes no state (eval mode, modes restored).
    """
    modes = {m: m.training for m in encoder.modules()}
    device = next(encoder.parameters()).device
    encoder.eval()
    try:
        with torch.no_grad():
            h = encoder.enter(torch.zeros(1, *input_shape, device=device))
            channels = []
            for stage in encoder.stages():
                h = stage(h)
                channels.append(int(h.shape[1]))
    finally:
        for m, training in modes.items():
            m.train(training)
    return channels


class MMTM(nn.Module):
    """One multimodal transfer module over M modalities (see the module docstring for the equations).

    Attributes:
        squeeze: the shared joint layer W_sq (counts for every modality's bypass in Greedy).
        excite: one excitation layer W_m per modality, in modality order.
        average: ``[Σd]`` running average of the gates, modality blocks in order (a buffer).
        calls: number of training forward calls folded into ``average`` (a buffer).
    """

    average: Tensor
    calls: Tensor

    def __init__(self, dims: Sequence[int], ratio: float = 4.0) -> None:
        super().__init__()
        self.dims = tuple(int(d) for d in dims)
        hidden = int(2 * sum(self.dims) / ratio)
        if hidden < 1:
            raise ValueError(f"MMTM ratio {ratio} leaves no joint units for channels {self.dims}")
        self.squeeze = nn.Linear(sum(self.dims), hidden)
        self.excite = nn.ModuleList(nn.Linear(hidden, d) for d in self.dims)
        self.register_buffer("average", torch.zeros(sum(self.dims)))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def running_gates(self) -> list[Tensor]:
        """The running averages ḡ_m ``[d_m]``, one per modality."""
        return list(self.average.split(self.dims))

    def forward(
        self,
        maps: Sequence[Tensor],
        batch_size: int,
        keep: Tensor | None = None,
        caring: int | None = None,
        row_mean: Callable[[Tensor], Tensor] | None = None,
    ) -> list[Tensor]:
        """Gate each modality's map by the joint excitation.

        Args:
            maps: F_m ``[B·T_m, d_m, *S_m]`` per modality (T_m frames folded into the batch, often 1).
            batch_size: B, the number of samples (to unfold the frames).
            keep: optional ``[B, M]`` mask of present modalities; absent ones squeeze to zero.
            caring: curation: this modality's gate is its running average ḡ_c instead of g_c.
            row_mean: the mean over rows of the gates ``[B, Σd]`` that a training call folds into the
                running average (default ``t.mean(0)``; Greedy passes ``ctx.global_mean``).

        Returns:
            F_m ⊙ g_m with the shapes of ``maps``.
        """
        # [B, T, d, *S]: time (folded frames) and space are both averaged out by the squeeze.
        unfolded = [h.unflatten(0, (batch_size, -1)) for h in maps]
        squeezed = [u.mean(dim=(1, *range(3, u.dim()))) for u in unfolded]  # [B, d_m] each
        if keep is not None:
            squeezed = [s * keep[:, i, None].to(s.dtype) for i, s in enumerate(squeezed)]
        e = torch.relu(self.squeeze(torch.cat(squeezed, dim=1)))
        gates = [torch.sigmoid(layer(e)) for layer in self.excite]  # [B, d_m] each
        if self.training:
            with torch.no_grad():
                t = self.calls
                stacked = torch.cat(gates, dim=1)
                mean = stacked.mean(0) if row_mean is None else row_mean(stacked)
                self.average.copy_((mean + self.average * t) / (t + 1))
                self.calls += 1
        if caring is not None:
            gates[caring] = self.running_gates()[caring].expand_as(gates[caring])
        return [
            (u * g.view(g.shape[0], 1, g.shape[1], *[1] * (u.dim() - 3))).flatten(0, 1)
            for u, g in zip(unfolded, gates, strict=True)
        ]


@dataclass(frozen=True)
class MidFusionSpec:
    """MMTM mid-fusion as a model option (``ModelSpec.mid_fusion``; Greedy's model), built into a :class:`MidFusion`.

    Attributes:
        stages: k ≥ 1, an MMTM block after each of the last k encoder stages (aligned from the end).
        ratio: the blocks' bottleneck ratio (> 0): joint layer Σd → ⌊2Σd/ratio⌋.
    """

    stages: int
    ratio: float = 4.0

    def __post_init__(self) -> None:
        if self.stages < 1:
            raise ValueError(f"mid-fusion needs at least one stage, got {self.stages} (no mid-fusion: leave it None)")
        if not self.ratio > 0:
            raise ValueError(f"MMTM ratio must be positive, got {self.ratio}")


class MidFusion(nn.Module):
    """Runs the encoders stage by stage in lockstep with an MMTM block after each of the last k stages.

    Stages are aligned from the end: block j follows stage n_m − k + j of every modality m (n_m its
    number of stages), so encoders of different depths can be fused; k larger than the shallowest
    encoder means "after every stage" of it. The encoders stay owned by the classifier (passed to
    :meth:`forward`), so their parameters and state-dict keys are those of the plain model.

    Attributes:
        blocks: the MMTM blocks, shallowest first.
        caring: the modality index under curation, or None (set through :meth:`curating`).
    """

    def __init__(
        self, encoders: Mapping[str, Encoder], input_shapes: Mapping[str, tuple[int, ...]], stages: int, ratio: float
    ) -> None:
        super().__init__()
        self.modalities = tuple(sorted(encoders))
        channels = {m: stage_channels(encoders[m], input_shapes[m]) for m in self.modalities}
        self.depth = min(stages, *(len(c) for c in channels.values()))
        self.blocks = nn.ModuleList(
            MMTM([channels[m][len(channels[m]) - self.depth + j] for m in self.modalities], ratio)
            for j in range(self.depth)
        )
        self.caring: int | None = None
        self.row_mean: Callable[[Tensor], Tensor] | None = None

    @contextmanager
    def averaging(self, row_mean: Callable[[Tensor], Tensor] | None) -> Iterator[None]:
        """Inside, every block folds ``row_mean`` of its gates ``[B, Σd]`` into its running average instead
        of their batch mean (None: the batch mean); ``ctx.global_mean`` makes it the global batch's."""
        previous, self.row_mean = self.row_mean, row_mean
        try:
            yield
        finally:
            self.row_mean = previous

    @contextmanager
    def curating(self, caring: int | None) -> Iterator[None]:
        """Inside, every block replaces modality ``caring``'s gate by its running average (None: off)."""
        previous, self.caring = self.caring, caring
        try:
            yield
        finally:
            self.caring = previous

    def joint_parameters(self) -> Iterator[nn.Parameter]:
        """The joint (squeeze) layer of every block, shallowest first, shared by all modalities: for block j
        its weight W_sq ``[h_j, Σd_j]`` then its bias ``[h_j]`` (Σd_j the block's channels summed over the
        modalities, h_j = ⌊2Σd_j/ratio⌋)."""
        for block in self.blocks:
            yield from cast(MMTM, block).squeeze.parameters()

    def excitation_parameters(self, modality: str) -> Iterator[nn.Parameter]:
        """One modality's excitation layer of every block, shallowest first: for block j its weight W_m
        ``[d_m,j, h_j]`` then its bias ``[d_m,j]`` (d_m,j the channels of ``modality``'s map there)."""
        index = self.modalities.index(modality)
        for block in self.blocks:
            yield from cast(MMTM, block).excite[index].parameters()

    def forward(
        self, encoders: Mapping[str, Encoder], inputs: Mapping[str, Tensor], keep: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Pooled features ``{m: [B, d_m]}`` of every modality, fused between stages.

        Args:
            encoders: the classifier's encoders (every modality of this runner).
            inputs: modality → ``[B, *input_shape]``.
            keep: optional ``[B, M]`` present-modality mask in sorted modality order.
        """
        batch_size = inputs[self.modalities[0]].shape[0]
        stages = {m: encoders[m].stages() for m in self.modalities}
        h = {m: encoders[m].enter(inputs[m]) for m in self.modalities}
        for m in self.modalities:  # the stages before the first block, each encoder on its own
            for stage in stages[m][: len(stages[m]) - self.depth]:
                h[m] = stage(h[m])
        for j, block in enumerate(self.blocks):
            maps = [stages[m][len(stages[m]) - self.depth + j](h[m]) for m in self.modalities]
            h = dict(zip(self.modalities, block(maps, batch_size, keep, self.caring, self.row_mean), strict=True))
        return {m: encoders[m].exit(h[m], batch_size) for m in self.modalities}
