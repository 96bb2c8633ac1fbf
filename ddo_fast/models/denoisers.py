"""EDM preconditioning and the small raw denoiser networks of the presets and benchmarks.

* :class:`EDMPrecond` - EDM preconditioning around any raw network ``F(x, c_noise, labels)``;
  the result is the ``D(x_noisy, sigma, labels)`` of :class:`ddo_fast.adapters.EDMDenoiser`.
* :class:`MLPDenoiser`, :class:`ConvDenoiser` - raw networks for vectors and images.
* :func:`edm_mlp` - the 2-D demo's denoiser (an EDM-preconditioned :class:`MLPDenoiser`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class EDMPrecond(nn.Module):
    """D(x; sigma) = c_skip x + c_out F(c_in x, c_noise, labels) with c_skip = sd^2/(s^2+sd^2),
    c_out = s sd / sqrt(s^2+sd^2), c_in = 1/sqrt(s^2+sd^2), c_noise = ln(s)/4 (Karras et al.
    2022, Table 1; sd = sigma_data)."""

    def __init__(self, net: nn.Module, sigma_data: float = 0.5) -> None:
        super().__init__()
        self.net, self.sigma_data = net, sigma_data

    def forward(
        self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        sd = self.sigma_data
        s = sigma.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        c_skip = sd**2 / (s**2 + sd**2)
        c_out = s * sd / (s**2 + sd**2).sqrt()
        c_in = 1 / (s**2 + sd**2).sqrt()
        c_noise = sigma.to(x.dtype).log() / 4
        return c_skip * x + c_out * self.net(c_in * x, c_noise, labels)


class FourierFeatures(nn.Module):
    """c_noise [N] -> [sin(a), cos(a)] [N, 2K] with a = c_noise f_k scale, k < K.

    ``harmonic=False``: f_k = 100^(-2k/dim), scale 10 (log-spaced); ``harmonic=True``:
    f_k = k + 1, scale 1 (the 2-D demo's embedding)."""

    def __init__(self, dim: int, harmonic: bool = False) -> None:
        super().__init__()
        k = torch.arange(dim // 2)
        freqs = (k + 1).float() if harmonic else torch.exp(k * (-math.log(100.0) / dim))
        self.scale = 1.0 if harmonic else 10.0
        # Not in the state dict: a function of the constructor arguments.
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        ang = c_noise.reshape(-1, 1) * self.freqs * self.scale
        return torch.cat([ang.sin(), ang.cos()], 1)


class MLPDenoiser(nn.Module):
    """F(x, c_noise, labels) for flat vectors: an MLP (``layers`` hidden layers of ``hidden``,
    SiLU) on [x, noise embedding (``emb``), class embedding (``emb``, if ``num_classes``)]."""

    def __init__(
        self,
        dim: int,
        hidden: int = 256,
        layers: int = 3,
        num_classes: int | None = None,
        emb: int = 32,
        harmonic: bool = False,
    ) -> None:
        super().__init__()
        self.cls = nn.Embedding(num_classes, emb) if num_classes else None
        self.noise_emb = FourierFeatures(emb, harmonic)
        sizes = [dim + emb + (emb if num_classes else 0)] + [hidden] * layers
        mods: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:], strict=True):
            mods += [nn.Linear(a, b), nn.SiLU()]
        self.net = nn.Sequential(*mods, nn.Linear(hidden, dim))

    def forward(self, x, c_noise, labels=None):
        shape = x.shape
        parts = [x.reshape(shape[0], -1), self.noise_emb(c_noise)]
        if self.cls is not None:
            parts.append(self.cls(labels))
        return self.net(torch.cat(parts, 1)).reshape(shape)


class ConvDenoiser(nn.Module):
    """F(x, c_noise, labels) for images: a small two-level U-Net with noise/class FiLM."""

    def __init__(self, channels: int = 4, width: int = 64, num_classes: int | None = None) -> None:
        super().__init__()
        self.noise_emb = FourierFeatures(32)
        self.emb = nn.Linear(32, 2 * width)
        self.cls = nn.Embedding(num_classes, 2 * width) if num_classes else None
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.mid = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.up = nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1)
        self.out = nn.Conv2d(2 * width, channels, 3, padding=1)

    def forward(self, x, c_noise, labels=None):
        e = self.emb(self.noise_emb(c_noise))
        if self.cls is not None:
            e = e + self.cls(labels)
        h0 = F.silu(self.inp(x))
        h1 = F.silu(self.down(h0)) * (1 + e[:, :, None, None])
        h1 = F.silu(self.mid(h1))
        return self.out(torch.cat([F.silu(self.up(h1)), h0], 1))


def edm_mlp(dim: int = 2, hidden: int = 32, layers: int = 3, sigma_data: float = 1.0) -> EDMPrecond:
    """The 2-D demo's denoiser: EDM preconditioning around an MLP with an 8-wide harmonic noise
    embedding."""
    return EDMPrecond(MLPDenoiser(dim, hidden, layers, emb=8, harmonic=True), sigma_data)
