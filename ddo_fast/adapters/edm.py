"""EDM / EDM2 denoisers ``D(x_noisy, sigma, labels)`` (Karras et al. 2022)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Adapter, LossOutput, batched, bcast, paired_diffusion_loss


def edm_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """EDM's loss weighting lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2
    (Karras et al. 2022, Table 1; = 1 / c_out^2, so lambda |D - x|^2 = |F - F_target|^2). DDO
    uses it in the ELBO-gap estimate r (DDO Eq. 14-16); usable without an adapter."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


@dataclass
class EDMDenoiser(Adapter):
    """EDM denoiser ``model(x_noisy, sigma [N], labels | None) -> D(x_noisy; sigma)``.

    Training noise: ln sigma ~ N(P_mean, P_std^2), one (sigma, eps) per real/fake pair, shared
    by theta and ref (:func:`~ddo_fast.adapters.base.paired_diffusion_loss`);
    r = -sum lambda(sigma) [(D_theta - x)^2 - (D_ref - x)^2] with :func:`edm_weight`.
    Sampling: EDM's deterministic Heun sampler (Karras et al. 2022, Algorithm 1) with ``steps``
    steps of the rho-schedule between ``sigma_max`` and ``sigma_min``.
    """

    sigma_data: float = 0.5
    P_mean: float = -1.2
    P_std: float = 1.2
    steps: int = 18
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    sample_batch: int = 4096
    backend: str | None = None

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        return edm_weight(sigma, self.sigma_data)

    def draw(self, batch, sample_shape, generator):
        log_sigma = torch.randn(batch, generator=generator) * self.P_std + self.P_mean
        return {
            "sigma": log_sigma.exp(),
            "eps": torch.randn(batch, *sample_shape, generator=generator),
        }

    def corrupt(self, x, sigma, eps):
        """x + sigma eps; target x; weight lambda(sigma)."""
        return x + bcast(sigma, x) * eps, x, self.weight(sigma)

    @staticmethod
    def denoise(net, x_noisy, sigma, labels):
        """D(x_noisy; sigma, labels)."""
        return net(x_noisy, sigma, labels)

    def loss(self, model, ref, real, fake, noise, *, alpha, beta) -> LossOutput:
        return paired_diffusion_loss(
            self, model, ref, real, fake, noise["sigma"], noise["eps"], alpha=alpha, beta=beta
        )

    def sigmas(self, device: torch.device) -> torch.Tensor:
        """sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,
        i < N, then 0 (Karras et al. 2022, Eq. 5), float64."""
        i = torch.arange(self.steps, dtype=torch.float64, device=device)
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        t = (hi + i / max(self.steps - 1, 1) * (lo - hi)) ** self.rho
        return torch.cat([t, t.new_zeros(1)])

    @torch.no_grad()
    def sample(self, model, n, labels, generator, device, shape):
        sig = self.sigmas(device)
        out = []
        for m, lab in batched(n, self.sample_batch, labels, device):
            x = torch.randn(m, *shape, generator=generator).to(device, torch.float64) * sig[0]
            for i in range(self.steps):
                s, s_next = sig[i], sig[i + 1]
                d = (x - model(x.float(), s.float().expand(m), lab).double()) / s
                x_next = x + (s_next - s) * d
                if s_next > 0:  # Heun's second-order correction
                    d2 = (
                        x_next - model(x_next.float(), s_next.float().expand(m), lab).double()
                    ) / s_next
                    x_next = x + (s_next - s) * 0.5 * (d + d2)
                x = x_next
            out.append(x.float())
        return torch.cat(out)

    def sampler_config(self):
        return {
            "kind": "edm-heun",
            "steps": self.steps,
            "sigma_min": self.sigma_min,
            "sigma_max": self.sigma_max,
            "rho": self.rho,
        }
