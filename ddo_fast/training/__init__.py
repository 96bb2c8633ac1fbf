"""DDO fine-tuning: :func:`train`, :class:`TrainConfig`, checkpoints, data streams, presets.

(The package is ``ddo_fast.training``; the function is re-exported as ``ddo_fast.train``.)
"""

from .config import TrainConfig
from .loop import TrainResult, train
from .state import TrainState

__all__ = ["TrainConfig", "TrainResult", "TrainState", "train"]
