"""The fusion contract: features of every modality → fused logits, optionally sliceable."""

from __future__ import annotations

from torch import Tensor, nn


class Fusion(nn.Module):
    """Maps ``{modality: [B, d_m]}`` (sorted modality order) to fused logits ``[B, C]``.

    A fusion whose logits decompose into per-modality terms sets ``supports_slice`` and implements
    :meth:`slice`, giving each modality's logits without any extra head (OGM-GE's convention).
    """

    supports_slice = False

    def __init__(self, dims: dict[str, int], num_classes: int) -> None:
        super().__init__()
        self.modalities = tuple(sorted(dims))
        self.dims = dict(dims)
        self.num_classes = num_classes

    def slice(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError(f"{type(self).__name__} logits do not split per modality")
