"""Argument checks and autograd plumbing shared by the operator modules.

Checks read only shapes, dtypes and devices (host metadata): no device sync ever happens here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .. import reference

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}


def reduction_code(reduction: str) -> int:
    try:
        return REDUCTIONS[reduction]
    except (KeyError, TypeError):
        raise ValueError(
            f"ddo_fast: reduction must be one of {tuple(REDUCTIONS)}, got {reduction!r}"
        ) from None


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
    """Checks the arguments every DDO loss takes; returns the reduction code."""
    code = reduction_code(reduction)
    check_is_real(is_real, batch, device)
    if sample_weight is not None:
        check_batch_vector("sample_weight", sample_weight, batch, device)
    return code


def check_token_args(logits: Any, targets: Any) -> None:
    check_float("logits", logits)
    if logits.dim() != 3:
        raise ValueError(f"ddo_fast: `logits` must have shape [B, L, V], got {list(logits.shape)}")
    check_tensor("targets", targets)
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(f"ddo_fast: `targets` must be an int64 tensor, got {targets.dtype}")
    if targets.shape != logits.shape[:2]:
        raise ValueError(
            f"ddo_fast: `targets` must have shape [B, L] = {list(logits.shape[:2])} to match "
            f"`logits`, got {list(targets.shape)}"
        )
    check_device("targets", targets, logits.device)
    if logits.shape[2] == 0 and targets.numel():
        raise ValueError("ddo_fast: `logits` has an empty vocabulary dimension")


def check_targets_on_cpu(
    route: str, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int
) -> None:
    """Out-of-range targets on the C++ CPU path are caught here, before the kernel.

    The kernel checks too, but a C++ exception thrown from the extension was seen to crash the
    process under torch 2.11 (the GPU machine's build), so the public path never relies on it.
    Triton paths flag bad targets inside the kernel and assert device-side.
    """
    if route == "dispatch" and logits.device.type == "cpu":
        reference.assert_targets_in_range(targets, logits.shape[2], ignore_index)


def interpreter_function(
    name: str,
    forward: Callable[..., Any],
    setup_context: Callable[..., None],
    backward: Callable[..., Any],
) -> type[torch.autograd.Function]:
    """An autograd.Function running Triton kernels on CPU tensors (``TRITON_INTERPRET=1``).

    It shares ``setup_context``/``backward`` with the registered operator, so the interpreter
    tests exercise the same gradient code the CUDA path runs.
    """

    def _forward(*args: Any) -> Any:
        return forward(*args)

    return type(
        name,
        (torch.autograd.Function,),
        {
            "forward": staticmethod(_forward),
            "setup_context": staticmethod(setup_context),
            "backward": staticmethod(backward),
        },
    )
