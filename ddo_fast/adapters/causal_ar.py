"""Autoregressive models ``model(tokens [B, L], labels) -> logits [B, L, V]`` (VAR, small LMs)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import ar_ddo_loss, sequence_logprob
from .base import Adapter, Batch, LossOutput, batched, cat_labels, pair_mask


def null_label_weights(uncond: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-row weights [2B] of a [real; fake] batch whose pairs ``uncond`` [B] (bool) got the
    null (classifier-free-guidance) label.

    The official DDO VAR trainer (``DDO_trainer.py::train_step``; summarised in the project's
    ddo_spec.md, section 3) weights real rows cond 1 / uncond max(alpha, 1) and fake rows
    cond alpha / uncond 0, then divides the loss by max(alpha, 1). Here the loss head already
    multiplies the fake term by alpha, so the sample weights are real: cond 1, uncond
    max(alpha, 1); fake: cond 1, uncond 0 - the unconditional model gets no fake term (it
    "should stay mode-covering", DDO issue #3) and a real term as strong as the conditional
    fake term. :class:`CausalAR` divides by max(alpha, 1) when ``normalize_alpha`` is set.
    """
    real = torch.where(uncond, max(alpha, 1.0), 1.0)
    fake = torch.where(uncond, 0.0, 1.0)
    return torch.cat([real, fake])


@dataclass
class CausalAR(Adapter):
    """Autoregressive model ``model(tokens [B, L], labels | None) -> logits [B, L, V]`` whose
    ``logits[:, i]`` predicts ``tokens[:, i]`` from ``tokens[:, :i]`` (the model prepends its own
    start/class token).

    r_b = sum_i log softmax(z_theta)[y_i] - sum_i log softmax(z_ref)[y_i] (sums over tokens, no
    length normalisation); the reference's ``sequence_logprob`` runs under no_grad. With
    ``null_label`` set (classifier-free-guidance training data), a share ``uncond_ratio`` of
    pairs get the null label on both their real and fake row, weighted by
    :func:`null_label_weights`, and with ``normalize_alpha`` the loss is divided by
    max(alpha, 1) - the official VAR recipe. Sampling uses ``model.sample(n, labels,
    generator)`` when the model has one (e.g. with a KV cache), else a plain token-by-token loop
    with ``temperature`` over ``seq_len`` tokens (0 = the sample shape's length).

    log p_ref(x | label) is a constant of the sample: :meth:`ref_logprob` scores it once for the
    sample's label and, with CFG rows, for the null label; :meth:`loss` given those values
    (``ref_logprob=``) picks per row by the step's null mask and runs no reference forward.
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

    def cfg_rows(self, labels: torch.Tensor | None) -> bool:
        """Whether a share of rows gets the null label (needs labels to replace)."""
        return self.null_label is not None and labels is not None and self.uncond_ratio > 0

    def ref_sequence_logprob(
        self, ref: nn.Module, tokens: torch.Tensor, labels: torch.Tensor | None
    ) -> torch.Tensor:
        """sum_i log softmax(z_ref)[y_i] [N] fp32 under no_grad: the one way both the per-step
        path and the cache compute it (so the two agree bit for bit on row-independent
        models)."""
        with torch.no_grad():
            return sequence_logprob(ref(tokens, labels), tokens, backend=self.backend)

    def ref_logprob(self, ref, x, labels):
        """[N, 1] (the sample's label), or [N, 2] (its label, the null label) with CFG rows."""
        tokens = x.long()
        cond = self.ref_sequence_logprob(ref, tokens, labels)
        if not self.cfg_rows(labels):
            return cond[:, None]
        null = self.ref_sequence_logprob(ref, tokens, torch.full_like(labels, self.null_label))
        return torch.stack([cond, null], 1)

    def pair_inputs(
        self, real: Batch, fake: Batch, noise: dict, alpha: float
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """(tokens [2B, L] long, labels [2B] with the step's null mask applied, the VAR-recipe
        sample weights [2B] (:func:`null_label_weights`), uncond [2B]) of a [real; fake] batch;
        weights and uncond are None without CFG rows. Both rows of a pair share the mask."""
        tokens = torch.cat([real[0], fake[0]]).long()
        labels = cat_labels(real[1], fake[1])
        weight = uncond = None
        if self.cfg_rows(labels):
            uncond = noise["uncond"].to(tokens.device).repeat(2)
            labels = torch.where(uncond, torch.full_like(labels, self.null_label), labels)
            weight = null_label_weights(uncond[: real[0].shape[0]], alpha)
        return tokens, labels, weight, uncond

    def check_cached(self, ref_logprob: torch.Tensor, rows: int, columns: int) -> None:
        """``ref_logprob`` must be the [rows, columns] block :meth:`ref_logprob` gives."""
        if ref_logprob.shape != (rows, columns):
            raise ValueError(
                f"ref_logprob: expected [{rows}, {columns}] (the [real; fake] rows of "
                f"{type(self).__name__}.ref_logprob), got {list(ref_logprob.shape)}"
            )

    def loss(self, model, ref, real, fake, noise, *, alpha, beta, ref_logprob=None) -> LossOutput:
        tokens, labels, weight, uncond = self.pair_inputs(real, fake, noise, alpha)
        batch = real[0].shape[0]
        if ref_logprob is None:
            ref_lp = self.ref_sequence_logprob(ref, tokens, labels)
        else:
            self.check_cached(ref_logprob, 2 * batch, 1 if uncond is None else 2)
            # the null mask is drawn per step: pick each row's column on the device
            ref_lp = ref_logprob[:, 0]
            if uncond is not None:
                ref_lp = torch.where(uncond, ref_logprob[:, 1], ref_lp)
        logits = model(tokens, labels)
        is_real = pair_mask(batch, tokens.device)
        loss, r = self.sequence_loss(logits, tokens, ref_lp, is_real, weight, alpha, beta)
        return LossOutput(loss, r.detach())

    def sequence_loss(
        self,
        logits: torch.Tensor,
        tokens: torch.Tensor,
        ref_lp: torch.Tensor,
        is_real: torch.Tensor,
        weight: torch.Tensor | None,
        alpha: float,
        beta: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, r [N]) of N [real; fake] rows (``is_real`` [N] bool) from theta's ``logits``
        [N, L, V] with the fused :func:`~ddo_fast.ar_ddo_loss`: r_b = sum_i log
        softmax(z_theta)[y_bi] - ``ref_lp``_b and Eq. 13 with the sample weights w = ``weight``
        [N] (None: 1), L = -mean_real w_b log sigma(beta r_b) - alpha mean_fake w_b log
        sigma(-beta r_b) in fp32, then :meth:`alpha_normalized`."""
        loss, r = ar_ddo_loss(
            logits,
            tokens,
            ref_lp,
            is_real,
            alpha=alpha,
            beta=beta,
            sample_weight=weight,
            return_logratio=True,
            backend=self.backend,
        )
        return self.alpha_normalized(loss, alpha), r

    def alpha_normalized(self, loss: torch.Tensor, alpha: float) -> torch.Tensor:
        """L / max(alpha, 1) with ``normalize_alpha`` (the official VAR recipe), else L: the
        largest row weight, alpha on fake rows and max(alpha, 1) on null-label real rows
        (:func:`null_label_weights`), becomes 1, so the loss's scale, and the step a given lr
        makes, does not grow with alpha."""
        return loss / max(alpha, 1.0) if self.normalize_alpha else loss

    def mle_loss(self, model, real, noise) -> torch.Tensor:
        """Next-token cross-entropy of the real batch, mean over rows and tokens (nats/token):
        -1/(B L) sum_b sum_i log softmax(z_theta)[y_bi], fp32 - what pre-training minimises.
        With CFG rows, the real rows whose pair ``noise["uncond"]`` [B] drew the null label get
        it here too, as in :meth:`loss`."""
        tokens = real[0].long()
        labels = real[1]
        if self.cfg_rows(labels):
            uncond = noise["uncond"].to(tokens.device)[: tokens.shape[0]]
            labels = torch.where(uncond, torch.full_like(labels, self.null_label), labels)
        logits = model(tokens, labels).float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1))

    @torch.no_grad()
    def sample(self, model, n, labels, generator, device, shape):
        own = getattr(model, "sample", None)
        length = self.seq_len or shape[-1]
        out = []
        for m, lab in batched(n, self.sample_batch, labels, device):
            if callable(own):
                out.append(own(m, lab, generator).cpu())
                continue
            tokens = torch.zeros(m, length, dtype=torch.long, device=device)
            for i in range(length):
                logits = model(tokens[:, : i + 1], lab)[:, i].double() / self.temperature
                u = torch.rand(m, 1, generator=generator, dtype=torch.float64).to(device)
                cdf = logits.softmax(-1).cumsum(-1)
                tokens[:, i] = (cdf < u).sum(-1).clamp_max(logits.shape[-1] - 1)
            out.append(tokens.cpu())
        return torch.cat(out)

    def sampler_config(self):
        return {"kind": "ancestral", "seq_len": self.seq_len, "temperature": self.temperature}
