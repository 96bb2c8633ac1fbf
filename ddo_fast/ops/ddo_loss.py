"""``ddo_loss``: the DDO objective on per-sample log-ratios (Zheng et al. 2025, Eq. 13).

With ``r_b = log p_theta(x_b) - log p_ref(x_b)`` and ``w_b`` the sample weight (1 by default):

* real sample (from the data):    ``l_b = -w_b * logsigmoid(beta * r_b)``
* fake sample (drawn from p_ref): ``l_b = -alpha * w_b * logsigmoid(-beta * r_b)``

``Reduction.MEAN`` is ``sum_real l / n_real + sum_fake l / n_fake`` (an empty group adds 0), i.e.
``sum_b group_scale[g_b] * l_b`` with the per-group scale ``group_scale`` [2] = (1/n_real,
1/n_fake) that the forward returns for the backward (1 for the other reductions). The gradient is
``d l_b / d r_b = -beta w_b sigmoid(-beta r_b)`` (real) or ``alpha beta w_b sigmoid(beta r_b)``
(fake), times the upstream gradient and the group scale.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import reference
from .._backend import TORCH, resolve_backend
from .._reduction import Reduction
from . import _triton
from ._common import check_float, check_loss_args, constant
from ._registry import register_op


def _fwd_fake(logratio, is_real, sample_weight, alpha, beta, reduction):
    f32 = torch.float32
    out = logratio.new_empty(logratio.shape if reduction == Reduction.NONE else (), dtype=f32)
    return out, logratio.new_empty((2,), dtype=f32)


def _bwd_fake(grad_out, logratio, *_):
    return logratio.new_empty(logratio.shape)  # d logratio, in logratio.dtype


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    logratio, is_real, sample_weight, alpha, beta, reduction = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(logratio, is_real, sample_weight, output[1])  # [1]: group_scale
    ctx.params = (alpha, beta, reduction)


def _backward(bwd: Any, ctx: Any, grad_out: torch.Tensor, _grad_group_scale: Any) -> tuple:
    grad = bwd(grad_out, *ctx.saved_tensors, *ctx.params) if ctx.needs_input_grad[0] else None
    return grad, None, None, None, None, None


SPEC = register_op(
    "ddo_loss",
    fake_fwd=_fwd_fake,
    fake_bwd=_bwd_fake,
    setup_context=_setup_context,
    backward=_backward,
    triton=_triton.ddo_loss,
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
    if route == TORCH:
        return reference.ddo_loss_ref(
            logratio,
            is_real,
            alpha=alpha,
            beta=beta,
            sample_weight=sample_weight,
            reduction=reduction,
        )
    args = (logratio, is_real, constant(sample_weight), float(alpha), float(beta), code)
    return SPEC.run(route, *args)[0]
