"""Encoders register themselves on import."""

from balancemm.models.encoders import cnn as _cnn  # noqa: F401
from balancemm.models.encoders import resnet as _resnet  # noqa: F401
from balancemm.models.encoders.base import Encoder

__all__ = ["Encoder"]
