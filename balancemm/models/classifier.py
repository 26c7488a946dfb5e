"""The multimodal classifier: per-modality encoders → fusion → fused logits (+ per-modality logits)."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch
from torch import Tensor, nn

from balancemm.config import EncoderConfig, ModelConfig
from balancemm.data.batch import Batch
from balancemm.errors import ConfigError
from balancemm.models.encoders.base import Encoder
from balancemm.models.fusions.base import Fusion
from balancemm.models.fusions.mmtm import MidFusion, MidFusionSpec
from balancemm.registry import ENCODERS, FUSIONS


class ModelOutput(NamedTuple):
    """What a forward pass returns.

    Attributes:
        logits: ``[B, C]`` fused logits.
        features: modality → ``[B, d_m]`` pooled features, after masking (what the fusion saw).
        unimodal_logits: modality → ``[B, C]``, sliced from the fusion head or from separate heads.
    """

    logits: Tensor
    features: dict[str, Tensor]
    unimodal_logits: dict[str, Tensor]


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build a model; methods may edit it in ``Method.model_spec``.

    The protocol sets neither ``fusion_options`` nor ``mid_fusion``, so every method starts from the same
    model; only the methods that need them set them in ``model_spec``.

    Attributes:
        fusion_options: keyword arguments of the fusion's constructor (e.g. MMCosine's ``{"scale": s}``),
            checked against its typed signature when the model is built (:meth:`Fusion.check_options`).
        mid_fusion: MMTM blocks between the encoder stages (Greedy), or None for the plain model.
    """

    modalities: tuple[str, ...]
    input_shapes: dict[str, tuple[int, ...]]
    num_classes: int
    encoders: dict[str, EncoderConfig]
    fusion: str = "concat"
    unimodal_heads: str = "auto"
    mask: str = "feature"
    fusion_options: Mapping[str, object] = field(default_factory=dict)
    mid_fusion: MidFusionSpec | None = None

    @classmethod
    def from_config(cls, model: ModelConfig, input_shapes: dict[str, tuple[int, ...]], num_classes: int) -> ModelSpec:
        return cls(
            tuple(sorted(input_shapes)),
            dict(input_shapes),
            num_classes,
            dict(model.encoders),
            model.fusion,
            model.unimodal_heads,
            model.mask,
        )

    def only(self, modalities: Iterable[str]) -> ModelSpec:
        """The same spec restricted to some modalities (unimodal models, teachers)."""
        keep = tuple(m for m in self.modalities if m in set(modalities))
        return replace(
            self,
            modalities=keep,
            input_shapes={m: self.input_shapes[m] for m in keep},
            encoders={m: self.encoders[m] for m in keep},
        )


class MultimodalClassifier(nn.Module):
    """Encoders (+ optional MMTM mid-fusion) + fusion + optional unimodal heads (TorchMultimodal-style).

    Parameter ownership comes from module structure: :meth:`modality_parameters` is exactly the
    encoder of one modality, :meth:`head_parameters` is everything shared between modalities (the
    fusion, the unimodal heads and the mid-fusion blocks).

    Masking (``batch.present``): with ``mask="feature"`` an absent modality's pooled feature is
    zeroed before fusion, so coalitions can reuse one encoder pass; with ``mask="input"`` its input is
    zeroed before the encoder (BalanceMM's choice; encoder and BatchNorm still run on zeros). With
    mid-fusion and feature masking, an absent modality's squeezed vector is also zeroed in every
    MMTM block, so it reaches the others nowhere; coalitions then need one pass each.
    """

    def __init__(
        self,
        encoders: dict[str, Encoder],
        fusion: Fusion,
        unimodal_heads: nn.ModuleDict | None = None,
        mask: str = "feature",
        mid_fusion: MidFusion | None = None,
    ) -> None:
        super().__init__()
        self.modalities = tuple(sorted(encoders))
        self.encoders = nn.ModuleDict({m: encoders[m] for m in self.modalities})
        self.fusion = fusion
        self.unimodal_heads = unimodal_heads
        self.mask = mask
        self.mid_fusion = mid_fusion

    # -- the pieces ------------------------------------------------------------------------------

    def _input(self, batch: Batch, modality: str) -> Tensor:
        """One modality's input, zeroed where absent under input masking."""
        x = batch.inputs[modality]
        if self.mask == "input":
            keep = batch.present_of(modality)
            if not bool(keep.all()):
                x = x * keep.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        return x

    def encode(self, batch: Batch, only: Iterable[str] | None = None) -> dict[str, Tensor]:
        """Pooled features ``{m: [B, d_m]}`` of the model's modalities (or the subset ``only``).

        With mid-fusion every encoder runs (their features depend on each other) and ``only`` just
        selects what is returned.
        """
        wanted = self.modalities if only is None else tuple(m for m in self.modalities if m in set(only))
        if self.mid_fusion is None:
            return {m: self.encoders[m](self._input(batch, m)) for m in wanted}
        keep = None
        if self.mask == "feature":
            # Column by column: indexing with a Python list would copy the list to the device.
            keep = torch.stack([batch.present_of(m) for m in self.modalities], dim=1)
        inputs = {m: self._input(batch, m) for m in self.modalities}
        features = self.mid_fusion(self.encoders, inputs, keep)
        return {m: features[m] for m in wanted}

    def apply_mask(self, features: dict[str, Tensor], present: Tensor, modalities: Sequence[str]) -> dict[str, Tensor]:
        """Zero the features of absent modalities (feature masking); identity for input masking."""
        if self.mask != "feature" or bool(present.all()):
            return features
        return {m: h * present[:, modalities.index(m), None].to(h.dtype) for m, h in features.items()}

    def fuse(self, features: dict[str, Tensor]) -> Tensor:
        """Fused logits ``[B, C]`` from (already masked) features of every model modality."""
        return self.fusion(features)

    def unimodal(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        """Per-modality logits ``{m: [B, C]}``."""
        if self.unimodal_heads is not None:
            return {m: self.unimodal_heads[m](h) for m, h in features.items()}
        return self.fusion.slice(features)

    def _output(self, features: dict[str, Tensor], batch: Batch) -> ModelOutput:
        masked = self.apply_mask(features, batch.present, batch.modalities)
        return ModelOutput(self.fuse(masked), masked, self.unimodal(masked))

    def forward(self, batch: Batch) -> ModelOutput:
        return self._output(self.encode(batch), batch)

    def predict_coalitions(self, batch: Batch, coalitions: Sequence[frozenset[str]]) -> tuple[ModelOutput, Tensor]:
        """The output on ``batch`` and fused logits ``[K, B, C]`` with only each coalition present.

        With feature masking the encoders run once and each coalition only re-runs the fusion,
        which is what makes the Shapley metric cost about one test pass instead of 2^M. Mid-fusion
        mixes modalities inside the encoders, so there every coalition gets its own pass.
        """
        everything = frozenset(self.modalities)
        if self.mask == "feature" and self.mid_fusion is None:
            features = self.encode(batch)
            out = self._output(features, batch)
            logits = [
                out.logits if s == everything else self._output(features, batch.with_only(s)).logits for s in coalitions
            ]
        else:
            out = self(batch)
            logits = [out.logits if s == everything else self(batch.with_only(s)).logits for s in coalitions]
        return out, torch.stack(logits)

    @contextmanager
    def masking(self, mask: str) -> Iterator[None]:
        """Inside, absent modalities are removed by ``mask`` (``"feature"`` or ``"input"``) instead of the
        model's own rule: the test evaluation scores the Shapley values under both."""
        old, self.mask = self.mask, mask
        try:
            yield
        finally:
            self.mask = old

    # -- parameter ownership ---------------------------------------------------------------------

    def modality_parameters(self, modality: str) -> Iterator[nn.Parameter]:
        """The parameters of one modality's encoder, found by structure (never by name matching)."""
        return self.encoders[modality].parameters()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """Fusion, unimodal-head and mid-fusion parameters: everything no single encoder owns."""
        yield from self.fusion.parameters()
        if self.unimodal_heads is not None:
            yield from self.unimodal_heads.parameters()
        if self.mid_fusion is not None:
            yield from self.mid_fusion.parameters()


def build_model(spec: ModelSpec) -> MultimodalClassifier:
    """Instantiate a classifier from a spec, with registered encoders and fusion."""
    encoders: dict[str, Encoder] = {}
    for m in spec.modalities:
        cfg = spec.encoders[m]
        try:
            encoders[m] = ENCODERS.get(cfg.name)(spec.input_shapes[m], cfg.options)
        except ValueError as exc:
            raise ConfigError(f"model.encoders.{m}: {exc}") from None
    dims = {m: e.num_features for m, e in encoders.items()}
    fusion_cls = FUSIONS.get(spec.fusion)
    fusion = fusion_cls(dims, spec.num_classes, **fusion_cls.check_options(spec.fusion_options, spec.fusion))
    heads_kind = spec.unimodal_heads
    if heads_kind == "auto":
        heads_kind = "slice" if fusion.supports_slice else "linear"
    if heads_kind == "slice" and not fusion.supports_slice:
        raise ConfigError(
            f"model.unimodal_heads=slice needs a fusion whose logits split per modality (concat, sum); "
            f"{spec.fusion} does not: use model.unimodal_heads=linear"
        )
    heads = None
    if heads_kind == "linear":
        heads = nn.ModuleDict({m: nn.Linear(d, spec.num_classes) for m, d in dims.items()})
    mid_fusion = None
    if spec.mid_fusion is not None:
        try:
            mid_fusion = MidFusion(encoders, spec.input_shapes, spec.mid_fusion.stages, spec.mid_fusion.ratio)
        except ValueError as exc:
            raise ConfigError(f"mid-fusion: {exc}") from None
    return MultimodalClassifier(encoders, fusion, heads, spec.mask, mid_fusion)


def require_slice_heads(
    spec: ModelSpec, method: str, why: str, fusions: Collection[str] | None = None, own: str | None = None
) -> None:
    """Refuse a model whose per-modality logits are not slices of the fusion head (OGM-GE, OPM, AMCo, MMCosine).

    Args:
        spec: the spec the method's ``model_spec`` receives.
        method: the method's registry name, which starts the message.
        why: what the method does with the head's slices, for the message.
        fusions: the fusions the method accepts, suggested in the message; None: every fusion that supports
            slicing, suggesting concat or sum.
        own: the fusion the method itself switches to (AMCo's ``amco``, MMCosine's ``cosine``): accepted,
            not suggested.

    Raises:
        ConfigError: ``model.unimodal_heads=linear``, or a fusion outside ``fusions`` (or not sliceable).
    """
    fusion = FUSIONS.resolve(spec.fusion)
    allowed = bool(FUSIONS.get(fusion).supports_slice) if fusions is None else fusion in (*fusions, own)
    if spec.unimodal_heads == "linear" or not allowed:
        suggested = " or ".join(fusions if fusions is not None else ("concat", "sum"))
        raise ConfigError(
            f"{method} {why} (got model.fusion={spec.fusion}, model.unimodal_heads={spec.unimodal_heads}): use "
            f"model.fusion={suggested} with model.unimodal_heads=auto or slice"
        )
