"""Epsilon-prediction diffusion models with a discrete noise schedule (DDPM / diffusers style)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .base import Adapter, LossOutput, batched, bcast, paired_diffusion_loss


def _unwrap(out: Any) -> torch.Tensor:
    """diffusers models return an object with ``.sample``; plain modules a tensor."""
    return out.sample if hasattr(out, "sample") else out


@dataclass
class EpsilonDiffusion(Adapter):
    """Epsilon-prediction model ``model(x_t, t[, labels])`` with ``alphas_cumprod`` [T].

    Training: one t ~ U{0..T-1} and one eps per pair, shared by theta and ref
    (:func:`~ddo_fast.adapters.base.paired_diffusion_loss`);
    ``r = -sum(|eps_theta - eps|^2 - |eps_ref - eps|^2)`` with unit weight (the simple-loss
    ELBO surrogate, DDO Eq. 14-15 with w(t) = 1). Sampling: DDIM (eta = 0) over ``steps``
    evenly spaced timesteps.
    """

    alphas_cumprod: torch.Tensor | None = None
    steps: int = 50
    sample_batch: int = 1024
    backend: str | None = None

    def __post_init__(self) -> None:
        if self.alphas_cumprod is None:  # DDPM's linear beta schedule, T = 1000
            betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
            self.alphas_cumprod = torch.cumprod(1 - betas, 0)
        self.alphas_cumprod = self.alphas_cumprod.double().cpu()

    @staticmethod
    def denoise(net, x, t, labels):
        """eps_theta(x_t, t[, labels]) (labels only when there are some)."""
        return _unwrap(net(x, t) if labels is None else net(x, t, labels))

    def draw(self, batch, sample_shape, generator):
        t = torch.randint(0, len(self.alphas_cumprod), (batch,), generator=generator)
        return {"t": t, "eps": torch.randn(batch, *sample_shape, generator=generator)}

    def corrupt(self, x, t, eps):
        """x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps; target eps; weight 1."""
        abar = self.alphas_cumprod.to(x.device)[t].to(x.dtype)
        x_t = bcast(abar.sqrt(), x) * x + bcast((1 - abar).sqrt(), x) * eps
        return x_t, eps, torch.ones(x.shape[0], device=x.device)

    def loss(self, model, ref, real, fake, noise, *, alpha, beta) -> LossOutput:
        return paired_diffusion_loss(
            self, model, ref, real, fake, noise["t"], noise["eps"], alpha=alpha, beta=beta
        )

    @torch.no_grad()
    def sample(self, model, n, labels, generator, device, shape):
        abar = self.alphas_cumprod.to(device)
        ts = torch.linspace(len(abar) - 1, 0, self.steps, device=device).round().long()
        out = []
        for m, lab in batched(n, self.sample_batch, labels, device):
            x = torch.randn(m, *shape, generator=generator).to(device)
            for i, t in enumerate(ts):
                a = abar[t]
                a_prev = abar[ts[i + 1]] if i + 1 < len(ts) else abar.new_tensor(1.0)
                eps = self.denoise(model, x, t.expand(m), lab).double()
                x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
                x = (a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps).float()
            out.append(x)
        return torch.cat(out)

    def sampler_config(self):
        return {"kind": "ddim", "steps": self.steps, "T": len(self.alphas_cumprod)}
