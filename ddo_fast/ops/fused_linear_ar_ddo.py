"""Fused-linear autoregressive DDO: hidden states and the head weight in, no [B, L, V] logits.

Same value and gradients as ``ar_ddo_loss(hidden @ weight.T + bias, ...)`` (Zheng et al. 2025,
Eq. 13 with ``log p(x_b) = sum_l log_softmax(z_{b,l})[y_{b,l}]``, ``z = h W^T + b``), with memory
that does not grow with ``B * L * V``.

Two paths, chosen in Python from metadata only (no device sync):

1. Single pass (the default for a training step): the loss is a scalar (``reduction`` "mean" or
   "sum"), ``return_logratio=False``, grad mode is on and hidden, weight (and bias) all require
   gradients, the batched [B, L, H] form, and one sequence's logits fit the chunk budget. The
   loss is then a scalar function of (hidden, weight, bias) alone, so its whole gradient is
   computed in the forward and the backward only scales it by the upstream gradient ``g``
   (exact: ``d(g L)/d theta = g dL/d theta``). Chunks hold WHOLE sequences, so ``r_b`` is
   complete after a chunk's logits, and ``k_b = d loss / d r_b`` comes from the loss head's
   backward (``ddo_loss_bwd`` with upstream 1 and the whole batch's ``group_scale``, which needs
   only ``is_real``). Op pair ``fused_linear_ar_ddo_loss_fwd(hidden [B, L, H], weight, bias?,
   targets, ref_logprob, is_real, sample_weight?, alpha, beta, ignore_index, reduction,
   chunk_sequences) -> (loss, d hidden, d weight, d bias)`` (the gradients in the parameters'
   dtypes, non-differentiable outputs saved for the backward) and
   ``fused_linear_ar_ddo_loss_bwd(grad_out, d hidden!, d weight!, d bias!)``, which scales them
   IN PLACE (a copy would double the gradients' memory at the backward's peak). They are the
   forward op's private outputs, never inputs and never returned to users; the in-place scaling
   bumps their version counters, so a second backward through the same graph
   (``retain_graph=True``) raises autograd's in-place error, and ``create_graph=True`` raises
   too, rather than return wrong gradients. Per chunk: logits into a reused buffer, the row
   kernel's ``logp``/stats, ``k_b``, then ``d z = k_b (onehot - softmax)`` from the row kernel
   ``token_logprobs_bwd`` in sub-blocks of ``SUB_BLOCK_BYTES`` written back over the logits
   buffer, and three matmuls (``d h = d z W``, ``d W += d z^T h``, ``d b += sum d z``, fp32
   accumulators), as many as the unfused path. A 16-bit parameter's gradient is rounded to its
   dtype in the forward and scaled by ``g`` (fp32 op math) in the backward: one more rounding
   than the unfused path when ``g != 1``. The packed ``[N, H]`` + ``seq_ids`` form always
   takes the recompute path.
2. Recompute (everything else, including ``reduction="none"``, ``return_logratio=True``, the
   packed form and a frozen input), below.

Design of the recompute path (and why). With a per-sample output or ``r`` returned, the coefficient
``k_b`` comes from autograd only in the backward, so no chunk's gradient can be finished in the
forward (unlike a fused linear cross-entropy, whose per-token gradient is known at once). Keeping
per-sequence weight-gradient partials instead would cost ``B * V * H``. So the work is split into
one custom operator pair over flattened tokens ``N = B * L`` (or the packed ``[N, H]`` form),
processed in row chunks of ``chunk_size`` tokens:

* ``fused_linear_ar_ddo_fwd(hidden [N, H], weight [V, H], bias?, targets [N], ignore_index,
  chunk_size) -> (logp [N] fp32, stats [2, N] fp32)``: per chunk, the logits ``h_c W^T (+ b)``
  by torch matmul in the inputs' (promoted) dtype, exactly as the unfused linear computes them,
  then the token row kernel (``token_logprobs_fwd``: C++ on CPU, Triton on CUDA and under the
  interpreter). Only ``logp`` and the softmax statistics ``stats`` (row max, log-sum-exp offset;
  see :mod:`.token_logprobs`) are kept.
* ``fused_linear_ar_ddo_bwd(grad [N], hidden, weight, bias?, targets, stats, ignore_index,
  chunk_size) -> (d hidden, d weight, d bias)``: per chunk, recomputes the logits, gets
  ``d z = grad_n (onehot(y_n) - softmax(z_n))`` from the row kernel ``token_logprobs_bwd``, writes
  ``d h_c = d z_c W`` and accumulates ``d W += d z_c^T h_c`` and ``d b += sum_n d z_n`` in fp32
  buffers, cast to each parameter's dtype at the end.

The per-sequence sum (a reshape-sum, or ``index_add`` over ``seq_ids`` for packed tokens), minus
``ref_logprob``, then goes through the ``ddo_loss`` operator: autograd carries ``k_b`` back into the
per-token ``grad_n``. The price is one recomputation of the logits in the backward (4 matmuls in
place of 3).

Memory besides the inputs and the returned gradients: one chunk's working set (the single pass keeps
one copy of the chunk's logits plus a ``SUB_BLOCK_BYTES`` sub-block of their gradient, the recompute
path two copies), chosen from a budget (:func:`default_chunk_size`: ``max(16 MiB, weight bytes /
8)`` for the chunk's logits, its gradient and, for 16-bit logits, the fp32 copy the weight-gradient
accumulation reads), plus the fp32 weight-gradient accumulator when the weight is 16-bit, and, when
the dtypes differ, one copy of the weight (if it is the narrower one) in the promoted dtype.
"""

from __future__ import annotations

import types
from typing import Any

import torch

from .. import reference
from .._backend import DISPATCH, TORCH, resolve_backend
from .._reduction import Reduction
from . import _triton
from ._common import (
    check_batch_vector,
    check_device,
    check_float,
    check_loss_args,
    check_tensor,
    constant,
)
from ._registry import register_op
from .ddo_loss import ddo_loss

_lib = torch.library.Library("ddo_fast", "FRAGMENT")  # module global: keeps the definitions alive
_lib.define(
    "fused_linear_ar_ddo_fwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, "
    "int ignore_index, int chunk_size) -> (Tensor, Tensor)"
)
_lib.define(
    "fused_linear_ar_ddo_bwd(Tensor grad, Tensor hidden, Tensor weight, Tensor? bias, "
    "Tensor targets, Tensor stats, int ignore_index, int chunk_size) -> (Tensor, Tensor, Tensor)"
)

CHUNK_BUDGET_BYTES = 16 << 20  # floor of the per-chunk working-set budget
_WEIGHT_FRACTION = 8  # ... raised to weight bytes / 8: fewer passes over a large weight


def compute_dtype(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """The logits' dtype: ``hidden @ weight.T + bias`` with the inputs promoted to a common type
    (torch's matmul needs one; a mixed pair is promoted as ``a + b`` would be)."""
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    return dtype if bias is None else torch.promote_types(dtype, bias.dtype)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_chunk_size(
    n_tokens: int, vocab: int, dtype: torch.dtype, weight_bytes: int, *, in_place: bool = False
) -> int:
    """Tokens per chunk so that one chunk's logits, their gradient and (16-bit logits) the fp32
    copy of the gradient fit ``max(CHUNK_BUDGET_BYTES, weight_bytes / 8)``; at least 1.
    ``in_place``: the single-pass path, whose logits gradient overwrites the logits buffer."""
    item = torch.empty((), dtype=dtype).element_size()
    acc = _acc_dtype(dtype)
    fp32_copy = torch.empty((), dtype=acc).element_size() if acc != dtype else 0
    row = vocab * ((1 if in_place else 2) * item + fp32_copy)
    budget = max(CHUNK_BUDGET_BYTES, weight_bytes // _WEIGHT_FRACTION)
    return max(1, min(max(n_tokens, 1), budget // max(row, 1)))


# ----------------------------------------------------------------------------- the kernels
def _operands(hidden, weight, bias):
    """(dtype, weight, bias) in the logits' dtype; a no-op in the usual same-dtype case."""
    dtype = compute_dtype(hidden, weight, bias)
    return dtype, weight.to(dtype), None if bias is None else bias.to(dtype)


def _chunk_logits(h, weight, bias, dtype, out):
    """``h @ weight.T + bias`` into ``out`` (a reused buffer): the unfused linear's two steps."""
    torch.mm(h.to(dtype), weight.t(), out=out)
    if bias is not None:
        out.add_(bias)
    return out


def _forward(row_fwd, hidden, weight, bias, targets, ignore_index, chunk_size):
    """``row_fwd`` has the schema of ``token_logprobs_fwd`` ([1, C, V] logits per chunk)."""
    n, vocab = hidden.shape[0], weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    logp, stats = torch.empty(n, **f32), torch.empty(2, n, **f32)
    dtype, w, b = _operands(hidden, weight, bias)
    buf = torch.empty(min(chunk_size, n), vocab, dtype=dtype, device=hidden.device)
    for c0 in range(0, n, chunk_size):
        c1 = min(c0 + chunk_size, n)
        z = _chunk_logits(hidden[c0:c1], w, b, dtype, buf[: c1 - c0])
        lp, st = row_fwd(z[None], targets[None, c0:c1], ignore_index)
        logp[c0:c1] = lp[0]
        stats[:, c0:c1] = st[:, 0]
    return logp, stats


def _backward(row_bwd, grad, hidden, weight, bias, targets, stats, ignore_index, chunk_size):
    """``row_bwd`` has the schema of ``token_logprobs_bwd``."""
    n, vocab = hidden.shape[0], weight.shape[0]
    dtype, w, b = _operands(hidden, weight, bias)
    acc = _acc_dtype(dtype)
    grad = grad.contiguous()
    d_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
    # fp32 accumulators; for an fp32 weight the accumulator is the returned gradient itself
    d_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
    d_bias = None if bias is None else torch.zeros(vocab, dtype=acc, device=weight.device)
    buf = torch.empty(min(chunk_size, n), vocab, dtype=dtype, device=hidden.device)
    for c0 in range(0, n, chunk_size):
        c1 = min(c0 + chunk_size, n)
        h = hidden[c0:c1].to(dtype)
        z = _chunk_logits(h, w, b, dtype, buf[: c1 - c0])
        dz = row_bwd(
            grad[None, c0:c1], z[None], targets[None, c0:c1], stats[:, None, c0:c1], ignore_index
        )[0]
        if hidden.dtype == dtype:
            torch.mm(dz, w, out=d_hidden[c0:c1])
        else:
            d_hidden[c0:c1] = dz @ w
        dz_acc, h_acc = dz.to(acc), h.to(acc)
        d_weight.addmm_(dz_acc.t(), h_acc)
        if d_bias is not None:
            d_bias.add_(dz_acc.sum(0))
    empty = hidden.new_empty((0,), dtype=weight.dtype)
    return (
        d_hidden,
        d_weight.to(weight.dtype),
        empty if d_bias is None else d_bias.to(bias.dtype),
    )


def _kernels(row_fwd, row_bwd):
    def fwd(hidden, weight, bias, targets, ignore_index, chunk_size):
        return _forward(row_fwd, hidden, weight, bias, targets, ignore_index, chunk_size)

    def bwd(grad, hidden, weight, bias, targets, stats, ignore_index, chunk_size):
        return _backward(
            row_bwd, grad, hidden, weight, bias, targets, stats, ignore_index, chunk_size
        )

    return fwd, bwd


_CPP = _kernels(
    lambda *a: torch.ops.ddo_fast.token_logprobs_fwd.default(*a),
    lambda *a: torch.ops.ddo_fast.token_logprobs_bwd.default(*a),
)
# The Triton row kernels: CUDA tensors, and CPU tensors under TRITON_INTERPRET=1.
_TRITON = _kernels(
    lambda *a: _triton.token_logprobs.forward(*a),
    lambda *a: _triton.token_logprobs.backward(*a),
)


# ----------------------------------------------------------------------- fakes and autograd
def _fwd_fake(hidden, weight, bias, targets, ignore_index, chunk_size):
    f32 = torch.float32
    n = hidden.shape[0]
    return hidden.new_empty((n,), dtype=f32), hidden.new_empty((2, n), dtype=f32)


def _bwd_fake(grad, hidden, weight, bias, *_):
    d_bias = hidden.new_empty((0,), dtype=weight.dtype) if bias is None else torch.empty_like(bias)
    return (
        torch.empty_like(hidden, memory_format=torch.contiguous_format),
        torch.empty_like(weight, memory_format=torch.contiguous_format),
        d_bias,
    )


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    hidden, weight, bias, targets, ignore_index, chunk_size = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(hidden, weight, bias, targets, output[1])  # [1]: stats
    ctx.params = (ignore_index, chunk_size)


def _backward_fn(bwd: Any, ctx: Any, grad: Any, _grad_stats: Any) -> tuple:
    needs = ctx.needs_input_grad
    if grad is None or not any(needs[:3]):
        return (None,) * 6
    d_hidden, d_weight, d_bias = bwd(grad, *ctx.saved_tensors, *ctx.params)
    return (
        d_hidden if needs[0] else None,
        d_weight if needs[1] else None,
        d_bias if needs[2] else None,
        None,
        None,
        None,
    )


SPEC = register_op(
    "fused_linear_ar_ddo",
    fake_fwd=_fwd_fake,
    fake_bwd=_bwd_fake,
    setup_context=_setup_context,
    backward=_backward_fn,
    kernels={"cpu": _CPP},
    triton=types.SimpleNamespace(forward=_TRITON[0], backward=_TRITON[1]),
)


# ------------------------------------------------------------- the single-pass (fast) path
_lib.define(
    "fused_linear_ar_ddo_loss_fwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, "
    "Tensor ref_logprob, Tensor is_real, Tensor? sample_weight, float alpha, float beta, "
    "int ignore_index, int reduction, int chunk_sequences) -> (Tensor, Tensor, Tensor, Tensor)"
)
_lib.define(
    "fused_linear_ar_ddo_loss_bwd(Tensor grad_out, Tensor(a!) d_hidden, Tensor(b!) d_weight, "
    "Tensor(c!) d_bias) -> ()"
)

SUB_BLOCK_BYTES = 4 << 20  # rows per token_logprobs_bwd call (its output is a temporary): few calls


def _single_pass_forward(
    rows,
    head,
    hidden,
    weight,
    bias,
    targets,
    ref_logprob,
    is_real,
    sample_weight,
    alpha,
    beta,
    ignore_index,
    reduction,
    chunk_sequences,
):
    """Loss and its gradients w.r.t. (hidden, weight, bias) in one pass over the logits.

    ``rows`` = (token_logprobs_fwd, token_logprobs_bwd), ``head`` = (ddo_loss_fwd, ddo_loss_bwd)
    kernels. Per chunk of ``chunk_sequences`` whole sequences: logits ``z = h W^T + b`` into a
    reused buffer, the row kernel's ``logp`` and stats, ``r_b = sum_l logp - ref_b`` (complete:
    the chunk holds whole sequences), ``k_b = d loss / d r_b`` from the loss head's backward with
    upstream 1 and the whole batch's ``group_scale``, then ``d z = k_b (onehot - softmax)`` from
    the row kernel in sub-blocks written back over ``z`` (its rows are not read again), and the
    three products ``d h = d z W``, ``d W += d z^T h``, ``d b += sum d z`` (fp32 accumulators).
    """
    row_fwd, row_bwd = rows
    loss_fwd, loss_bwd = head
    batch, length, size = hidden.shape
    vocab, device = weight.shape[0], hidden.device
    dtype, w, b = _operands(hidden, weight, bias)
    acc = _acc_dtype(dtype)
    f32 = dict(dtype=torch.float32, device=device)
    d_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=device)
    d_weight = torch.zeros(weight.shape, dtype=acc, device=device)
    d_bias = None if bias is None else torch.zeros(vocab, dtype=acc, device=device)
    r = torch.empty(batch, **f32)
    # group_scale depends on is_real only: the loss head's own, from a zero log-ratio
    group_scale = loss_fwd(r.new_zeros(batch), is_real, sample_weight, alpha, beta, reduction)[1]
    one = torch.ones((), **f32)  # d loss / d loss: the upstream gradient is applied in backward
    step = max(1, chunk_sequences)
    buf = torch.empty(min(step, batch) * length, vocab, dtype=dtype, device=device)
    sub = max(1, SUB_BLOCK_BYTES // max(1, vocab * buf.element_size()))
    for b0 in range(0, batch, step):
        b1 = min(b0 + step, batch)
        n = (b1 - b0) * length
        h = hidden[b0:b1].reshape(n, size).to(dtype)
        y = targets[b0:b1].reshape(1, n)
        z = _chunk_logits(h, w, b, dtype, buf[:n])
        logp, stats = row_fwd(z[None], y, ignore_index)
        r_c = logp.reshape(b1 - b0, length).sum(1) - ref_logprob[b0:b1].float()
        r[b0:b1] = r_c
        sw = None if sample_weight is None else sample_weight[b0:b1]
        k = loss_bwd(one, r_c, is_real[b0:b1], sw, group_scale, alpha, beta, reduction)
        grad = k[:, None].expand(b1 - b0, length).reshape(1, n)
        for s0 in range(0, n, sub):
            s1 = min(s0 + sub, n)
            z[s0:s1] = row_bwd(
                grad[:, s0:s1], z[None, s0:s1], y[:, s0:s1], stats[:, :, s0:s1], ignore_index
            )[0]
        d_h = d_hidden[b0:b1].view(n, size)
        if hidden.dtype == dtype:
            torch.mm(z, w, out=d_h)
        else:
            d_h.copy_(z @ w)
        dz_acc, h_acc = z.to(acc), h.to(acc)
        d_weight.addmm_(dz_acc.t(), h_acc)
        if d_bias is not None:
            d_bias.add_(dz_acc.sum(0))
    loss = loss_fwd(r, is_real, sample_weight, alpha, beta, reduction)[0]
    return (
        loss,
        d_hidden,
        d_weight.to(weight.dtype),
        hidden.new_empty((0,), dtype=weight.dtype) if d_bias is None else d_bias.to(bias.dtype),
    )


def _scale_(grad_out, d_hidden, d_weight, d_bias) -> None:
    """``d *= grad_out`` in place, in each tensor's dtype with fp32 op math (a 0-d fp32 factor
    is not rounded to a 16-bit tensor's dtype): exact, ``d(g L)/d theta = g dL/d theta``."""
    for d in (d_hidden, d_weight, d_bias):
        d.mul_(grad_out)


def _single_pass_kernels(rows, head):
    def fwd(*args):
        return _single_pass_forward(rows, head, *args)

    return fwd, _scale_


_CPP_SINGLE = _single_pass_kernels(
    (
        lambda *a: torch.ops.ddo_fast.token_logprobs_fwd.default(*a),
        lambda *a: torch.ops.ddo_fast.token_logprobs_bwd.default(*a),
    ),
    (
        lambda *a: torch.ops.ddo_fast.ddo_loss_fwd.default(*a),
        lambda *a: torch.ops.ddo_fast.ddo_loss_bwd.default(*a),
    ),
)
_TRITON_SINGLE = _single_pass_kernels(
    (lambda *a: _triton.token_logprobs.forward(*a), lambda *a: _triton.token_logprobs.backward(*a)),
    (lambda *a: _triton.ddo_loss.forward(*a), lambda *a: _triton.ddo_loss.backward(*a)),
)


def _single_pass_fwd_fake(hidden, weight, bias, *_):
    d_bias = hidden.new_empty((0,), dtype=weight.dtype) if bias is None else torch.empty_like(bias)
    return (
        hidden.new_empty((), dtype=torch.float32),
        hidden.new_empty(hidden.shape),
        weight.new_empty(weight.shape),
        d_bias.new_empty(d_bias.shape),
    )


def _single_pass_bwd_fake(grad_out, d_hidden, d_weight, d_bias) -> None:
    return None


def _single_pass_setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # else autograd allocates zero "gradients" for output[1:]
    ctx.save_for_backward(*output[1:])
    ctx.has_bias = inputs[2] is not None


def _single_pass_backward(bwd: Any, ctx: Any, grad_out: Any, *_grads: Any) -> tuple:
    """``grad_out * (d hidden, d weight, d bias)``, scaled in place: no second copy of the
    gradients. The scaling bumps their version counters, so a second backward through the same
    graph (``retain_graph=True``) raises autograd's "modified by an inplace operation" error
    instead of returning a twice-scaled gradient. Gradients of gradients are not available."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "ddo_fast: fused_linear_ar_ddo_loss's single-pass path has no double backward "
            "(create_graph=True); compute the loss with return_logratio=True for the "
            "recompute path"
        )
    nones = (None,) * 9
    if grad_out is None:
        return (None, None, None, *nones)
    d_hidden, d_weight, d_bias = ctx.saved_tensors
    bwd(grad_out, d_hidden, d_weight, d_bias)
    return (d_hidden, d_weight, d_bias if ctx.has_bias else None, *nones)


SINGLE_PASS_SPEC = register_op(
    "fused_linear_ar_ddo_loss",
    fake_fwd=_single_pass_fwd_fake,
    fake_bwd=_single_pass_bwd_fake,
    setup_context=_single_pass_setup_context,
    backward=_single_pass_backward,
    kernels={"cpu": _CPP_SINGLE},
    triton=types.SimpleNamespace(forward=_TRITON_SINGLE[0], backward=_TRITON_SINGLE[1]),
)


# ------------------------------------------------------------------------------- the checks
def _check_chunk_size(chunk_size: Any) -> None:
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"ddo_fast: `chunk_size` must be an int or None, got {chunk_size!r}")
    if chunk_size < 1:
        raise ValueError(f"ddo_fast: `chunk_size` must be >= 1, got {chunk_size}")


def _check_tokens(hidden, weight, bias, targets, seq_ids, ignore_index, backend, chunk_size):
    """Checks the token-side arguments; returns (hidden [N, H], targets [N], route, chunk)."""
    check_float("hidden", hidden)
    packed = seq_ids is not None
    if packed and hidden.dim() != 2:
        raise ValueError(
            f"ddo_fast: with `seq_ids`, `hidden` must have shape [N, H], got {list(hidden.shape)}"
        )
    if not packed and hidden.dim() != 3:
        raise ValueError(
            f"ddo_fast: `hidden` must have shape [B, L, H] (or [N, H] with `seq_ids`), got "
            f"{list(hidden.shape)}"
        )
    check_float("weight", weight)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"ddo_fast: `weight` must have shape [V, H] with H = {hidden.shape[-1]} (the last "
            f"dimension of `hidden`), got {list(weight.shape)}"
        )
    device = hidden.device
    check_device("weight", weight, device)
    if bias is not None:
        check_float("bias", bias)
        if bias.shape != weight.shape[:1]:
            raise ValueError(
                f"ddo_fast: `bias` must have shape [V] = [{weight.shape[0]}], got "
                f"{list(bias.shape)}"
            )
        check_device("bias", bias, device)
    check_tensor("targets", targets)
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(f"ddo_fast: `targets` must be an integer tensor, got {targets.dtype}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(
            f"ddo_fast: `targets` must have shape {list(hidden.shape[:-1])} to match `hidden`, "
            f"got {list(targets.shape)}"
        )
    check_device("targets", targets, device)
    if packed:
        check_tensor("seq_ids", seq_ids)
        if seq_ids.is_floating_point() or seq_ids.is_complex() or seq_ids.dtype == torch.bool:
            raise TypeError(f"ddo_fast: `seq_ids` must be an integer tensor, got {seq_ids.dtype}")
        if seq_ids.shape != targets.shape:
            raise ValueError(
                f"ddo_fast: `seq_ids` must have shape [N] = {list(targets.shape)}, got "
                f"{list(seq_ids.shape)}"
            )
        check_device("seq_ids", seq_ids, device)
    _check_chunk_size(chunk_size)
    n = targets.numel()
    if weight.shape[0] == 0 and n:
        raise ValueError("ddo_fast: `weight` has an empty vocabulary dimension (V = 0)")
    route = resolve_backend(backend, device)
    if route == DISPATCH and device.type == "cpu":
        # checked before the kernels: see _common.token_route
        reference.assert_targets_in_range(targets, weight.shape[0], ignore_index)
    if chunk_size is None:
        dtype = compute_dtype(hidden, weight, bias)
        chunk_size = default_chunk_size(
            n, weight.shape[0], dtype, weight.numel() * weight.element_size()
        )
    return hidden.reshape(n, hidden.shape[-1]), targets.reshape(n), route, chunk_size


def _segment_sum(per_token: torch.Tensor, seq_ids, batch: int, hidden_shape) -> torch.Tensor:
    """``sum_l`` per sequence: a reshape-sum for [B, L], ``index_add`` over ``seq_ids`` for packed
    tokens (an id outside [0, B) raises IndexError on CPU, a device-side assert on CUDA)."""
    if seq_ids is None:
        return per_token.reshape(hidden_shape[:2]).sum(1)
    out = per_token.new_zeros(batch)
    return out.index_add(0, seq_ids.long(), per_token)


def _reference_logits(hidden, weight, bias) -> torch.Tensor:
    """The unfused logits ``hidden @ weight.T + bias``, the inputs promoted to one dtype."""
    dtype = compute_dtype(hidden, weight, bias)
    logits = hidden.to(dtype) @ weight.to(dtype).t()
    return logits if bias is None else logits + bias.to(dtype)


def _reference_logprob(hidden, weight, bias, targets, ignore_index) -> torch.Tensor:
    """Per-token log-probs [N] of the unfused path (``ddo_fast.reference`` on those logits)."""
    logits = _reference_logits(hidden, weight, bias)
    return reference.token_logprobs_ref(logits[None], targets[None], ignore_index=ignore_index)[0]


# --------------------------------------------------------------------------- public functions
def _single_pass_sequences(
    hidden, weight, bias, seq_ids, route, code, return_logratio, chunk_size
) -> int:
    """Whole sequences per chunk of the single-pass path, or 0 where the recompute path runs:
    the packed form, ``reduction="none"``, ``return_logratio``, the ``torch`` route, no gradient
    wanted (grad mode off, or hidden / weight / bias not all requiring it), or one sequence's
    logits over the chunk budget. Decided from metadata only (no device sync)."""
    params = [t for t in (hidden, weight, bias) if t is not None]
    if (
        seq_ids is not None
        or return_logratio
        or code == Reduction.NONE
        or route == TORCH
        or not torch.is_grad_enabled()
        or not all(t.requires_grad for t in params)
    ):
        return 0
    batch, length = hidden.shape[:2]
    if chunk_size is None:
        chunk_size = default_chunk_size(
            batch * length,
            weight.shape[0],
            compute_dtype(hidden, weight, bias),
            weight.numel() * weight.element_size(),
            in_place=True,
        )
    return chunk_size // max(length, 1)


def _logprob(h2, weight, bias, y, route, ignore_index, chunk) -> torch.Tensor:
    """Per-token log-probs [N] fp32 on ``route`` (TORCH: the unfused reference)."""
    if route == TORCH:
        return _reference_logprob(h2, weight, bias, y, ignore_index).float()
    return SPEC.run(route, h2, weight, bias, y, int(ignore_index), int(chunk))[0]


def fused_linear_sequence_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    seq_ids: torch.Tensor | None = None,
    num_sequences: int | None = None,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``sequence_logprob(hidden @ weight.T + bias, targets)`` [B] fp32 without the logits tensor.

    Args:
        hidden: [B, L, H] any float dtype (or [N, H] packed tokens with ``seq_ids``);
            differentiable.
        weight: [V, H] the output head's weight; differentiable. bias: optional [V].
        targets: [B, L] (or [N]) integer tokens; ``ignore_index`` positions add 0.
        seq_ids: packed form only: [N] integer sequence index of each token, in
            [0, num_sequences).
        num_sequences: B of the packed form (required with ``seq_ids``; no host sync reads it).
        chunk_size: tokens per chunk (default from the memory budget, see the module docstring).

    Returns:
        [B] fp32 sequence log-probs. Use under ``torch.no_grad()`` on the reference model to
        get ``ref_logprob`` for :func:`fused_linear_ar_ddo_loss`.
    """
    if seq_ids is not None and num_sequences is None:
        raise ValueError("ddo_fast: `num_sequences` (B) is required with `seq_ids`")
    h2, y, route, chunk = _check_tokens(
        hidden, weight, bias, targets, seq_ids, ignore_index, backend, chunk_size
    )
    batch = num_sequences if seq_ids is not None else hidden.shape[0]
    logp = _logprob(h2, weight, bias, y, route, ignore_index, chunk)
    return _segment_sum(logp, seq_ids, batch, hidden.shape)


def fused_linear_ar_ddo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ref_logprob: torch.Tensor,
    is_real: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    alpha: float = 1.0,
    beta: float = 1.0,
    ignore_index: int = -100,
    sample_weight: torch.Tensor | None = None,
    reduction: str = "mean",
    seq_ids: torch.Tensor | None = None,
    chunk_size: int | None = None,
    backend: str | None = None,
    return_logratio: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``ar_ddo_loss(hidden @ weight.T + bias, targets, ref_logprob, is_real, ...)`` without a
    [B, L, V] logits tensor: ``r_b = sum_l log_softmax(h_{b,l} W^T + b)[y_{b,l}] - ref_logprob_b``
    (Eq. 13 of Zheng et al. 2025), then the DDO loss head.

    Args:
        hidden: [B, L, H] any float dtype, or [N, H] packed tokens with ``seq_ids``;
            differentiable.
        weight: [V, H] head weight, differentiable; bias: optional [V], differentiable.
        targets: [B, L] (or [N]) integer tokens; ``ignore_index`` positions are skipped.
        ref_logprob: [B] the reference model's sequence log-prob (constant).
        is_real: [B] bool. alpha, beta, sample_weight, reduction: as in
            :func:`ddo_fast.ddo_loss`.
        seq_ids: packed form: [N] integer sequence index of each token in [0, B), B =
            ``len(ref_logprob)``.
        chunk_size: tokens per chunk (default: from the memory budget; see the module docstring).
        backend: ``"torch"`` is the plain unfused path; see :mod:`ddo_fast._backend`.

    Returns:
        fp32 scalar, or [B] for ``reduction="none"``; with ``return_logratio`` also r [B] fp32.
        Gradients reach hidden, weight and bias in their own dtypes (accumulated in fp32).

    Paths (module docstring): a scalar loss without ``return_logratio``, in grad mode with every
    given parameter requiring grad, takes the single-pass path (gradients computed in the
    forward, 3 matmuls; no double backward, no second backward through the same graph; an
    in-place change to ``weight`` between forward and backward goes unnoticed there, and the
    gradient returned is the one at the forward's weights). The
    packed ``[N, H]`` + ``seq_ids`` form, ``reduction="none"``, ``return_logratio=True``, a
    frozen input and sequences whose logits exceed the chunk budget take the recompute path.
    """
    h2, y, route, chunk = _check_tokens(
        hidden, weight, bias, targets, seq_ids, ignore_index, backend, chunk_size
    )
    if seq_ids is not None:
        check_float("ref_logprob", ref_logprob)
        if ref_logprob.dim() != 1:
            raise ValueError(
                f"ddo_fast: `ref_logprob` must have shape [B], got {list(ref_logprob.shape)}"
            )
    batch = ref_logprob.shape[0] if seq_ids is not None else hidden.shape[0]
    check_batch_vector("ref_logprob", ref_logprob, batch, hidden.device)
    code = check_loss_args(is_real, sample_weight, batch, hidden.device, reduction)
    sequences = _single_pass_sequences(
        hidden, weight, bias, seq_ids, route, code, return_logratio, chunk_size
    )
    if sequences:
        args = (hidden, weight, bias, targets, ref_logprob.detach(), is_real)
        params = (float(alpha), float(beta), int(ignore_index), code, sequences)
        return SINGLE_PASS_SPEC.run(route, *args, constant(sample_weight), *params)[0]
    if route == TORCH and seq_ids is None:  # the plain unfused path, as ar_ddo_loss computes it
        logits = _reference_logits(hidden, weight, bias)
        seq = reference.sequence_logprob_ref(logits, targets, ignore_index=ignore_index)
        r = seq - ref_logprob.detach().to(seq.dtype)
        loss = reference.ddo_loss_ref(
            r, is_real, alpha=alpha, beta=beta, sample_weight=sample_weight, reduction=reduction
        ).float()
        return (loss, r.float()) if return_logratio else loss
    logp = _logprob(h2, weight, bias, y, route, ignore_index, chunk)
    r = _segment_sum(logp, seq_ids, batch, hidden.shape) - ref_logprob.detach().float()
    loss = ddo_loss(
        r,
        is_real,
        alpha=alpha,
        beta=beta,
        sample_weight=constant(sample_weight),
        reduction=reduction,
        backend=backend,
    )
    return (loss, r) if return_logratio else loss
