"""Every built-in method's hyper-parameters, with the name, aliases and paper it is listed under.

Each ``HParams`` is the ``method:`` section of a run config: its defaults are the original code's
(differences noted beside the field), and the method's file in ``balancemm/methods`` documents what
each one does. They live here rather than beside their method so that resolving and printing a config
(``balancemm config``, the sweep's dry run) and ``balancemm list`` never import torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from balancemm.errors import ConfigError
from balancemm.registry import METHOD_HPARAMS
from balancemm.schema import EpochValue, epoch_meta, rng, window_order


class ModulationWindow:
    """Hyper-parameters that act from ``modulation_starts`` to ``modulation_ends`` (AGM, AMCo, OGM-GE,
    PMR): a window that ends before it starts is refused when the config is parsed."""

    modulation_starts: EpochValue
    modulation_ends: EpochValue

    def _validate(self, path: str) -> None:
        window_order(self.modulation_starts, self.modulation_ends, path)


@dataclass(frozen=True)
class NoHParams:
    """For methods without hyper-parameters."""


@METHOD_HPARAMS.register("agm", group="optimization", paper="Li et al., ICCV 2023", aliases=("AGM", "AGMTrainer"))
@dataclass(frozen=True)
class AGMHParams(ModulationWindow):
    alpha: float = field(default=1.0, metadata=rng(ge=0))  # α; official --alpha 1.0 (README AV-MNIST 2.5); BMM 0.1
    kappa: float | None = field(default=10.0, metadata=rng(gt=0))  # κ: 10 CREMA-D, 7 URFunny, null MOSEI; BMM 7
    modulation_starts: EpochValue = field(default=0, metadata=epoch_meta())  # first modulated epoch, 0-based (BMM 0)
    # last modulated epoch, 0-based, inclusive; official 20 counts from 1, i.e. 19 here (BMM 80)
    modulation_ends: EpochValue = field(default=19, metadata=epoch_meta())
    clip_threshold: float = field(default=1.0, metadata=rng(ge=0))  # θ, fusion-weight grad bound (BMM 5); 0 = no clip
    clip_norm: float = field(default=1.0, metadata=rng(gt=0))  # max_norm of the clip (BMM 5)
    # "shared": each encoder runs once per input kind, same values and gradients as "official":
    # one full zero-padded pass per coalition, the all-zero one included (the official cost)
    passes: Literal["shared", "official"] = "shared"
    # after modulation_ends: "plain" CE without coalition passes (the default here) | "frozen": the
    # last in-window c_m keep scaling ∂L/∂o_m (official: its gradient hooks stay registered)
    after_window: Literal["plain", "frozen"] = "plain"


@METHOD_HPARAMS.register(
    "amco",
    group="feed-forward",
    paper="Zhou et al., ICASSP 2023 (reconstruction: no code released)",
    aliases=("AMCo", "AMCoTrainer"),
)
@dataclass(frozen=True)
class AMCoHParams(ModulationWindow):
    sigma: float = field(default=0.5, metadata=rng(gt=0, lt=1))  # σ, dependence threshold; BMM 0.5 (paper unknown)
    eps: float = field(default=0.3, metadata=rng(gt=0))  # ε, level at which p_t reaches 1; BMM 0.3 (paper unknown)
    modulation_starts: EpochValue = field(default=0, metadata=epoch_meta())  # first epoch with mask + co-loss (BMM 0)
    modulation_ends: EpochValue = field(default=80, metadata=epoch_meta())  # last one, inclusive (BMM 80)
    # what a flagged modality loses: feature units of h_m (BMM 596b434, U = 512) | class logits of u_m (BMM HEAD)
    mask_unit: Literal["feature", "class"] = "feature"
    rescale: bool = True  # feature mode: × 1/max(1 − p_t, 0.1) (BMM 596b434); false: plain zeroing (BMM HEAD: none)


@METHOD_HPARAMS.register(
    "aug",
    group="feed-forward",
    paper="Jiang, Huang, Yang, NeurIPS 2025 (AUG)",
    aliases=("AUG",),
)
@dataclass(frozen=True)
class AUGHParams:
    # λ, the ACA threshold; null: 1.0 for M = 2 (--lam, train_CREMAD.py:165), 0.8/(M − 1) for M ≥ 3 (0.4 for three
    # modalities, 966dbf5 train_NVGesture.py:224)
    lam: float | None = field(default=None, metadata=rng(gt=0))
    margin: float = field(default=0.01, metadata=rng(ge=0))  # M = 2 dead band: add when |r − λ| > 0.01 (:222-225)
    mu: float = field(default=0.4, metadata=rng(ge=0, le=1))  # μ, M = 2 weight of f of the first sorted modality (:166)
    # fusion weights in sorted modality order; null: (μ, 1 − μ) for M = 2, 0.33/0.33/0.34 for M = 3
    # (966dbf5 train_NVGesture.py:225-226), 1/M beyond
    weights: tuple[float, ...] | None = None
    residual: float = field(default=0.5, metadata=rng(ge=0, le=1))  # c of (1 − c·p_o(y))·CE(a); HEAD :57 (966dbf5 0.2)
    check_every: EpochValue = field(default="10%", metadata=epoch_meta(ge=1))  # ACA period; code int(E/10) (:205-208)
    max_learners: int = field(default=10, metadata=rng(ge=0))  # preallocated learners per modality (ours)
    hidden: int = field(default=256, metadata=rng(ge=1))  # learner width (AudioVideo.py:47-54,67)
    # true: learners are trained (paper); false: weights frozen at initialisation as in the code, which never adds them
    # to its optimiser (train_CREMAD.py:201); gradient still reaches the encoder through them
    train_learners: bool = True

    def _validate(self, path: str) -> None:
        if self.weights is not None and (min(self.weights, default=0.0) < 0 or sum(self.weights) <= 0):
            raise ConfigError(f"{path}.weights must be non-negative with a positive sum")


METHOD_HPARAMS.register(
    "baseline", group="reference", paper="concatenation fusion + cross-entropy", aliases=("baselineTrainer",)
)(NoHParams)


@METHOD_HPARAMS.register("cggm", group="optimization", paper="Guo et al., NeurIPS 2024", aliases=("CGGM",))
@dataclass(frozen=True)
class CGGMHParams:
    rho: float = field(default=1.3, metadata=rng(gt=0))  # ρ `--rou`: 1.3 MOSI, IEMOCAP, Food-101 (BraTS 1.0)
    lam: float = field(default=0.2, metadata=rng(ge=0))  # λ `--lamda`: 0.2 MOSI and IEMOCAP, 0.05 Food-101 (BraTS 0.1)
    cls_lr: float = field(default=5e-4, metadata=rng(gt=0))  # classifiers' lr: 5e-4 MSA and Food-101 (BraTS 6e-3)
    hidden_twice: bool = False  # the classifier's first Linear applied twice (code: msamodel.py 91-92)
    # ours: B_m clamped to [0, clamp] (no sign flip, no blow-up when Σ Δ ≈ 0); null = unbounded, the code,
    # which stays finite only under its gradient clipping at 0.8 (null + train.grad_clip=0.8 reproduces it)
    clamp: float | None = field(default=2.0, metadata=rng(gt=0))
    # where the alignment term's gradient is evaluated: the head now ("current") | the head of the step
    # that built the term ("previous", the code: cal_cos clones the weights one step before they are used)
    align_at: Literal["current", "previous"] = "current"


@METHOD_HPARAMS.register("cml", group="objective", paper="Ma et al., ICML 2023", aliases=("CML", "CMLTrainer"))
@dataclass(frozen=True)
class CMLHParams:
    lam: float = field(default=0.1, metadata=rng(ge=0))  # λ = β/100; README --beta 10 → 0.1 (BMM lam 0.1)
    epsilon: float = field(default=0.0, metadata=rng(ge=0))  # margin ε; original 0.0 (BMM: none)
    variant: Literal["miwae", "cpm"] = "miwae"  # sign mask (+ trick 2) of miwae/train.py | cpm/CPM_Nets.py


@METHOD_HPARAMS.register("dgl", group="optimization", paper="Wei, Luo, Luo, ICCV 2025 (DGL)", aliases=("DGL",))
@dataclass(frozen=True)
class DGLHParams:
    alpha: float = field(default=4.0, metadata=rng(ge=0))  # α on Σ_m CE(z_m); argparse 4.0 (scripts 4–5, KS 2–3)
    # unimodal logits W[h_m; 0] + b through the shared head: "full" bias b (the code) | "split" b/M (slices)
    dgl_bias: Literal["full", "split"] = "full"


@METHOD_HPARAMS.register("g2d", group="objective", paper="Rakib & Bagavathi, ICCV 2025", aliases=("G2D",))
@dataclass(frozen=True)
class G2DHParams(ModulationWindow):
    ce_weight: float = field(default=1.0, metadata=rng(ge=0))  # w_ce; config.py ce_loss_weight 1.0
    kd_weight: float = field(default=1.0, metadata=rng(ge=0))  # w_log per teacher; logit_*_loss_weight 1.0
    feat_weight: float = field(default=1.0, metadata=rng(ge=0))  # w_feat per teacher; *_feature_loss_weight 1.0
    temperature: float = field(default=1.0, metadata=rng(gt=0))  # T per teacher; temp_audio = temp_video = 1
    modulation_starts: EpochValue = field(default=0, metadata=epoch_meta())  # first SMP epoch, 0-based; code 0
    modulation_ends: EpochValue = field(default=150, metadata=epoch_meta())  # last SMP epoch (inclusive); code 150/300
    # SMP: keep only the weakest teacher's modality (code, M = 2) | zero only the strongest's | none (KD alone)
    smp: Literal["keep_weakest", "zero_strongest", "none"] = "keep_weakest"
    # gated tensors: every conv kernel (= the code's 4-D rule on 2-D CNNs) | ndim == 4 (code) | every encoder param
    gate_params: Literal["conv", "conv4d", "all"] = "conv"


@METHOD_HPARAMS.register(
    "gblending", group="objective", paper="Wang et al., CVPR 2020", aliases=("GBlending", "GBlendingTrainer")
)
@dataclass(frozen=True)
class GBlendingHParams:
    mode: Literal["online", "offline"] = "online"  # paper: both; BMM "online"
    super_epoch: EpochValue = field(default=10, metadata=epoch_meta(ge=1))  # n, epochs per estimate (online); BMM 10
    heads: Literal["linear", "slice"] = "linear"  # separate unimodal heads (paper) | head slices (BMM)


@METHOD_HPARAMS.register(
    "greedy", group="feed-forward", paper="Wu et al., ICML 2022", aliases=("Greedy", "GreedyTrainer")
)
@dataclass(frozen=True)
class GreedyHParams:
    # ε, the BDR gap that starts curation; official gin 0.01 (BMM alpha 0.001)
    epsilon: float = field(default=0.01, metadata=rng(ge=0))
    # Q, steps per curation window; official curation_windowsize 5 (BMM window_size 5)
    window: int = field(default=5, metadata=rng(ge=1))
    # first 0-based epoch that may curate; official starting_epoch=2 counts from 1, i.e. 1 here (BMM 0)
    starting_epoch: EpochValue = field(default=1, metadata=epoch_meta())
    # MMTM after the last k stages of every encoder; official 3 = ResNet-18 layer2–4 (BMM 4 = all)
    mmtm_stages: int = field(default=3, metadata=rng(ge=1))
    # MMTM bottleneck ratio, joint layer Σd → ⌊2Σd/ratio⌋; official 4 (BMM 4)
    ratio: float = field(default=4.0, metadata=rng(gt=0))


@METHOD_HPARAMS.register(
    "inforeg", group="optimization", paper="Huang et al., CVPR 2025 (InfoReg)", aliases=("InfoReg",)
)
@dataclass(frozen=True)
class InfoRegHParams:
    threshold: float = field(default=0.05, metadata=rng(ge=0))  # τ: regulate while k > τ; HEAD 0.05 (41d887f 0.04)
    c: float = field(default=0.95, metadata=rng(ge=0))  # c_m of β_m = c_m·e^tanh(gap); HEAD audio's 0.95
    # c of the modality named "visual": HEAD 0.1; 0 = the first release (its visual branch is unreachable);
    # null = c, as every other modality (the uniform rule for M ≥ 3)
    c_visual: float | None = field(default=0.1, metadata=rng(ge=0))
    window_modality: str | None = None  # whose trace opens the window; null = audio if present, else the first
    span: EpochValue = field(default=10, metadata=epoch_meta(ge=1))  # epochs averaged in k (10, with 10 zero pads)
    trace_grad: Literal["regulated", "loss"] = "regulated"  # trace of g after the proximal add (code) | before it
    heads: Literal["slice", "linear"] = "slice"  # z_m = W_m h_m + b/M (HEAD) | separate linear heads (41d887f)


@METHOD_HPARAMS.register("lfm", group="objective", paper="Yang et al., NeurIPS 2024", aliases=("LFM", "LFMTrainer"))
@dataclass(frozen=True)
class LFMHParams:
    schedule: Literal["learned", "fitted", "heuristic"] = "learned"  # α rule; BMM always runs learned
    alignment: Literal["js", "mixture_kl"] = "js"  # true JS | the code's KL(m‖p) (original and BMM)
    alpha_al_init: float = field(default=0.95, metadata=rng(ge=0.05, le=0.95))  # learned α_al₀; orig 0.95 (BMM 0.05)
    lr_alpha: float = field(default=1e-4, metadata=rng(ge=0))  # η_α; original 1e-4 (BMM 1e-4)
    halve_every: EpochValue = field(default=20, metadata=epoch_meta(ge=1))  # η_α halving period; orig 20 (BMM 20)
    val_samples: int = field(default=8, metadata=rng(ge=1))  # rows for the α pass; orig 8 train rows (BMM 8 of val)


@METHOD_HPARAMS.register("mbsd", group="objective", paper="Liu et al., WSDM 2023", aliases=("MBSD", "MBSDTrainer"))
@dataclass(frozen=True)
class MBSDHParams:
    unimodal_weight: float = field(default=1.0, metadata=rng(ge=0))  # λ_u per CE(z_m); paper unknown (BMM 1)
    kl_weight: float = field(default=1.0, metadata=rng(ge=0))  # λ_kl; paper unknown (BMM 1)
    beta: float = field(default=1.0, metadata=rng(ge=0))  # β, RS weight; paper unknown (BMM 1)
    compat: bool = False  # BalanceMM's literal terms: scalar "KL", ω and RS not detached, RS on p for M ≥ 3


@METHOD_HPARAMS.register(
    "mla", group="feed-forward", paper="Zhang et al., CVPR 2024 (MLA)", aliases=("MLA", "MLATrainer")
)
@dataclass(frozen=True)
class MLAHParams:
    gs: bool = True  # project H's weight gradient; official: dead code at its commit (name test); BMM: runs
    gs_denominator: Literal["scalar", "elementwise"] = "scalar"  # OWM α + r·k (paper); official + BMM elementwise
    gs_mode: Literal["replace", "add"] = "replace"  # g ← g·Pᵀ (official) | g ← g + g·Pᵀ (BMM)
    fusion: Literal["entropy", "fixed"] = "entropy"  # test-time fusion; official: fixed unless --dynamic; BMM entropy
    # Fixed weights in sorted modality order (fusion=fixed); null = official (0.5/0.5; audio .35, visual .25, text .4).
    fixed_weights: tuple[float, ...] | None = None
    # After each modality's step but the last: official (torch 1.8.1) "zeros", so momentum and weight decay move
    # the encoders trained earlier in the batch; BMM (torch 2) and here "none", gradients cleared.
    zero_grad: Literal["none", "zeros"] = "none"

    def _validate(self, path: str) -> None:
        if self.fixed_weights is not None and (min(self.fixed_weights) < 0 or sum(self.fixed_weights) <= 0):
            raise ConfigError(f"{path}.fixed_weights must be non-negative with a positive sum")


@METHOD_HPARAMS.register(
    "mmcosine", group="objective", paper="Xu et al., ICASSP 2023", aliases=("MMCosine", "MMCosineTrainer")
)
@dataclass(frozen=True)
class MMCosineHParams:
    scale: float = field(default=10.0, metadata=rng(gt=0))  # s; original --scaling 10 (BMM 15)


@METHOD_HPARAMS.register(
    "mmpareto", group="objective", paper="Wei & Hu, ICML 2024", aliases=("MMPareto", "MMParetoTrainer")
)
@dataclass(frozen=True)
class MMParetoHParams:
    gamma: float = field(default=1.5, metadata=rng(gt=0))  # γ, hard-coded 1.5 in the original
    heads: Literal["linear", "slice"] = "linear"  # separate unimodal heads (original) | head slices (BMM)


@METHOD_HPARAMS.register(
    "modality_valuation",
    group="data",
    paper="Wei et al., CVPR 2024",
    aliases=("Sample", "SampleTrainer", "ModalityValuation"),
)
@dataclass(frozen=True)
class ValuationHParams:
    variant: Literal["sample", "modality"] = "sample"  # sample-level | modality-level (BMM default)
    warmup: EpochValue = field(default=5, metadata=epoch_meta())  # plain epochs before re-sampling starts; BMM 1
    part_ratio: float = field(default=0.2, metadata=rng(gt=0, le=1))  # modality-level: share of rows for φ̄; BMM 0.2
    alpha: float = field(default=1.0, metadata=rng(ge=0))  # modality-level α; BMM none (its alpha 0.5 is unused)
    func: Literal["linear", "tanh", "square"] = "linear"  # modality-level D(|Δγ|)


@METHOD_HPARAMS.register(
    "ogm_ge", group="optimization", paper="Peng et al., CVPR 2022 (OGM-GE)", aliases=("OGM", "OGM_GE", "OGMTrainer")
)
@dataclass(frozen=True)
class OGMGEHParams(ModulationWindow):
    alpha: float = field(default=0.1, metadata=rng(ge=0))  # α; CVPR README default 0.1 (BMM 0.3)
    ge: bool = True  # add the Generalization-Enhancement noise; false = plain OGM
    modulation_starts: EpochValue = field(default=0, metadata=epoch_meta())  # first modulated epoch, 0-based (BMM 10)
    modulation_ends: EpochValue = field(default=50, metadata=epoch_meta())  # last modulated epoch, inclusive (BMM 80)
    params: Literal["conv", "weights"] = "conv"  # conv kernels (official) | all non-1-D weights (BMM)
    continuous: bool = False  # 1 − tanh(α·(ρ−1)) instead of the code's 1 − tanh(α·ρ)


@METHOD_HPARAMS.register(
    "opm", group="feed-forward", paper="Wei et al., TPAMI 2024 (OPM)", aliases=("OPM", "OPMTrainer")
)
@dataclass(frozen=True)
class OPMHParams:
    q_base: float = field(default=0.5, metadata=rng(ge=0, le=1))  # q_base; argparse 0.5, config.py 0.4 (BMM 0.4)
    lam: float = field(default=0.5, metadata=rng(ge=0))  # λ; official `lam` 0.5 (BMM `alpha` 0.5)
    p_exe: float = field(default=0.7, metadata=rng(ge=0, le=1))  # drop executed on this share of batches (BMM 0.7)
    modulation_starts: EpochValue = field(default=6, metadata=epoch_meta())  # official: epochs 0–5 warm-up (BMM 0)
    ratio_to: Literal["mean", "sum"] = "mean"  # M ≥ 3: ρ_m = s_m / mean_{j≠m} s_j | / Σ_{j≠m} s_j (BMM)
    # Gradient of executed drops through the scores: "none" | "official": + ∇½θ² to the encoders, as the
    # official θ backward returns θ (Classifier.py 21); BMM: CE's own ∂/∂θ via 1/(1 − θ) (not offered)
    score_gradient: Literal["none", "official"] = "none"


@METHOD_HPARAMS.register("pmr", group="optimization", paper="Fan et al., CVPR 2023", aliases=("PMR", "PMRTrainer"))
@dataclass(frozen=True)
class PMRHParams(ModulationWindow):
    alpha: float = field(default=1.0, metadata=rng(ge=0))  # α, PCE weight; argparse 1.0, scripts 2–5 (BMM 0.6)
    momentum_coef: float = field(default=0.2, metadata=rng(ge=0, le=1))  # μ; argparse 0.2, scripts 0.0 (BMM 0.5)
    modulation_starts: EpochValue = field(default=0, metadata=epoch_meta())  # first epoch with PCE, 0-based (BMM 0)
    modulation_ends: EpochValue = field(default=100, metadata=epoch_meta())  # last epoch with PCE, inclusive (BMM 80)
    proto_fraction: float = field(default=0.1, metadata=rng(gt=0, le=1))  # share of train batches; ⌊N/10⌋ (BMM same)
    # The computation that first blends in the old prototypes (the one before epoch 0 is the first); official
    # "third" (`epoch <= 0`, main_Prototype_grad.py 435, also catches the call after epoch 0), BMM "second"
    momentum_from: Literal["second", "third"] = "second"


@METHOD_HPARAMS.register(
    "reconboost", group="optimization", paper="Hua et al., ICML 2024", aliases=("ReconBoost", "ReconBoostTrainer")
)
@dataclass(frozen=True)
class ReconBoostHParams:
    w1: float = field(default=5.0, metadata=rng(ge=0))  # weight1: 5.0 CREMA-D README (AVE 4.0); BMM 5
    w2: float = field(default=1.0, metadata=rng(ge=0))  # weight2: 1.0; BMM 1
    ga_weight: float = field(default=0.5, metadata=rng(ge=0))  # α of the (gradient-free) GA term; BMM 0.5
    epochs_per_stage: int = field(default=4, metadata=rng(ge=1))  # boosting passes per stage; BMM 1
    correct_epoch: int = field(default=4, metadata=rng(ge=0))  # rectification passes per stage; BMM 1
    boost_rate: float = 1.0  # initial learnable β_b; BMM 0.01
    head_hidden: int = field(default=256, metadata=rng(ge=0))  # shared head Linear→ReLU→Linear; 0 = Linear (BMM)
    pretrained: bool = True  # start from unimodal runs (README --use_pretrain); BMM false
    # what a pre-trained learner predicts through until its first stage: "own" = its unimodal run's
    # classifier, frozen (original: its pre-trained fc, train.py 287–288); "shared" = H (BMM: no pre-training)
    pretrained_head: Literal["own", "shared"] = "own"
    # the GA partner's logits: "reuse" the F_{−m} pass (default) | "again" = a second train-mode forward that
    # moves its BatchNorm running statistics a second time (original train.py 348; BMM the same)
    partner_pass: Literal["reuse", "again"] = "reuse"


@METHOD_HPARAMS.register(
    "relearning",
    group="optimization",
    paper="Wei et al., ECCV 2024 (Diagnosing & Re-learning)",
    aliases=("ReLearning", "ReLearningTrainer", "Diagnosing"),
)
@dataclass(frozen=True)
class ReLearningHParams:
    move_lambda: float = field(default=3.0, metadata=rng(ge=0))  # λ; official 3 (BMM 3)
    reinit_epoch: EpochValue = field(default=20, metadata=epoch_meta(ge=1))  # R, diagnosis period; official 20 (BMM 15)
    reinit_num: int = field(default=3, metadata=rng(ge=0))  # N, most re-initialisations; official 3 (BMM 2)
    n_init: int = field(default=10, metadata=rng(ge=1))  # k-means restarts; official: sklearn's default (10 < 1.4)
    max_rows: int | None = field(default=None, metadata=rng(ge=1))  # rows per split to diagnose; None = all


@METHOD_HPARAMS.register(
    "remix", group="data", paper="Ma, Chen, Deng, ICML 2025 (Data Remixing)", aliases=("Remix", "DataRemixing")
)
@dataclass(frozen=True)
class RemixHParams:
    warmup: EpochValue = field(default=10, metadata=epoch_meta())  # joint epochs before remixing starts (--warmup 10)
    alpha: float = field(default=0.5, metadata=rng(ge=0))  # warm-up weight of every CE(z_m); --alpha = --beta = 0.5
    gamma: float = field(default=1.0, metadata=rng(ge=0))  # remixed weight of CE(z_m) on m's subset; --gamma1/2 = 1
    alphas: tuple[float, ...] | None = None  # per-modality warm-up weights in sorted modality order (overrides alpha)
    gammas: tuple[float, ...] | None = None  # per-modality remixed weights in sorted modality order (overrides gamma)
    # the order the subsets are trained in, which is also the tie-break of the assignment (the first wins); null:
    # reverse sorted modality order, i.e. visual then audio, the code's (train.py:127-171, ties to video :78-81)
    subset_order: tuple[str, ...] | None = None

    def _validate(self, path: str) -> None:
        for name in ("alphas", "gammas"):
            given = getattr(self, name)
            if given is not None and min(given, default=0.0) < 0:
                raise ConfigError(f"{path}.{name} must be non-negative")


@METHOD_HPARAMS.register("umt", group="objective", paper="Du et al., ICML 2023", aliases=("UMT", "UMTTrainer"))
@dataclass(frozen=True)
class UMTHParams:
    weight: float = field(default=10.0, metadata=rng(ge=0))  # λ; paper: tuned per dataset (unverified); BMM 10


@METHOD_HPARAMS.register("unimodal", group="reference", paper="one modality alone", aliases=("unimodalTrainer",))
@dataclass(frozen=True)
class UnimodalHParams:
    modality: str = ""  # required: which modality to train on, e.g. audio
