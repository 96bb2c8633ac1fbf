"""A small next-scale autoregressive transformer (VAR, Tian et al. 2024) over the token maps of a
:class:`~ddo_fast.models.quantizer.MultiScaleQuantizer`, with a KV-cached per-scale sampler and
VAR's classifier-free guidance.

Sequence: L = sum_k pn_k^2 positions, coarse to fine. The input at the positions of scale 1 is
the class token (class embedding + a start position), at the positions of scale k >= 2 VAR's
teacher-forcing input: the reconstruction of scales < k area-downsampled to pn_k, projected by a
linear layer (:meth:`MultiScaleQuantizer.next_scale_inputs`); plus position and level
embeddings. Attention is block-causal as in VAR (position i attends to j iff level(j) <=
level(i)), so the logits of scale k [B, pn_k^2, V] depend on the class and the tokens of scales
< k only, none of its own scale: all pn_k^2 tokens of a scale are drawn at once.

Training is plain cross-entropy over all tokens. Class-label dropout (``label_dropout``, VAR:
0.1, null class = ``num_classes``) happens inside :meth:`forward` in training mode, as in VAR; a
DDO adapter draws the null mask itself and needs it off (``label_dropout = 0``).

Guidance (VAR's ``autoregressive_infer_cfg``): scale k of K mixes conditional and null-label
logits as (1 + t_k) z_cond - t_k z_uncond with t_k = cfg * k / (K - 1), k = 0..K-1 (a ramp from
0 at the first scale to ``cfg`` at the last); ``cfg = 0`` is the guidance-free sampler (one
forward of B rows per scale instead of 2B). top-k / top-p are off by default (they hurt FID per
the DDO authors).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .quantizer import MultiScaleQuantizer


def scale_levels(patch_nums: tuple[int, ...]) -> torch.Tensor:
    """level(i) [L] int64: the scale index of each position."""
    return torch.cat([torch.full((p * p,), k) for k, p in enumerate(patch_nums)])


def block_causal_mask(patch_nums: tuple[int, ...]) -> torch.Tensor:
    """bool [L, L], True where position i may attend to j: level(j) <= level(i) (VAR)."""
    lvl = scale_levels(patch_nums)
    return lvl[None, :] <= lvl[:, None]


def cfg_ramp(cfg: float, scales: int) -> list[float]:
    """VAR's guidance strength per scale: t_k = cfg * k / (K - 1) (t = cfg for K = 1)."""
    if scales == 1:
        return [float(cfg)]
    return [float(cfg) * k / (scales - 1) for k in range(scales)]


def guide(logits: torch.Tensor, t: float) -> torch.Tensor:
    """(1 + t) z_cond - t z_uncond of stacked [cond; uncond] logits [2B, ...] -> [B, ...]."""
    cond, uncond = logits.chunk(2)
    return (1 + t) * cond - t * uncond


def sample_tokens(
    logits: torch.Tensor,
    u: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 0.0,
) -> torch.Tensor:
    """Inverse-CDF draw of one token per position from ``logits`` [B, n, V] with uniforms ``u``
    [B, n] (float64): the index of the first CDF entry >= u. ``top_k`` > 0 keeps the k largest
    logits, ``0 < top_p < 1`` the smallest set of largest-probability tokens with mass >= p
    (both off by default). In float64 so that the cached and uncached samplers agree."""
    z = logits.double() / temperature
    if top_k > 0:
        kth = z.topk(min(top_k, z.shape[-1]), -1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        zs, order = z.sort(-1, descending=True)
        before = zs.softmax(-1).cumsum(-1) - zs.softmax(-1)  # mass strictly above each token
        drop = torch.zeros_like(z, dtype=torch.bool).scatter(-1, order, before >= top_p)
        z = z.masked_fill(drop, float("-inf"))
    cdf = z.softmax(-1).cumsum(-1)
    return (cdf < u[..., None]).sum(-1).clamp_max(z.shape[-1] - 1)


class _Block(nn.Module):
    """Pre-norm attention + MLP block with an attention mask and a per-scale KV cache."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}")
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.heads, d // self.heads).unbind(2)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def _out(self, x: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        x = x + self.proj(att.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.ln2(x))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self._qkv(x)
        return self._out(x, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))

    def step(self, x: torch.Tensor, cache: dict[str, torch.Tensor], start: int) -> torch.Tensor:
        """The positions [start, start + n) of one scale, x [B, n, d]: their keys/values join
        the cache and they attend to every cached position < start + n (earlier scales and
        their own: exactly the block-causal mask's rows of this scale)."""
        q, k, v = self._qkv(x)
        end = start + x.shape[1]
        cache["k"][:, :, start:end] = k
        cache["v"][:, :, start:end] = v
        att = F.scaled_dot_product_attention(q, cache["k"][:, :, :end], cache["v"][:, :, :end])
        return self._out(x, att)


class VARTransformer(nn.Module):
    """``model(tokens [B, L], labels [B] | None) -> logits [B, L, V]`` (fp32), where the logits
    of scale k depend on the class and the tokens of scales < k only.

    Args:
        quantizer: the tokenizer (its codebook is a buffer of this model; its ``patch_nums``
            fix L).
        num_classes: classes; label ``num_classes`` is the null (unconditional) class, also used
            for ``labels=None``.
        dim, layers, heads: width, depth, attention heads.
        label_dropout: share of labels replaced by the null class in training mode (VAR: 0.1);
            set 0 to let a DDO adapter draw the null mask itself.
    """

    def __init__(
        self,
        quantizer: MultiScaleQuantizer,
        num_classes: int,
        dim: int = 64,
        layers: int = 2,
        heads: int = 4,
        label_dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if not 0.0 <= label_dropout < 1.0:
            raise ValueError(f"label_dropout={label_dropout}: must be in [0, 1)")
        self.quantizer = quantizer
        self.patch_nums = quantizer.patch_nums
        self.num_classes, self.label_dropout = num_classes, label_dropout
        self.vocab, self.seq_len = quantizer.vocab, quantizer.seq_len
        self.first = self.patch_nums[0] ** 2
        self.cls = nn.Embedding(num_classes + 1, dim)
        self.start = nn.Parameter(torch.randn(1, self.first, dim) * 0.02)
        self.word = nn.Linear(quantizer.channels, dim)
        self.pos = nn.Parameter(torch.randn(self.seq_len, dim) * 0.02)
        self.lvl = nn.Embedding(len(self.patch_nums), dim)
        self.blocks = nn.ModuleList(_Block(dim, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, self.vocab)
        self.register_buffer("mask", block_causal_mask(self.patch_nums), persistent=False)
        self.register_buffer("levels", scale_levels(self.patch_nums), persistent=False)

    def _labels(self, labels: torch.Tensor | None, batch: int, device) -> torch.Tensor:
        if labels is None:
            return torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        if labels.shape != (batch,) or labels.is_floating_point():
            raise ValueError(
                f"labels: expected integer [{batch}], got {labels.dtype} {labels.shape}"
            )
        return labels.long()

    def _embed(self, x: torch.Tensor, start: int) -> torch.Tensor:
        n = x.shape[1]
        return x + self.pos[start : start + n] + self.lvl(self.levels[start : start + n])

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        b = tokens.shape[0]
        labels = self._labels(labels, b, tokens.device)
        if self.training and self.label_dropout > 0:  # VAR drops labels inside its forward
            drop = torch.rand(b, device=tokens.device) < self.label_dropout
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        sos = self.cls(labels)[:, None] + self.start
        rest = self.word(self.quantizer.next_scale_inputs(tokens))
        x = self._embed(torch.cat([sos, rest], 1), 0)
        for block in self.blocks:
            x = block(x, self.mask)
        return self.head(self.ln(x)).float()

    @torch.no_grad()
    def sample(
        self,
        n: int,
        labels: torch.Tensor | None,
        generator: torch.Generator,
        *,
        cfg: float = 0.0,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 0.0,
    ) -> torch.Tensor:
        """Tokens [n, L]: scale by scale, every token of a scale at once, with a KV cache
        (one forward over the pn_k^2 new positions per scale). ``cfg`` > 0 runs the null-label
        rows beside the conditional ones and mixes them with :func:`cfg_ramp` / :func:`guide`.
        Uniforms [n, pn_k^2] float64 come from ``generator`` (CPU) scale by scale."""
        device = self.pos.device
        labels = self._labels(None if labels is None else labels.to(device), n, device)
        if cfg < 0:
            raise ValueError(f"cfg={cfg}: must be >= 0 (0 = no guidance)")
        guided = cfg > 0
        rows = torch.cat([labels, torch.full_like(labels, self.num_classes)]) if guided else labels
        ramp = cfg_ramp(cfg, len(self.patch_nums))
        q = self.quantizer
        dim = self.pos.shape[1]
        caches = [
            {
                key: torch.empty(
                    len(rows), blk.heads, self.seq_len, dim // blk.heads, device=device
                )
                for key in ("k", "v")
            }
            for blk in self.blocks
        ]
        tokens = torch.zeros(n, self.seq_len, dtype=torch.long, device=device)
        f_hat = q.codebook.new_zeros(n, q.channels, q.size, q.size)
        start = 0
        for k, pn in enumerate(self.patch_nums):
            if k == 0:
                x = self.cls(rows)[:, None] + self.start
            else:
                x = self.word(q.scale_input(f_hat, pn))
                x = torch.cat([x, x]) if guided else x
            h = self._embed(x, start)
            for block, cache in zip(self.blocks, caches, strict=True):
                h = block.step(h, cache, start)
            logits = self.head(self.ln(h)).float()
            if guided:
                logits = guide(logits, ramp[k])
            u = torch.rand(n, pn * pn, generator=generator, dtype=torch.float64).to(device)
            idx = sample_tokens(logits, u, temperature=temperature, top_k=top_k, top_p=top_p)
            tokens[:, start : start + pn * pn] = idx
            f_hat = q.add_scale(f_hat, idx, pn)
            start += pn * pn
        return tokens

    @torch.no_grad()
    def reencode(self, tokens: torch.Tensor) -> torch.Tensor:
        """encode(decode(tokens)): the canonical tokens of the image a token map decodes to."""
        return self.quantizer.encode(self.quantizer.decode(tokens))
