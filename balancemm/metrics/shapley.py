"""Coalitions and Shapley values of modalities — one implementation for the whole codebase.

The imbalance metric, AGM's coalition passes and Modality-valuation all use these helpers. Values
may be floats (accuracies) or tensors (AGM's coalition logits ``[B, C]``): only +, − and scaling by
the weight are used.

Paper eq. (7): φ_i = 1/|M|! Σ_π [v(S_π^i ∪ {i}) − v(S_π^i)], computed in the equivalent subset form
φ_i = Σ_{S ⊆ M∖{i}} |S|!(|M|−|S|−1)!/|M|! · [v(S ∪ {i}) − v(S)].

Eq. (8): v(A) is the accuracy of the trained model evaluated with only the modalities in A present.
**The empty coalition** is evaluated the same way: v(∅) is the accuracy of the model with every
modality masked (under feature masking: the prediction from the fusion bias alone, i.e. the
frequency of one class). It is reported, not assumed to be 0, and efficiency holds with it:
Σ_i φ_i = v(M) − v(∅).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Protocol, TypeVar


class _Vector(Protocol):
    def __add__(self: V, other: V, /) -> V: ...
    def __sub__(self: V, other: V, /) -> V: ...
    def __rmul__(self: V, weight: float, /) -> V: ...


V = TypeVar("V", bound=_Vector)


def coalitions(modalities: Sequence[str], *, include_empty: bool = True) -> list[frozenset[str]]:
    """Every subset of ``modalities``, smallest first (∅, {a}, {b}, …, M)."""
    subsets = [frozenset(c) for k in range(len(modalities) + 1) for c in itertools.combinations(modalities, k)]
    return subsets if include_empty else subsets[1:]


def shapley_weight(size: int, players: int) -> float:
    """|S|!(|M|−|S|−1)!/|M|!: the weight of a coalition of ``size`` that a new player joins."""
    return math.factorial(size) * math.factorial(players - size - 1) / math.factorial(players)


def shapley_values(values: Mapping[frozenset[str], V], modalities: Sequence[str]) -> dict[str, V]:
    """φ for each modality from the value of every coalition (``values`` must hold all 2^M)."""
    n = len(modalities)
    phi = {}
    for m in modalities:
        others = [o for o in modalities if o != m]
        terms = [shapley_weight(len(s), n) * (values[s | {m}] - values[s]) for s in coalitions(others)]
        total = terms[0]
        for term in terms[1:]:
            total = total + term
        phi[m] = total
    return phi
