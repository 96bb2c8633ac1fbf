"""Discrete-time diffusion models with a noise schedule (DDPM / diffusers style), predicting
epsilon, v or x0."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Any

import torch

from ._calls import model_output
from .base import Adapter, Batch, LossOutput, batched, bcast, paired_diffusion_loss

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


# abar_{T-1} of a zero-terminal-SNR schedule, as diffusers' EulerDiscreteScheduler sets it.
ZERO_SNR_ABAR = 2.0**-24


def _ddpm_linear() -> torch.Tensor:
    """abar_t of DDPM's linear beta schedule (1e-4 to 0.02, T = 1000), float64: the default."""
    return torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)


def _checked_schedule(alphas_cumprod: Any) -> torch.Tensor:
    """``alphas_cumprod`` as float64 [T] on the CPU, checked: 1-D, non-empty, strictly
    decreasing, in (0, 1) but for a final 0 (zero terminal SNR), which then becomes
    :data:`ZERO_SNR_ABAR` (as in diffusers, that value may exceed abar_{T-2}: ~4e-9 for the
    rescaled 1000-step linear schedule)."""
    abar = torch.as_tensor(alphas_cumprod).detach().double().cpu().clone()
    if abar.dim() != 1 or len(abar) == 0:
        raise ValueError(
            f"alphas_cumprod must be a non-empty 1-D tensor, got shape {list(abar.shape)}"
        )
    if not bool((abar[1:] < abar[:-1]).all()):
        i = int((abar[1:] >= abar[:-1]).nonzero()[0])
        raise ValueError(
            f"alphas_cumprod must be strictly decreasing in t, got abar[{i}] = "
            f"{abar[i].item():.6g} <= abar[{i + 1}] = {abar[i + 1].item():.6g}"
        )
    if abar[-1] == 0 and len(abar) > 1:
        abar[-1] = ZERO_SNR_ABAR
    if not bool(((abar > 0) & (abar < 1)).all()):
        raise ValueError(
            "alphas_cumprod must have values in (0, 1) (a final 0 is allowed: zero terminal "
            f"SNR), got min {abar.min().item():.3g}, max {abar.max().item():.3g}"
        )
    return abar


@dataclass
class EpsilonDiffusion(Adapter):
    """Diffusion model ``model(x_t, t [N] integer[, conditioning])`` with ``alphas_cumprod``
    [T] (abar_t), predicting ``prediction_type``: ``"epsilon"`` (eps), ``"v_prediction"``
    (v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0; Salimans & Ho 2022) or ``"sample"`` (x0), as
    diffusers names them. :meth:`from_scheduler` reads all three from a diffusers scheduler.

    Forward process: x_t = a_t x0 + s_t eps, a_t = sqrt(abar_t), s_t = sqrt(1 - abar_t).
    Training: one t ~ U{0..T-1} and one eps per real/fake pair, shared by theta and ref
    (:func:`~ddo_fast.adapters.base.paired_diffusion_loss`), so r = 0 exactly at theta = ref.

    **The log-ratio and its weight.** DDO replaces log p by the weighted denoising ELBO
    (DDO Eq. 14-16): r = -sum_dims w(t) [(pred_theta - target)^2 - (pred_ref - target)^2].
    Here w is fixed on the eps error at w_eps(t) = 1 (Ho et al. 2020's L_simple: the ELBO's
    eps-form with its t-dependent factor dropped, as DDO does for eps-models), and the other
    parameterisations use the weight that makes their squared error *the same number*. Each
    prediction determines an eps-prediction given x_t (Kingma et al. 2021, Sec. 3-4: the ELBO
    is one functional of the model whatever its output parameterisation):

    * x0:  eps_hat = (x_t - a x0_hat) / s, so eps_hat - eps = -(a/s)(x0_hat - x0):
      |eps_hat - eps|^2 = SNR(t) |x0_hat - x0|^2 with SNR = abar / (1 - abar); w_x0 = SNR(t).
    * v:   eps = s x_t + a v (Salimans & Ho 2022, Appendix D), so eps_hat - eps = a (v_hat - v):
      |eps_hat - eps|^2 = abar_t |v_hat - v|^2; w_v = abar_t.
    * eps: w_eps = 1.

    So r is the same estimate of the same ELBO gap whichever parameterisation the model
    predicts in, in exact arithmetic. In float32 the three agree only up to rounding, which
    the x0 form amplifies where SNR(t) is large: a rounding error d of x0_hat is an eps
    error sqrt(SNR) d (~155 d at t = 0 of the default schedule, SNR ~ 2.4e4). Measured on
    one model expressed three ways: r agrees with the float64 eps-space value to ~4e-7
    relative for eps and v, to ~2e-5 relative for x0 at t = 0 (the test allows 1e-4).

    **Schedule.** ``alphas_cumprod`` strictly decreasing in (0, 1); a zero-terminal-SNR
    schedule (Lin et al. 2024; diffusers ``rescale_betas_zero_snr=True``: abar_{T-1} = 0) gets
    abar_{T-1} clamped to 2**-24, as diffusers' ``EulerDiscreteScheduler`` does, so that
    x0_hat = (x_t - s eps_hat) / a stays finite (the last step's weights: v 2**-24,
    x0 ~ 6e-8).

    **Conditioning.** ``label_key`` None: ``model(x_t, t, labels)`` (labels positional, only
    when there are some; diffusers ``UNet2DModel`` takes ``class_labels`` there); a name:
    ``model(x_t, t, **{label_key: labels})`` (``"class_labels"``, ``"encoder_hidden_states"``);
    ``condition``: a function labels -> keyword arguments, e.g.
    ``lambda y: {"encoder_hidden_states": prompt_embeddings[y]}`` for a text-conditioned UNet
    with integer prompt ids as labels (the training loop draws fakes per integer label).
    ``model_kwargs``: constant keyword arguments of every call. Outputs may be a tensor, a
    diffusers output (``.sample``) or a tuple.

    Sampling: DDIM (eta = 0; Song et al. 2021, Eq. 12) over ``steps`` evenly spaced
    timesteps from T - 1 to 0, the prediction converted to (x0_hat, eps_hat) and
    x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev) eps_hat (abar_prev = 1 after t = 0).
    ``clip_sample`` (bool, diffusers' name) clips x0_hat to [-``clip_sample_range``,
    ``clip_sample_range``] and recomputes eps_hat = (x_t - a x0_hat) / s from the clipped
    x0_hat (GLIDE-style): diffusers' ``DDIMScheduler.step`` does that only with
    ``use_clipped_model_output=True`` (its default keeps the unclipped eps_hat); tested
    against it. Dynamic thresholding is not supported.
    """

    alphas_cumprod: torch.Tensor | None = None
    steps: int = 50
    sample_batch: int = 1024
    backend: str | None = None
    prediction_type: str = "epsilon"
    label_key: str | None = None
    condition: Callable[[torch.Tensor], dict[str, torch.Tensor]] | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    clip_sample: bool = False
    clip_sample_range: float = 1.0

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}"
            )
        if self.alphas_cumprod is None:
            self.alphas_cumprod = _ddpm_linear()
        self.alphas_cumprod = _checked_schedule(self.alphas_cumprod)
        for name in ("steps", "sample_batch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, Integral) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
            setattr(self, name, int(v))  # a numpy integer becomes a plain one (cache keys)
        if self.label_key is not None and self.condition is not None:
            raise ValueError("label_key and condition: give one of them, not both")
        if self.label_key is not None and (
            not isinstance(self.label_key, str) or not self.label_key.isidentifier()
        ):
            raise ValueError(f"label_key must be None or a keyword name, got {self.label_key!r}")
        if not isinstance(self.clip_sample, bool):
            raise TypeError(
                f"clip_sample must be a bool (the range is clip_sample_range), got "
                f"{self.clip_sample!r}"
            )
        r = self.clip_sample_range
        if isinstance(r, bool) or not isinstance(r, Real) or not r > 0:
            raise ValueError(f"clip_sample_range must be a number > 0, got {r!r}")
        self.clip_sample_range = float(r)

    @classmethod
    def from_scheduler(cls, scheduler: Any, **kwargs: Any) -> EpsilonDiffusion:
        """The adapter of a diffusers discrete-time scheduler (``DDPMScheduler``,
        ``DDIMScheduler``, ``EulerDiscreteScheduler``, ...): its ``alphas_cumprod`` as it is
        (the schedule the model was trained with; a zero-terminal-SNR one gets
        abar_{T-1} = 2**-24, see the class docstring), ``config.prediction_type`` and
        ``config.clip_sample`` / ``clip_sample_range``; ``kwargs`` set the other fields.
        A ``prediction_type`` in ``kwargs`` must agree with the scheduler's. A scheduler with
        ``thresholding=True`` (dynamic thresholding, Saharia et al. 2022) is refused: this
        sampler does not implement it, and sampling fakes differently from the scheduler
        would go unnoticed."""
        abar = getattr(scheduler, "alphas_cumprod", None)
        if not isinstance(abar, torch.Tensor):
            raise TypeError(
                f"scheduler: {type(scheduler).__name__} has no alphas_cumprod tensor (a "
                "continuous-sigma / EDM scheduler? use EDMDenoiser)"
            )
        config = getattr(scheduler, "config", {})
        T = config.get("num_train_timesteps", len(abar))
        if T != len(abar):
            raise ValueError(
                f"scheduler: config.num_train_timesteps = {T} but alphas_cumprod has {len(abar)}"
            )
        pt = config.get("prediction_type", "epsilon")
        if kwargs.setdefault("prediction_type", pt) != pt:
            raise ValueError(
                f"prediction_type={kwargs['prediction_type']!r} disagrees with the scheduler's "
                f"config.prediction_type={pt!r}"
            )
        if config.get("thresholding", False):
            raise ValueError(
                f"scheduler: thresholding is not supported ({type(scheduler).__name__} has "
                "config.thresholding=True; EpsilonDiffusion's DDIM sampler only clips)"
            )
        kwargs.setdefault("clip_sample", bool(config.get("clip_sample", False)))
        kwargs.setdefault("clip_sample_range", float(config.get("clip_sample_range", 1.0)))
        return cls(alphas_cumprod=abar, **kwargs)

    def _coefficients(self, t: torch.Tensor, like: torch.Tensor):
        """(a_t, s_t, abar_t) [N] in float64 on ``like``'s device; t [N] integer in [0, T)."""
        T = len(self.alphas_cumprod)
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"t must be integer timesteps in [0, {T}), got dtype {t.dtype}")
        in_range = ((t >= 0) & (t < T)).all()
        msg = f"t: timesteps must lie in [0, {T}) (the schedule's length)"
        if t.device.type == "cpu":
            if not bool(in_range):
                raise ValueError(f"{msg}, got min {int(t.min())}, max {int(t.max())}")
        else:  # no host sync on an accelerator: a device-side assert
            torch._assert_async(in_range, msg)
        abar = self.alphas_cumprod.to(like.device)[t]
        return abar.sqrt(), (1 - abar).sqrt(), abar

    def denoise(self, net, x, t, labels):
        """The model's prediction (in its ``prediction_type``) at (x_t, t, conditioning)."""
        kwargs = dict(self.model_kwargs)
        if labels is not None:
            if self.condition is not None:
                kwargs.update(self.condition(labels))
            elif self.label_key is not None:
                kwargs[self.label_key] = labels
            else:
                return model_output(net(x, t, labels, **kwargs))
        return model_output(net(x, t, **kwargs))

    def draw(self, batch, sample_shape, generator):
        t = torch.randint(0, len(self.alphas_cumprod), (batch,), generator=generator)
        return {"t": t, "eps": torch.randn(batch, *sample_shape, generator=generator)}

    def corrupt(self, x, t, eps):
        """x_t = a_t x + s_t eps; (target, weight) by ``prediction_type``: (eps, 1),
        (a_t eps - s_t x, abar_t) or (x, abar_t / (1 - abar_t)); weight fp32 [N]."""
        a, s, abar = self._coefficients(t, x)
        a_x, s_x = bcast(a, x).to(x.dtype), bcast(s, x).to(x.dtype)
        x_t = a_x * x + s_x * eps
        if self.prediction_type == "epsilon":
            target, weight = eps, torch.ones_like(abar)
        elif self.prediction_type == "v_prediction":
            target, weight = a_x * eps - s_x * x, abar
        else:
            target, weight = x, abar / (1 - abar)
        return x_t, target, weight.float()

    def loss(self, model, ref, real, fake, noise, *, alpha, beta) -> LossOutput:
        return paired_diffusion_loss(
            self, model, ref, real, fake, noise["t"], noise["eps"], alpha=alpha, beta=beta
        )

    def mle_loss(self, model, real: Batch, noise: dict[str, torch.Tensor]) -> torch.Tensor:
        """The usual regression loss of the ``prediction_type`` on the real rows, unweighted
        as diffusers' training scripts use it (``F.mse_loss(pred.float(), target.float())``):
        mean over rows and elements of (pred - target)^2, fp32, with (t [B], eps [B, ...]) of
        :meth:`draw`. (The weight in r is the ELBO-consistent one of the class docstring; the
        control minimises what the model was pre-trained with.)"""
        x, labels = real
        t = noise["t"].to(x.device)
        x_t, target, _ = self.corrupt(x, t, noise["eps"].to(x.device, x.dtype))
        pred = self.denoise(model, x_t, t, labels)
        return (pred.float() - target.float()).square().mean()

    def _x0_eps(self, pred, x, a, s):
        """(x0_hat, eps_hat) of a prediction at x_t = x (float64; a, s scalars)."""
        if self.prediction_type == "epsilon":
            eps = pred
            x0 = (x - s * eps) / a
        elif self.prediction_type == "v_prediction":
            x0, eps = a * x - s * pred, s * x + a * pred
        else:
            x0 = pred
            eps = (x - a * x0) / s
        if self.clip_sample:  # GLIDE-style: eps_hat follows the clipped x0_hat
            x0 = x0.clamp(-self.clip_sample_range, self.clip_sample_range)
            eps = (x - a * x0) / s
        return x0, eps

    @torch.no_grad()
    def sample(self, model, n, labels, generator, device, shape):
        abar = self.alphas_cumprod.to(device)
        ts = torch.linspace(len(abar) - 1, 0, self.steps, device=device).round().long()
        out = []
        for m, lab in batched(n, self.sample_batch, labels, device):
            x = torch.randn(m, *shape, generator=generator).to(device)
            for i, t in enumerate(ts):
                a_bar = abar[t]
                a_prev = abar[ts[i + 1]] if i + 1 < len(ts) else abar.new_tensor(1.0)
                pred = self.denoise(model, x, t.expand(m), lab).double()
                x0, eps = self._x0_eps(pred, x.double(), a_bar.sqrt(), (1 - a_bar).sqrt())
                x = (a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps).float()
            out.append(x)
        return torch.cat(out)

    def sampler_config(self):
        cfg: dict[str, Any] = {"kind": "ddim", "steps": self.steps, "T": len(self.alphas_cumprod)}
        # Only when not the defaults: the keys of existing runs' fake caches stay.
        if not torch.equal(self.alphas_cumprod, _ddpm_linear()):
            digest = hashlib.sha256(self.alphas_cumprod.numpy().tobytes()).hexdigest()[:16]
            cfg["alphas_cumprod_sha256"] = digest
        if self.prediction_type != "epsilon":
            cfg["prediction_type"] = self.prediction_type
        if self.clip_sample:  # the range under the key earlier versions wrote
            cfg["clip_sample"] = float(self.clip_sample_range)
        if self.label_key is not None:
            cfg["label_key"] = self.label_key
        if self.condition is not None:  # by name: a function has no stable value to hash
            cfg["condition"] = getattr(self.condition, "__qualname__", repr(self.condition))
        if self.model_kwargs:
            cfg["model_kwargs"] = repr(sorted(self.model_kwargs.items()))
        return cfg
