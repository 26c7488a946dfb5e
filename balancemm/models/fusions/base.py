"""The fusion contract: features of every modality → fused logits, optionally sliceable."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Mapping

from torch import Tensor, nn

from balancemm.errors import ConfigError


class Fusion(nn.Module):
    """Maps ``{modality: [B, d_m]}`` (sorted modality order) to fused logits ``[B, C]``.

    A fusion whose logits decompose into per-modality terms sets ``supports_slice`` and implements
    :meth:`slice`, giving each modality's logits without any extra head (OGM-GE's convention).

    Options: a fusion's options are the typed keyword parameters of its constructor after ``dims`` and
    ``num_classes`` (``SumFusion(average: bool)``, ``SharedHeadFusion(hidden: int)``,
    ``CosineFusion(scale: float)``); ``ModelSpec.fusion_options`` is checked against them by
    :meth:`check_options`.
    """

    supports_slice = False

    def __init__(self, dims: dict[str, int], num_classes: int) -> None:
        super().__init__()
        self.modalities = tuple(sorted(dims))
        self.dims = dict(dims)
        self.num_classes = num_classes

    def slice(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError(f"{type(self).__name__} logits do not split per modality")

    @classmethod
    def check_options(cls, options: Mapping[str, object], name: str) -> dict[str, object]:
        """``options`` as keyword arguments of this fusion's constructor, checked against its signature.

        Args:
            options: option name → value (``ModelSpec.fusion_options``).
            name: the fusion's registry name, for the message.

        Raises:
            ConfigError: a name the constructor does not take, or a value not of its annotated type (an
                int is taken for a float, a bool never for a number).
        """
        params = inspect.signature(cls.__init__).parameters.values()
        hints = typing.get_type_hints(cls.__init__)
        declared = {
            p.name: hints.get(p.name, object)
            for p in params
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in ("self", "dims", "num_classes")
        }
        unknown = sorted(set(options) - set(declared))
        if unknown and not any(p.kind == p.VAR_KEYWORD for p in params):
            known = ", ".join(declared) or "none"
            raise ConfigError(f"fusion {name!r} has no option {', '.join(unknown)} (its options: {known})")
        for key, value in options.items():
            expected = declared.get(key, object)
            if not _is_a(value, expected):
                kind = getattr(expected, "__name__", expected)
                raise ConfigError(f"fusion {name!r}: option {key} must be {kind}, got {value!r}")
        return dict(options)


def _is_a(value: object, expected: object) -> bool:
    """Whether ``value`` fits the annotation ``expected`` (a class; other annotations are not checked)."""
    if isinstance(value, bool) and expected in (int, float):
        return False
    if expected is float:
        return isinstance(value, (int, float))
    return not isinstance(expected, type) or isinstance(value, expected)
