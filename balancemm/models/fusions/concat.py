"""Concatenation fusion, the paper's eq. (1)–(2): z = W[h_1; …; h_M] + b = Σ_m W_m h_m + b."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from balancemm.models.fusions.base import Fusion
from balancemm.registry import FUSIONS


@FUSIONS.register("concat")
class ConcatFusion(Fusion):
    supports_slice = True

    def __init__(self, dims: dict[str, int], num_classes: int) -> None:
        super().__init__(dims, num_classes)
        self.fc_out = nn.Linear(sum(dims.values()), num_classes)

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        return self.fc_out(torch.cat([features[m] for m in self.modalities], dim=1))

    def modality_weights(self) -> tuple[dict[str, Tensor], Tensor]:
        """The head's parameters by modality: ``{m: W_m}``, W_m ``[C, d_m]`` the column block of the weight
        ``[C, Σ d_m]`` that reads h_m (views: gradients reach the weight), and the whole bias b ``[C]``;
        :meth:`slice` is h_m W_mᵀ + b/M."""
        blocks = self.fc_out.weight.split([self.dims[m] for m in self.modalities], dim=1)
        return dict(zip(self.modalities, blocks, strict=True)), self.fc_out.bias

    def slice(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        """z_m = W_m h_m + b/M (OGM-GE, BalanceMM), so that Σ_m z_m equals the fused logits."""
        out, start = {}, 0
        bias = self.fc_out.bias / len(self.modalities)
        for m in self.modalities:
            w = self.fc_out.weight[:, start : start + self.dims[m]]
            out[m] = features[m] @ w.t() + bias
            start += self.dims[m]
        return out
