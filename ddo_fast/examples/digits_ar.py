"""``ddo-fast train --preset digits-ar``: DDO on a class-conditional autoregressive digit model,
under the held-out, multi-seed protocol of :mod:`ddo_fast.examples.digits`.

Pixels are quantised to ``levels`` grey levels and flattened to 64 tokens; a small
class-conditional causal transformer (pre-norm, class token first) is pre-trained on the seed's
train part by next-token likelihood (:meth:`~ddo_fast.adapters.CausalAR.mle_loss`; cached), then
fine-tuned by DDO with :class:`~ddo_fast.adapters.CausalAR`; the MLE control continues the
likelihood under the same TrainConfig. The model is deliberately small (it cannot fit the data,
so maximum likelihood spreads its mass: the regime the paper's VAR gains come from). Samples are
de-quantised and scored against the original pixels. Settings: the ``digits-ar`` row of
:data:`ddo_fast.examples.presets.PRESETS`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import adapters as A
from ..models import CausalTransformer
from ..training import TrainConfig
from ..training.data import generator
from .digits import EMA_BASELINE_NOTES, SeedSetup, Split, run_protocol
from .presets import preset_runner
from .pretrain import cached_pretrain_pair, cosine_decay, fit


def quantise(pixels: torch.Tensor, levels: int) -> torch.Tensor:
    """Pixels in [0, 16] -> tokens round(p / 16 * (levels - 1)) in [0, levels)."""
    return torch.round(pixels / 16.0 * (levels - 1)).long()


def dequantise(tokens: torch.Tensor, levels: int) -> torch.Tensor:
    """Tokens -> pixels in [-1, 1]."""
    return tokens.float() / (levels - 1) * 2.0 - 1.0


def pretrain(
    model: CausalTransformer,
    adapter: A.CausalAR,
    tokens: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    seed: int,
    batch: int = 64,
    lr: float = 1e-3,
    floor: float = 0.01,
) -> tuple[CausalTransformer, CausalTransformer]:
    """Next-token cross-entropy (nats/token; the adapter's ``mle_loss``), AdamW, cosine lr from
    ``lr`` to ``floor`` of it, EMA 0.999; returns (EMA, raw)."""
    g = generator(seed, "pretrain")
    torch.manual_seed(seed)

    def loss_at(step: int) -> torch.Tensor:
        idx = torch.randint(len(tokens), (batch,), generator=g)
        noise = adapter.draw(batch, tuple(tokens.shape[1:]), g)
        return adapter.mle_loss(model, (tokens[idx], y[idx]), noise)

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    lr_at = cosine_decay(lr, floor, steps)
    return fit(model, opt, steps, lr_at, loss_at, ema=0.999, log_every=2000, keep_raw=True)


run = preset_runner("digits-ar")


def build(
    out: Path,
    cfg: TrainConfig,
    *,
    levels: int,
    pretrain_steps: int,
    pretrain_lr: float,
    dim: int,
    layers: int,
    seeds: list[int],
    control: bool,
    plot: bool,
    eval_samples: int,
    classifier_steps: int,
) -> dict:
    adapter = A.CausalAR(seq_len=64)

    def generate(m, labels, g):
        return dequantise(m.sample(len(labels), labels, g), levels)

    def make_model() -> CausalTransformer:
        return CausalTransformer(levels, 64, 10, dim=dim, layers=layers)

    def setup(split: Split, seed: int, cache: Path) -> SeedSetup:
        tokens = quantise((split.x_train + 1.0) * 8.0, levels)  # back to [0, 16] first
        y = split.y_train
        name = f"pretrained-ar-{levels}-{dim}-{layers}-{pretrain_steps}-{pretrain_lr}-{seed}.pt"
        with torch.random.fork_rng():
            torch.manual_seed(seed)  # the initial weights
            ema, raw = cached_pretrain_pair(
                cache / name,
                make_model,
                lambda m: pretrain(m, adapter, tokens, y, pretrain_steps, seed, lr=pretrain_lr),
            )
        info = {
            "levels": levels,
            "pretrain_steps": pretrain_steps,
            "pretrain_lr": pretrain_lr,
            "dim": dim,
            "layers": layers,
            "sampler": "ancestral, temperature 1, class token first, no guidance",
        }
        return SeedSetup(ema, raw, adapter, (tokens, y), generate, info)

    return run_protocol(
        out,
        "digits-ar",
        cfg,
        seeds,
        setup,
        plot=plot,
        control=control,
        notes=EMA_BASELINE_NOTES,
        eval_samples=eval_samples,
        classifier_steps=classifier_steps,
    )
