"""Token log-probs in Triton: one program per (b, l) row of the [B, L, V] logits.

forward : reads the row once, in the logits' dtype, upcast to fp32 in registers. For V up to
          MAX_SINGLE the whole row sits in registers (VAR's V=4096 is 16 KB of fp32); larger rows
          use a blocked online logsumexp with per-lane running max/sum, still one read. Writes
          logp [B, L] and the softmax statistics stats [2, B, L] only: stats[0] = m, the row max,
          stats[1] = log s, s = sum_v exp(x_v - m), and logp = (x_t - m) - log s. Never forming
          m + log s keeps logp exact to fp32 rounding at logit offsets of 1e4, where m + log s
          alone would round away ~1e-3.
backward: recomputes softmax = exp((x - m) - log s) and writes k * (onehot(target) - softmax)
          in the logits dtype in one pass, with k per token (token_logprobs) or per sequence
          (the fused AR loss; see ar_ddo.py).
Targets are read in their own integer dtype. Ignored rows (target == ignore_index) read nothing
and get zero gradient. An out-of-range target makes the row write +inf into logp, which the
callers turn into a device-side assert.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch
from .launch import TRITON_INTERPRET, next_pow2
from .loss_head import loss_head_coef
from .rounding import cast_for_store

MAX_SINGLE = 8192  # largest V kept whole in registers
BLOCK_LOOP = 4096  # vocabulary tile of the looped paths


@triton.jit
def _target(y_ptr, row, V, ignore_index):
    """(y, ignored, valid) of one row; y read in its own integer dtype, widened to int64."""
    y = tl.load(y_ptr + row).to(tl.int64)
    ignored = y == ignore_index
    valid = (y >= 0) & (y < V) & (~ignored)
    return y, ignored, valid


@triton.jit
def stats_kernel(
    x_ptr,
    y_ptr,
    logp_ptr,
    stats_ptr,
    n_rows,
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
    y, ignored, valid = _target(y_ptr, row, V, ignore_index)
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
    log_s = tl.log(s)
    x_t = tl.load(base + tl.where(valid, y, 0), mask=valid, other=0.0).to(tl.float32)
    logp = tl.where(valid, (x_t - mx) - log_s, tl.where(ignored, 0.0, float("inf")))
    tl.store(logp_ptr + row, logp)
    tl.store(stats_ptr + row, tl.where(valid, mx, 0.0))
    tl.store(stats_ptr + n_rows + row, tl.where(valid, log_s, 0.0))


@triton.jit
def grad_kernel(
    x_ptr,
    y_ptr,
    stats_ptr,
    grad_ptr,
    n_rows,
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
    group_scale_ptr,
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
    y, _ignored, valid = _target(y_ptr, row, V, ignore_index)
    if PER_TOKEN:
        k = tl.load(tok_ptr + b * tok_stride_b + pos * tok_stride_l).to(tl.float32)
    else:
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
    k = tl.where(valid, k, 0.0)
    mx = tl.load(stats_ptr + row)
    log_s = tl.load(stats_ptr + n_rows + row)
    out = grad_ptr + row * V
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        m = cols < V
        # masked lanes read -inf: exp gives 0 there instead of overflowing
        x = tl.load(base + cols, mask=m & valid, other=float("-inf")).to(tl.float32)
        g = k * (tl.where(cols == y, 1.0, 0.0) - tl.exp((x - mx) - log_s))
        tl.store(out + cols, cast_for_store(tl.where(valid, g, 0.0), grad_ptr), mask=m)


def prepare(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits with unit stride over V and contiguous targets (no copy in the usual case); both
    keep their dtypes."""
    if logits.shape[2] > 1 and logits.stride(2) != 1:
        logits = logits.contiguous()
    return logits, targets.contiguous()


def _warps(block: int) -> int:
    return 1 if TRITON_INTERPRET else max(4, min(16, block // 512))


def row_forward(logits, targets, ignore_index):
    """(logp [B, L] with +inf on invalid rows, stats [2, B, L]), both fp32."""
    x, y = prepare(logits, targets)
    batch, length, vocab = x.shape
    f32 = dict(dtype=torch.float32, device=x.device)
    logp = torch.empty(batch, length, **f32)
    stats = torch.empty(2, batch, length, **f32)
    if batch * length == 0:
        return logp, stats
    single = next_pow2(vocab) <= MAX_SINGLE
    block = max(2, next_pow2(vocab)) if single else BLOCK_LOOP
    stats_kernel[(batch * length,)](
        x,
        y,
        logp,
        stats,
        batch * length,
        length,
        vocab,
        x.stride(0),
        x.stride(1),
        int(ignore_index),
        BLOCK_V=block,
        SINGLE=single,
        num_warps=_warps(block),
    )
    return logp, stats


def row_backward(logits, targets, stats, ignore_index, *, per_token=None, coef_kwargs=None):
    """The gradient [B, L, V] in logits' dtype, k per token (``per_token`` [B, L]) or per
    sequence (``coef_kwargs``: the pointers and flags of ``loss_head_coef``)."""
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
            group_scale_ptr=None,
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
        stats.contiguous(),
        grad,
        batch * length,
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


def assert_targets(ok: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Stops the op if ``ok`` (a 0-d flag the kernels computed) is false: a device-side assert on
    CUDA (no host sync); on CPU tensors (the interpreter) an IndexError, as on the C++ path
    (reading a CPU tensor is no device sync)."""
    message = (
        f"ddo_fast: `targets` holds a value outside the vocabulary [0, {vocab}) that is not "
        f"ignore_index={ignore_index}"
    )
    if ok.device.type == "cpu" and not torch.compiler.is_compiling():
        if not launch.STUBBED and not bool(ok):
            raise IndexError(message)
        return
    torch._assert_async(ok, message)


# ------------------------------------------------------------------------ the token_logprobs op
def forward(logits, targets, ignore_index):
    logp, stats = row_forward(logits, targets, ignore_index)
    if logp.numel():  # every row whose target was out of range wrote +inf
        assert_targets((logp != float("inf")).all(), logits.shape[2], ignore_index)
    return logp, stats


def backward(grad, logits, targets, stats, ignore_index):
    return row_backward(logits, targets, stats, ignore_index, per_token=grad)
