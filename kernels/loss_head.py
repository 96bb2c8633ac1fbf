"""The DDO loss head in Triton, shared by every fused operator (Zheng et al. 2025, Eq. 13).

With c_b = w_b for a real sample and alpha w_b for a fake one (w_b = sample_weight or 1):

  real:  l_b = -c_b logsigmoid(beta r_b)     dl/dr = -c_b beta sigmoid(-beta r_b)
  fake:  l_b = -c_b logsigmoid(-beta r_b)    dl/dr =  c_b beta sigmoid(beta r_b)
  mean:  sum_real l / n_real + sum_fake l / n_fake  (group_scale = [1/n_real, 1/n_fake], counts
         clamped to >= 1; [1, 1] for none and sum)

A term with c_b == 0 is exactly 0 in the loss and the gradient, even where beta r_b overflows
(0 * inf would be NaN), unless r_b is NaN: NaN always propagates.

``loss_head_kernel`` turns per-sample partial sums into r and the loss in one tiny launch (one
program, deterministic order, no atomics); ``loss_head_coef`` gives each backward kernel its
per-sample coefficient k_b = d total / d r_b without a separate launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._reduction import Reduction
from .launch import next_pow2, vector

# The schema's `int reduction` codes as compile-time constants of the kernels.
REDUCTION_NONE: tl.constexpr = tl.constexpr(int(Reduction.NONE))
REDUCTION_MEAN: tl.constexpr = tl.constexpr(int(Reduction.MEAN))
REDUCTION_SUM: tl.constexpr = tl.constexpr(int(Reduction.SUM))


@triton.jit
def logsigmoid(z):
    """log(sigmoid(z)) = min(z, 0) - log1p(exp(-|z|)), log1p by the Goldberg correction."""
    e = tl.exp(-tl.abs(z))
    u = 1.0 + e
    log1p = tl.where(u == 1.0, e, tl.log(u) * (e / tl.where(u == 1.0, 1.0, u - 1.0)))
    return tl.minimum(z, 0.0) - log1p


@triton.jit
def _zero_weight(c, r, value):
    """``value`` where the term weight c is nonzero; else exactly 0 (NaN if r is NaN)."""
    return tl.where(c == 0.0, tl.where(r != r, r, 0.0), value)


@triton.jit
def per_sample_loss(r, real, w, alpha, beta):
    c = tl.where(real, w, alpha * w)
    z = beta * r
    return _zero_weight(c, r, -c * logsigmoid(tl.where(real, z, -z)))


@triton.jit
def dloss_dr(r, real, w, alpha, beta):
    c = tl.where(real, w, alpha * w)
    z = beta * r
    return _zero_weight(c, r, tl.where(real, -c * beta * tl.sigmoid(-z), c * beta * tl.sigmoid(z)))


@triton.jit
def loss_head_coef(
    idx,
    mask,
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
):
    """k = grad_logratio + grad_out * group_scale[group] * dl/dr, for samples ``idx`` (scalar or
    block). Every vector is loaded in its own dtype and upcast to fp32.

    ``gout_stride`` is 0 for a reduced (scalar) loss and the [B] stride for ``reduction="none"``.
    """
    k = tl.zeros_like(idx).to(tl.float32)
    if HAS_GR:
        k += tl.load(gr_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    if HAS_GOUT:
        r = tl.load(r_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        real = tl.load(real_ptr + idx, mask=mask, other=0) != 0
        w = 1.0
        if HAS_SW:
            w = tl.load(sw_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        scale = tl.where(real, tl.load(group_scale_ptr), tl.load(group_scale_ptr + 1))
        g = tl.load(gout_ptr + idx * gout_stride, mask=mask, other=0.0).to(tl.float32)
        k += g * scale * dloss_dr(r, real, w, alpha, beta)
    return k


@triton.jit
def loss_head_kernel(
    part_ptr,
    n_parts,
    scale_ptr,
    offset_ptr,
    real_ptr,
    sw_ptr,
    r_ptr,
    out_ptr,
    group_scale_ptr,
    ok_ptr,
    B,
    alpha,
    beta,
    NEG_SCALE: tl.constexpr,
    HAS_OFFSET: tl.constexpr,
    HAS_LOSS: tl.constexpr,
    HAS_SW: tl.constexpr,
    REDUCTION: tl.constexpr,
    CHECK: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """r_b = [-scale_b] * sum_p part[b, p] [- offset_b]; then the loss head and its reduction.

    ``part`` [B, n_parts] (contiguous, any float dtype) is summed in fp32 in a fixed order.
    With CHECK, a +inf partial marks a row the producer found invalid (an out-of-range target):
    ok is written 0 so that the launcher's device-side assert fires without a host sync.
    """
    sum_real = tl.zeros([BLOCK_B], tl.float32)
    sum_fake = tl.zeros([BLOCK_B], tl.float32)
    n_real = tl.zeros([BLOCK_B], tl.float32)
    n_bad = tl.zeros([BLOCK_B], tl.float32)
    for start in range(0, B, BLOCK_B):
        rows = start + tl.arange(0, BLOCK_B)
        row_mask = rows < B
        acc = tl.zeros([BLOCK_B], tl.float32)
        for p0 in range(0, n_parts, BLOCK_P):
            cols = p0 + tl.arange(0, BLOCK_P)
            m = row_mask[:, None] & (cols[None, :] < n_parts)
            x = tl.load(
                part_ptr + rows.to(tl.int64)[:, None] * n_parts + cols[None, :], mask=m, other=0.0
            ).to(tl.float32)
            if CHECK:
                n_bad += tl.sum(tl.where(x == float("inf"), 1.0, 0.0), axis=1)
            acc += tl.sum(x, axis=1)
        if NEG_SCALE:
            acc = -tl.load(scale_ptr + rows, mask=row_mask, other=0.0).to(tl.float32) * acc
        if HAS_OFFSET:
            acc -= tl.load(offset_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
        tl.store(r_ptr + rows, acc, mask=row_mask)
        if HAS_LOSS:
            real = tl.load(real_ptr + rows, mask=row_mask, other=0) != 0
            w = 1.0
            if HAS_SW:
                w = tl.load(sw_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
            loss = per_sample_loss(acc, real, w, alpha, beta)
            if REDUCTION == REDUCTION_NONE:
                tl.store(out_ptr + rows, loss, mask=row_mask)
            sum_real += tl.where(real & row_mask, loss, 0.0)
            sum_fake += tl.where(real | (~row_mask), 0.0, loss)
            n_real += tl.where(real & row_mask, 1.0, 0.0)
    if CHECK:
        tl.store(ok_ptr, tl.where(tl.sum(n_bad, axis=0) == 0.0, 1, 0).to(tl.int32))
    if HAS_LOSS:
        nr = tl.sum(n_real, axis=0)
        nf = B - nr
        s_real = 1.0
        s_fake = 1.0
        if REDUCTION == REDUCTION_MEAN:
            s_real = 1.0 / tl.maximum(nr, 1.0)
            s_fake = 1.0 / tl.maximum(nf, 1.0)
        tl.store(group_scale_ptr, s_real)
        tl.store(group_scale_ptr + 1, s_fake)
        if REDUCTION != REDUCTION_NONE:
            tl.store(out_ptr, tl.sum(sum_real, axis=0) * s_real + tl.sum(sum_fake, axis=0) * s_fake)


def as_flags(is_real: torch.Tensor | None) -> torch.Tensor | None:
    """bool [B] as contiguous uint8, the element type the kernels load."""
    return None if is_real is None else is_real.contiguous().view(torch.uint8)


def run_loss_head(
    parts: torch.Tensor,
    *,
    neg_scale: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    is_real: torch.Tensor | None = None,
    sample_weight: torch.Tensor | None = None,
    alpha: float = 1.0,
    beta: float = 1.0,
    reduction: int = int(Reduction.MEAN),
    check: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Launch ``loss_head_kernel`` on ``parts`` [B, P] (contiguous, any float dtype).

    Returns (out, logratio [B] fp32, group_scale [2] fp32, ok) where out is empty without
    ``is_real``, [B] for reduction none, else a 0-d loss; ok is an int32 flag when ``check``.
    """
    batch, n_parts = parts.shape
    f32 = dict(dtype=torch.float32, device=parts.device)
    logratio = torch.empty(batch, **f32)
    group_scale = torch.ones(2, **f32) if is_real is None else torch.empty(2, **f32)
    if is_real is None:
        out = torch.empty(0, **f32)
    else:
        out = torch.empty(batch if reduction == Reduction.NONE else (), **f32)
    ok = torch.empty((), dtype=torch.int32, device=parts.device) if check else None
    block_p = max(2, min(next_pow2(n_parts), 1024))
    block_b = max(2, min(next_pow2(batch), 8192 // block_p))
    loss_head_kernel[(1,)](
        parts,
        n_parts,
        vector(neg_scale),
        vector(offset),
        as_flags(is_real),
        vector(sample_weight),
        logratio,
        out,
        group_scale,
        ok,
        batch,
        float(alpha),
        float(beta),
        NEG_SCALE=neg_scale is not None,
        HAS_OFFSET=offset is not None,
        HAS_LOSS=is_real is not None,
        HAS_SW=sample_weight is not None,
        REDUCTION=int(reduction),
        CHECK=check,
        BLOCK_B=block_b,
        BLOCK_P=block_p,
    )
    return out, logratio, group_scale, ok


def empty_batch_outputs(device: torch.device, with_loss: bool, reduction: int):
    """(out, logratio, group_scale) for B = 0: a zero loss (mean of nothing adds 0), empty r."""
    f32 = dict(dtype=torch.float32, device=device)
    if not with_loss:
        out = torch.empty(0, **f32)
    else:
        out = torch.zeros(0 if reduction == Reduction.NONE else (), **f32)
    return out, torch.empty(0, **f32), torch.ones(2, **f32)


def coef_args(grad_out: torch.Tensor | None, reduction: int) -> tuple[torch.Tensor | None, int]:
    """The upstream-gradient pointer and its per-sample stride (0 for a reduced loss)."""
    if grad_out is None:
        return None, 0
    if reduction == Reduction.NONE:
        return grad_out, grad_out.stride(0)
    return grad_out.reshape(1), 0
