"""EDM / EDM2 denoisers ``D(x_noisy, sigma, labels)`` (Karras et al. 2022), called the way
ddo_fast, k-diffusion or EDM2 call them."""

from __future__ import annotations

from dataclasses import dataclass, field
from numbers import Integral
from typing import Any

import torch

from ._calls import model_output, one_hot_labels
from .base import Adapter, Batch, LossOutput, batched, bcast, paired_diffusion_loss

CALLS = ("ddo", "k-diffusion", "edm2")


def edm_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """EDM's loss weighting lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2
    (Karras et al. 2022, Table 1; = 1 / c_out^2, so lambda |D - x|^2 = |F - F_target|^2). DDO
    uses it in the ELBO-gap estimate r (DDO Eq. 14-16); usable without an adapter."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


@dataclass
class EDMDenoiser(Adapter):
    """EDM denoiser D(x_noisy; sigma, labels), the preconditioned output (Karras et al. 2022).

    How the model is called (``call``; ``model_kwargs``: constant keyword arguments added to
    every call, e.g. ``{"force_fp32": True}``):

    * ``"ddo"`` (default): ``model(x_noisy, sigma [N], labels | None)`` (this package's
      :class:`~ddo_fast.models.EDMPrecond`).
    * ``"k-diffusion"``: ``model(x_noisy, sigma [N], **extra_args)``, the labels (when there are
      some) as the keyword ``label_key`` (default ``"class_cond"``, k-diffusion's name; e.g.
      ``"class_labels"`` or ``"y"`` for other code bases).
    * ``"edm2"``: ``model(x_noisy, sigma [N], class_labels)`` as EDM's and EDM2's ``Precond``:
      integer labels [N] become float32 one-hot [N, label_dim] (``label_dim``, else the
      model's ``label_dim`` attribute); floating labels pass as they are; None stays None.

    Outputs may be a tensor, a tuple (first element: EDM2's ``return_logvar=True``) or an
    object with ``.sample``.

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
    call: str = "ddo"
    label_key: str = "class_cond"
    label_dim: int | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.call not in CALLS:
            raise ValueError(f"call must be one of {CALLS}, got {self.call!r}")
        if not isinstance(self.label_key, str) or not self.label_key.isidentifier():
            raise ValueError(f"label_key must be a keyword name, got {self.label_key!r}")
        d = self.label_dim
        if d is not None and (isinstance(d, bool) or not isinstance(d, Integral) or d < 1):
            raise ValueError(f"label_dim must be None or an int >= 1, got {d!r}")
        self.label_dim = None if d is None else int(d)
        for name in ("steps", "sample_batch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, Integral) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
            setattr(self, name, int(v))  # a numpy integer becomes a plain one (cache keys)

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

    def denoise(self, net, x_noisy, sigma, labels):
        """D(x_noisy; sigma, labels), called by the ``call`` convention."""
        if self.call == "ddo":
            out = net(x_noisy, sigma, labels, **self.model_kwargs)
        elif self.call == "k-diffusion":
            extra = dict(self.model_kwargs)
            if labels is not None:
                extra[self.label_key] = labels
            out = net(x_noisy, sigma, **extra)
        else:  # edm2
            out = net(
                x_noisy, sigma, one_hot_labels(net, labels, self.label_dim), **self.model_kwargs
            )
        return model_output(out)

    def loss(self, model, ref, real, fake, noise, *, alpha, beta) -> LossOutput:
        return paired_diffusion_loss(
            self, model, ref, real, fake, noise["sigma"], noise["eps"], alpha=alpha, beta=beta
        )

    def mle_loss(self, model, real: Batch, noise: dict[str, torch.Tensor]) -> torch.Tensor:
        """EDM's denoising loss on the real rows (Karras et al. 2022, Eq. 2 and 8):
        mean over rows and elements of lambda(sigma) (D(x + sigma eps; sigma) - x)^2, fp32, with
        (sigma [B], eps [B, ...]) of :meth:`draw` (the pair's draws of the same step). Per row it
        is 1/numel(x_b) of theta's term sum lambda (D_theta - x)^2 in r, and it is what
        pre-training minimises (``ddo_fast.examples.pretrain.edm_denoising_loss``)."""
        x, labels = real
        sigma = noise["sigma"].to(x.device, x.dtype)
        x_noisy = x + bcast(sigma, x) * noise["eps"].to(x.device, x.dtype)
        err = (self.denoise(model, x_noisy, sigma, labels).float() - x.float()).square()
        return (bcast(self.weight(sigma.float()), err) * err).mean()

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
                d = (x - self.denoise(model, x.float(), s.float().expand(m), lab).double()) / s
                x_next = x + (s_next - s) * d
                if s_next > 0:  # Heun's second-order correction
                    d_next = self.denoise(model, x_next.float(), s_next.float().expand(m), lab)
                    d2 = (x_next - d_next.double()) / s_next
                    x_next = x + (s_next - s) * 0.5 * (d + d2)
                x = x_next
            out.append(x.float())
        return torch.cat(out)

    def sampler_config(self):
        cfg: dict[str, Any] = {
            "kind": "edm-heun",
            "steps": self.steps,
            "sigma_min": self.sigma_min,
            "sigma_max": self.sigma_max,
            "rho": self.rho,
        }
        if self.call != "ddo":  # only then: the keys of existing runs' fake caches stay
            cfg.update(call=self.call, label_key=self.label_key, label_dim=self.label_dim)
        if self.model_kwargs:
            cfg["model_kwargs"] = repr(sorted(self.model_kwargs.items()))
        return cfg
