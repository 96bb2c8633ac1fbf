"""Autoregressive DDO: sequence log-likelihood gap of target and reference, fused with the loss.

``r_b = sum_l log_softmax(logits[b, l])[targets[b, l]] - ref_logprob_b`` (sum over tokens, no
length normalisation, as in the VAR recipe). The backward pass needs only a per-sequence
coefficient ``k_b = d loss / d r_b``: ``d logits[b, l] = k_b (onehot - softmax)``, recomputed
from the saved logsumexp, so no [B, L, V] tensor besides the input is kept.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from .. import reference
from .._backend import resolve_backend
from ._common import (
    check_batch_vector,
    check_loss_args,
    check_token_args,
    interpreter_function,
)
from ._common import check_targets_on_cpu as _check_targets_on_cpu

_FWD = "ddo_fast::ar_ddo_fwd"
_BWD = "ddo_fast::ar_ddo_bwd"


@torch.library.register_fake(_FWD)
def _fwd_fake(
    logits, targets, ref_logprob, is_real, sample_weight, alpha, beta, ignore_index, reduction
):
    batch = logits.shape[0]
    f32 = dict(dtype=torch.float32, device=logits.device)
    if is_real is None:
        out = logits.new_empty((0,), **f32)
    else:
        out = logits.new_empty((batch,) if reduction == 0 else (), **f32)
    return (
        out,
        logits.new_empty((batch,), **f32),
        logits.new_empty((2,), **f32),
        logits.new_empty(logits.shape[:2], **f32),
    )


@torch.library.register_fake(_BWD)
def _bwd_fake(
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
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    logits, targets, _ref, is_real, sample_weight, alpha, beta, ignore_index, reduction = inputs
    _out, logratio, norm, lse = output
    ctx.mark_non_differentiable(norm, lse)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(logits, targets, lse, logratio, is_real, sample_weight, norm)
    ctx.params = (alpha, beta, ignore_index, reduction)


def _make_backward(bwd):
    def backward(ctx: Any, grad_out: Any, grad_logratio: Any, _gn: Any, _gl: Any) -> tuple:
        logits, targets, lse, logratio, is_real, sample_weight, norm = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0] and (grad_out is not None or grad_logratio is not None):
            if is_real is None:
                grad_out = None
            grad = bwd(
                grad_out,
                grad_logratio,
                logits,
                targets,
                lse,
                logratio,
                is_real,
                sample_weight,
                norm,
                *ctx.params,
            )
        return (grad,) + (None,) * 8

    return backward


torch.library.register_autograd(
    _FWD, _make_backward(torch.ops.ddo_fast.ar_ddo_bwd), setup_context=_setup_context
)


@torch.library.register_kernel(_FWD, "cuda")
def _fwd_cuda(*args):
    from ..kernels import ar_ddo as kernels

    return kernels.forward(*args)


@torch.library.register_kernel(_BWD, "cuda")
def _bwd_cuda(*args):
    from ..kernels import ar_ddo as kernels

    return kernels.backward(*args)


@functools.cache  # one Function class per process, built on first use
def _interpreter_function() -> type[torch.autograd.Function]:
    from ..kernels import ar_ddo as kernels

    return interpreter_function(
        "ARDDOTritonInterpret", kernels.forward, _setup_context, _make_backward(kernels.backward)
    )


def _run(route: str, *args: Any) -> tuple[torch.Tensor, ...]:
    if route == "triton-interpret":
        return _interpreter_function().apply(*args)
    return torch.ops.ddo_fast.ar_ddo_fwd(*args)


def sequence_logprob(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    backend: str | None = None,
) -> torch.Tensor:
    """``sum_l log_softmax(logits)[b, l, targets[b, l]]`` [B] fp32 (ignored tokens add 0).

    Args as in :func:`ddo_fast.token_logprobs`. Use it under ``torch.no_grad()`` on the reference
    model's logits to get ``ref_logprob`` for :func:`ar_ddo_loss`.
    """
    check_token_args(logits, targets)
    route = resolve_backend(backend, logits.device)
    if route == "torch":
        return reference.sequence_logprob_ref(logits, targets, ignore_index=ignore_index).float()
    _check_targets_on_cpu(route, logits, targets, ignore_index)
    args = (logits, targets, None, None, None, 1.0, 1.0, int(ignore_index), 0)
    return _run(route, *args)[1]


def ar_ddo_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ref_logprob: torch.Tensor,
    is_real: torch.Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    ignore_index: int = -100,
    sample_weight: torch.Tensor | None = None,
    reduction: str = "mean",
    backend: str | None = None,
    return_logratio: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Fused autoregressive DDO loss with ``r_b = sequence_logprob(logits)_b - ref_logprob_b``.

    Args:
        logits: [B, L, V] any float dtype, the trained model's logits; differentiable.
        targets: [B, L] int64 tokens (``ignore_index`` positions are skipped).
        ref_logprob: [B] the reference model's sequence log-prob (constant; e.g. from
            :func:`sequence_logprob` under ``no_grad``, or a cache).
        is_real, alpha, beta, sample_weight, reduction: as in :func:`ddo_fast.ddo_loss`.

    Returns:
        fp32 scalar, or [B] for ``reduction="none"``; with ``return_logratio`` also r [B].
    """
    check_token_args(logits, targets)
    batch = logits.shape[0]
    check_batch_vector("ref_logprob", ref_logprob, batch, logits.device)
    code = check_loss_args(is_real, sample_weight, batch, logits.device, reduction)
    route = resolve_backend(backend, logits.device)
    if route == "torch":
        seq = reference.sequence_logprob_ref(logits, targets, ignore_index=ignore_index)
        r = seq - ref_logprob.detach().to(seq.dtype)
        loss = reference.ddo_loss_ref(
            r, is_real, alpha=alpha, beta=beta, sample_weight=sample_weight, reduction=reduction
        ).float()
        return (loss, r.float()) if return_logratio else loss
    _check_targets_on_cpu(route, logits, targets, ignore_index)
    sw = None if sample_weight is None else sample_weight.detach()
    args = (
        logits,
        targets,
        ref_logprob.detach(),
        is_real,
        sw,
        float(alpha),
        float(beta),
        int(ignore_index),
        code,
    )
    out, r = _run(route, *args)[:2]
    return (out, r) if return_logratio else out
