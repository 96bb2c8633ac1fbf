"""The adapter protocol and the parts every adapter shares.

An adapter turns (model theta, frozen reference, real batch, fake batch, the step's random draws)
into the fused DDO loss (Zheng et al. 2025, Eq. 13) and samples the model for the fake pool:

    L = -E_real[log sigma(beta r)] - alpha E_fake[log sigma(-beta r)],  r = log p_theta - log p_ref

Every adapter evaluates theta and ref on the same inputs (same noise, same labels) over the
concatenated [real; fake] batch of 2B rows, real rows first.

Cached reference log-probs: where log p_ref(x) depends on nothing drawn per step (autoregressive
models: it is a function of the sample and its label), :meth:`Adapter.ref_logprob` scores samples
once and :meth:`Adapter.loss` takes those values (``ref_logprob=``) instead of running the
reference; :func:`ddo_fast.train` does so for offline fake pools
(``TrainConfig.ref_logprob_cache``). Diffusion adapters return None: their r needs the step's
noise, shared by theta and ref.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from ..ops import diffusion_ddo_loss

Batch = tuple[torch.Tensor, "torch.Tensor | None"]
"""(x [B, ...], labels [B] or None): one real or fake batch."""


@dataclass
class LossOutput:
    """What :meth:`Adapter.loss` returns.

    loss: fp32 scalar. logratio: r [2B], real rows first, then fake rows (detached).
    stats: extra per-step scalars on the device (e.g. VAR's per-scale log-ratios), logged as
    extra metrics columns without a host sync; the same keys every step of a run, or None.
    """

    loss: torch.Tensor
    logratio: torch.Tensor
    stats: dict[str, torch.Tensor] | None = None


class Adapter:
    """What :func:`ddo_fast.train` needs from a model family; subclass it and override
    :meth:`loss` and :meth:`sample` (and :meth:`draw` / :meth:`sampler_config` when the family
    draws noise or has sampler settings).

    ``backend`` (None = ``$DDO_FAST_BACKEND`` / auto) is passed to the loss functions.
    """

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
        ref_logprob: torch.Tensor | None = None,
    ) -> LossOutput:
        """The DDO loss of one step and the per-sample log-ratios r [2B] (``noise`` from
        :meth:`draw`).

        ``ref_logprob`` [2B, K] (fp32, [real; fake] rows, on the batch's device): the rows of
        :meth:`ref_logprob` for these samples, used instead of running ``ref``; the adapter picks
        the column each row needs this step (on the device). The loop passes it only to adapters
        whose :meth:`ref_logprob` returns values, so others need not accept it.
        """
        raise NotImplementedError(f"{type(self).__name__}.loss")

    def prepare_data(self, data: Any) -> Any:
        """The user's real data in a form :func:`ddo_fast.train` takes (a tensor, ``(x,
        labels)`` or a Dataset); default: unchanged (HFCausalLM packs a dict of token ids)."""
        return data

    def mle_loss(
        self, model: nn.Module, real: Batch, noise: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """The family's maximum-likelihood training loss on the real batch only (what
        pre-training minimises; diffusion: the denoising loss at the step's noise levels, AR:
        next-token cross-entropy), an fp32 scalar. ``noise`` comes from :meth:`draw` for the
        step's B pairs; only the real rows' draws are used. :class:`MLEControl` trains on it."""
        raise NotImplementedError(
            f"{type(self).__name__}.mle_loss: this adapter has no maximum-likelihood loss, so "
            "MLEControl cannot wrap it; implement mle_loss(model, real, noise)"
        )

    def ref_logprob(
        self, ref: nn.Module, x: torch.Tensor, labels: torch.Tensor | None
    ) -> torch.Tensor | None:
        """log p_ref of samples ``x`` [N, ...] with ``labels`` [N] or None, as :meth:`loss` would
        compute it, for every conditioning the loss may pick per step: [N, K] fp32 under no_grad
        (column 0: the sample's own label; :class:`~ddo_fast.adapters.CausalAR` with CFG rows adds
        column 1: the null label). Rows must not depend on the other rows of the call, so that
        the loop may score samples in any batches.

        None (the default) when the value depends on the step's random draws (diffusion: the
        noise level and noise): the loss then runs ``ref`` every step. Decide before touching
        ``ref``: the loop calls it on one sample to find out.
        """
        return None

    def sample(
        self,
        model: nn.Module,
        n: int,
        labels: torch.Tensor | None,
        generator: torch.Generator,
        device: torch.device,
        shape: tuple[int, ...],
    ) -> torch.Tensor:
        """``n`` samples [n, *shape] from ``model`` on ``device`` under no_grad, with ``labels``
        [n] or None, the noise drawn on the CPU from ``generator``. ``shape`` is one sample's
        shape (the real data's); a family that knows it from the model may ignore it."""
        raise NotImplementedError(f"{type(self).__name__}.sample")

    def sampler_config(self) -> dict[str, Any]:
        """What determines the samples besides weights and seed (part of the fake-cache key)."""
        return {}


class MLEControl(Adapter):
    """The fair maximum-likelihood control of a DDO run: ``train(model, data,
    adapter=MLEControl(a), config=<the DDO run's exact TrainConfig>)`` spends the same steps,
    batch, optimizer, lr schedule, EMA and best-checkpoint selection on ``a.mle_loss`` of the
    real rows instead of the DDO loss.

    :meth:`loss` returns ``LossOutput(a.mle_loss(model, real, noise), zeros [2B])``: the fake
    pool is still drawn (so the step's random stream matches DDO's) and ignored, and the
    reference is never run. Sampling, draws and the sampler settings are the wrapped adapter's.
    """

    def __init__(self, adapter: Adapter) -> None:
        if not isinstance(adapter, Adapter):
            raise TypeError(
                f"MLEControl(adapter): expected an Adapter, got {type(adapter).__name__}"
            )
        self.adapter = adapter
        self.backend = adapter.backend

    def __repr__(self) -> str:
        return f"MLEControl({self.adapter!r})"

    def draw(self, batch, sample_shape, generator):
        return self.adapter.draw(batch, sample_shape, generator)

    def prepare_data(self, data):
        return self.adapter.prepare_data(data)

    def loss(self, model, ref, real, fake, noise, *, alpha, beta, ref_logprob=None):
        loss = self.adapter.mle_loss(model, real, noise).float()
        rows = real[0].shape[0] + fake[0].shape[0]
        return LossOutput(loss, torch.zeros(rows, device=loss.device))

    def mle_loss(self, model, real, noise):
        return self.adapter.mle_loss(model, real, noise)

    def ref_logprob(self, ref, x, labels):
        return None  # the loss never uses the reference

    def sample(self, model, n, labels, generator, device, shape):
        return self.adapter.sample(model, n, labels, generator, device, shape)

    def sampler_config(self):
        return self.adapter.sampler_config()


def pair_mask(batch: int, device: torch.device) -> torch.Tensor:
    """is_real [2 * batch] of a concatenated [real; fake] batch."""
    mask = torch.zeros(2 * batch, dtype=torch.bool, device=device)
    mask[:batch] = True
    return mask


def cat_labels(real: torch.Tensor | None, fake: torch.Tensor | None) -> torch.Tensor | None:
    """[real; fake] labels, or None when neither batch has labels."""
    if real is None and fake is None:
        return None
    if real is None or fake is None:
        raise ValueError("real and fake batches must both have labels or both have none")
    return torch.cat([real, fake])


def bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-row value [N] shaped to broadcast against ``like`` [N, ...]."""
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def batched(
    n: int, size: int, labels: torch.Tensor | None, device: torch.device
) -> list[tuple[int, torch.Tensor | None]]:
    """(rows, labels on ``device``) of the chunks of at most ``size`` that a sampler runs."""
    chunks = []
    for start in range(0, n, size):
        m = min(size, n - start)
        chunks.append((m, None if labels is None else labels[start : start + m].to(device)))
    return chunks


class DiffusionFamily(Protocol):
    """What :func:`paired_diffusion_loss` needs from a diffusion adapter."""

    backend: str | None

    def corrupt(
        self, x: torch.Tensor, level: torch.Tensor, eps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The forward process: (x_noisy, target of the prediction, weight [2B])."""
        ...

    def denoise(
        self,
        net: nn.Module,
        x_noisy: torch.Tensor,
        level: torch.Tensor,
        labels: torch.Tensor | None,
    ) -> torch.Tensor:
        """The model call: the prediction compared with the target."""
        ...


def paired_diffusion_loss(
    family: DiffusionFamily,
    model: nn.Module,
    ref: nn.Module,
    real: Batch,
    fake: Batch,
    level: torch.Tensor,
    eps: torch.Tensor,
    *,
    alpha: float,
    beta: float,
) -> LossOutput:
    """The DDO loss of a diffusion model over one [real; fake] batch (DDO Eq. 14-16).

    r_b = -sum_dims w_b [(pred_theta - target)^2 - (pred_ref - target)^2]: the one-draw estimate
    of the ELBO gap log p_theta - log p_ref (Eq. 14-15; Jensen, Eq. 16, puts the draw outside
    log sigma). Real row i and fake row i share the noise level ``level[i]`` [B] and the noise
    ``eps[i]`` [B, ...] (repeated over the pair; drawn by the adapter's ``draw``), and theta and
    ref see the same noisy input, so r = 0 exactly at theta = ref.

    ``family.corrupt(x, level, eps) -> (x_noisy, target, weight [2B])`` is the forward process,
    ``family.denoise(net, x_noisy, level, labels) -> pred`` the model call. The reference runs
    under no_grad; the loss is the fused :func:`~ddo_fast.diffusion_ddo_loss` with
    ``family.backend``.
    """
    x = torch.cat([real[0], fake[0]])
    labels = cat_labels(real[1], fake[1])
    # A floating level (sigma) computes in the data's dtype; an integer one (a timestep) stays.
    level = level.to(x.device, x.dtype if level.is_floating_point() else level.dtype).repeat(2)
    eps = eps.to(x.device, x.dtype).repeat(2, *([1] * (x.dim() - 1)))
    x_noisy, target, weight = family.corrupt(x, level, eps)
    pred = family.denoise(model, x_noisy, level, labels)
    with torch.no_grad():
        pred_ref = family.denoise(ref, x_noisy, level, labels)
    loss, r = diffusion_ddo_loss(
        pred,
        pred_ref,
        target,
        weight,
        pair_mask(real[0].shape[0], x.device),
        alpha=alpha,
        beta=beta,
        return_logratio=True,
        backend=family.backend,
    )
    return LossOutput(loss, r.detach())
