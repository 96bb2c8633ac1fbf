"""``ddo-fast train --preset digits-diffusion``: DDO on a class-conditional EDM digit model,
under the held-out, multi-seed protocol of :mod:`ddo_fast.examples.digits`.

A class-conditional EDM denoiser (an MLP, 3 hidden layers of 256, sigma_data 0.5; pixels in
[-1, 1]) is pre-trained on the seed's train part by plain denoising
(:meth:`~ddo_fast.adapters.EDMDenoiser.mle_loss`, Karras et al. 2022 Eq. 2) for a fixed budget
(cached), then fine-tuned by DDO with :class:`~ddo_fast.adapters.EDMDenoiser` and fakes from the
EDM Heun sampler; the MLE control continues the denoising loss under the same TrainConfig.
Guidance-free evaluation. Settings: the ``digits-diffusion`` row of
:data:`ddo_fast.examples.presets.PRESETS`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import adapters as A
from ..models import EDMPrecond, MLPDenoiser
from ..training import TrainConfig
from ..training.data import generator
from .digits import EMA_BASELINE_NOTES, SeedSetup, Split, run_protocol
from .presets import preset_runner
from .pretrain import cached_pretrain_pair, exp_decay, fit


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
) -> tuple[EDMPrecond, EDMPrecond]:
    """Plain EDM denoising (the adapter's ``mle_loss``), Adam, lr ``lr`` -> ``lr_end``
    (exponential), EMA 0.999; returns (EMA, raw)."""
    g = generator(seed, "pretrain")
    torch.manual_seed(seed)

    def loss_at(step: int) -> torch.Tensor:
        idx = torch.randint(len(x), (batch,), generator=g)
        noise = adapter.draw(batch, tuple(x.shape[1:]), g)
        return adapter.mle_loss(model, (x[idx], y[idx]), noise)

    opt = torch.optim.Adam(model.parameters(), lr=lr)
    lr_at = exp_decay(lr, lr_end / lr, steps)
    return fit(model, opt, steps, lr_at, loss_at, ema=0.999, keep_raw=True)


run = preset_runner("digits-diffusion")


def build(
    out: Path,
    cfg: TrainConfig,
    *,
    pretrain_steps: int,
    sample_steps: int,
    seeds: list[int],
    control: bool,
    plot: bool,
    eval_samples: int,
    classifier_steps: int,
) -> dict:
    adapter = A.EDMDenoiser(
        sigma_data=0.5, P_mean=-1.2, P_std=1.2, steps=sample_steps, sample_batch=2048
    )

    def generate(m, labels, g):
        return adapter.sample(m, len(labels), labels, g, torch.device("cpu"), (64,))

    def setup(split: Split, seed: int, cache: Path) -> SeedSetup:
        x, y = split.x_train, split.y_train
        with torch.random.fork_rng():  # initial weights from the seed, not from what ran before
            torch.manual_seed(seed)
            ema, raw = cached_pretrain_pair(
                cache / f"pretrained-diffusion-{pretrain_steps}-{seed}.pt",
                make_model,
                lambda m: pretrain(m, adapter, x, y, pretrain_steps, seed),
            )
        info = {
            "pretrain_steps": pretrain_steps,
            "sample_steps": sample_steps,
            "sampler": f"EDM Heun (Karras et al. 2022 Alg. 1), {sample_steps} steps, no guidance",
        }
        return SeedSetup(ema, raw, adapter, (x, y), generate, info)

    return run_protocol(
        out,
        "digits-diffusion",
        cfg,
        seeds,
        setup,
        plot=plot,
        control=control,
        notes=EMA_BASELINE_NOTES,
        eval_samples=eval_samples,
        classifier_steps=classifier_steps,
    )
