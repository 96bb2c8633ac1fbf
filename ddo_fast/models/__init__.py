"""Small reference models used by the presets, the demo, the benchmarks and the tests.

* :class:`CausalTransformer` (:mod:`.causal_transformer`) - a VAR-like class-conditional causal
  transformer with a KV-cache ``sample``, for :class:`ddo_fast.adapters.CausalAR`.
* :class:`EDMPrecond`, :class:`MLPDenoiser`, :class:`ConvDenoiser`, :func:`edm_mlp`
  (:mod:`.denoisers`) - EDM denoisers for :class:`ddo_fast.adapters.EDMDenoiser`.
"""

from .causal_transformer import CausalTransformer
from .denoisers import ConvDenoiser, EDMPrecond, FourierFeatures, MLPDenoiser, edm_mlp
from .quantizer import MultiScaleQuantizer
from .var import VARTransformer

__all__ = [
    "CausalTransformer",
    "ConvDenoiser",
    "EDMPrecond",
    "FourierFeatures",
    "MLPDenoiser",
    "MultiScaleQuantizer",
    "VARTransformer",
    "edm_mlp",
]
