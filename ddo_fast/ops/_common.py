"""Argument checks, fake outputs and autograd pieces shared by the operator modules.

Checks read only shapes, dtypes and devices (host metadata): no device sync ever happens here,
and each public function checks each argument once.
"""

from __future__ import annotations

from typing import Any

import torch

from .._backend import resolve_backend
from .._reduction import Reduction


def check_tensor(name: str, t: Any) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"ddo_fast: `{name}` must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_float(name: str, t: Any) -> torch.Tensor:
    check_tensor(name, t)
    if not t.is_floating_point():
        raise TypeError(f"ddo_fast: `{name}` must be a floating-point tensor, got {t.dtype}")
    return t


def check_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(
            f"ddo_fast: `{name}` is on {t.device} but the other inputs are on {device}"
        )


def check_batch_vector(name: str, t: Any, batch: int, device: torch.device) -> torch.Tensor:
    """A float tensor of shape [batch] on `device`."""
    check_float(name, t)
    if t.shape != (batch,):
        raise ValueError(
            f"ddo_fast: `{name}` must have shape [{batch}] (one value per sample), "
            f"got {list(t.shape)}"
        )
    check_device(name, t, device)
    return t


def check_is_real(is_real: Any, batch: int, device: torch.device) -> torch.Tensor:
    check_tensor("is_real", is_real)
    if is_real.dtype != torch.bool:
        raise TypeError(
            f"ddo_fast: `is_real` must be a bool tensor (True = data sample), got {is_real.dtype}"
        )
    if is_real.shape != (batch,):
        raise ValueError(
            f"ddo_fast: `is_real` must have shape [{batch}], got {list(is_real.shape)}"
        )
    check_device("is_real", is_real, device)
    return is_real


def check_loss_args(
    is_real: Any, sample_weight: Any, batch: int, device: torch.device, reduction: str
) -> int:
    """Checks the arguments every DDO loss takes; returns the schema's ``int reduction``."""
    code = int(Reduction.parse(reduction))
    check_is_real(is_real, batch, device)
    if sample_weight is not None:
        check_batch_vector("sample_weight", sample_weight, batch, device)
    return code


def constant(t: torch.Tensor | None) -> torch.Tensor | None:
    """An optional input that never receives gradients (weights, the reference side)."""
    return None if t is None else t.detach()


def token_route(logits: Any, targets: Any, ignore_index: int, backend: str | None) -> str:
    """Checks the token arguments and returns the route (see ``resolve_backend``).

    Out-of-range targets are left to the kernels: the C++ kernel raises IndexError before its
    parallel region, the Triton kernels assert device-side (no host sync here).
    """
    check_float("logits", logits)
    if logits.dim() != 3:
        raise ValueError(f"ddo_fast: `logits` must have shape [B, L, V], got {list(logits.shape)}")
    check_tensor("targets", targets)
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(f"ddo_fast: `targets` must be an integer tensor, got {targets.dtype}")
    if targets.shape != logits.shape[:2]:
        raise ValueError(
            f"ddo_fast: `targets` must have shape [B, L] = {list(logits.shape[:2])} to match "
            f"`logits`, got {list(targets.shape)}"
        )
    check_device("targets", targets, logits.device)
    if logits.shape[2] == 0 and targets.numel():
        raise ValueError("ddo_fast: `logits` has an empty vocabulary dimension")
    return resolve_backend(backend, logits.device)


# ------------------------------------------------------------------- fakes and autograd
def loss_fakes(
    like: torch.Tensor, batch: int, with_loss: bool, reduction: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fake ``(out, logratio [B], group_scale [2])`` of a loss-head forward, all fp32.

    ``out`` is [0] without a loss (``is_real`` absent), [B] for ``Reduction.NONE``, else a scalar.
    """
    if not with_loss:
        out_shape: tuple[int, ...] = (0,)
    else:
        out_shape = (batch,) if reduction == Reduction.NONE else ()
    f32 = torch.float32
    return (
        like.new_empty(out_shape, dtype=f32),
        like.new_empty((batch,), dtype=f32),
        like.new_empty((2,), dtype=f32),
    )


def save_fused_loss(
    ctx: Any, saved: tuple, params: tuple, with_loss: bool, *constants: torch.Tensor
) -> None:
    """``setup_context`` of a fused op, for :func:`fused_loss_backward`.

    ``saved``: tensors in the order the ``bwd`` schema takes them after the two upstream
    gradients; ``params``: the scalar arguments that follow; ``constants``: outputs without
    gradient (``group_scale``, ``stats``). Grads are not materialised: an unused output is free.
    """
    ctx.mark_non_differentiable(*constants)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*saved)
    ctx.params, ctx.with_loss = params, with_loss


def fused_loss_backward(bwd: Any, ctx: Any, grad_out: Any, grad_logratio: Any, *_: Any) -> tuple:
    """Backward of a fused log-ratio + loss-head forward ``(out, logratio, group_scale, ...)``.

    Only the first input (``pred``/``logits``) gets a gradient; ``setup_context`` calls
    :func:`save_fused_loss`. Without a loss (``is_real`` absent) only ``logratio`` carries one.
    """
    grad = None
    if ctx.needs_input_grad[0] and (grad_out is not None or grad_logratio is not None):
        if not ctx.with_loss:
            grad_out = None
        grad = bwd(grad_out, grad_logratio, *ctx.saved_tensors, *ctx.params)
    return (grad,) + (None,) * (len(ctx.needs_input_grad) - 1)
