"""Models: encoders, fusions and the classifier that composes them."""

from balancemm.models import encoders as _encoders  # noqa: F401  (registers encoders)
from balancemm.models import fusions as _fusions  # noqa: F401  (registers fusions)
from balancemm.models.classifier import ModelOutput, ModelSpec, MultimodalClassifier, build_model
from balancemm.models.fusions.mmtm import MidFusionSpec
from balancemm.registry import ENCODERS, FUSIONS

__all__ = ["ENCODERS", "FUSIONS", "MidFusionSpec", "ModelOutput", "ModelSpec", "MultimodalClassifier", "build_model"]
