"""Diffusion DDO: the weighted denoising-error gap of target and reference, fused with the loss.

The log-ratio is the one-sample ELBO gap of the paper's Eq. 14-16 (Zheng et al. 2025) with the
EDM weighting ``weight_b = lambda(sigma_b)``, summed over all non-batch dimensions (no mean):

``r_b = -weight_b * sum_d ((pred - target)^2 - (pred_ref - target)^2)``

``pred`` is D_theta(x + sigma eps), ``pred_ref`` is D_ref on the same noisy input, ``target`` is
the clean x. The loss head of Eq. 13 (:mod:`ddo_fast.ops.ddo_loss`) runs in the same pass. Only
``pred`` gets gradients: ``d r_b / d pred = -2 weight_b (pred - target)``, times
``k_b = d loss / d r_b`` (plus any upstream gradient of ``r``).
"""

from __future__ import annotations

from typing import Any

import torch

from .. import reference
from .._backend import TORCH, resolve_backend
from .._reduction import Reduction
from . import _triton
from ._common import (
    check_batch_vector,
    check_device,
    check_float,
    check_loss_args,
    constant,
    fused_loss_backward,
    loss_fakes,
    save_fused_loss,
)
from ._registry import register_op


def _fwd_fake(pred, pred_ref, target, weight, is_real, sample_weight, alpha, beta, reduction):
    return loss_fakes(pred, pred.shape[0], is_real is not None, reduction)


def _bwd_fake(grad_out, grad_logratio, pred, *_):
    return torch.empty_like(pred, memory_format=torch.contiguous_format)  # d pred, in pred.dtype


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    pred, _pred_ref, target, weight, is_real, sample_weight, alpha, beta, reduction = inputs
    _out, logratio, group_scale = output
    saved = (pred, target, weight, logratio, is_real, sample_weight, group_scale)  # bwd order
    save_fused_loss(ctx, saved, (alpha, beta, reduction), is_real is not None, group_scale)


SPEC = register_op(
    "diffusion_ddo",
    fake_fwd=_fwd_fake,
    fake_bwd=_bwd_fake,
    setup_context=_setup_context,
    backward=fused_loss_backward,
    triton=_triton.diffusion_ddo,
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
    if route == TORCH:
        return reference.diffusion_logratio_ref(pred, pred_ref, target, weight).float()
    args = (pred, pred_ref.detach(), target.detach(), weight.detach(), None, None, 1.0, 1.0)
    return SPEC.run(route, *args, int(Reduction.NONE))[1]


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
    if route == TORCH:
        r = reference.diffusion_logratio_ref(pred, pred_ref, target, weight)
        loss = reference.ddo_loss_ref(
            r, is_real, alpha=alpha, beta=beta, sample_weight=sample_weight, reduction=reduction
        ).float()
        return (loss, r.float()) if return_logratio else loss
    constants = (pred_ref.detach(), target.detach(), weight.detach())
    args = (pred, *constants, is_real, constant(sample_weight), float(alpha), float(beta), code)
    out, r, _ = SPEC.run(route, *args)
    return (out, r) if return_logratio else out
