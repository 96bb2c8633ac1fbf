"""``ddo-fast train --preset digits-ar``: DDO on a class-conditional autoregressive digit model.

Pixels are quantised to ``levels`` grey levels and flattened to 64 tokens; a small
class-conditional causal transformer (2 pre-norm layers, 128-d, class token first) is pre-trained
by next-token likelihood (cached in the output folder), then fine-tuned by DDO rounds with
:class:`~ddo_fast.adapters.CausalAR`. Evaluation as in :mod:`ddo_fast.examples.digits`, on the
de-quantised samples against the original data.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import adapters as A
from ..training import TrainConfig
from ..training.data import generator
from ..training.loop import update_ema
from .digits import Evaluator, cached_pretrain, load_scaled, run_ddo, train_classifier
from .models import CausalTransformer


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
    """Next-token cross-entropy, cosine lr from `lr` to `floor` of it, EMA 0.999 (returned)."""
    g = generator(seed, "pretrain")
    torch.manual_seed(seed)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            cosine = 0.5 * (1 + math.cos(math.pi * step / max(steps - 1, 1)))
            group["lr"] = lr * (floor + (1 - floor) * cosine)
        idx = torch.randint(len(tokens), (batch,), generator=g)
        logits = model(tokens[idx], y[idx])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[idx].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        update_ema(ema, model, 0.999)
        if step % 1000 == 0 or step == steps - 1:
            print(f"  pretrain step {step}: {loss.item():.3f} nats/token")
    return ema.eval().requires_grad_(True)


def run(
    out: Path,
    *,
    seed: int = 0,
    levels: int = 8,
    pretrain_steps: int = 3000,
    dim: int = 64,
    layers: int = 2,
    plot: bool = True,
    run_name: str = "ddo",
    control_mle: bool = False,
    **overrides,
) -> dict:
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
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
    cfg = TrainConfig(
        alpha=1.0,
        beta=1.0,
        lr=1e-5,
        batch_size=64,
        steps_per_round=300,
        rounds=1,
        fake_samples_per_round=2000,
        seed=seed,
        out_dir=str(out / run_name),
        eval_every=50,
        select_best_by="min:fd",
        device="cpu",
        log_every=25,
    ).replace(**overrides)
    extra: dict = {"levels": levels}
    if control_mle:  # the same steps and samples spent on more likelihood training instead
        ctrl = pretrain(
            copy.deepcopy(model).train(),
            tokens,
            y,
            cfg.steps_per_round * cfg.rounds,
            seed + 1,
            batch=2 * cfg.batch_size,
            lr=cfg.lr,
            floor=1.0,
        )
        extra["MLE control feature FD (report seed)"] = round(evaluate(ctrl, "report")["fd"], 3)
    return run_ddo(out, "digits-ar", model, (tokens, y), adapter, cfg, evaluate, t0, plot, extra)
