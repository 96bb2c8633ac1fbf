"""``ddo-fast train --preset digits-diffusion``: DDO on a class-conditional EDM digit model.

A class-conditional EDM denoiser (an MLP, 3 hidden layers of 256, sigma_data 0.5; pixels in
[-1, 1]) is pre-trained by plain denoising for a fixed budget (cached in the output folder), then
fine-tuned by DDO rounds with :class:`~ddo_fast.adapters.EDMDenoiser` and fakes from the EDM Heun
sampler; guidance-free evaluation (see :mod:`ddo_fast.examples.digits`).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from .. import adapters as A
from ..training import TrainConfig
from ..training.data import generator
from ..training.loop import update_ema
from .digits import Evaluator, cached_pretrain, load_scaled, run_ddo, train_classifier
from .models import EDMPrecond, MLPDenoiser


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
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * ((lr_end / lr) ** (step / max(steps - 1, 1)))
        idx = torch.randint(len(x), (batch,), generator=g)
        sigma = (torch.randn(batch, generator=g) * adapter.P_std + adapter.P_mean).exp()
        noisy = x[idx] + sigma[:, None] * torch.randn(batch, 64, generator=g)
        loss = adapter.weight(sigma)[:, None] * (model(noisy, sigma, y[idx]) - x[idx]).square()
        opt.zero_grad(set_to_none=True)
        loss.mean().backward()
        opt.step()
        update_ema(ema, model, 0.999)
    return ema.eval().requires_grad_(True)


def run(
    out: Path,
    *,
    seed: int = 0,
    pretrain_steps: int = 20_000,
    sample_steps: int = 18,
    plot: bool = True,
    run_name: str = "ddo",
    control_mle: bool = False,
    **overrides,
) -> dict:
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
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
    cfg = TrainConfig(
        alpha=2.0,
        beta=0.1,
        lr=3e-5,
        batch_size=128,
        steps_per_round=600,
        rounds=1,
        fake_samples_per_round=4000,
        ema=0.99,
        seed=seed,
        out_dir=str(out / run_name),
        eval_every=100,
        select_best_by="min:fd",
        device="cpu",
        log_every=50,
    ).replace(**overrides)
    extra = {}
    if control_mle:  # the same steps and samples spent on more denoising training instead
        ctrl = pretrain(
            copy.deepcopy(model).train(),
            adapter,
            x,
            y,
            cfg.steps_per_round * cfg.rounds,
            seed + 1,
            batch=2 * cfg.batch_size,
            lr=cfg.lr,
            lr_end=cfg.lr,
        )
        extra["MLE control feature FD (report seed)"] = round(evaluate(ctrl, "report")["fd"], 3)
    return run_ddo(out, "digits-diffusion", model, (x, y), adapter, cfg, evaluate, t0, plot, extra)
