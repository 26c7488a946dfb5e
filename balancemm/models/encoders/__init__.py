"""Encoders register themselves on import.

The HuggingFace-backed ones (bert, vit) import ``transformers`` only when built, so importing the
package never needs it.
"""

from balancemm.models.encoders import cnn as _cnn  # noqa: F401
from balancemm.models.encoders import resnet as _resnet  # noqa: F401
from balancemm.models.encoders import text as _text  # noqa: F401
from balancemm.models.encoders import transformer as _transformer  # noqa: F401
from balancemm.models.encoders import vit as _vit  # noqa: F401
from balancemm.models.encoders.base import Encoder

__all__ = ["Encoder"]
