"""Token log-probs in Triton: one program per (b, l) row of the [B, L, V] logits.

forward : reads the row once. For V up to MAX_SINGLE the whole row sits in registers (VAR's
          V=4096 is 16 KB of fp32); larger rows use a blocked online logsumexp with per-lane
          running max/sum, still one read. Writes logp [B, L] and logsumexp [B, L] only.
backward: recomputes softmax from the saved logsumexp and writes
          k * (onehot(target) - softmax) in the logits dtype in one pass, with k per token
          (token_logprobs) or per sequence (the fused AR loss; see ar_ddo.py).
Ignored rows (target == ignore_index) read nothing and get zero gradient. An out-of-range
target makes the row write +inf into logp, which the callers turn into a device-side assert.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .ddo_loss import upstream_coef
from .launch import INTERPRET, next_pow2

MAX_SINGLE = 8192  # largest V kept whole in registers
BLOCK_LOOP = 4096  # vocabulary tile of the looped paths


@triton.jit
def lse_kernel(
    x_ptr,
    y_ptr,
    logp_ptr,
    lse_ptr,
    L,
    V,
    stride_b,
    stride_l,
    ignore_index,
    BLOCK_V: tl.constexpr,
    SINGLE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + (row // L) * stride_b + (row % L) * stride_l
    y = tl.load(y_ptr + row)
    ignored = y == ignore_index
    valid = (y >= 0) & (y < V) & (~ignored)
    if SINGLE:
        cols = tl.arange(0, BLOCK_V)
        x = tl.load(base + cols, mask=(cols < V) & valid, other=float("-inf")).to(tl.float32)
        mx = tl.max(x, axis=0)
        s = tl.sum(tl.exp(x - mx), axis=0)
    else:
        m_vec = tl.full([BLOCK_V], float("-inf"), tl.float32)
        s_vec = tl.zeros([BLOCK_V], tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            x = tl.load(base + cols, mask=(cols < V) & valid, other=float("-inf")).to(tl.float32)
            new_m = tl.maximum(m_vec, x)
            # lanes that have seen only -inf keep s = 0 (exp(-inf - -inf) would be NaN)
            seen = new_m != float("-inf")
            s_vec = tl.where(seen, s_vec * tl.exp(m_vec - new_m) + tl.exp(x - new_m), 0.0)
            m_vec = new_m
        mx = tl.max(m_vec, axis=0)
        s = tl.sum(tl.where(m_vec != float("-inf"), s_vec * tl.exp(m_vec - mx), 0.0), axis=0)
    lse = mx + tl.log(s)
    x_t = tl.load(base + tl.where(valid, y, 0), mask=valid, other=0.0).to(tl.float32)
    logp = tl.where(valid, x_t - lse, tl.where(ignored, 0.0, float("inf")))
    tl.store(logp_ptr + row, logp)
    tl.store(lse_ptr + row, tl.where(valid, lse, 0.0))


@triton.jit
def grad_kernel(
    x_ptr,
    y_ptr,
    lse_ptr,
    grad_ptr,
    L,
    V,
    stride_b,
    stride_l,
    ignore_index,
    tok_ptr,
    tok_stride_b,
    tok_stride_l,
    r_ptr,
    real_ptr,
    sw_ptr,
    norm_ptr,
    gout_ptr,
    gout_stride,
    gr_ptr,
    alpha,
    beta,
    PER_TOKEN: tl.constexpr,
    HAS_GOUT: tl.constexpr,
    HAS_SW: tl.constexpr,
    HAS_GR: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // L
    pos = row % L
    base = x_ptr + b * stride_b + pos * stride_l
    y = tl.load(y_ptr + row)
    valid = (y >= 0) & (y < V) & (y != ignore_index)
    if PER_TOKEN:
        k = tl.load(tok_ptr + b * tok_stride_b + pos * tok_stride_l).to(tl.float32)
    else:
        k = upstream_coef(
            b,
            True,
            r_ptr,
            real_ptr,
            sw_ptr,
            norm_ptr,
            gout_ptr,
            gout_stride,
            gr_ptr,
            alpha,
            beta,
            HAS_GOUT,
            HAS_SW,
            HAS_GR,
        )
    k = tl.where(valid, k, 0.0)
    lse = tl.load(lse_ptr + row)
    out = grad_ptr + row * V
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        m = cols < V
        x = tl.load(base + cols, mask=m & valid, other=0.0).to(tl.float32)
        g = k * (tl.where(cols == y, 1.0, 0.0) - tl.exp(x - lse))
        tl.store(out + cols, tl.where(valid, g, 0.0).to(grad_ptr.dtype.element_ty), mask=m)


def prepare(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits with unit stride over V (no copy in the usual case), targets contiguous int64."""
    if logits.shape[2] > 1 and logits.stride(2) != 1:
        logits = logits.contiguous()
    return logits, targets.to(torch.int64).contiguous()


def _warps(block: int) -> int:
    return 1 if INTERPRET else max(4, min(16, block // 512))


def row_forward(logits, targets, ignore_index):
    """(logp [B, L] with +inf on invalid rows, lse [B, L]), both fp32."""
    x, y = prepare(logits, targets)
    batch, length, vocab = x.shape
    f32 = dict(dtype=torch.float32, device=x.device)
    logp = torch.empty(batch, length, **f32)
    lse = torch.empty(batch, length, **f32)
    if batch * length == 0:
        return logp, lse
    single = next_pow2(vocab) <= MAX_SINGLE
    block = max(2, next_pow2(vocab)) if single else BLOCK_LOOP
    lse_kernel[(batch * length,)](
        x,
        y,
        logp,
        lse,
        length,
        vocab,
        x.stride(0),
        x.stride(1),
        int(ignore_index),
        BLOCK_V=block,
        SINGLE=single,
        num_warps=_warps(block),
    )
    return logp, lse


def row_backward(logits, targets, lse, ignore_index, *, per_token=None, coef_kwargs=None):
    """The gradient [B, L, V] in logits' dtype, k per token (``per_token`` [B, L]) or per
    sequence (``coef_kwargs``: the pointers and flags of ``upstream_coef``)."""
    x, y = prepare(logits, targets)
    batch, length, vocab = x.shape
    grad = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if grad.numel() == 0:
        return grad
    block = max(2, min(next_pow2(vocab), BLOCK_LOOP))
    if per_token is not None:
        tok = (per_token, per_token.stride(0), per_token.stride(1))
        coef = dict(
            r_ptr=None,
            real_ptr=None,
            sw_ptr=None,
            norm_ptr=None,
            gout_ptr=None,
            gout_stride=0,
            gr_ptr=None,
            alpha=0.0,
            beta=0.0,
            HAS_GOUT=False,
            HAS_SW=False,
            HAS_GR=False,
        )
    else:
        tok = (None, 0, 0)
        coef = coef_kwargs
    grad_kernel[(batch * length,)](
        x,
        y,
        lse,
        grad,
        length,
        vocab,
        x.stride(0),
        x.stride(1),
        int(ignore_index),
        *tok,
        PER_TOKEN=per_token is not None,
        BLOCK_V=block,
        num_warps=_warps(block),
        **coef,
    )
    return grad


def assert_targets(logp: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Device-side check (no host sync): every row whose target was out of range wrote +inf."""
    if logp.numel():
        torch._assert_async(
            (logp != float("inf")).all(),
            f"ddo_fast: `targets` holds a value outside the vocabulary [0, {vocab}) that is not "
            f"ignore_index={ignore_index}",
        )


# ------------------------------------------------------------------------ the token_logprobs op
def forward(logits, targets, ignore_index):
    logp, lse = row_forward(logits, targets, ignore_index)
    assert_targets(logp, logits.shape[2], ignore_index)
    return logp, lse


def backward(grad, logits, targets, lse, ignore_index):
    return row_backward(logits, targets, lse, ignore_index, per_token=grad)
