"""MBSD: modality-balanced self-distillation (a reconstruction).

Liu, Li, Song, Yang, Zeng. "Multimodal Pre-Training with Self-Distillation for Product Understanding
in E-Commerce." WSDM 2023 (DOI 10.1145/3539597.3570423). No official code exists; BalanceMM's
``MBSD_trainer.py`` is the only implementation, and this file is a *faithful variant* of it (a true
KL, detached teacher; documented in docs/methods/mbsd.md): a reconstruction, not the paper's code.

Idea: per sample, the modality that is more confident on the true class is the teacher and the other
one the student; the student is pulled towards the teacher's prediction (a KL term) and its logits
towards the teacher's logits (a representation-similarity term, RS), weighted by how far apart the
two modalities are on that sample. Knowledge flows one way, from the dominant to the weaker modality.

Per step (hook ``losses``), with z the fused logits, z_m the per-modality logits, p_m = softmax(z_m)
and p_{m,y} the probability of the true class:

1. pairs        every unordered modality pair (a, b), P = M(M−1)/2 of them (P = 1 for M = 2);
2. roles        per sample i: teacher t(i) = argmax_{m∈{a,b}} p_{m,y}, student s(i) = the other;
3. weight       ω_i = (max(p_{a,y}, p_{b,y}) − min(p_{a,y}, p_{b,y})) · 1[ŷ_a = y ∨ ŷ_b = y]
                (zero when both predictions of the pair are wrong);
4. distillation KL_i = KL(sg(p_t) ‖ p_s) = Σ_c sg(p_t,c) (log sg(p_t,c) − log p_s,c);
5. similarity   RS_i = (1/C) Σ_c (sg(z_t,c) − z_s,c)²   (on logits, as BalanceMM's 2-modality case);
6. loss         L = CE(z, y) + λ_u Σ_m CE(z_m, y)
                    + (1/P) Σ_pairs (1/B) Σ_i sg(ω_i) [λ_kl KL_i + β RS_i].

Logged terms: ``fused``, ``uni_<m>``, ``distill`` (λ_kl part), ``rs`` (β part).

Three or more modalities: every pair applies steps 2–5 with its own ω and the pair terms are
averaged (step 6). This is BalanceMM's 3-modality construction, and it reduces exactly to the
2-modality rule for M = 2; a middle modality learns from the strongest and teaches the weakest.
The alternative "best modality teaches all others" was not chosen because it drops that middle
transfer and has no BalanceMM counterpart to compare against.

Deviations from the paper (reconstruction choices; the paper's text and code are not available):
  * The term weights λ_u, λ_kl, β are unknown; all default to 1, BalanceMM's implicit values.
  * The teacher is detached in both KL and RS, and ω is detached, so the self-distillation terms
    train only the student's branch and never pull the dominant modality down.
  * RS is measured on logits for every M (BalanceMM switches to probabilities for M = 3).
Deviations from BalanceMM (``MBSD_trainer.py``), ``compat=True`` reproduces BalanceMM's terms:
  * BalanceMM's "KL" is ``F.kl_div(s, w)`` on two scalars, i.e. K_i = w_i (log w_i − s_i) with
    s_i, w_i the larger and smaller true-class probability; it is not a divergence and is ≤ 0.
    ``compat`` uses it, with ω and RS not detached and RS on probabilities when M ≥ 3.
  * BalanceMM loops over the batch in Python (O(B) host syncs per step); this is vectorised.
  * BalanceMM's ``modulation_starts``/``modulation_ends`` window (0..80, covering every default
    epoch) is not offered: outside it BalanceMM trains CE(z) alone, which is the baseline.
  * Heads are the protocol's: with concat fusion the unimodal logits are slices of the fusion head,
    z_m = W_m h_m + b/M, as in BalanceMM; ``model.unimodal_heads=linear`` gives separate heads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from balancemm.catalog.methods import MBSDHParams
from balancemm.data.batch import Batch
from balancemm.methods.base import Method, Needs
from balancemm.models.classifier import ModelOutput
from balancemm.registry import METHODS


def self_distillation(logits: Sequence[Tensor], label: Tensor, compat: bool = False) -> tuple[Tensor, Tensor]:
    """The sample-weighted distillation and similarity terms, averaged over modality pairs.

    Args:
        logits: one ``[B, C]`` tensor per modality (``model.modalities`` order), at least two.
        label: ``[B]`` class indices.
        compat: BalanceMM's literal terms instead of the reconstruction (module docstring).

    Returns:
        ``(kl, rs)``, two scalars: (1/P) Σ_pairs (1/B) Σ_i ω_i KL_i and the same with RS_i.
    """
    z = torch.stack(list(logits))  # [M, B, C]
    # Pair indices (a, b), a < b, in lexicographic order, built on the device: no host list is copied.
    a, b = torch.triu_indices(z.shape[0], z.shape[0], 1, device=z.device)
    log_p = torch.log_softmax(z, dim=-1)
    p_true = log_p.gather(-1, label.expand(z.shape[0], -1).unsqueeze(-1)).squeeze(-1).exp()  # [M, B]
    correct = z.argmax(-1) == label  # [M, B]
    strong, weak = torch.maximum(p_true[a], p_true[b]), torch.minimum(p_true[a], p_true[b])  # [P, B]
    omega = (strong - weak) * (correct[a] | correct[b])
    if compat:
        # BMM-PARITY: F.kl_div(input=s, target=w) on scalars = w·(log w − s), with 0·log 0 = 0.
        kl = torch.xlogy(weak, weak) - weak * strong
        # BMM-PARITY: RS on logits for two modalities, on probabilities for three or more.
        rep = z if z.shape[0] == 2 else log_p.exp()
        rs = (rep[a] - rep[b]).pow(2).mean(-1)
        return (omega * kl).mean(), (omega * rs).mean()
    a_teaches = (p_true[a] >= p_true[b]).unsqueeze(-1)  # a tie has ω = 0, so its roles do not matter
    teacher_log_p = torch.where(a_teaches, log_p[a], log_p[b]).detach()
    student_log_p = torch.where(a_teaches, log_p[b], log_p[a])
    kl = (teacher_log_p.exp() * (teacher_log_p - student_log_p)).sum(-1)  # [P, B]
    teacher_z = torch.where(a_teaches, z[a], z[b]).detach()
    student_z = torch.where(a_teaches, z[b], z[a])
    rs = (teacher_z - student_z).pow(2).mean(-1)
    omega = omega.detach()
    return (omega * kl).mean(), (omega * rs).mean()


@METHODS.register("mbsd")
class MBSD(Method):
    HParams = MBSDHParams
    search: ClassVar[Mapping[str, Any]] = {  # no released values (all 1 in BalanceMM): a band around 1
        "kl_weight": [0.1, 0.3, 1.0, 3.0],
        "beta": [0.3, 1.0, 3.0],
    }
    needs = Needs()

    def losses(self, out: ModelOutput, batch: Batch) -> dict[str, Tensor]:
        hp, y = self.hp, batch.label
        unimodal = [out.unimodal_logits[m] for m in self.model.modalities]
        terms = {"fused": F.cross_entropy(out.logits, y)}
        for m, z_m in zip(self.model.modalities, unimodal, strict=True):
            terms[f"uni_{m}"] = hp.unimodal_weight * F.cross_entropy(z_m, y)
        kl, rs = self_distillation(unimodal, y, compat=hp.compat)
        terms["distill"] = hp.kl_weight * kl
        terms["rs"] = hp.beta * rs
        return terms
