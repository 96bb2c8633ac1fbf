"""Fused autoregressive DDO loss in Triton.

forward  (2 launches + a device-side assert): the token row kernel writes logp [B, L] and the
         softmax statistics stats [2, B, L]; ``loss_head_kernel`` sums each sequence, subtracts
         ref_logprob (read in its own dtype) and evaluates the loss head, and flags any
         out-of-range target (+inf logp) for the assert.
backward (1 launch): the row gradient kernel with the per-sequence coefficient
         k_b = d total / d r_b computed in-kernel (``loss_head_coef``), so a per-sample upstream
         gradient (reduction="none") is exact.
"""

from __future__ import annotations

import torch

from .launch import vector
from .loss_head import as_flags, coef_args, empty_batch_outputs, run_loss_head
from .token_logprobs import assert_targets, prepare, row_backward, row_forward


def forward(
    logits, targets, ref_logprob, is_real, sample_weight, alpha, beta, ignore_index, reduction
):
    batch, length, vocab = logits.shape
    if batch == 0:
        out, logratio, group_scale = empty_batch_outputs(
            logits.device, is_real is not None, reduction
        )
        stats = torch.empty(2, 0, length, dtype=torch.float32, device=logits.device)
        return out, logratio, group_scale, stats
    logp, stats = row_forward(logits, targets, ignore_index)
    out, logratio, group_scale, ok = run_loss_head(
        logp,
        offset=ref_logprob,
        is_real=is_real,
        sample_weight=sample_weight,
        alpha=alpha,
        beta=beta,
        reduction=reduction,
        check=True,
    )
    assert_targets(ok, vocab, ignore_index)
    return out, logratio, group_scale, stats


def backward(
    grad_out,
    grad_logratio,
    logits,
    targets,
    stats,
    logratio,
    is_real,
    sample_weight,
    group_scale,
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
        group_scale_ptr=group_scale,
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
    return row_backward(x, y, stats, ignore_index, coef_kwargs=coef)
