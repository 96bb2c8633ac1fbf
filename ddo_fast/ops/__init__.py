"""Operator layer: one module per operator stem, each registering its ``torch.ops.ddo_fast``
pair through :func:`._registry.register_op` and holding its public functions.

``_triton`` is the only importer of the Triton kernels (``kernels/`` = ``ddo_fast.kernels``),
``_registry`` the only registration and interpreter path, ``_common`` the shared argument checks.
"""

from .ar_ddo import ar_ddo_loss, sequence_logprob
from .ddo_loss import ddo_loss
from .diffusion_ddo import diffusion_ddo_loss, diffusion_logratio
from .fused_linear_ar_ddo import fused_linear_ar_ddo_loss, fused_linear_sequence_logprob
from .token_logprobs import token_logprobs

__all__ = [
    "ar_ddo_loss",
    "ddo_loss",
    "diffusion_ddo_loss",
    "diffusion_logratio",
    "fused_linear_ar_ddo_loss",
    "fused_linear_sequence_logprob",
    "sequence_logprob",
    "token_logprobs",
]
