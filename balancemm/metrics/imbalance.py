"""The imbalance degree of the paper's §4.4.

Eq. (9), two modalities: I = |φ_1 − φ_2|.
Eq. (10), three modalities: I = (|φ_1 − φ_2| + |φ_1 − φ_3| + |φ_2 − φ_3|) / 3.

Both are the mean absolute difference over pairs of modalities, which is how it is computed here for
any M ≥ 2 (for M > 3 this is our extension; the paper stops at 3). I = 0 when every modality
contributes equally, and I does not depend on the order of the modalities. The paper's bound
I ∈ [0, 1] holds whenever no modality hurts (every φ_i ≥ 0): then Σφ = v(M) − v(∅) ≤ 1 bounds every
pairwise difference. A modality with φ_i < 0 (the model does better without it) can exceed it.

Example: φ = {audio: 0.55, visual: 0.25} → I = 0.30;
φ = {a: 0.5, t: 0.2, v: 0.1} → I = (0.3 + 0.4 + 0.1) / 3 = 0.2667.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping


def imbalance_degree(phi: Mapping[str, float]) -> float | None:
    """Mean |φ_i − φ_j| over modality pairs; None for a single modality (no pair to compare)."""
    pairs = list(itertools.combinations(sorted(phi), 2))
    if not pairs:
        return None
    return sum(abs(phi[a] - phi[b]) for a, b in pairs) / len(pairs)
