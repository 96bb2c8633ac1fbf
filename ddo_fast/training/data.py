"""Real data and fake pools as deterministic, resumable sample streams.

The order of real samples is a fresh permutation per epoch, drawn from (seed, epoch): the
position in the stream (samples consumed so far) is the whole state, so a resumed run reads the
very samples the uninterrupted one would have, on any number of ranks.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch.utils.data import Dataset

from ..adapters import Batch


def tensor_digest(*tensors: torch.Tensor | None) -> str:
    """sha256 of tensors' dtypes, shapes and bytes (None counts as a marker): a cache key part."""
    h = hashlib.sha256()
    for t in tensors:
        if t is None:
            h.update(b"none")
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the bytes, without a copy
    return h.hexdigest()


def seed_for(*parts: Any) -> int:
    """A 63-bit seed from any parts, the same in every process (Python's hash() is salted)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def generator(*parts: Any) -> torch.Generator:
    return torch.Generator().manual_seed(seed_for(*parts))


class RealData:
    """A tensor [N, ...], a ``(tensor, labels)`` pair, or a Dataset of ``x`` / ``(x, label)``."""

    def __init__(self, data: Any) -> None:
        self.dataset: Dataset | None = None
        self.x: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None
        self._fingerprint: str | None = None
        self._epoch_perm: tuple[tuple[int, int], torch.Tensor] | None = None  # the last one drawn
        if isinstance(data, torch.Tensor):
            self.x = data
        elif (
            isinstance(data, (tuple, list))
            and len(data) == 2
            and all(isinstance(t, torch.Tensor) for t in data)
        ):
            self.x, self.labels = data
            if self.labels.shape[:1] != self.x.shape[:1]:
                raise ValueError(
                    f"real_data: labels {list(self.labels.shape)} and samples "
                    f"{list(self.x.shape)} must have the same first dimension"
                )
        elif isinstance(data, Dataset) or hasattr(data, "__getitem__"):
            self.dataset = data
        else:
            raise TypeError(
                "real_data must be a tensor [N, ...], a (tensor, labels) pair or a Dataset, "
                f"got {type(data).__name__}"
            )
        if len(self) == 0:
            raise ValueError("real_data is empty")

    def __len__(self) -> int:
        return len(self.x) if self.x is not None else len(self.dataset)

    def get(self, index: torch.Tensor) -> Batch:
        if self.x is not None:
            labels = None if self.labels is None else self.labels[index]
            return self.x[index], labels
        items = [self.dataset[i] for i in index.tolist()]
        if isinstance(items[0], (tuple, list)):
            xs = torch.stack([torch.as_tensor(it[0]) for it in items])
            return xs, torch.as_tensor([int(it[1]) for it in items])
        return torch.stack([torch.as_tensor(it) for it in items]), None

    def fingerprint(self) -> str:
        """What the data is, for cache keys: sha256 of a tensor's (and its labels') bytes; for a
        Dataset, of its length and 64 items spread evenly over it (reading all of a large
        Dataset would cost an epoch; an edit elsewhere goes unseen, so give a changed Dataset a
        new out_dir). Computed once."""
        if self._fingerprint is None:
            if self.x is not None:
                self._fingerprint = tensor_digest(self.x, self.labels)
            else:
                n = len(self)
                picks = torch.linspace(0, n - 1, min(n, 64)).long().unique()
                xs, labels = self.get(picks)
                self._fingerprint = tensor_digest(torch.tensor(n), xs, labels)
        return self._fingerprint

    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.get(torch.tensor([0]))[0].shape[1:])

    def num_classes(self) -> int | None:
        """1 + the largest label, when labels exist (read from the tensor or a few items)."""
        if self.x is not None:
            return None if self.labels is None else int(self.labels.max()) + 1
        labels = self.get(torch.arange(min(len(self), 4096)))[1]
        return None if labels is None else int(labels.max()) + 1

    def epoch_perm(self, seed: int, epoch: int) -> torch.Tensor:
        """The permutation of epoch ``epoch``: drawn once and kept until another epoch's is
        asked for (``indices`` runs every step; the permutation is an epoch's, not a step's)."""
        key = (seed, epoch)
        if self._epoch_perm is None or self._epoch_perm[0] != key:
            perm = torch.randperm(len(self), generator=generator(seed, "epoch", epoch))
            self._epoch_perm = (key, perm)
        return self._epoch_perm[1]

    def indices(self, seed: int, start: int, count: int) -> torch.Tensor:
        """Stream positions [start, start + count) mapped through per-epoch permutations."""
        n = len(self)
        parts = []
        for epoch in range(start // n, (start + count - 1) // n + 1):  # no tensor -> host reads
            lo, hi = max(start, epoch * n), min(start + count, (epoch + 1) * n)
            parts.append(self.epoch_perm(seed, epoch)[lo - epoch * n : hi - epoch * n])
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)


def balanced_labels(num_classes: int | None, n: int, generator: torch.Generator):
    """Exactly balanced class labels (as the paper stresses for evaluation), shuffled."""
    if num_classes is None:
        return None
    labels = torch.arange(n) % num_classes
    return labels[torch.randperm(n, generator=generator)]
