"""What every encoder offers: a pooled feature, and its stages for mid-fusion."""

from __future__ import annotations

from torch import Tensor, nn


class Encoder(nn.Module):
    """Maps one modality's input ``[B, *input_shape]`` to a pooled feature ``[B, num_features]``.

    ``forward`` is ``exit(stage_n(...stage_1(enter(x))), B)``. Exposing the three parts (timm's
    ``forward_features`` idea) lets a mid-fusion module such as MMTM sit between stages of any
    encoder without hand-unrolling it.
    """

    num_features: int

    def enter(self, x: Tensor) -> Tensor:
        """Input reshaping and stem, before the first stage."""
        return x

    def stages(self) -> list[nn.Module]:
        raise NotImplementedError

    def exit(self, h: Tensor, batch_size: int) -> Tensor:
        """Pool the last stage's map to ``[B, num_features]``."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        h = self.enter(x)
        for stage in self.stages():
            h = stage(h)
        return self.exit(h, x.shape[0])
