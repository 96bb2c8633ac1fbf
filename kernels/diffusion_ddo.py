"""Fused diffusion DDO loss in Triton.

forward  (2 launches): ``partial_kernel`` reads pred, pred_ref, target once, each in its own
         float dtype (upcast to fp32 in registers, so a bf16 pred next to an fp32 target loses
         nothing), and writes sum_{chunk} (pred-t)^2 - (pred_ref-t)^2 for every (sample, D-part);
         ``loss_head_kernel`` folds the parts into r_b = -weight_b * sum and evaluates the loss
         head. The D-split makes the grid fill the GPU for few large samples (B=8, D=65536) and
         for many small ones (B=512, D=3072).
backward (1 launch): ``grad_kernel`` reads pred and target once and writes
         d pred = -2 weight_b k_b (pred - target) in pred's dtype, where k_b = d total / d r_b is
         computed in-kernel from the saved r (``loss_head_coef``). No full-size temporaries.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import TRITON_INTERPRET, next_pow2, rows_2d, target_programs, vector
from .loss_head import as_flags, coef_args, empty_batch_outputs, loss_head_coef, run_loss_head
from .rounding import cast_for_store

# Elements per loop step: 1024 fp32 over 4 warps is two 16-byte loads per thread per tensor.
BLOCK_GPU, WARPS_GPU = 1024, 4

# Test hook: when set, every launch splits D into this many parts (as far as D allows) whatever
# the device. The interpreter otherwise always runs one part per sample, so the multi-part
# reduction of the GPU grid (and the > 1024-part loop of loss_head_kernel) would go untested.
FORCE_PARTS: int | None = None


@triton.jit
def partial_kernel(
    pred_ptr,
    ref_ptr,
    tgt_ptr,
    part_ptr,
    D,
    stride_p,
    stride_q,
    stride_t,
    chunk,
    n_parts,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    start = part.to(tl.int64) * chunk
    acc = tl.zeros([BLOCK], tl.float32)
    for off in range(0, chunk, BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        m = idx < D
        t = tl.load(tgt_ptr + b * stride_t + idx, mask=m, other=0.0).to(tl.float32)
        p = tl.load(pred_ptr + b * stride_p + idx, mask=m, other=0.0).to(tl.float32)
        q = tl.load(ref_ptr + b * stride_q + idx, mask=m, other=0.0).to(tl.float32)
        dp = p - t
        dq = q - t
        acc += (dp - dq) * (dp + dq)  # exactly 0 where pred == pred_ref (no FMA rounding)
    tl.store(part_ptr + b * n_parts + part, tl.sum(acc, axis=0))


@triton.jit
def grad_kernel(
    pred_ptr,
    tgt_ptr,
    grad_ptr,
    weight_ptr,
    D,
    stride_p,
    stride_t,
    chunk,
    r_ptr,
    real_ptr,
    sw_ptr,
    group_scale_ptr,
    gout_ptr,
    gout_stride,
    gr_ptr,
    alpha,
    beta,
    HAS_GOUT: tl.constexpr,
    HAS_SW: tl.constexpr,
    HAS_GR: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    start = tl.program_id(1).to(tl.int64) * chunk
    k = loss_head_coef(
        b,
        True,
        r_ptr,
        real_ptr,
        sw_ptr,
        group_scale_ptr,
        gout_ptr,
        gout_stride,
        gr_ptr,
        alpha,
        beta,
        HAS_GOUT,
        HAS_SW,
        HAS_GR,
    )
    coef = -2.0 * tl.load(weight_ptr + b).to(tl.float32) * k
    for off in range(0, chunk, BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        m = idx < D
        p = tl.load(pred_ptr + b * stride_p + idx, mask=m, other=0.0).to(tl.float32)
        t = tl.load(tgt_ptr + b * stride_t + idx, mask=m, other=0.0).to(tl.float32)
        g = coef * (p - t)
        tl.store(grad_ptr + b * D + idx, cast_for_store(g, grad_ptr), mask=m)


def _split(batch: int, dim: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK, chunk, n_parts): each program reduces `chunk` elements of one sample."""
    if FORCE_PARTS is not None:
        block = max(16, min(next_pow2(triton.cdiv(dim, FORCE_PARTS)), 4096))
        blocks = triton.cdiv(dim, block)
        chunk = triton.cdiv(blocks, min(FORCE_PARTS, blocks)) * block
        return block, chunk, triton.cdiv(dim, chunk)
    if TRITON_INTERPRET or device.type != "cuda":
        block = max(16, min(next_pow2(dim), 4096))
        return block, triton.cdiv(dim, block) * block, 1
    blocks = triton.cdiv(dim, BLOCK_GPU)
    parts = max(1, min(blocks, triton.cdiv(target_programs(device), batch)))
    chunk = triton.cdiv(blocks, parts) * BLOCK_GPU
    return BLOCK_GPU, chunk, triton.cdiv(dim, chunk)


def _rows(*tensors):
    """Each tensor as [B, D] with unit inner stride, in its own dtype."""
    batch = tensors[0].shape[0]
    return tuple(rows_2d(t, batch) for t in tensors)


def forward(pred, pred_ref, target, weight, is_real, sample_weight, alpha, beta, reduction):
    batch = pred.shape[0]
    if batch == 0:
        return empty_batch_outputs(pred.device, is_real is not None, reduction)
    p, q, t = _rows(pred, pred_ref, target)
    dim = p.shape[1]
    block, chunk, n_parts = _split(batch, dim, pred.device)
    parts = torch.empty(batch, n_parts, dtype=torch.float32, device=pred.device)
    partial_kernel[(batch, n_parts)](
        p,
        q,
        t,
        parts,
        dim,
        p.stride(0),
        q.stride(0),
        t.stride(0),
        chunk,
        n_parts,
        BLOCK=block,
        num_warps=WARPS_GPU,
    )
    out, logratio, group_scale, _ = run_loss_head(
        parts,
        neg_scale=weight,
        is_real=is_real,
        sample_weight=sample_weight,
        alpha=alpha,
        beta=beta,
        reduction=reduction,
    )
    return out, logratio, group_scale


def backward(
    grad_out,
    grad_logratio,
    pred,
    target,
    weight,
    logratio,
    is_real,
    sample_weight,
    group_scale,
    alpha,
    beta,
    reduction,
):
    batch = pred.shape[0]
    grad = torch.empty_like(pred, memory_format=torch.contiguous_format)
    if batch == 0 or grad.numel() == 0:
        return grad.zero_()
    p, t = _rows(pred, target)
    dim = p.shape[1]
    block, chunk, n_parts = _split(batch, dim, pred.device)
    gout, gstride = coef_args(grad_out, reduction)
    grad_kernel[(batch, n_parts)](
        p,
        t,
        grad,
        vector(weight),
        dim,
        p.stride(0),
        t.stride(0),
        chunk,
        logratio,
        as_flags(is_real),
        vector(sample_weight),
        group_scale,
        gout,
        gstride,
        vector(grad_logratio),
        float(alpha),
        float(beta),
        HAS_GOUT=gout is not None,
        HAS_SW=sample_weight is not None,
        HAS_GR=grad_logratio is not None,
        BLOCK=block,
        num_warps=WARPS_GPU,
    )
    return grad
