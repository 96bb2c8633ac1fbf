"""How the diffusion adapters call models written for other libraries (diffusers, k-diffusion,
EDM/EDM2): unwrapping their outputs and turning integer class labels into the inputs they take."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def model_output(out: Any) -> torch.Tensor:
    """The prediction tensor of a model's output: a tensor as is; a diffusers output object
    (``UNet2DOutput``, ``UNet2DConditionOutput``: ``.sample``); a tuple or list (diffusers
    ``return_dict=False``, EDM2 ``return_logvar=True``: the first element)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample") and isinstance(out.sample, torch.Tensor):
        return out.sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(
        f"model output of type {type(out).__name__} is neither a tensor, an object with a "
        "tensor .sample (diffusers) nor a tuple whose first element is a tensor"
    )


def one_hot_labels(
    net: nn.Module, labels: torch.Tensor | None, label_dim: int | None
) -> torch.Tensor | None:
    """EDM/EDM2 ``class_labels``: float32 one-hot [N, label_dim] from integer labels [N];
    floating labels (already one-hot or soft) pass as they are; None stays None (EDM2's
    ``Precond`` then uses zeros). ``label_dim`` None reads ``net.label_dim`` (EDM and EDM2
    ``Precond`` have it; a DDP/FSDP wrapper's ``.module`` is looked through)."""
    if labels is None or labels.is_floating_point():
        return labels
    if label_dim is None:
        inner = getattr(net, "module", net)
        label_dim = getattr(net, "label_dim", getattr(inner, "label_dim", None))
        if not label_dim:
            raise ValueError(
                "label_dim: integer class labels need the number of classes for the one-hot "
                f"class_labels of call='edm2'; {type(net).__name__} has no label_dim > 0, pass "
                "EDMDenoiser(label_dim=...)"
            )
    return torch.nn.functional.one_hot(labels.long(), int(label_dim)).float()
