"""Token log-probabilities ``log_softmax(logits)[targets]`` without a [B, L, V] temporary.

Per row x = logits[b, l] the forward keeps only the softmax statistics ``stats`` [2, B, L] fp32:
``m = stats[0] = max_v x_v`` and ``s = stats[1] = log sum_v exp(x_v - m)``, and returns
``logp = (x_t - m) - s`` (0 where ``t == ignore_index``). Keeping m and s apart (not the logsumexp
``m + s``) keeps fp32 precise at large logit offsets. The backward recomputes
``softmax = exp((x - m) - s)`` and writes ``grad_{b,l} * (onehot(t) - softmax)`` in one pass, for
any per-token upstream gradient. This is the log-likelihood term of the autoregressive DDO
log-ratio (Zheng et al. 2025, Eq. 13 with ``log p(x) = sum_l logp``; see :mod:`.ar_ddo`).
"""

from __future__ import annotations

from typing import Any

import torch

from .. import reference
from .._backend import TORCH
from . import _triton
from ._common import token_route
from ._registry import register_op


def _fwd_fake(logits, targets, ignore_index):
    f32 = torch.float32
    return (
        logits.new_empty(logits.shape[:2], dtype=f32),
        logits.new_empty((2, *logits.shape[:2]), dtype=f32),
    )


def _bwd_fake(grad, logits, *_):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)  # in logits.dtype


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    logits, targets, ignore_index = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(logits, targets, output[1])  # [1]: stats
    ctx.ignore_index = ignore_index


def _backward(bwd: Any, ctx: Any, grad: torch.Tensor, _grad_stats: Any) -> tuple:
    out = None
    if ctx.needs_input_grad[0]:
        out = bwd(grad, *ctx.saved_tensors, ctx.ignore_index)
    return out, None, None


SPEC = register_op(
    "token_logprobs",
    fake_fwd=_fwd_fake,
    fake_bwd=_bwd_fake,
    setup_context=_setup_context,
    backward=_backward,
    triton=_triton.token_logprobs,
)


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    backend: str | None = None,
) -> torch.Tensor:
    """``log_softmax(logits, -1)[b, l, targets[b, l]]`` in fp32.

    Args:
        logits: [B, L, V] any float dtype; differentiable.
        targets: [B, L] any integer dtype, in [0, V) or ``ignore_index`` (those positions give 0).

    Returns:
        [B, L] fp32 log-probabilities.
    """
    route = token_route(logits, targets, ignore_index, backend)
    if route == TORCH:
        return reference.token_logprobs_ref(logits, targets, ignore_index=ignore_index).float()
    return SPEC.run(route, logits, targets, int(ignore_index))[0]
