"""The ``ddo_loss`` operator in Triton: the loss head (``loss_head.py``) on a given r [B].

forward : ``loss_head_kernel`` with one part per sample, reading r in its own dtype.
backward: ``coef_kernel`` writes d loss / d r_b = grad_out * group_scale[group] * dl/dr in the
          dtype of r.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import next_pow2, vector
from .loss_head import as_flags, coef_args, empty_batch_outputs, loss_head_coef, run_loss_head
from .rounding import cast_for_store


@triton.jit
def coef_kernel(
    coef_ptr,
    B,
    r_ptr,
    real_ptr,
    sw_ptr,
    group_scale_ptr,
    gout_ptr,
    gout_stride,
    alpha,
    beta,
    HAS_SW: tl.constexpr,
    BLOCK: tl.constexpr,
):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < B
    k = loss_head_coef(
        idx,
        mask,
        r_ptr,
        real_ptr,
        sw_ptr,
        group_scale_ptr,
        gout_ptr,
        gout_stride,
        r_ptr,
        alpha,
        beta,
        True,
        HAS_SW,
        False,
    )
    tl.store(coef_ptr + idx, cast_for_store(k, coef_ptr), mask=mask)


def forward(logratio, is_real, sample_weight, alpha, beta, reduction):
    if logratio.shape[0] == 0:
        return empty_batch_outputs(logratio.device, True, reduction)[::2]
    out, _, group_scale, _ = run_loss_head(
        vector(logratio).reshape(-1, 1),
        is_real=is_real,
        sample_weight=sample_weight,
        alpha=alpha,
        beta=beta,
        reduction=reduction,
    )
    return out, group_scale


def backward(grad_out, logratio, is_real, sample_weight, group_scale, alpha, beta, reduction):
    batch = logratio.shape[0]
    coef = torch.empty(batch, dtype=logratio.dtype, device=logratio.device)
    if batch == 0:
        return coef
    gout, gstride = coef_args(grad_out, reduction)
    block = max(2, min(next_pow2(batch), 1024))
    coef_kernel[(triton.cdiv(batch, block),)](
        coef,
        batch,
        vector(logratio),
        as_flags(is_real),
        vector(sample_weight),
        group_scale,
        gout,
        gstride,
        float(alpha),
        float(beta),
        HAS_SW=sample_weight is not None,
        BLOCK=block,
    )
    return coef
