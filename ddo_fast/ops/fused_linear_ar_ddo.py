"""Fused-linear autoregressive DDO: hidden states and the head weight in, no [B, L, V] logits.

Same value and gradients as ``ar_ddo_loss(hidden @ weight.T + bias, ...)`` (Zheng et al. 2025,
Eq. 13 with ``log p(x_b) = sum_l log_softmax(z_{b,l})[y_{b,l}]``, ``z = h W^T + b``), with memory
that does not grow with ``B * L * V``.

Design (and why). The DDO coefficient ``k_b = d loss / d r_b`` needs the whole sequence's log-prob,
so no chunk's gradient can be finished in the forward (unlike a fused linear cross-entropy, whose
per-token gradient is known at once). Keeping per-sequence weight-gradient partials instead would
cost ``B * V * H``. So the work is split into one custom operator pair over flattened tokens
``N = B * L`` (or the packed ``[N, H]`` form), processed in row chunks of ``chunk_size`` tokens:

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

Memory besides the inputs and the returned gradients: one chunk's working set, chosen from a
budget (:func:`default_chunk_size`: ``max(16 MiB, weight bytes / 8)`` for the chunk's logits, its
gradient and, for 16-bit logits, the fp32 copy the weight-gradient accumulation reads), plus the
fp32 weight-gradient accumulator when the weight is 16-bit, and, when the dtypes differ, one copy
of the weight (if it is the narrower one) in the promoted dtype.
"""

from __future__ import annotations

import types
from typing import Any

import torch

from .. import reference
from .._backend import DISPATCH, TORCH, resolve_backend
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


def default_chunk_size(n_tokens: int, vocab: int, dtype: torch.dtype, weight_bytes: int) -> int:
    """Tokens per chunk so that one chunk's logits, their gradient and (16-bit logits) the fp32
    copy of the gradient fit ``max(CHUNK_BUDGET_BYTES, weight_bytes / 8)``; at least 1."""
    item = torch.empty((), dtype=dtype).element_size()
    acc = _acc_dtype(dtype)
    row = vocab * (2 * item + (torch.empty((), dtype=acc).element_size() if acc != dtype else 0))
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
    check_loss_args(is_real, sample_weight, batch, hidden.device, reduction)
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
