"""Token log-probabilities ``log_softmax(logits)[targets]`` without a [B, L, V] temporary.

Forward keeps only logsumexp [B, L]; backward recomputes softmax from it and writes
``grad_{b,l} * (onehot(target) - softmax)`` in one pass, for any per-token upstream gradient.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from .. import reference
from .._backend import resolve_backend
from ._common import check_targets_on_cpu as _check_targets_on_cpu
from ._common import check_token_args, interpreter_function

_FWD = "ddo_fast::token_logprobs_fwd"
_BWD = "ddo_fast::token_logprobs_bwd"


@torch.library.register_fake(_FWD)
def _fwd_fake(logits, targets, ignore_index):
    shape = logits.shape[:2]
    return (
        logits.new_empty(shape, dtype=torch.float32),
        logits.new_empty(shape, dtype=torch.float32),
    )


@torch.library.register_fake(_BWD)
def _bwd_fake(grad, logits, targets, lse, ignore_index):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    logits, targets, ignore_index = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(logits, targets, output[1])
    ctx.ignore_index = ignore_index


def _make_backward(bwd):
    def backward(ctx: Any, grad: torch.Tensor, _grad_lse: Any) -> tuple:
        logits, targets, lse = ctx.saved_tensors
        out = None
        if ctx.needs_input_grad[0]:
            out = bwd(grad, logits, targets, lse, ctx.ignore_index)
        return out, None, None

    return backward


torch.library.register_autograd(
    _FWD, _make_backward(torch.ops.ddo_fast.token_logprobs_bwd), setup_context=_setup_context
)


@torch.library.register_kernel(_FWD, "cuda")
def _fwd_cuda(*args):
    from ..kernels import token_logprobs as kernels

    return kernels.forward(*args)


@torch.library.register_kernel(_BWD, "cuda")
def _bwd_cuda(*args):
    from ..kernels import token_logprobs as kernels

    return kernels.backward(*args)


@functools.cache  # one Function class per process, built on first use
def _interpreter_function() -> type[torch.autograd.Function]:
    from ..kernels import token_logprobs as kernels

    return interpreter_function(
        "TokenLogprobsTritonInterpret",
        kernels.forward,
        _setup_context,
        _make_backward(kernels.backward),
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
        targets: [B, L] int64 in [0, V), or ``ignore_index`` (those positions give 0).

    Returns:
        [B, L] fp32 log-probabilities.
    """
    check_token_args(logits, targets)
    route = resolve_backend(backend, logits.device)
    if route == "torch":
        return reference.token_logprobs_ref(logits, targets, ignore_index=ignore_index).float()
    _check_targets_on_cpu(route, logits, targets, ignore_index)
    args = (logits, targets, int(ignore_index))
    if route == "triton-interpret":
        return _interpreter_function().apply(*args)[0]
    return torch.ops.ddo_fast.token_logprobs_fwd(*args)[0]
