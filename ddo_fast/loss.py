"""Drop-in loss modules holding the DDO hyper-parameters (alpha, beta, reduction, backend).

They add nothing to the functions in :mod:`ddo_fast.ops` but a place to keep the settings, so a
trainer can build the loss once and call it every step. None of them runs a collective: under
data parallelism each rank computes its local loss and the trainer averages gradients.
"""

from __future__ import annotations

import torch
from torch import nn

from ._reduction import Reduction
from .ops import ar_ddo_loss, ddo_loss, diffusion_ddo_loss, fused_linear_ar_ddo_loss


class _DDOSettings(nn.Module):
    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 1.0,
        reduction: str = "mean",
        backend: str | None = None,
    ) -> None:
        super().__init__()
        Reduction.parse(reduction)  # fail at construction, not at the first step
        self.alpha, self.beta = float(alpha), float(beta)
        self.reduction, self.backend = reduction, backend

    def _options(self) -> dict:
        """The keyword arguments every loss function takes, read from the current settings."""
        return {
            "alpha": self.alpha,
            "beta": self.beta,
            "reduction": self.reduction,
            "backend": self.backend,
        }

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, beta={self.beta}, reduction={self.reduction!r}, "
            f"backend={self.backend!r}"
        )


class DDOLoss(_DDOSettings):
    """``forward(logratio [B], is_real [B], sample_weight=None)`` -> :func:`ddo_fast.ddo_loss`."""

    def forward(
        self,
        logratio: torch.Tensor,
        is_real: torch.Tensor,
        sample_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return ddo_loss(logratio, is_real, sample_weight=sample_weight, **self._options())


class DiffusionDDOLoss(_DDOSettings):
    """``forward(pred, pred_ref, target, weight, is_real, sample_weight=None)`` ->
    :func:`ddo_fast.diffusion_ddo_loss` (one fused op)."""

    def forward(
        self,
        pred: torch.Tensor,
        pred_ref: torch.Tensor,
        target: torch.Tensor,
        weight: torch.Tensor,
        is_real: torch.Tensor,
        sample_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return diffusion_ddo_loss(
            pred, pred_ref, target, weight, is_real, sample_weight=sample_weight, **self._options()
        )


class ARDDOLoss(_DDOSettings):
    """``forward(logits, targets, ref_logprob, is_real, sample_weight=None)`` ->
    :func:`ddo_fast.ar_ddo_loss` (one fused op)."""

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 1.0,
        reduction: str = "mean",
        backend: str | None = None,
        ignore_index: int = -100,
    ) -> None:
        super().__init__(alpha, beta, reduction, backend)
        self.ignore_index = int(ignore_index)

    def forward(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        ref_logprob: torch.Tensor,
        is_real: torch.Tensor,
        sample_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return ar_ddo_loss(
            logits,
            targets,
            ref_logprob,
            is_real,
            ignore_index=self.ignore_index,
            sample_weight=sample_weight,
            **self._options(),
        )


class FusedLinearARDDOLoss(ARDDOLoss):
    """``forward(hidden, weight, targets, ref_logprob, is_real, bias=None, sample_weight=None,
    seq_ids=None)`` -> :func:`ddo_fast.fused_linear_ar_ddo_loss` (the head's matmul fused in, no
    [B, L, V] logits); ``chunk_size`` None = from the memory budget."""

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 1.0,
        reduction: str = "mean",
        backend: str | None = None,
        ignore_index: int = -100,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__(alpha, beta, reduction, backend, ignore_index)
        self.chunk_size = chunk_size

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        ref_logprob: torch.Tensor,
        is_real: torch.Tensor,
        bias: torch.Tensor | None = None,
        sample_weight: torch.Tensor | None = None,
        seq_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return fused_linear_ar_ddo_loss(
            hidden,
            weight,
            targets,
            ref_logprob,
            is_real,
            bias=bias,
            ignore_index=self.ignore_index,
            sample_weight=sample_weight,
            seq_ids=seq_ids,
            chunk_size=self.chunk_size,
            **self._options(),
        )
