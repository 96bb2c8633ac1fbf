"""ddo_fast: fused kernels for Direct Discriminative Optimization (Zheng et al., ICML 2025).

The DDO loss fine-tunes a likelihood model theta against its frozen copy theta_ref with the
implicit discriminator ``r = log p_theta - log p_ref``:
``L = -E_data logsigmoid(beta r) - alpha E_{x ~ p_ref} logsigmoid(-beta r)``.
"""

import torch  # noqa: F401  (loads libtorch before the extension that links against it)

from . import (
    _library,  # noqa: F401  (operator schemas; the C++ CPU kernels load on first use)
    adapters,
    ops,
)
from ._library import cpu_isa
from .loss import ARDDOLoss, DDOLoss, DiffusionDDOLoss, FusedLinearARDDOLoss
from .ops import *  # noqa: F403  (the public functions: exactly ddo_fast.ops.__all__)
from .training import TrainConfig, TrainResult, train

__version__ = "0.1.0"

__all__ = [
    "ARDDOLoss",
    "DDOLoss",
    "DiffusionDDOLoss",
    "FusedLinearARDDOLoss",
    "TrainConfig",
    "TrainResult",
    "adapters",
    "cpu_isa",
    "train",
    "__version__",
]
__all__ += ops.__all__  # the public functions, listed once in ddo_fast/ops/__init__.py
