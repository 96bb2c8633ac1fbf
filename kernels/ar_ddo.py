"""Fused autoregressive DDO loss in Triton.

forward  (2 launches + a device-side assert): the token row kernel writes logp [B, L] and
         logsumexp [B, L]; ``loss_epilogue_kernel`` sums each sequence, subtracts ref_logprob and
         evaluates the loss head, and flags any out-of-range target (+inf logp) for the assert.
backward (1 launch): the row gradient kernel with the per-sequence coefficient
         k_b = d total / d r_b computed in-kernel (``upstream_coef``), so a per-sample upstream
         gradient (reduction="none") is exact.
"""

from __future__ import annotations

import torch

from .ddo_loss import as_flags, coef_args, empty_batch_outputs, run_epilogue
from .launch import vector
from .token_logprobs import prepare, row_backward, row_forward


def forward(
    logits, targets, ref_logprob, is_real, sample_weight, alpha, beta, ignore_index, reduction
):
    batch, length, vocab = logits.shape
    if batch == 0:
        out, logratio, norm = empty_batch_outputs(logits.device, is_real is not None, reduction)
        return (
            out,
            logratio,
            norm,
            torch.empty(0, length, dtype=torch.float32, device=logits.device),
        )
    logp, lse = row_forward(logits, targets, ignore_index)
    out, logratio, norm, ok = run_epilogue(
        logp,
        offset=ref_logprob,
        is_real=is_real,
        sample_weight=sample_weight,
        alpha=alpha,
        beta=beta,
        reduction=reduction,
        check=True,
    )
    torch._assert_async(
        ok,
        f"ddo_fast: `targets` holds a value outside the vocabulary [0, {vocab}) that is not "
        f"ignore_index={ignore_index}",
    )
    return out, logratio, norm, lse


def backward(
    grad_out,
    grad_logratio,
    logits,
    targets,
    lse,
    logratio,
    is_real,
    sample_weight,
    norm,
    alpha,
    beta,
    ignore_index,
    reduction,
):
    gout, gstride = coef_args(grad_out, reduction)
    coef = dict(
        r_ptr=logratio,
        real_ptr=as_flags(is_real),
        sw_ptr=vector(sample_weight),
        norm_ptr=norm,
        gout_ptr=gout,
        gout_stride=gstride,
        gr_ptr=vector(grad_logratio),
        alpha=float(alpha),
        beta=float(beta),
        HAS_GOUT=gout is not None,
        HAS_SW=sample_weight is not None,
        HAS_GR=grad_logratio is not None,
    )
    x, y = prepare(logits, targets)
    return row_backward(x, y, lse, ignore_index, coef_kwargs=coef)
