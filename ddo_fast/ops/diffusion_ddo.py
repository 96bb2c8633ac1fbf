"""Diffusion DDO: the weighted denoising-error gap of target and reference, fused with the loss.

``r_b = -sum_{all non-batch dims} weight_b * ((pred - target)^2 - (pred_ref - target)^2)``, the
one-sample ELBO gap of the paper's Eq. 14-16 with the EDM weighting ``weight_b = lambda(sigma_b)``
(sums over all dimensions, no per-dimension mean). ``pred`` is D_theta(x + sigma eps), ``pred_ref``
is D_ref on the same noisy input, ``target`` is the clean x. Only ``pred`` gets gradients:
``d r_b / d pred = -2 weight_b (pred - target)``.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from .. import reference
from .._backend import resolve_backend
from ._common import (
    check_batch_vector,
    check_device,
    check_float,
    check_loss_args,
    interpreter_function,
)

_FWD = "ddo_fast::diffusion_ddo_fwd"
_BWD = "ddo_fast::diffusion_ddo_bwd"


@torch.library.register_fake(_FWD)
def _fwd_fake(pred, pred_ref, target, weight, is_real, sample_weight, alpha, beta, reduction):
    batch = pred.shape[0]
    f32 = dict(dtype=torch.float32, device=pred.device)
    if is_real is None:
        out = pred.new_empty((0,), **f32)
    else:
        out = pred.new_empty((batch,) if reduction == 0 else (), **f32)
    return out, pred.new_empty((batch,), **f32), pred.new_empty((2,), **f32)


@torch.library.register_fake(_BWD)
def _bwd_fake(
    grad_out,
    grad_logratio,
    pred,
    target,
    weight,
    logratio,
    is_real,
    sample_weight,
    norm,
    alpha,
    beta,
    reduction,
):
    return torch.empty_like(pred, memory_format=torch.contiguous_format)


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    pred, _pred_ref, target, weight, is_real, sample_weight, alpha, beta, reduction = inputs
    _out, logratio, norm = output
    ctx.mark_non_differentiable(norm)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(pred, target, weight, logratio, is_real, sample_weight, norm)
    ctx.params = (alpha, beta, reduction)


def _make_backward(bwd):
    def backward(ctx: Any, grad_out: Any, grad_logratio: Any, _grad_norm: Any) -> tuple:
        pred, target, weight, logratio, is_real, sample_weight, norm = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0] and (grad_out is not None or grad_logratio is not None):
            if is_real is None:
                grad_out = None
            grad = bwd(
                grad_out,
                grad_logratio,
                pred,
                target,
                weight,
                logratio,
                is_real,
                sample_weight,
                norm,
                *ctx.params,
            )
        return (grad,) + (None,) * 8

    return backward


torch.library.register_autograd(
    _FWD, _make_backward(torch.ops.ddo_fast.diffusion_ddo_bwd), setup_context=_setup_context
)


@torch.library.register_kernel(_FWD, "cuda")
def _fwd_cuda(*args):
    from ..kernels import diffusion_ddo as kernels

    return kernels.forward(*args)


@torch.library.register_kernel(_BWD, "cuda")
def _bwd_cuda(*args):
    from ..kernels import diffusion_ddo as kernels

    return kernels.backward(*args)


@functools.cache  # one Function class per process, built on first use
def _interpreter_function() -> type[torch.autograd.Function]:
    from ..kernels import diffusion_ddo as kernels

    return interpreter_function(
        "DiffusionDDOTritonInterpret",
        kernels.forward,
        _setup_context,
        _make_backward(kernels.backward),
    )


def _check_diffusion(pred: Any, pred_ref: Any, target: Any, weight: Any) -> int:
    check_float("pred", pred)
    if pred.dim() < 1:
        raise ValueError("ddo_fast: `pred` must have a batch dimension [B, ...], got a scalar")
    for name, t in (("pred_ref", pred_ref), ("target", target)):
        check_float(name, t)
        if t.shape != pred.shape:
            raise ValueError(
                f"ddo_fast: `{name}` must have the shape of `pred` {list(pred.shape)}, "
                f"got {list(t.shape)}"
            )
        check_device(name, t, pred.device)
    check_batch_vector("weight", weight, pred.shape[0], pred.device)
    return pred.shape[0]


def _run(route: str, *args: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if route == "triton-interpret":
        return _interpreter_function().apply(*args)
    return torch.ops.ddo_fast.diffusion_ddo_fwd(*args)


def diffusion_logratio(
    pred: torch.Tensor,
    pred_ref: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Per-sample log-ratio of a denoiser against its frozen reference, in fp32.

    Args:
        pred: [B, ...] any float dtype, the trained model's denoised prediction; differentiable.
        pred_ref: [B, ...] the reference model's prediction on the same noisy input (constant).
        target: [B, ...] the clean sample (constant).
        weight: [B] the loss weight lambda(sigma_b) of each sample (constant).

    Returns:
        [B] fp32 ``-weight_b * sum((pred - target)^2 - (pred_ref - target)^2)``.
    """
    _check_diffusion(pred, pred_ref, target, weight)
    route = resolve_backend(backend, pred.device)
    if route == "torch":
        return reference.diffusion_logratio_ref(pred, pred_ref, target, weight).float()
    args = (pred, pred_ref.detach(), target.detach(), weight.detach(), None, None, 1.0, 1.0, 0)
    return _run(route, *args)[1]


def diffusion_ddo_loss(
    pred: torch.Tensor,
    pred_ref: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor,
    is_real: torch.Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    sample_weight: torch.Tensor | None = None,
    reduction: str = "mean",
    backend: str | None = None,
    return_logratio: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Fused diffusion DDO loss: ``ddo_loss(diffusion_logratio(...), is_real, ...)`` in one op.

    Forward reads pred, pred_ref and target once; backward reads pred and target once and writes
    ``d pred`` in ``pred.dtype``. Arguments as in :func:`diffusion_logratio` and
    :func:`ddo_fast.ddo_loss`. Returns an fp32 scalar, or [B] for ``reduction="none"``; with
    ``return_logratio`` also r [B] fp32 (computed by the same pass; for monitoring).
    """
    batch = _check_diffusion(pred, pred_ref, target, weight)
    code = check_loss_args(is_real, sample_weight, batch, pred.device, reduction)
    route = resolve_backend(backend, pred.device)
    if route == "torch":
        r = reference.diffusion_logratio_ref(pred, pred_ref, target, weight)
        loss = reference.ddo_loss_ref(
            r, is_real, alpha=alpha, beta=beta, sample_weight=sample_weight, reduction=reduction
        ).float()
        return (loss, r.float()) if return_logratio else loss
    sw = None if sample_weight is None else sample_weight.detach()
    args = (
        pred,
        pred_ref.detach(),
        target.detach(),
        weight.detach(),
        is_real,
        sw,
        float(alpha),
        float(beta),
        code,
    )
    out, r, _ = _run(route, *args)
    return (out, r) if return_logratio else out
