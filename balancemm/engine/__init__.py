"""Engine: the one training loop, evaluation and the run directory."""

from balancemm.engine.evaluate import evaluate
from balancemm.engine.trainer import Trainer

__all__ = ["Trainer", "evaluate"]
