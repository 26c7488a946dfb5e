"""Fusion modules register themselves on import."""

from balancemm.models.fusions import amco as _amco  # noqa: F401
from balancemm.models.fusions import boosted as _boosted  # noqa: F401
from balancemm.models.fusions import concat as _concat  # noqa: F401
from balancemm.models.fusions import cosine as _cosine  # noqa: F401
from balancemm.models.fusions import film as _film  # noqa: F401
from balancemm.models.fusions import gated as _gated  # noqa: F401
from balancemm.models.fusions import shared as _shared  # noqa: F401
from balancemm.models.fusions import sum as _sum  # noqa: F401
from balancemm.models.fusions.base import Fusion

__all__ = ["Fusion"]
