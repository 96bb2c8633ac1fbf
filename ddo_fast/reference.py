"""Plain-PyTorch DDO: the oracle every kernel is tested against, and ``backend="torch"``.

Everything is computed in float32, or in float64 when an input is float64 (tests use that as the
high-precision oracle). Notation (Zheng et al., ICML 2025, Eq. 13):

* per-sample log-ratio ``r_b = log p_theta(x_b) - log p_ref(x_b)``;
* real sample (from the data):  ``l_b = -w_b * logsigmoid(beta * r_b)``;
* fake sample (from p_ref):     ``l_b = -alpha * w_b * logsigmoid(-beta * r_b)``;
* ``reduction="mean"``: ``sum_real l / n_real + sum_fake l / n_fake`` (an empty group adds 0),
  ``"sum"``: ``sum_b l_b``, ``"none"``: ``l`` of shape [B].
"""

from __future__ import annotations

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
    z = beta * r
    per_sample = torch.where(is_real, -w * F.logsigmoid(z), -alpha * w * F.logsigmoid(-z))
    return _reduce(per_sample, is_real, reduction)


def diffusion_logratio_ref(
    pred: torch.Tensor, pred_ref: torch.Tensor, target: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """``r_b = -sum_{non-batch dims} weight_b * ((pred - target)^2 - (pred_ref - target)^2)`` [B].

    Only ``pred`` receives gradients: the reference prediction and the target are constants.
    """
    dtype = _acc_dtype(pred, pred_ref, target, weight)
    p, q, t = pred.to(dtype), pred_ref.detach().to(dtype), target.detach().to(dtype)
    diff = ((p - t).square() - (q - t).square()).reshape(p.shape[0], -1).sum(1)
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
    """Every target is in [0, vocab) or equals ignore_index. Device-side on CUDA (no host sync;
    a failure is a device assert), an immediate RuntimeError on CPU; traceable by dynamo."""
    if targets.numel():
        valid = (targets == ignore_index) | ((targets >= 0) & (targets < vocab))
        torch._assert_async(
            valid.all(),
            f"ddo_fast: `targets` holds a value outside the vocabulary [0, {vocab}) that is not "
            f"ignore_index={ignore_index}",
        )


def token_logprobs_ref(
    logits: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -100
) -> torch.Tensor:
    """``log_softmax(logits)[targets]`` [B, L]; 0 where ``targets == ignore_index``."""
    assert_targets_in_range(targets, logits.shape[-1], ignore_index)
    valid = targets != ignore_index
    logp = torch.log_softmax(logits.to(_acc_dtype(logits)), dim=-1)
    picked = logp.gather(-1, torch.where(valid, targets, 0).unsqueeze(-1)).squeeze(-1)
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
