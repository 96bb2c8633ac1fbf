"""``ddo_loss``: the DDO objective from per-sample log-ratios (Zheng et al. 2025, Eq. 13).

``l_b = -w_b logsigmoid(beta r_b)`` for real samples and ``-alpha w_b logsigmoid(-beta r_b)`` for
samples drawn from the reference model; reduced per group (see ``ddo_fast.reference``).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from .. import reference
from .._backend import resolve_backend
from ._common import check_float, check_loss_args, interpreter_function

_FWD = "ddo_fast::ddo_loss_fwd"
_BWD = "ddo_fast::ddo_loss_bwd"


@torch.library.register_fake(_FWD)
def _fwd_fake(logratio, is_real, sample_weight, alpha, beta, reduction):
    f32 = dict(dtype=torch.float32, device=logratio.device)
    out = logratio.new_empty(logratio.shape if reduction == 0 else (), **f32)
    return out, logratio.new_empty((2,), **f32)


@torch.library.register_fake(_BWD)
def _bwd_fake(grad_out, logratio, is_real, sample_weight, norm, alpha, beta, reduction):
    return logratio.new_empty(logratio.shape, dtype=torch.float32)


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    logratio, is_real, sample_weight, alpha, beta, reduction = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(logratio, is_real, sample_weight, output[1])
    ctx.params = (alpha, beta, reduction)


def _make_backward(bwd):
    def backward(ctx: Any, grad_out: torch.Tensor, _grad_norm: Any) -> tuple:
        logratio, is_real, sample_weight, norm = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0]:
            grad = bwd(grad_out, logratio, is_real, sample_weight, norm, *ctx.params)
            grad = grad.to(logratio.dtype)
        return grad, None, None, None, None, None

    return backward


torch.library.register_autograd(
    _FWD, _make_backward(torch.ops.ddo_fast.ddo_loss_bwd), setup_context=_setup_context
)


@torch.library.register_kernel(_FWD, "cuda")
def _fwd_cuda(*args):
    from ..kernels import ddo_loss as kernels

    return kernels.forward(*args)


@torch.library.register_kernel(_BWD, "cuda")
def _bwd_cuda(*args):
    from ..kernels import ddo_loss as kernels

    return kernels.backward(*args)


@functools.cache  # one Function class per process, built on first use
def _interpreter_function() -> type[torch.autograd.Function]:
    from ..kernels import ddo_loss as kernels

    return interpreter_function(
        "DDOLossTritonInterpret", kernels.forward, _setup_context, _make_backward(kernels.backward)
    )


def ddo_loss(
    logratio: torch.Tensor,
    is_real: torch.Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    sample_weight: torch.Tensor | None = None,
    reduction: str = "mean",
    backend: str | None = None,
) -> torch.Tensor:
    """DDO loss from per-sample log-ratios, computed in fp32.

    Args:
        logratio: [B] float, ``log p_theta(x_b) - log p_ref(x_b)``; differentiable.
        is_real: [B] bool, True for data samples, False for samples from the reference model.
        alpha: weight of the fake (reference-sample) term.
        beta: scale of the log-ratio inside both sigmoids.
        sample_weight: optional [B] float weights ``w_b``.
        reduction: ``"mean"`` (per-group means, summed), ``"sum"`` or ``"none"`` ([B]).
        backend: see :mod:`ddo_fast._backend`.

    Returns:
        fp32 scalar, or [B] for ``reduction="none"``.
    """
    check_float("logratio", logratio)
    if logratio.dim() != 1:
        raise ValueError(f"ddo_fast: `logratio` must have shape [B], got {list(logratio.shape)}")
    code = check_loss_args(is_real, sample_weight, logratio.shape[0], logratio.device, reduction)
    route = resolve_backend(backend, logratio.device)
    if route == "torch":
        return reference.ddo_loss_ref(
            logratio,
            is_real,
            alpha=alpha,
            beta=beta,
            sample_weight=sample_weight,
            reduction=reduction,
        )
    sw = None if sample_weight is None else sample_weight.detach()
    args = (logratio, is_real, sw, float(alpha), float(beta), code)
    if route == "triton-interpret":
        return _interpreter_function().apply(*args)[0]
    return torch.ops.ddo_fast.ddo_loss_fwd(*args)[0]
