"""Tiny models for the training-loop tests (one per adapter family)."""

import torch
from torch import nn


class TinyEps(nn.Module):
    """epsilon-prediction model(x_t, t) for 2-D data."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 16), nn.SiLU(), nn.Linear(16, 2))

    def forward(self, x, t, labels=None):
        return self.net(torch.cat([x, t.float()[:, None] / 1000], 1))


class TinyAR(nn.Module):
    """Causal model(tokens [B, L], labels) -> logits [B, L, V]: position i sees tokens < i
    (through a running mean of their embeddings) and the class label."""

    def __init__(self, vocab: int = 5, classes: int = 3, dim: int = 8) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.cls = nn.Embedding(classes + 1, dim)  # + a null label for CFG
        self.out = nn.Linear(dim, vocab)

    def forward(self, tokens, labels=None):
        b, length = tokens.shape
        e = self.tok(tokens)
        prev = torch.cat([e.new_zeros(b, 1, e.shape[2]), e[:, :-1]], 1).cumsum(1)
        prev = prev / torch.arange(1, length + 1, device=e.device)[None, :, None]
        lab = self.cls(labels)[:, None] if labels is not None else 0
        return self.out(torch.tanh(prev + lab))


class NaNAfter(nn.Module):
    """Wraps a denoiser; returns NaN when `poison` is set (non-finite handling tests)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.poison = False

    def forward(self, x, sigma, labels=None):
        out = self.inner(x, sigma, labels)
        return out * float("nan") if self.poison else out


class Recorder(nn.Module):
    """Wraps a model and keeps a detached copy of the arguments of every forward call (to check
    what theta and the reference were given)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls: list[tuple] = []

    def forward(self, *args):
        self.calls.append(tuple(a.detach().clone() if torch.is_tensor(a) else a for a in args))
        return self.inner(*args)
