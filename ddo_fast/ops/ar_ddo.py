"""Autoregressive DDO: sequence log-likelihood gap of target and reference, fused with the loss.

The log-ratio of Zheng et al. 2025, Eq. 13 for a model that factorises over tokens, summed over
tokens with no length normalisation (as in the VAR recipe):

``r_b = sum_l log_softmax(logits[b, l])[targets[b, l]] - ref_logprob_b``

followed by the loss head of :mod:`ddo_fast.ops.ddo_loss` in the same pass. The backward needs only
the per-sequence coefficient ``k_b = d loss / d r_b`` (plus any upstream gradient of r):
``d logits[b, l] = k_b (onehot(t) - softmax)``, with softmax recomputed from the saved statistics
``stats`` [2, B, L] (row max and log-sum-exp offset, see :mod:`.token_logprobs`), so no
[B, L, V] tensor besides the input is kept.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import reference
from .._backend import TORCH
from .._reduction import Reduction
from . import _triton
from ._common import (
    check_batch_vector,
    check_loss_args,
    constant,
    fused_loss_backward,
    loss_fakes,
    save_fused_loss,
    token_route,
)
from ._registry import register_op


def _fwd_fake(
    logits, targets, ref_logprob, is_real, sample_weight, alpha, beta, ignore_index, reduction
):
    out, logratio, group_scale = loss_fakes(logits, logits.shape[0], is_real is not None, reduction)
    return out, logratio, group_scale, logits.new_empty((2, *logits.shape[:2]), dtype=torch.float32)


def _bwd_fake(grad_out, grad_logratio, logits, *_):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)  # in logits.dtype


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    logits, targets, _ref, is_real, sample_weight, alpha, beta, ignore_index, reduction = inputs
    _out, logratio, group_scale, stats = output
    saved = (logits, targets, stats, logratio, is_real, sample_weight, group_scale)  # bwd order
    params = (alpha, beta, ignore_index, reduction)
    save_fused_loss(ctx, saved, params, is_real is not None, group_scale, stats)


SPEC = register_op(
    "ar_ddo",
    fake_fwd=_fwd_fake,
    fake_bwd=_bwd_fake,
    setup_context=_setup_context,
    backward=fused_loss_backward,
    triton=_triton.ar_ddo,
)


def reference_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ref_logprob: torch.Tensor,
    is_real: torch.Tensor,
    ignore_index: int,
    loss: dict,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``backend="torch"`` of the AR losses: (fp32 loss, r [B] fp32) from plain-PyTorch logits.

    ``loss`` holds the keyword arguments of :func:`ddo_fast.reference.ddo_loss_ref`.
    """
    seq = reference.sequence_logprob_ref(logits, targets, ignore_index=ignore_index)
    r = seq - ref_logprob.detach().to(seq.dtype)
    return reference.ddo_loss_ref(r, is_real, **loss).float(), r.float()


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
    route = token_route(logits, targets, ignore_index, backend)
    if route == TORCH:
        return reference.sequence_logprob_ref(logits, targets, ignore_index=ignore_index).float()
    args = (logits, targets, None, None, None, 1.0, 1.0, int(ignore_index), int(Reduction.NONE))
    return SPEC.run(route, *args)[1]


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
        targets: [B, L] integer tokens (``ignore_index`` positions are skipped).
        ref_logprob: [B] the reference model's sequence log-prob (constant; e.g. from
            :func:`sequence_logprob` under ``no_grad``, or a cache).
        is_real, alpha, beta, sample_weight, reduction: as in :func:`ddo_fast.ddo_loss`.

    Returns:
        fp32 scalar, or [B] for ``reduction="none"``; with ``return_logratio`` also r [B].
    """
    route = token_route(logits, targets, ignore_index, backend)
    batch = logits.shape[0]
    check_batch_vector("ref_logprob", ref_logprob, batch, logits.device)
    code = check_loss_args(is_real, sample_weight, batch, logits.device, reduction)
    if route == TORCH:
        loss = dict(alpha=alpha, beta=beta, sample_weight=sample_weight, reduction=reduction)
        out, r = reference_loss(logits, targets, ref_logprob, is_real, ignore_index, loss)
        return (out, r) if return_logratio else out
    args = (logits, targets, ref_logprob.detach(), is_real, constant(sample_weight))
    out, r = SPEC.run(route, *args, float(alpha), float(beta), int(ignore_index), code)[:2]
    return (out, r) if return_logratio else out
