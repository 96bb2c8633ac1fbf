"""Plain-PyTorch DDO: ``backend="torch"``, and the semantics every backend implements.

Everything is computed in float32, or in float64 when an input is float64; each input is read in
its own dtype and upcast (no common-dtype cast). Notation (Zheng et al., ICML 2025, Eq. 13):

* per-sample log-ratio ``r_b = log p_theta(x_b) - log p_ref(x_b)``;
* per-sample weight ``c_b = w_b`` (real) or ``alpha * w_b`` (fake), ``w_b = sample_weight_b``
  or 1;
* real sample (from the data):  ``l_b = -c_b * logsigmoid(beta * r_b)``;
* fake sample (from p_ref):     ``l_b = -c_b * logsigmoid(-beta * r_b)``;
* ``reduction="mean"``: ``sum_real l / n_real + sum_fake l / n_fake`` (an empty group adds 0),
  ``"sum"``: ``sum_b l_b``, ``"none"``: ``l`` of shape [B].

Edge cases, identical on every backend (``torch``, ``cpp``, ``triton``):

* Zero weight: if ``c_b == 0`` the term's loss and its gradient are exactly 0, even when
  ``beta * r_b`` overflows (``0 * inf`` would be NaN), unless ``r_b`` is NaN: NaN always
  propagates, to the loss and to the gradient.
* Targets: any integer dtype (int8/16/32/64, uint8); bool or float targets raise a TypeError;
  a target outside ``[0, V)`` that is not ``ignore_index`` raises an IndexError on CPU (a
  device-side assert on CUDA, no host sync).
* Empty batch (B = 0): the loss is 0 for ``"mean"``/``"sum"`` and a [0] tensor for ``"none"``;
  log-ratios and log-probs are empty; gradients have the (empty) shape of their input.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "assert_targets_in_range",
    "ddo_loss_ref",
    "diffusion_logratio_ref",
    "diffusion_ddo_loss_ref",
    "token_logprobs_ref",
    "sequence_logprob_ref",
    "ar_ddo_loss_ref",
]


def _acc_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32: the precision the reference computes in."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def _reduce(per_sample: torch.Tensor, is_real: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return per_sample
    if reduction == "sum":
        return per_sample.sum()
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    zero = per_sample.new_zeros(())
    n_real = is_real.sum().clamp_min(1).to(per_sample.dtype)
    n_fake = (~is_real).sum().clamp_min(1).to(per_sample.dtype)
    real_sum = torch.where(is_real, per_sample, zero).sum()
    fake_sum = torch.where(is_real, zero, per_sample).sum()
    return real_sum / n_real + fake_sum / n_fake


def ddo_loss_ref(
    logratio: torch.Tensor,
    is_real: torch.Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    sample_weight: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """DDO loss from per-sample log-ratios ``logratio`` [B] and the bool mask ``is_real`` [B]."""
    dtype = _acc_dtype(logratio, sample_weight)
    r = logratio.to(dtype)
    w = torch.ones_like(r) if sample_weight is None else sample_weight.to(dtype)
    c = torch.where(is_real, w, alpha * w)
    z = torch.where(is_real, beta * r, -beta * r)
    # c_b = 0 zeroes the term even where beta * r overflowed to inf (0 * inf = NaN); the where
    # also routes a zero gradient to the dropped branch. A NaN r_b still propagates.
    dropped = (c == 0) & ~r.isnan()
    per_sample = torch.where(dropped, r.new_zeros(()), -c * F.logsigmoid(z))
    return _reduce(per_sample, is_real, reduction)


def diffusion_logratio_ref(
    pred: torch.Tensor, pred_ref: torch.Tensor, target: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """``r_b = -sum_{non-batch dims} weight_b * ((pred - target)^2 - (pred_ref - target)^2)`` [B].

    Only ``pred`` receives gradients: the reference prediction and the target are constants.
    """
    dtype = _acc_dtype(pred, pred_ref, target, weight)
    p, q, t = pred.to(dtype), pred_ref.detach().to(dtype), target.detach().to(dtype)
    # explicit row length: reshape(B, -1) cannot infer it when B = 0
    row = math.prod(p.shape[1:])
    diff = ((p - t).square() - (q - t).square()).reshape(p.shape[0], row).sum(1)
    return -weight.detach().to(dtype) * diff


def diffusion_ddo_loss_ref(
    pred: torch.Tensor,
    pred_ref: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor,
    is_real: torch.Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    sample_weight: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """``ddo_loss_ref(diffusion_logratio_ref(pred, pred_ref, target, weight), is_real, ...)``."""
    r = diffusion_logratio_ref(pred, pred_ref, target, weight)
    return ddo_loss_ref(
        r, is_real, alpha=alpha, beta=beta, sample_weight=sample_weight, reduction=reduction
    )


def assert_targets_in_range(targets: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Every target is in [0, vocab) or equals ignore_index.

    Eager on CPU: an IndexError (reading a CPU tensor is no device sync). On CUDA, and while
    dynamo traces (a data-dependent ``if`` would break the graph), a device-side assert: no host
    sync, a RuntimeError on CPU. Works for every integer dtype (compared as int64, so an
    ignore_index such as -100 never wraps around in uint8).
    """
    if not targets.numel():
        return
    y = targets.long()
    valid = ((y == ignore_index) | ((y >= 0) & (y < vocab))).all()
    message = (
        f"ddo_fast: `targets` holds a value outside the vocabulary [0, {vocab}) that is not "
        f"ignore_index={ignore_index}"
    )
    if targets.device.type == "cpu" and not torch.compiler.is_compiling():
        if not valid:
            raise IndexError(message)
        return
    torch._assert_async(valid, message)


def token_logprobs_ref(
    logits: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -100
) -> torch.Tensor:
    """``log_softmax(logits)[targets]`` [B, L]; 0 where ``targets == ignore_index``.

    ``targets`` may have any integer dtype; log_softmax is ``(x - max) - log sum exp(x - max)``,
    so the result keeps full precision at large logit offsets."""
    assert_targets_in_range(targets, logits.shape[-1], ignore_index)
    y = targets.long()  # gather indexes with int64; comparing in int64 keeps -100 from wrapping
    valid = y != ignore_index
    # ignored rows are not read (as in the kernels): a NaN there must not reach the gradient
    x = logits.to(_acc_dtype(logits))
    x = torch.where(valid.unsqueeze(-1), x, x.new_zeros(()))
    logp = torch.log_softmax(x, dim=-1)
    picked = logp.gather(-1, torch.where(valid, y, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, picked, picked.new_zeros(()))


def sequence_logprob_ref(
    logits: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -100
) -> torch.Tensor:
    """``sum_l token_logprobs_ref(logits, targets)[:, l]`` [B]."""
    return token_logprobs_ref(logits, targets, ignore_index=ignore_index).sum(-1)


def ar_ddo_loss_ref(
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
) -> torch.Tensor:
    """DDO loss with ``r_b = sequence_logprob(logits)_b - ref_logprob_b``."""
    seq = sequence_logprob_ref(logits, targets, ignore_index=ignore_index)
    r = seq - ref_logprob.detach().to(seq.dtype)
    return ddo_loss_ref(
        r, is_real, alpha=alpha, beta=beta, sample_weight=sample_weight, reduction=reduction
    )
