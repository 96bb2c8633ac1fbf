"""``ddo-fast train --preset digits-diffusion``: DDO on a class-conditional EDM digit model.

A class-conditional EDM denoiser (an MLP, 3 hidden layers of 256, sigma_data 0.5; pixels in
[-1, 1]) is pre-trained by plain denoising for a fixed budget (cached in the output folder), then
fine-tuned by DDO rounds with :class:`~ddo_fast.adapters.EDMDenoiser` and fakes from the EDM Heun
sampler; guidance-free evaluation (see :mod:`ddo_fast.examples.digits`). Settings: the
``digits-diffusion`` row of :data:`ddo_fast.examples.presets.PRESETS`.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .. import adapters as A
from ..models import EDMPrecond, MLPDenoiser
from ..training import TrainConfig
from ..training.data import generator
from .digits import Evaluator, load_scaled, mle_control, run_ddo, train_classifier
from .presets import preset_runner
from .pretrain import cached_pretrain, edm_denoising_loss, exp_decay, fit


def make_model() -> EDMPrecond:
    return EDMPrecond(MLPDenoiser(64, hidden=256, layers=3, num_classes=10), sigma_data=0.5)


def pretrain(
    model: EDMPrecond,
    adapter: A.EDMDenoiser,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    seed: int,
    batch: int = 128,
    lr: float = 1e-3,
    lr_end: float = 1e-5,
) -> EDMPrecond:
    """Plain EDM denoising, lr `lr` -> `lr_end` (exponential), EMA 0.999; returns the EMA."""
    g = generator(seed, "pretrain")
    torch.manual_seed(seed)

    def loss_at(step: int) -> torch.Tensor:
        idx = torch.randint(len(x), (batch,), generator=g)
        return edm_denoising_loss(model, adapter, x[idx], y[idx], g)

    opt = torch.optim.Adam(model.parameters(), lr=lr)
    return fit(model, opt, steps, exp_decay(lr, lr_end / lr, steps), loss_at, ema=0.999)


run = preset_runner("digits-diffusion")


def build(
    out: Path,
    cfg: TrainConfig,
    *,
    pretrain_steps: int,
    sample_steps: int,
    plot: bool,
    control_mle: bool,
) -> dict:
    t0 = time.time()
    seed = cfg.seed
    _, x, y = load_scaled()
    clf = train_classifier(x, y, out, seed)
    adapter = A.EDMDenoiser(
        sigma_data=0.5, P_mean=-1.2, P_std=1.2, steps=sample_steps, sample_batch=2048
    )
    torch.manual_seed(seed)
    model = cached_pretrain(
        out / f"pretrained-diffusion-{pretrain_steps}-{seed}.pt",
        make_model(),
        lambda m: pretrain(m, adapter, x, y, pretrain_steps, seed),
    )

    def generate(m, labels, g):
        return adapter.sample(m, len(labels), labels, g, torch.device("cpu"), (64,))

    evaluate = Evaluator(x, y, clf, generate, seed)
    extra: dict = {}
    if control_mle:  # the same steps and samples spent on more denoising training instead
        extra |= mle_control(
            model,
            cfg,
            evaluate,
            lambda m, steps, s, batch, lr: pretrain(m, adapter, x, y, steps, s, batch, lr, lr),
        )
    return run_ddo(out, "digits-diffusion", model, (x, y), adapter, cfg, evaluate, t0, plot, extra)
