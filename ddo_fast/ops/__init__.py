"""Operator layer: fake impls, autograd and CUDA (Triton) registration, public functions."""

from .ar_ddo import ar_ddo_loss, sequence_logprob
from .ddo_loss import ddo_loss
from .diffusion_ddo import diffusion_ddo_loss, diffusion_logratio
from .token_logprobs import token_logprobs

__all__ = [
    "ar_ddo_loss",
    "ddo_loss",
    "diffusion_ddo_loss",
    "diffusion_logratio",
    "sequence_logprob",
    "token_logprobs",
]
