"""Next-scale autoregressive models (VAR, Tian et al. 2024): ``model(tokens [B, L], labels) ->
logits [B, L, V]`` over the token maps of ``patch_nums`` (L = sum_k pn_k^2), where the logits of
scale k depend on the class and the tokens of scales < k (block-causal).

DDO for VAR (Zheng et al. 2025, Sec. 4.2 and the official VAR trainer): r_b = sum_i log
softmax(z_theta)[y_i] - sum_i log softmax(z_ref)[y_i] over all L tokens, guidance-free theta and
ref, classifier-free-guidance (null-label) rows drawn per pair by the adapter with the weights of
:func:`~ddo_fast.adapters.causal_ar.null_label_weights` (fake side 0, real side max(alpha, 1)),
the loss divided by max(alpha, 1). Everything that is not VAR-specific is
:class:`~ddo_fast.adapters.CausalAR`'s (the null-mask draw, the null-row weights, the fused loss
and its max(alpha, 1) division, ``mle_loss``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..models.quantizer import check_patch_nums
from ..models.var import cfg_ramp, guide, sample_tokens
from ..ops import ddo_loss, token_logprobs
from .base import LossOutput, batched, pair_mask
from .causal_ar import CausalAR


def scale_sums(values: torch.Tensor, patch_nums: tuple[int, ...]) -> torch.Tensor:
    """Per-scale sums [N, K] of per-token values [N, L] (segments of pn_k^2 tokens)."""
    parts = values.split([p * p for p in patch_nums], dim=1)
    return torch.stack([part.sum(1) for part in parts], 1)


@dataclass
class VAR(CausalAR):
    """DDO adapter for next-scale (VAR) models; see the module docstring for r and the loss.

    Labels: the adapter, not the model, draws the null-label mask per pair (share
    ``uncond_ratio``, VAR's 0.1; label ``null_label``), so theta and ref see the **same**
    labels. A model that drops labels inside ``forward`` in training mode (VAR does) must have
    that switched off (:class:`~ddo_fast.models.VARTransformer`: ``label_dropout = 0``); on its
    first step with theta = ref the adapter checks that r = 0 and raises otherwise
    (``check_first_step``; one host sync, once per adapter object).

    Diagnostics: ``LossOutput.stats`` holds r split by scale, the mean over real rows
    ``r_real_s{k}`` and over fake rows ``r_fake_s{k}`` (per-segment sums of
    :func:`~ddo_fast.token_logprobs`; they add up to r). ``scale_stats=False`` uses the fused
    :func:`~ddo_fast.ar_ddo_loss` instead and returns no stats.

    Sampling (fakes and evaluation): the model's own ``sample(n, labels, generator, cfg=...,
    temperature=..., top_k=..., top_p=...)`` (KV-cached) when it has one, else
    :meth:`sample_uncached`; ``cfg`` 0 is guidance-free, > 0 VAR's ramp
    (:func:`~ddo_fast.models.var.cfg_ramp`). ``reencode``: fakes are decoded to pixels and
    re-encoded (``model.reencode(tokens)``; that the DDO authors do so rests on the text of
    issue 12, not on their code). A heuristic departure from DDO's theory: with R =
    encode∘decode the fakes are samples of the push-forward R#p_ref, q(x) = Σ_{R(t)=x} p_ref(t),
    not of p_ref, so the optimal discriminator is log p_data/q rather than log p_data/p_ref and
    the guarantee that theta -> p_data at the optimum no longer holds exactly.

    Cached reference log-probs (:meth:`ref_logprob`): [N, K_cond * S] per-scale sums, S =
    len(patch_nums), K_cond = 1 (own label) or 2 (own, null label) - the loss picks the block by
    the step's null mask; the per-step path computes the same values the same way.
    """

    patch_nums: tuple[int, ...] = ()
    uncond_ratio: float = 0.1
    normalize_alpha: bool = True
    cfg: float = 0.0
    top_k: int = 0
    top_p: float = 0.0
    reencode: bool = False
    scale_stats: bool = True
    check_first_step: bool = True
    _checked: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        pns = check_patch_nums(self.patch_nums)
        self.patch_nums = pns
        self.seq_len = sum(p * p for p in pns)
        if self.cfg < 0:
            raise ValueError(f"cfg={self.cfg}: must be >= 0 (0 = guidance-free)")
        if not 0.0 <= self.uncond_ratio < 1.0:
            raise ValueError(f"uncond_ratio={self.uncond_ratio}: must be in [0, 1)")
        if self.uncond_ratio > 0 and self.null_label is None:
            raise ValueError("null_label: set it (VAR: num_classes) when uncond_ratio > 0")

    # ------------------------------------------------------------------------ log-probs
    def _check_tokens(self, tokens: torch.Tensor) -> None:
        if tokens.dim() != 2 or tokens.shape[1] != self.seq_len:
            raise ValueError(
                f"tokens: expected [B, {self.seq_len}] (patch_nums {self.patch_nums}), got "
                f"{list(tokens.shape)}"
            )

    def ref_scale_logprob(
        self, ref: nn.Module, tokens: torch.Tensor, labels: torch.Tensor | None
    ) -> torch.Tensor:
        """log p_ref per scale [N, S] fp32 under no_grad: the one way both the per-step path
        and the cache compute it."""
        with torch.no_grad():
            return scale_sums(
                token_logprobs(ref(tokens, labels), tokens, backend=self.backend), self.patch_nums
            )

    def ref_logprob(self, ref, x, labels):
        """[N, S] (own label), or [N, 2S] (own label, null label) with CFG rows."""
        tokens = x.long()
        self._check_tokens(tokens)
        cond = self.ref_scale_logprob(ref, tokens, labels)
        if not self.cfg_rows(labels):
            return cond
        null = self.ref_scale_logprob(ref, tokens, torch.full_like(labels, self.null_label))
        return torch.cat([cond, null], 1)

    # ----------------------------------------------------------------------------- loss
    def loss(self, model, ref, real, fake, noise, *, alpha, beta, ref_logprob=None) -> LossOutput:
        for part in (real[0], fake[0]):  # before the labels meet them: a clear error first
            self._check_tokens(part)
        tokens, labels, weight, uncond = self.pair_inputs(real, fake, noise, alpha)
        batch, s = real[0].shape[0], len(self.patch_nums)
        if ref_logprob is None:
            ref_s = self.ref_scale_logprob(ref, tokens, labels)
        else:
            self.check_cached(ref_logprob, 2 * batch, s if uncond is None else 2 * s)
            ref_s = ref_logprob[:, :s]
            if uncond is not None:  # the null mask is drawn per step: pick on the device
                ref_s = torch.where(uncond[:, None], ref_logprob[:, s:], ref_s)
        ref_lp = ref_s.sum(1)
        logits = model(tokens, labels)
        is_real = pair_mask(batch, tokens.device)
        stats = None
        if self.scale_stats:
            theta_s = scale_sums(
                token_logprobs(logits, tokens, backend=self.backend), self.patch_nums
            )
            r = theta_s.sum(1) - ref_lp
            loss = ddo_loss(
                r, is_real, alpha=alpha, beta=beta, sample_weight=weight, backend=self.backend
            )
            loss = self.alpha_normalized(loss, alpha)
            r_s = (theta_s - ref_s).detach()
            stats = {}
            for k in range(s):
                stats[f"r_real_s{k}"] = r_s[:batch, k].mean()
                stats[f"r_fake_s{k}"] = r_s[batch:, k].mean()
        else:
            loss, r = self.sequence_loss(logits, tokens, ref_lp, is_real, weight, alpha, beta)
        r = r.detach()
        if self.check_first_step and not self._checked:
            self._first_step_check(model, ref, r, ref_lp)
        return LossOutput(loss, r, stats)

    def _first_step_check(
        self, model: nn.Module, ref: nn.Module, r: torch.Tensor, ref_lp: torch.Tensor
    ) -> None:
        """At theta = ref (the first step of a run), r must be 0: theta and ref see the same
        labels and inputs. One host sync, once."""
        self._checked = True
        mine, theirs = list(model.parameters()), list(ref.parameters())
        if len(mine) != len(theirs) or any(
            a.shape != b.shape or not torch.equal(a.detach(), b.detach())
            for a, b in zip(mine, theirs, strict=True)
        ):
            return  # theta != ref (resumed, or sharded): nothing to compare
        tol = 1e-3 + 1e-5 * ref_lp.abs()
        bad = r.abs() > tol
        if bool(bad.any()):
            worst = float(r.abs().max())
            raise RuntimeError(
                f"VAR adapter: theta and the reference disagree at theta = ref (|r| up to "
                f"{worst:.4g} on {int(bad.sum())} of {len(r)} rows of the first step). They "
                "must see the same labels and the same function: a model that drops labels "
                "inside forward in training mode (VAR's class dropout) or has dropout layers "
                "must have that switched off (VARTransformer: model.label_dropout = 0); the "
                "adapter draws the null-label mask itself (uncond_ratio)."
            )

    # -------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(self, model, n, labels, generator, device, shape):
        own = getattr(model, "sample", None)
        out = []
        for m, lab in batched(n, self.sample_batch, labels, device):
            if callable(own):
                toks = own(
                    m,
                    lab,
                    generator,
                    cfg=self.cfg,
                    temperature=self.temperature,
                    top_k=self.top_k,
                    top_p=self.top_p,
                )
            else:
                toks = self.sample_uncached(model, m, lab, generator, device)
            if self.reencode:
                again = getattr(model, "reencode", None)
                if not callable(again):
                    raise TypeError(
                        f"reencode=True: {type(model).__name__} has no reencode(tokens) "
                        "(decode to pixels and encode again)"
                    )
                toks = again(toks)
            out.append(toks.cpu())
        return torch.cat(out)

    @torch.no_grad()
    def sample_uncached(
        self,
        model: nn.Module,
        n: int,
        labels: torch.Tensor | None,
        generator: torch.Generator,
        device: torch.device,
    ) -> torch.Tensor:
        """The sampler without a KV cache: per scale k, one full forward over all L positions
        (later scales zero: block-causality makes them irrelevant) and the logits of scale k,
        guided as in :class:`~ddo_fast.models.VARTransformer.sample`; the same uniforms, so the
        two agree token for token."""
        guided = self.cfg > 0
        if guided and (labels is None or self.null_label is None):
            raise ValueError("cfg > 0 needs labels and null_label")
        rows = labels
        if guided:
            rows = torch.cat([labels, torch.full_like(labels, self.null_label)])
        ramp = cfg_ramp(self.cfg, len(self.patch_nums))
        tokens = torch.zeros(n, self.seq_len, dtype=torch.long, device=device)
        start = 0
        for k, pn in enumerate(self.patch_nums):
            inp = torch.cat([tokens, tokens]) if guided else tokens
            logits = model(inp, rows)[:, start : start + pn * pn].float()
            if guided:
                logits = guide(logits, ramp[k])
            u = torch.rand(n, pn * pn, generator=generator, dtype=torch.float64).to(device)
            tokens[:, start : start + pn * pn] = sample_tokens(
                logits, u, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p
            )
            start += pn * pn
        return tokens

    def sampler_config(self):
        return {
            "kind": "var",
            "patch_nums": self.patch_nums,
            "cfg": self.cfg,
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "reencode": self.reencode,
        }
