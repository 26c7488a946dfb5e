"""Boosted fusion: a growing ensemble of small learners per modality, one shared output layer, z = Σ_m w_m f_m.

The head of AUG (Jiang, Huang, Yang, NeurIPS 2025; njustkmg/NeurIPS25-AUG @ 841d079,
``model/AudioVideo.py:47-104``), written as a fusion any method can select (``fusion: boosted``). For
modality m with pooled feature h_m ``[B, d_m]``:

    e_m     = fc(ReLU(E_m h_m))                  base learner, E_m = Linear(d_m, hidden)
    a_{m,k} = fc(ReLU(L_{m,k} h_m)),  k = 1…K_m  the active learners, L_{m,k} = Linear(d_m, hidden)
    f_m     = e_m + Σ_k a_{m,k}                  fc's bias is counted K_m + 1 times, as in the original
    z       = Σ_m w_m f_m

``fc`` = Linear(hidden, C) is one layer shared by every learner of every modality. The original appends a
new ``nn.Linear`` when a learner is added (``add_layer``, ``:67-74``); a parameter created mid-run cannot
join the run's optimiser, so here each modality holds ``max_learners`` learners from the start and
:meth:`BoostedFusion.activate` switches on the next one. Only active learners enter the graph: an inactive
one gets no gradient (``grad`` stays None, so SGD and Adam skip it, momentum and weight decay included).
The count of active learners is the buffer ``active`` ``[M]``, so checkpoints and resumed runs hold it.

Every linear layer starts Xavier-normal with a zero bias: the original's ``weight_init`` for the base
learners and ``fc`` (``utils/utils.py:81-84``, applied at ``train_CREMAD.py:197``) and ``add_layer``'s own
initialisation for the learners (``AudioVideo.py:69-70``).

The fusion is sliceable: :meth:`BoostedFusion.slice` gives the ensembles f_m, so methods read them as
``out.unimodal_logits``, and the Shapley metric's coalitions (absent features zeroed, ``mask: feature``)
re-run only the head. An absent modality's f_m is then the head's answer to a zero feature, a constant
vector, as a concatenation head's is its bias share.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from balancemm.errors import ConfigError
from balancemm.models.fusions.base import Fusion
from balancemm.registry import FUSIONS


class Ensemble(NamedTuple):
    """One modality's boosted prediction, each ``[B, C]``.

    Attributes:
        full: f_m, every active learner's output summed with the base learner's.
        rest: o_m = f_m − a_{m,K}, everything but the newest learner (None while K_m = 0).
        newest: a_{m,K}, the newest active learner's output (None while K_m = 0).
    """

    full: Tensor
    rest: Tensor | None
    newest: Tensor | None


def _xavier(layer: nn.Linear) -> nn.Linear:
    nn.init.xavier_normal_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def _refresh_counts(module: nn.Module, incompatible_keys: Any) -> None:
    """After ``load_state_dict``: the host copy of the active counts follows the loaded buffer."""
    assert isinstance(module, BoostedFusion)
    module._counts = [int(k) for k in module.active.tolist()]


@FUSIONS.register("boosted")
class BoostedFusion(Fusion):
    """Per-modality boosted ensembles with a shared output layer, combined with fixed weights.

    Args:
        dims: modality → feature size d_m.
        num_classes: C.
        hidden: width of every learner (the original's 256).
        max_learners: learners preallocated per modality, activated in order.
        weights: w_m in sorted modality order (they need not sum to 1); None = 1/M each.
    """

    supports_slice = True
    active: Tensor  # [M] long: learners switched on per modality, in sorted modality order

    def __init__(
        self,
        dims: dict[str, int],
        num_classes: int,
        hidden: int = 256,
        max_learners: int = 10,
        weights: tuple[float, ...] | None = None,
    ) -> None:
        super().__init__(dims, num_classes)
        if hidden < 1 or max_learners < 0:
            raise ConfigError(f"fusion 'boosted' needs hidden >= 1 and max_learners >= 0, got {hidden}, {max_learners}")
        if weights is not None and len(weights) != len(self.modalities):
            raise ConfigError(
                f"fusion 'boosted' needs one weight per modality ({', '.join(self.modalities)}), got {len(weights)}"
            )
        self.weights = [float(w) for w in weights] if weights is not None else [1.0 / len(self.modalities)] * len(dims)
        self.embedding = nn.ModuleDict({m: _xavier(nn.Linear(dims[m], hidden)) for m in self.modalities})
        self.fc = _xavier(nn.Linear(hidden, num_classes))
        self.learners = nn.ModuleDict(
            {
                m: nn.ModuleList(_xavier(nn.Linear(dims[m], hidden)) for _ in range(max_learners))
                for m in self.modalities
            }
        )
        self.max_learners = max_learners
        self.register_buffer("active", torch.zeros(len(self.modalities), dtype=torch.long))
        # A host copy of ``active``: the forward pass reads it without a device synchronisation.
        self._counts = [0] * len(self.modalities)
        self.register_load_state_dict_post_hook(_refresh_counts)

    # -- the learners -----------------------------------------------------------------------------

    def _layers(self, modality: str) -> list[nn.Linear]:
        """Every learner of ``modality``, in activation order."""
        return cast(list[nn.Linear], list(cast(nn.ModuleList, self.learners[modality])))

    def num_active(self, modality: str) -> int:
        """K_m, the active learners of ``modality`` (the base learner not counted)."""
        return self._counts[self.modalities.index(modality)]

    def activate(self, modality: str) -> bool:
        """Switch on the next learner of ``modality``; False (and nothing changes) when all are on."""
        j = self.modalities.index(modality)
        if self._counts[j] >= self.max_learners:
            return False
        self._counts[j] += 1
        self.active[j] += 1
        return True

    def learner_parameters(self, modality: str | None = None) -> Iterator[nn.Parameter]:
        """The weights and biases of every learner (active or not) of ``modality``, or of all modalities."""
        for m in self.modalities if modality is None else (modality,):
            yield from self.learners[m].parameters()

    def dormant_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters of the learners not switched on yet: no forward pass reads them."""
        for m in self.modalities:
            for layer in self._layers(m)[self.num_active(m) :]:
                yield from layer.parameters()

    # -- the predictions -----------------------------------------------------------------------------

    def ensemble(self, modality: str, h: Tensor) -> Ensemble:
        """f_m, o_m and a_{m,K} of ``modality`` from its feature ``h`` ``[B, d_m]``.

        The sum runs learner by learner in activation order (the original's running sum), so o_m is an
        exact partial sum, not f_m minus a_{m,K}.
        """
        total = self.fc(F.relu(self.embedding[modality](h)))
        rest = newest = None
        for layer in self._layers(modality)[: self.num_active(modality)]:
            rest, newest = total, self.fc(F.relu(layer(h)))
            total = total + newest
        return Ensemble(total, rest, newest)

    def slice(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        """``{m: f_m}``, each ``[B, C]``, for whichever modalities ``features`` holds."""
        return {m: self.ensemble(m, h).full for m, h in features.items()}

    def combine(self, ensembles: dict[str, Tensor]) -> Tensor:
        """z = Σ_m w_m f_m ``[B, C]`` from every modality's f_m ``[B, C]``."""
        parts = [w * ensembles[m] for m, w in zip(self.modalities, self.weights, strict=True)]
        return torch.stack(parts).sum(0)

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        return self.combine(self.slice(features))
