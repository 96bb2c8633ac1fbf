"""Model adapters: turn (model, frozen reference, real batch, fake batch) into the fused DDO loss.

An adapter knows how a model family computes its log-likelihood surrogate and how to sample it
(the protocol: :class:`~ddo_fast.adapters.base.Adapter`):

* :class:`EDMDenoiser` (:mod:`.edm`) - EDM/EDM2 denoisers ``D(x_noisy, sigma, labels)``; one
  ln sigma and one noise draw per real/fake pair, shared by theta and ref; EDM weighting
  ``lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2``; EDM Heun sampler; ddo_fast's,
  k-diffusion's or EDM2's calling convention (``call=``).
* :class:`EpsilonDiffusion` (:mod:`.epsilon`) - discrete-schedule models predicting eps, v or x0
  (``model(x_t, t[, conditioning])``; ``from_scheduler`` reads a diffusers scheduler); DDIM.
* :class:`CausalAR` (:mod:`.causal_ar`) - autoregressive models ``model(tokens [B, L], labels)
  -> logits [B, L, V]`` whose ``logits[:, i]`` predicts ``tokens[:, i]`` from ``tokens[:, :i]``;
  ancestral sampler (or the model's own ``sample``).

Both diffusion adapters build their loss with one helper,
:func:`~ddo_fast.adapters.base.paired_diffusion_loss`. Every adapter runs theta and ref on the
same inputs (same noise, same labels) in one forward over the concatenated [real; fake] batch,
and returns the loss and the per-sample log-ratios. Every ``sample`` has the one signature
``sample(model, n, labels, generator, device, shape)``.
"""

from .base import Adapter, Batch, LossOutput, MLEControl, paired_diffusion_loss
from .causal_ar import CausalAR, null_label_weights
from .edm import EDMDenoiser, edm_weight
from .epsilon import EpsilonDiffusion
from .hf_causal_lm import HFCausalLM
from .var import VAR

__all__ = [
    "Adapter",
    "Batch",
    "CausalAR",
    "EDMDenoiser",
    "EpsilonDiffusion",
    "HFCausalLM",
    "LossOutput",
    "MLEControl",
    "VAR",
    "edm_weight",
    "null_label_weights",
    "paired_diffusion_loss",
]
