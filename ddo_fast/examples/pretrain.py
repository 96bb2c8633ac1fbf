"""Maximum-likelihood pre-training shared by the presets: the loop, lr schedules, the EDM
denoising loss, and a cache of the result in the output folder."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..adapters import EDMDenoiser
from ..adapters.base import bcast
from ..training.loop import update_ema


def cached_pretrain(
    path: Path, model: nn.Module, fit: Callable[[nn.Module], nn.Module]
) -> nn.Module:
    """Load ``path`` into ``model`` if it exists, else ``fit(model)`` and save it there."""
    t0 = time.time()
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        print(f"pre-trained model loaded from {path}")
    else:
        model = fit(model)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
        print(f"pre-trained in {time.time() - t0:.1f}s -> {path}")
    return model.eval()


def cached_pretrain_pair(
    path: Path,
    make_model: Callable[[], nn.Module],
    fit_pair: Callable[[nn.Module], tuple[nn.Module, nn.Module]],
) -> tuple[nn.Module, nn.Module]:
    """(EMA, raw) pre-trained models: loaded from ``path`` if it exists, else ``fit_pair(model)``
    -> (EMA, raw) and saved there (both state dicts)."""
    t0 = time.time()
    ema, raw = make_model(), make_model()
    if path.exists():
        blob = torch.load(path, weights_only=True)
        ema.load_state_dict(blob["ema"])
        raw.load_state_dict(blob["raw"])
        print(f"pre-trained model loaded from {path}")
    else:
        ema, raw = fit_pair(raw)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"ema": ema.state_dict(), "raw": raw.state_dict()}, path)
        print(f"pre-trained in {time.time() - t0:.1f}s -> {path}")
    return ema.eval(), raw.eval()


def exp_decay(lr: float, ratio: float, steps: int) -> Callable[[int], float]:
    """lr * ratio^(step / (steps - 1)): from ``lr`` to ``ratio * lr``."""
    return lambda step: lr * (ratio ** (step / max(steps - 1, 1)))


def cosine_decay(lr: float, floor: float, steps: int) -> Callable[[int], float]:
    """Cosine from ``lr`` down to ``floor * lr``."""

    def at(step: int) -> float:
        cosine = 0.5 * (1 + math.cos(math.pi * step / max(steps - 1, 1)))
        return lr * (floor + (1 - floor) * cosine)

    return at


def fit(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    steps: int,
    lr_at: Callable[[int], float],
    loss_at: Callable[[int], torch.Tensor],
    *,
    ema: float | None = None,
    log_every: int = 0,
    keep_raw: bool = False,
) -> nn.Module | tuple[nn.Module, nn.Module]:
    """``steps`` optimizer steps on ``loss_at(step)`` with lr ``lr_at(step)``; returns the
    model, or its EMA (decay ``ema`` per step) when ``ema`` is set, in eval mode; with
    ``keep_raw`` the pair (that, the raw model)."""
    average = copy.deepcopy(model).requires_grad_(False) if ema else None
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = loss_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if average is not None:
            update_ema(average, model, ema)
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"  pretrain step {step}: loss {loss.item():.4f}")
    out = average if average is not None else model
    out = out.eval().requires_grad_(True)
    return (out, model.eval()) if keep_raw else out


def edm_denoising_loss(
    model: nn.Module,
    adapter: EDMDenoiser,
    x: torch.Tensor,
    labels: torch.Tensor | None,
    generator: torch.Generator,
) -> torch.Tensor:
    """EDM's training loss mean lambda(sigma) |D(x + sigma eps; sigma) - x|^2 (Karras et al.
    2022, Eq. 2 and 8) with (sigma, eps) from the adapter's ``draw``."""
    noise = adapter.draw(len(x), tuple(x.shape[1:]), generator)
    sigma = noise["sigma"]
    noisy = x + bcast(sigma, x) * noise["eps"]
    err = (model(noisy, sigma, labels) - x).square()
    return (bcast(adapter.weight(sigma), x) * err).mean()
