"""The 2-D demo (like the paper's Figure 1): DDO sharpens an MLE-trained diffusion model.

Target: a ring of 8 Gaussians (radius 2, std 0.08) with a known log-density. A small EDM MLP
denoiser is pre-trained by plain denoising to convergence; at this capacity its density stays
dispersed between the modes (MLE covers modes). DDO rounds through :func:`ddo_fast.train` then
concentrate it on the modes. Metrics that need no trust: the mean true log-density of generated
samples (higher is better), the share of samples inside a mode, and the smallest mode's share
relative to uniform (coverage: 1.0 = all modes equally hit).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from torch import nn

from .. import adapters as A
from ..models import edm_mlp
from ..training import TrainConfig, train
from ..training.data import generator
from .presets import preset_runner
from .pretrain import cached_pretrain, edm_denoising_loss, exp_decay, fit

MODES, RADIUS, STD = 8, 2.0, 0.08


def centers() -> torch.Tensor:
    angle = torch.arange(MODES, dtype=torch.float64) * (2 * math.pi / MODES)
    return RADIUS * torch.stack([angle.cos(), angle.sin()], 1)


def sample_data(n: int, g: torch.Generator) -> torch.Tensor:
    idx = torch.randint(MODES, (n,), generator=g)
    return (centers()[idx] + STD * torch.randn(n, 2, generator=g, dtype=torch.float64)).float()


def true_logp(x: torch.Tensor) -> torch.Tensor:
    d2 = (x.double()[:, None, :] - centers()[None]).square().sum(-1)
    log_norm = -math.log(MODES) - math.log(2 * math.pi * STD**2)
    return torch.logsumexp(-d2 / (2 * STD**2), 1) + log_norm


# The name the tests and older scripts import; the model lives in ddo_fast.models.
EDMMLP = edm_mlp


def pretrain(model: nn.Module, adapter: A.EDMDenoiser, steps: int, seed: int, batch: int = 512):
    """Plain EDM denoising (MLE) on fresh ring samples, lr decayed 1e-3 -> 1e-5."""
    g = generator(seed, "pretrain")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return fit(
        model,
        opt,
        steps,
        exp_decay(1e-3, 1e-2, steps),
        lambda step: edm_denoising_loss(model, adapter, sample_data(batch, g), None, g),
    )


def metrics(x: torch.Tensor) -> dict[str, float]:
    d = (x.double()[:, None, :] - centers()[None]).norm(dim=-1)
    nearest = d.argmin(1)
    inside = d.min(1).values < 4 * STD
    counts = torch.bincount(nearest[inside], minlength=MODES).double()
    return {
        "logp": true_logp(x).mean().item(),
        "in_mode": inside.double().mean().item(),
        "min_mode_share": (counts.min() / (len(x) / MODES)).item(),
    }


run = preset_runner("toy2d")


def build(
    out: Path, cfg: TrainConfig, *, pretrain_steps: int, eval_samples: int, plot: bool
) -> dict:
    """Pre-train (cached in ``out``), run DDO, print per-round metrics, write demo.png."""
    t0 = time.time()
    seed = cfg.seed
    torch.manual_seed(seed)
    adapter = A.EDMDenoiser(sigma_data=1.0, P_mean=-1.2, P_std=1.2, steps=18)
    model = cached_pretrain(
        out / f"pretrained-edm-mlp-{pretrain_steps}-{seed}.pt",
        edm_mlp(),
        lambda m: pretrain(m, adapter, pretrain_steps, seed),
    )

    def draw(m: nn.Module, purpose: str) -> torch.Tensor:
        # The same noise for every candidate (a paired comparison); the reported before/after
        # numbers use other noise than the selection, so the selection cannot flatter them.
        return adapter.sample(
            m, eval_samples, None, generator(seed, purpose), torch.device("cpu"), (2,)
        )

    def eval_fn(m: nn.Module) -> dict[str, float]:
        return metrics(draw(m, "select"))

    before_x = draw(model, "report")
    before = metrics(before_x)
    print("pretrained: " + ", ".join(f"{k}={v:.4f}" for k, v in before.items()))
    data = sample_data(100_000, generator(seed, "data"))
    result = train(model, data, adapter=adapter, config=cfg, eval_fn=eval_fn)
    after_x = draw(result.model, "report")
    after = metrics(after_x)

    def fmt(name: str, m: dict) -> str:
        return f"{name:26} {m['logp']:8.4f} {m['in_mode']:8.4f} {m['min_mode_share']:15.4f}"

    lines = [
        f"{'':26} {'logp':>8} {'in_mode':>8} {'min_mode_share':>15}",
        fmt("pretrained (report)", before),
    ]
    for row in result.metrics:
        lines.append(fmt(f"round {row['round'] + 1} best (selection)", row))
    lines.append(fmt("after DDO (report)", after))
    table = "\n".join(lines)
    print(table)
    (out / "demo.txt").write_text(table + "\n")
    if plot:
        _plot(out / "demo.png", data[:eval_samples], before_x, after_x, before, after)
    print(f"total {time.time() - t0:.1f}s; files in {out}")
    return {"before": before, "after": after, "rounds": result.metrics}


def _plot(path: Path, data, before_x, after_x, before, after) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no picture (pip install matplotlib)")
        return
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.2), sharex=True, sharey=True)
    panels = [
        ("data", data, None),
        ("pretrained (MLE)", before_x, before),
        ("after DDO", after_x, after),
    ]
    for ax, (title, x, m) in zip(axes, panels, strict=True):
        ax.scatter(x[:, 0], x[:, 1], s=0.3, alpha=0.35, color="tab:blue", rasterized=True)
        if m is not None:
            title += f"\nmean true log-density {m['logp']:.3f}, in a mode {100 * m['in_mode']:.1f}%"
        ax.set_title(title, fontsize=9)
        ax.set_xlim(-3, 3)
        ax.set_ylim(-3, 3)
        ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")
