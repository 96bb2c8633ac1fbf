"""The DDO loss head in Triton: shared by every fused operator, and the ``ddo_loss`` op itself.

  real:  l_b = -w_b logsigmoid(beta r_b)           dl/dr = -w_b beta sigmoid(-beta r_b)
  fake:  l_b = -alpha w_b logsigmoid(-beta r_b)    dl/dr =  alpha w_b beta sigmoid(beta r_b)
  mean:  sum_real l / n_real + sum_fake l / n_fake  (norm = [1/n_real, 1/n_fake], counts >= 1)

``loss_epilogue_kernel`` turns per-sample partial sums into r and the loss in one tiny launch
(one program, deterministic order, no atomics); ``upstream_coef`` gives each backward kernel its
per-sample coefficient k_b = d total / d r_b without a separate launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import next_pow2, vector

REDUCTION_NONE, REDUCTION_MEAN, REDUCTION_SUM = 0, 1, 2


@triton.jit
def logsigmoid(z):
    """log(sigmoid(z)) = min(z, 0) - log1p(exp(-|z|)), log1p by the Goldberg correction."""
    e = tl.exp(-tl.abs(z))
    u = 1.0 + e
    log1p = tl.where(u == 1.0, e, tl.log(u) * (e / tl.where(u == 1.0, 1.0, u - 1.0)))
    return tl.minimum(z, 0.0) - log1p


@triton.jit
def per_sample_loss(r, real, w, alpha, beta):
    z = beta * r
    return tl.where(real, -w * logsigmoid(z), -alpha * w * logsigmoid(-z))


@triton.jit
def dloss_dr(r, real, w, alpha, beta):
    z = beta * r
    return tl.where(real, -w * beta * tl.sigmoid(-z), alpha * w * beta * tl.sigmoid(z))


@triton.jit
def upstream_coef(
    idx,
    mask,
    r_ptr,
    real_ptr,
    sw_ptr,
    norm_ptr,
    gout_ptr,
    gout_stride,
    gr_ptr,
    alpha,
    beta,
    HAS_GOUT: tl.constexpr,
    HAS_SW: tl.constexpr,
    HAS_GR: tl.constexpr,
):
    """k = grad_logratio + grad_out * norm[group] * dl/dr, for samples ``idx`` (scalar or block).

    ``gout_stride`` is 0 for a reduced (scalar) loss and the [B] stride for ``reduction="none"``.
    """
    k = tl.zeros_like(idx).to(tl.float32)
    if HAS_GR:
        k += tl.load(gr_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    if HAS_GOUT:
        r = tl.load(r_ptr + idx, mask=mask, other=0.0)
        real = tl.load(real_ptr + idx, mask=mask, other=0) != 0
        w = 1.0
        if HAS_SW:
            w = tl.load(sw_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        scale = tl.where(real, tl.load(norm_ptr), tl.load(norm_ptr + 1))
        g = tl.load(gout_ptr + idx * gout_stride, mask=mask, other=0.0).to(tl.float32)
        k += g * scale * dloss_dr(r, real, w, alpha, beta)
    return k


@triton.jit
def loss_epilogue_kernel(
    part_ptr,
    n_parts,
    scale_ptr,
    offset_ptr,
    real_ptr,
    sw_ptr,
    r_ptr,
    out_ptr,
    norm_ptr,
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
            )
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
            if REDUCTION == 0:
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
        if REDUCTION == 1:
            s_real = 1.0 / tl.maximum(nr, 1.0)
            s_fake = 1.0 / tl.maximum(nf, 1.0)
        tl.store(norm_ptr, s_real)
        tl.store(norm_ptr + 1, s_fake)
        if REDUCTION != 0:
            tl.store(out_ptr, tl.sum(sum_real, axis=0) * s_real + tl.sum(sum_fake, axis=0) * s_fake)


@triton.jit
def coef_kernel(
    coef_ptr,
    B,
    r_ptr,
    real_ptr,
    sw_ptr,
    norm_ptr,
    gout_ptr,
    gout_stride,
    alpha,
    beta,
    HAS_SW: tl.constexpr,
    BLOCK: tl.constexpr,
):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < B
    k = upstream_coef(
        idx,
        mask,
        r_ptr,
        real_ptr,
        sw_ptr,
        norm_ptr,
        gout_ptr,
        gout_stride,
        r_ptr,
        alpha,
        beta,
        True,
        HAS_SW,
        False,
    )
    tl.store(coef_ptr + idx, k, mask=mask)


def as_flags(is_real: torch.Tensor | None) -> torch.Tensor | None:
    """bool [B] as contiguous uint8, the element type the kernels load."""
    return None if is_real is None else is_real.contiguous().view(torch.uint8)


def run_epilogue(
    parts: torch.Tensor,
    *,
    neg_scale: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    is_real: torch.Tensor | None = None,
    sample_weight: torch.Tensor | None = None,
    alpha: float = 1.0,
    beta: float = 1.0,
    reduction: int = REDUCTION_MEAN,
    check: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Launch ``loss_epilogue_kernel`` on ``parts`` [B, P] fp32 (contiguous).

    Returns (out, logratio [B], norm [2], ok) where out is empty without ``is_real``, [B] for
    reduction none, else a 0-d loss; ok is an int32 flag when ``check`` (else None).
    """
    batch, n_parts = parts.shape
    f32 = dict(dtype=torch.float32, device=parts.device)
    logratio = torch.empty(batch, **f32)
    norm = torch.ones(2, **f32) if is_real is None else torch.empty(2, **f32)
    if is_real is None:
        out = torch.empty(0, **f32)
    else:
        out = torch.empty(batch if reduction == REDUCTION_NONE else (), **f32)
    ok = torch.empty((), dtype=torch.int32, device=parts.device) if check else None
    block_p = max(2, min(next_pow2(n_parts), 1024))
    block_b = max(2, min(next_pow2(batch), 8192 // block_p))
    flags, sw = as_flags(is_real), vector(sample_weight)
    loss_epilogue_kernel[(1,)](
        parts,
        n_parts,
        vector(neg_scale),
        vector(offset),
        flags,
        sw,
        logratio,
        out,
        norm,
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
    return out, logratio, norm, ok


def empty_batch_outputs(device: torch.device, with_loss: bool, reduction: int):
    """(out, logratio, norm) for B = 0: a zero loss (mean of nothing adds 0), empty vectors."""
    f32 = dict(dtype=torch.float32, device=device)
    if not with_loss:
        out = torch.empty(0, **f32)
    else:
        out = torch.zeros(0 if reduction == REDUCTION_NONE else (), **f32)
    return out, torch.empty(0, **f32), torch.ones(2, **f32)


def coef_args(grad_out: torch.Tensor | None, reduction: int) -> tuple[torch.Tensor | None, int]:
    """The upstream-gradient pointer and its per-sample stride (0 for a reduced loss)."""
    if grad_out is None:
        return None, 0
    if reduction == REDUCTION_NONE:
        return grad_out, grad_out.stride(0)
    return grad_out.reshape(1), 0


# ---------------------------------------------------------------------------- the ddo_loss op
def forward(logratio, is_real, sample_weight, alpha, beta, reduction):
    if logratio.shape[0] == 0:
        return empty_batch_outputs(logratio.device, True, reduction)[::2]
    parts = logratio.to(torch.float32).reshape(-1, 1).contiguous()
    out, _, norm, _ = run_epilogue(
        parts,
        is_real=is_real,
        sample_weight=sample_weight,
        alpha=alpha,
        beta=beta,
        reduction=reduction,
    )
    return out, norm


def backward(grad_out, logratio, is_real, sample_weight, norm, alpha, beta, reduction):
    batch = logratio.shape[0]
    coef = torch.empty(batch, dtype=torch.float32, device=logratio.device)
    if batch == 0:
        return coef
    gout, gstride = coef_args(grad_out, reduction)
    block = max(2, min(next_pow2(batch), 1024))
    coef_kernel[(triton.cdiv(batch, block),)](
        coef,
        batch,
        vector(logratio.to(torch.float32)),
        as_flags(is_real),
        vector(sample_weight),
        norm,
        gout,
        gstride,
        float(alpha),
        float(beta),
        HAS_SW=sample_weight is not None,
        BLOCK=block,
    )
    return coef
