"""Model adapters: turn (model, frozen reference, real batch, fake batch) into the fused DDO loss.

An adapter knows how a model family computes its log-likelihood surrogate and how to sample it:

* :class:`EDMDenoiser` - EDM/EDM2 denoisers ``D(x_noisy, sigma, labels)``; one ln sigma and one
  noise draw per real/fake pair, shared by theta and ref; EDM weighting
  ``lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2``; EDM Heun sampler.
* :class:`EpsilonDiffusion` - epsilon-prediction models with a discrete noise schedule
  (``model(x_t, t[, labels])``, diffusers-style ``.sample`` outputs accepted); DDIM sampler.
* :class:`CausalAR` - autoregressive models ``model(tokens [B, L], labels) -> logits [B, L, V]``
  whose ``logits[:, i]`` predicts ``tokens[:, i]`` from ``tokens[:, :i]`` (the model prepends its
  own start/class token); ancestral sampler (or the model's own ``sample``).

Every adapter runs theta and ref on the same inputs (same noise, same labels) in one forward
over the concatenated [real; fake] batch, and returns the loss and the per-sample log-ratios.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .ops import ar_ddo_loss, diffusion_ddo_loss, sequence_logprob

Batch = tuple[torch.Tensor, "torch.Tensor | None"]


def _pair_mask(batch: int, device: torch.device) -> torch.Tensor:
    """is_real for a concatenated [real; fake] batch of 2 * batch rows."""
    mask = torch.zeros(2 * batch, dtype=torch.bool, device=device)
    mask[:batch] = True
    return mask


def _cat_labels(real: torch.Tensor | None, fake: torch.Tensor | None) -> torch.Tensor | None:
    if real is None and fake is None:
        return None
    if real is None or fake is None:
        raise ValueError("real and fake batches must both have labels or both have none")
    return torch.cat([real, fake])


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.dim() - 1)))


@dataclass
class LossOutput:
    loss: torch.Tensor
    logratio: torch.Tensor  # [2B]: real rows first, then fake rows (detached)


class Adapter:
    """Interface of an adapter (see module docstring). Every adapter has a ``backend`` field
    (None = ``$DDO_FAST_BACKEND`` / auto) passed to the loss functions."""

    backend: str | None = None

    def draw(
        self, batch: int, sample_shape: tuple[int, ...], generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """Random inputs of one step for ``batch`` pairs, drawn on the CPU from ``generator``
        (so runs on any device and any number of ranks draw the same numbers)."""
        return {}

    def loss(
        self,
        model: nn.Module,
        ref: nn.Module,
        real: Batch,
        fake: Batch,
        noise: dict[str, torch.Tensor],
        *,
        alpha: float,
        beta: float,
    ) -> LossOutput:
        raise NotImplementedError

    @torch.no_grad()
    def sample(
        self,
        model: nn.Module,
        n: int,
        labels: torch.Tensor | None,
        generator: torch.Generator,
        device: torch.device,
    ) -> torch.Tensor:
        raise NotImplementedError

    def sampler_config(self) -> dict[str, Any]:
        """What determines the samples besides weights and seed (part of the fake-cache key)."""
        return {}


# ----------------------------------------------------------------------------------------- EDM
@dataclass
class EDMDenoiser(Adapter):
    """EDM denoiser ``model(x_noisy, sigma [N], labels | None) -> D(x_noisy; sigma)``.

    Training noise: ln sigma ~ N(P_mean, P_std^2), one (sigma, eps) per real/fake pair.
    Sampling: EDM's deterministic Heun sampler with ``steps`` steps (rho=7).
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

    def loss(self, model, ref, real, fake, noise, *, alpha, beta):
        x = torch.cat([real[0], fake[0]])
        labels = _cat_labels(real[1], fake[1])
        sigma = noise["sigma"].to(x.device, x.dtype).repeat(2)
        eps = noise["eps"].to(x.device, x.dtype).repeat(2, *([1] * (x.dim() - 1)))
        x_noisy = x + _bcast(sigma, x) * eps
        pred = model(x_noisy, sigma, labels)
        with torch.no_grad():
            pred_ref = ref(x_noisy, sigma, labels)
        loss, r = diffusion_ddo_loss(
            pred,
            pred_ref,
            x,
            self.weight(sigma),
            _pair_mask(real[0].shape[0], x.device),
            alpha=alpha,
            beta=beta,
            return_logratio=True,
            backend=self.backend,
        )
        return LossOutput(loss, r.detach())

    def sigmas(self, device: torch.device) -> torch.Tensor:
        i = torch.arange(self.steps, dtype=torch.float64, device=device)
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        t = (hi + i / max(self.steps - 1, 1) * (lo - hi)) ** self.rho
        return torch.cat([t, t.new_zeros(1)])

    @torch.no_grad()
    def sample(self, model, n, labels, generator, device, shape=None):
        if shape is None:
            raise ValueError("EDMDenoiser.sample needs the sample shape")
        out = []
        for start in range(0, n, self.sample_batch):
            m = min(self.sample_batch, n - start)
            lab = None if labels is None else labels[start : start + m].to(device)
            x = torch.randn(m, *shape, generator=generator).to(device, torch.float64)
            sig = self.sigmas(device)
            x = x * sig[0]
            for i in range(self.steps):
                s, s_next = sig[i], sig[i + 1]
                d = (x - model(x.float(), s.float().expand(m), lab).double()) / s
                x_next = x + (s_next - s) * d
                if s_next > 0:
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


# ------------------------------------------------------------------------------ epsilon / DDIM
def _unwrap(out: Any) -> torch.Tensor:
    return out.sample if hasattr(out, "sample") else out


@dataclass
class EpsilonDiffusion(Adapter):
    """Epsilon-prediction model ``model(x_t, t[, labels])`` with ``alphas_cumprod`` [T].

    Training: one t ~ U{0..T-1} and one eps per pair; ``r = -w(t) sum(|eps_theta - eps|^2 -
    |eps_ref - eps|^2)`` with unit weight (the simple-loss ELBO surrogate). Sampling: DDIM
    (eta = 0) over ``steps`` evenly spaced timesteps.
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

    def _call(self, model, x, t, labels):
        return _unwrap(model(x, t) if labels is None else model(x, t, labels))

    def draw(self, batch, sample_shape, generator):
        t = torch.randint(0, len(self.alphas_cumprod), (batch,), generator=generator)
        return {"t": t, "eps": torch.randn(batch, *sample_shape, generator=generator)}

    def loss(self, model, ref, real, fake, noise, *, alpha, beta):
        x = torch.cat([real[0], fake[0]])
        labels = _cat_labels(real[1], fake[1])
        t = noise["t"].repeat(2).to(x.device)
        eps = noise["eps"].to(x.device, x.dtype).repeat(2, *([1] * (x.dim() - 1)))
        abar = self.alphas_cumprod.to(x.device)[t].to(x.dtype)
        x_t = _bcast(abar.sqrt(), x) * x + _bcast((1 - abar).sqrt(), x) * eps
        pred = self._call(model, x_t, t, labels)
        with torch.no_grad():
            pred_ref = self._call(ref, x_t, t, labels)
        weight = torch.ones(x.shape[0], device=x.device)
        loss, r = diffusion_ddo_loss(
            pred,
            pred_ref,
            eps,
            weight,
            _pair_mask(real[0].shape[0], x.device),
            alpha=alpha,
            beta=beta,
            return_logratio=True,
            backend=self.backend,
        )
        return LossOutput(loss, r.detach())

    @torch.no_grad()
    def sample(self, model, n, labels, generator, device, shape=None):
        if shape is None:
            raise ValueError("EpsilonDiffusion.sample needs the sample shape")
        abar = self.alphas_cumprod.to(device)
        ts = torch.linspace(len(abar) - 1, 0, self.steps, device=device).round().long()
        out = []
        for start in range(0, n, self.sample_batch):
            m = min(self.sample_batch, n - start)
            lab = None if labels is None else labels[start : start + m].to(device)
            x = torch.randn(m, *shape, generator=generator).to(device)
            for i, t in enumerate(ts):
                a = abar[t]
                a_prev = abar[ts[i + 1]] if i + 1 < len(ts) else abar.new_tensor(1.0)
                eps = self._call(model, x, t.expand(m), lab).double()
                x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
                x = (a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps).float()
            out.append(x)
        return torch.cat(out)

    def sampler_config(self):
        return {"kind": "ddim", "steps": self.steps, "T": len(self.alphas_cumprod)}


# --------------------------------------------------------------------------------- causal AR
@dataclass
class CausalAR(Adapter):
    """Autoregressive model ``model(tokens [B, L], labels | None) -> logits [B, L, V]``.

    ``ref_logprob`` comes from ``sequence_logprob`` of the reference under no_grad. With
    ``null_label`` set (classifier-free-guidance training data), a share ``uncond_ratio`` of pairs
    get the null label; those rows get no fake term and a real weight of max(alpha, 1), and with
    ``normalize_alpha`` the loss is divided by max(alpha, 1) - the official VAR recipe.
    Sampling uses ``model.sample(n, labels, generator)`` when the model has one (e.g. with a KV
    cache), else a plain token-by-token loop with ``temperature``.
    """

    seq_len: int = 0
    null_label: int | None = None
    uncond_ratio: float = 0.0
    normalize_alpha: bool = False
    temperature: float = 1.0
    sample_batch: int = 1024
    backend: str | None = None

    def draw(self, batch, sample_shape, generator):
        return {"uncond": torch.rand(batch, generator=generator) < self.uncond_ratio}

    def loss(self, model, ref, real, fake, noise, *, alpha, beta):
        tokens = torch.cat([real[0], fake[0]]).long()
        labels = _cat_labels(real[1], fake[1])
        batch = real[0].shape[0]
        weight = None
        if self.null_label is not None and labels is not None and self.uncond_ratio > 0:
            uncond = noise["uncond"].to(tokens.device).repeat(2)
            labels = torch.where(uncond, torch.full_like(labels, self.null_label), labels)
            weight = torch.ones(2 * batch, device=tokens.device)
            weight[:batch] = torch.where(uncond[:batch], max(alpha, 1.0), 1.0)
            weight[batch:] = torch.where(uncond[batch:], 0.0, 1.0)
        with torch.no_grad():
            ref_lp = sequence_logprob(ref(tokens, labels), tokens, backend=self.backend)
        logits = model(tokens, labels)
        loss, r = ar_ddo_loss(
            logits,
            tokens,
            ref_lp,
            _pair_mask(batch, tokens.device),
            alpha=alpha,
            beta=beta,
            sample_weight=weight,
            return_logratio=True,
            backend=self.backend,
        )
        if self.normalize_alpha:
            loss = loss / max(alpha, 1.0)
        return LossOutput(loss, r.detach())

    @torch.no_grad()
    def sample(self, model, n, labels, generator, device, shape=None):
        own = getattr(model, "sample", None)
        out = []
        for start in range(0, n, self.sample_batch):
            m = min(self.sample_batch, n - start)
            lab = None if labels is None else labels[start : start + m].to(device)
            if callable(own):
                out.append(own(m, lab, generator).cpu())
                continue
            tokens = torch.zeros(m, self.seq_len, dtype=torch.long, device=device)
            for i in range(self.seq_len):
                logits = model(tokens[:, : i + 1], lab)[:, i].double() / self.temperature
                u = torch.rand(m, 1, generator=generator, dtype=torch.float64).to(device)
                cdf = logits.softmax(-1).cumsum(-1)
                tokens[:, i] = (cdf < u).sum(-1).clamp_max(logits.shape[-1] - 1)
            out.append(tokens.cpu())
        return torch.cat(out)

    def sampler_config(self):
        return {"kind": "ancestral", "seq_len": self.seq_len, "temperature": self.temperature}


def edm_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """lambda(sigma) of EDM (also usable without an adapter)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


__all__ = ["Adapter", "CausalAR", "EDMDenoiser", "EpsilonDiffusion", "LossOutput", "edm_weight"]
