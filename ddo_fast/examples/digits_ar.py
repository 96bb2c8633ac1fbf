"""``ddo-fast train --preset digits-ar``: DDO on a class-conditional autoregressive digit model.

Pixels are quantised to ``levels`` grey levels and flattened to 64 tokens; a small
class-conditional causal transformer (2 pre-norm layers, class token first) is pre-trained by
next-token likelihood (cached in the output folder), then fine-tuned by DDO rounds with
:class:`~ddo_fast.adapters.CausalAR`. Evaluation as in :mod:`ddo_fast.examples.digits`, on the
de-quantised samples against the original data. Settings: the ``digits-ar`` row of
:data:`ddo_fast.examples.presets.PRESETS`.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import adapters as A
from ..models import CausalTransformer
from ..training import TrainConfig
from ..training.data import generator
from .digits import Evaluator, load_scaled, mle_control, run_ddo, train_classifier
from .presets import preset_runner
from .pretrain import cached_pretrain, cosine_decay, fit


def quantise(pixels: torch.Tensor, levels: int) -> torch.Tensor:
    return torch.round(pixels / 16.0 * (levels - 1)).long()


def dequantise(tokens: torch.Tensor, levels: int) -> torch.Tensor:
    return tokens.float() / (levels - 1) * 2.0 - 1.0


def pretrain(
    model: CausalTransformer,
    tokens: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    seed: int,
    batch: int = 64,
    lr: float = 1e-3,
    floor: float = 0.01,
) -> CausalTransformer:
    """Next-token cross-entropy (nats/token), cosine lr from `lr` to `floor` of it, EMA 0.999
    (returned)."""
    g = generator(seed, "pretrain")
    torch.manual_seed(seed)

    def loss_at(step: int) -> torch.Tensor:
        idx = torch.randint(len(tokens), (batch,), generator=g)
        logits = model(tokens[idx], y[idx])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[idx].reshape(-1))

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    lr_at = cosine_decay(lr, floor, steps)
    return fit(model, opt, steps, lr_at, loss_at, ema=0.999, log_every=1000)


run = preset_runner("digits-ar")


def build(
    out: Path,
    cfg: TrainConfig,
    *,
    levels: int,
    pretrain_steps: int,
    dim: int,
    layers: int,
    plot: bool,
    control_mle: bool,
) -> dict:
    t0 = time.time()
    seed = cfg.seed
    pixels, x, y = load_scaled()
    tokens = quantise(pixels, levels)
    clf = train_classifier(x, y, out, seed)
    torch.manual_seed(seed)
    model = cached_pretrain(
        out / f"pretrained-ar-{levels}-{dim}-{layers}-{pretrain_steps}-{seed}.pt",
        CausalTransformer(levels, 64, 10, dim=dim, layers=layers),
        lambda m: pretrain(m, tokens, y, pretrain_steps, seed),
    )
    adapter = A.CausalAR(seq_len=64)

    def generate(m, labels, g):
        return dequantise(m.sample(len(labels), labels, g), levels)

    evaluate = Evaluator(x, y, clf, generate, seed)
    extra: dict = {"levels": levels}
    if control_mle:  # the same steps and samples spent on more likelihood training instead
        extra |= mle_control(
            model,
            cfg,
            evaluate,
            lambda m, steps, s, batch, lr: pretrain(m, tokens, y, steps, s, batch, lr, floor=1.0),
        )
    return run_ddo(out, "digits-ar", model, (tokens, y), adapter, cfg, evaluate, t0, plot, extra)
