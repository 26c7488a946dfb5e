"""Diagnosing & Re-learning: re-initialise each encoder softly, by how unevenly it has learnt.

Wei, Li, Feng, Hu. "Diagnosing and Re-learning for Balanced Multimodal Learning." ECCV 2024.
Official code: GeWu-Lab/Diagnosing_Relearning_ECCV2024 @ 025085ea (``code/ours.py``), which this
follows (documented in docs/methods/relearning.md).

Idea: every R epochs, diagnose how each modality has learnt from the separability of its features:
cluster them with k-means on the training and on the validation split and compare the purities. A
large gap means the encoder has memorised the training data (or is well learnt); a small gap means it
has learnt little. Each encoder is then pulled back towards its initial weights, harder the larger
its gap, so the well-learnt modality stops over-training and the worse-learnt one learns again.

Training steps are plain joint cross-entropy (the default hooks). The method adds nothing per step.

Initial weights (constructor): θ_m^0, a copy of every parameter of encoder m (including BatchNorm's
affine parameters, not its running statistics), stored as buffers so checkpoints and resume carry it.

Re-learning (hook ``on_epoch_start(epoch)``, for the epoch e = epoch − 1 just trained and validated),
when e > 0, e mod R = 0 and fewer than N re-initialisations were done:

1. features  h_m for every row of the training and of the validation split (eval mode, no gradients,
             ``model.encode``), optionally a random subset of ``max_rows`` rows per split
2. purity    per modality and split: scale each feature dimension to [−1, 1] (MinMaxScaler fitted on
             that split), y = KMeans(n_clusters=C, random_state=0, n_init).fit_predict, and
             P = (1/N) Σ_clusters max_k |cluster ∩ class k|  (majority-vote accuracy of the clustering)
3. gap       Δ_m = |P_m^train − P_m^val|
4. strength  α_m = tanh(λ·Δ_m)
5. re-init   θ ← α_m·θ_m^0 + (1 − α_m)·θ  for every parameter of encoder m

The fusion head is not re-initialised and the optimiser state (momentum) is not reset. Δ_m, α_m and
both purities are logged (in the records of the epoch whose start ran the diagnosis).

Three or more modalities: the diagnosis is per modality already; nothing changes.

Cost: per re-initialisation, one no-grad encoder pass over the training and validation splits (counted
in the training FLOPs, phase ``relearning/diagnose``) and 2·M k-means fits, which run in
scikit-learn and are not in the FLOP count. On large datasets the k-means on the full training split
dominates; ``max_rows`` caps the rows used.

Deviations from the paper/official code:
  * The re-initialisation runs at the start of epoch e + 1 instead of at the end of epoch e, after its
    evaluation: the same model is trained and evaluated in the same order. A re-initialisation after
    the last epoch, which the official code can run but never evaluates, is not run.
  * ``n_init`` is explicit (default 10). The official call leaves it to scikit-learn's default, which
    was 10 before scikit-learn 1.4 (January 2024) and is 1 (``"auto"`` with k-means++) from 1.4 on.
    The code was written for an ECCV 2024 submission and silences warnings (among them 1.2–1.3's
    FutureWarning about this very default), so 10 is the likely value; the repository pins no version.
  * Purity is computed from a contingency table in one pass instead of a loop over clusters; same value.
  * k-means gets at most as many clusters as there are rows, so a tiny split or ``max_rows`` < C
    cannot fail (the official code would raise).
  * The model is selected on validation like every method here; the official script selects on test.
Deviations from BalanceMM (``ReLearning_trainer.py``):
  * θ^0 is captured when the method is built (the freshly initialised model), BalanceMM at the start
    of ``fit``; the encoders are found by structure, BalanceMM by the modality's name in a parameter's
    name.
  * The validation of epoch e sees the model before its re-initialisation (as the official code);
    BalanceMM re-initialises before validating.
  * Defaults are the official ones (R = 20, N = 3); BalanceMM uses R = 15, N = 2.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, cast

import torch
from torch import Tensor, nn

from balancemm.catalog.methods import ReLearningHParams
from balancemm.data.base import SplitName
from balancemm.data.batch import SamplePlan
from balancemm.methods.base import Method, Needs
from balancemm.registry import METHODS


def cluster_purity(assignments: Tensor, labels: Tensor) -> float:
    """Purity (1/N) Σ_clusters max_k |cluster ∩ class k| of cluster ids ``[N]`` against labels ``[N]``."""
    clusters, classes = int(assignments.max()) + 1, int(labels.max()) + 1
    table = torch.bincount(assignments.long() * classes + labels.long(), minlength=clusters * classes)
    return float(table.view(clusters, classes).amax(dim=1).sum()) / assignments.numel()


def kmeans_purity(features: Tensor, labels: Tensor, n_clusters: int, n_init: int = 10) -> float:
    """Purity of k-means on MinMax-scaled features ``[N, d]`` against labels ``[N]`` (official recipe)."""
    # Imported here: scikit-learn takes about a second to import, which every CLI start would pay.
    from sklearn.cluster import KMeans
    from sklearn.preprocessing import MinMaxScaler

    x = MinMaxScaler(feature_range=(-1, 1)).fit_transform(features.detach().float().cpu().numpy())
    k = min(n_clusters, x.shape[0])
    assignments = KMeans(n_clusters=k, random_state=0, n_init=n_init).fit_predict(x)
    return cluster_purity(torch.from_numpy(assignments), labels.cpu())


def relearning_strength(gap: float, move_lambda: float) -> float:
    """α = tanh(λ·Δ)."""
    return math.tanh(move_lambda * gap)


@torch.no_grad()
def soft_reinit_(params: Iterable[nn.Parameter], initial: Iterable[Tensor], alpha: float) -> None:
    """θ ← α·θ^0 + (1 − α)·θ in place, for matching sequences of parameters and initial values."""
    for p, p0 in zip(params, initial, strict=True):
        p.lerp_(p0, alpha)


class _InitialParameters(nn.Module):
    """Copies of one encoder's parameters, as buffers ``p0, p1, …`` in ``parameters()`` order."""

    def __init__(self, params: Iterable[nn.Parameter]) -> None:
        super().__init__()
        self.count = 0
        for p in params:
            self.register_buffer(f"p{self.count}", p.detach().clone())
            self.count += 1

    def tensors(self) -> list[Tensor]:
        return [getattr(self, f"p{i}") for i in range(self.count)]


@METHODS.register("relearning")
class ReLearning(Method):
    adapted: ClassVar[Mapping[str, Any]] = {"reinit_epoch": "22%"}  # official: every 20 of 90 epochs
    HParams = ReLearningHParams
    search: ClassVar[Mapping[str, Any]] = {  # N: official 3, BalanceMM 2; λ around the official 3
        "move_lambda": [1.0, 2.0, 3.0, 5.0],
        "reinit_num": [1, 2, 3],
    }
    needs = Needs(val=True)
    reinits_done: Tensor  # number of re-initialisations so far (a buffer, so resume carries it)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The model is freshly initialised when its method is built: this is θ^0.
        self.initial = nn.ModuleDict(
            {m: _InitialParameters(self.model.modality_parameters(m)) for m in self.model.modalities}
        )
        self.register_buffer("reinits_done", torch.zeros((), dtype=torch.long))

    def acts_in(self, epoch: int) -> bool:
        # Re-initialisation k (1 ≤ k ≤ N) comes at the start of epoch k·R + 1, after epoch k·R was validated.
        last, period = epoch - 1, self.epoch_of(self.hp.reinit_epoch, ge=1)
        return last > 0 and last % period == 0 and last // period <= self.hp.reinit_num

    def on_epoch_start(self, epoch: int) -> SamplePlan | None:
        if self.acts_in(epoch) and int(self.reinits_done) < self.hp.reinit_num:
            with self.ctx.phase("relearning/diagnose"):
                self.relearn()
            self.reinits_done += 1
        return None

    def initial_parameters(self, modality: str) -> list[Tensor]:
        """θ^0 of one encoder, in ``model.modality_parameters(modality)`` order."""
        return cast(_InitialParameters, self.initial[modality]).tensors()

    def relearn(self) -> dict[str, float]:
        """Diagnose every modality and softly re-initialise its encoder; return α per modality."""
        hp, n_classes = self.hp, self.model.fusion.num_classes
        train_features, train_labels = self.features("train")
        val_features, val_labels = self.features("val")
        alphas = {}
        for m in self.model.modalities:
            p_train = kmeans_purity(train_features[m], train_labels, n_classes, hp.n_init)
            p_val = kmeans_purity(val_features[m], val_labels, n_classes, hp.n_init)
            gap = abs(p_train - p_val)
            alphas[m] = relearning_strength(gap, hp.move_lambda)
            soft_reinit_(self.model.modality_parameters(m), self.initial_parameters(m), alphas[m])
            self.ctx.log(
                **{
                    f"relearning/purity_train_{m}": p_train,
                    f"relearning/purity_val_{m}": p_val,
                    f"relearning/gap_{m}": gap,
                    f"relearning/alpha_{m}": alphas[m],
                }
            )
        return alphas

    def features(self, split: SplitName) -> tuple[dict[str, Tensor], Tensor]:
        """Pooled features ``{m: [N, d_m]}`` (CPU) and labels ``[N]`` of a split, or of ``max_rows`` of its rows."""
        n, cap = self.ctx.split_size(split), self.hp.max_rows
        subset = None
        if cap is not None and n > cap:
            subset = torch.randperm(n, generator=self.ctx.generator)[:cap].sort().values
        chunks: dict[str, list[Tensor]] = {m: [] for m in self.model.modalities}
        labels = []
        with self.ctx.eval_mode(self.model):
            for batch in self.ctx.batches(split, subset=subset):
                for m, h in self.model.encode(batch).items():
                    chunks[m].append(h.cpu())
                labels.append(batch.label.cpu())
        return {m: torch.cat(c) for m, c in chunks.items()}, torch.cat(labels)
