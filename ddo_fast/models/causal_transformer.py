"""A small VAR-like class-conditional causal transformer with KV-cache sampling.

The class token is the first input and ``logits[:, i]`` predicts ``tokens[:, i]`` from
``tokens[:, :i]`` (the contract of :class:`ddo_fast.adapters.CausalAR`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.heads, d // self.heads).unbind(2)
        att = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.proj(att.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.ln2(x))

    def step(self, x: torch.Tensor, cache: dict[str, torch.Tensor], pos: int) -> torch.Tensor:
        """One new position x [B, 1, d] attending to the cached keys/values of positions <= pos
        (decoding with a KV cache: O(L) per token instead of recomputing the prefix)."""
        b, _, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, 1, 3, self.heads, d // self.heads).unbind(2)
        cache["k"][:, :, pos] = k[:, 0]
        cache["v"][:, :, pos] = v[:, 0]
        att = F.scaled_dot_product_attention(
            q.transpose(1, 2), cache["k"][:, :, : pos + 1], cache["v"][:, :, : pos + 1]
        )
        x = x + self.proj(att.transpose(1, 2).reshape(b, 1, d))
        return x + self.mlp(self.ln2(x))


class CausalTransformer(nn.Module):
    """Pre-norm causal transformer over ``seq_len`` tokens with a class token (``num_classes``
    classes + one null label, index ``num_classes``)."""

    def __init__(
        self,
        vocab: int,
        seq_len: int,
        num_classes: int,
        dim: int = 128,
        layers: int = 2,
        heads: int = 4,
    ) -> None:
        super().__init__()
        self.vocab, self.seq_len, self.num_classes = vocab, seq_len, num_classes
        self.tok = nn.Embedding(vocab, dim)
        self.cls = nn.Embedding(num_classes + 1, dim)
        self.pos = nn.Parameter(torch.randn(seq_len, dim) * 0.02)
        self.blocks = nn.ModuleList(_Block(dim, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        b, n = tokens.shape
        if labels is None:
            labels = torch.full((b,), self.num_classes, device=tokens.device, dtype=torch.long)
        x = torch.cat([self.cls(labels)[:, None], self.tok(tokens[:, : n - 1])], 1)
        x = x + self.pos[:n]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))

    @torch.no_grad()
    def sample(
        self,
        n: int,
        labels: torch.Tensor | None,
        generator: torch.Generator,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """Ancestral sampling of n sequences at once, with a KV cache."""
        device = self.pos.device
        if labels is None:
            labels = torch.full((n,), self.num_classes, device=device, dtype=torch.long)
        labels = labels.to(device)
        dim = self.pos.shape[1]
        caches = [
            {
                key: torch.empty(n, blk.heads, self.seq_len, dim // blk.heads, device=device)
                for key in ("k", "v")
            }
            for blk in self.blocks
        ]
        tokens = torch.zeros(n, self.seq_len, dtype=torch.long, device=device)
        x = (self.cls(labels) + self.pos[0])[:, None]
        for i in range(self.seq_len):
            h = x
            for block, cache in zip(self.blocks, caches, strict=True):
                h = block.step(h, cache, i)
            logits = self.head(self.ln(h))[:, 0].double() / temperature
            u = torch.rand(n, 1, generator=generator, dtype=torch.float64).to(device)
            tokens[:, i] = (logits.softmax(-1).cumsum(-1) < u).sum(-1).clamp_max(self.vocab - 1)
            if i + 1 < self.seq_len:
                x = (self.tok(tokens[:, i]) + self.pos[i + 1])[:, None]
        return tokens
