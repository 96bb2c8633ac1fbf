"""A multi-scale residual quantiser (VAR's tokenizer scheme, Tian et al. 2024, Sec. 3.2 / Alg. 1)
with one shared k-means codebook, for small images such as the 8x8 digits.

An image f [B, C, H, W] becomes K token maps r_1..r_K of sizes pn_k x pn_k (``patch_nums``, the
last one H = W): for k = 1..K

    r_k   = Q(area_down(f_rest, pn_k))      Q: nearest codebook entry, one codebook for all k
    z_k   = up(codebook[r_k], H)            bicubic, as in VAR (identity at pn_k = H)
    f_rest <- f_rest - z_k

so decode(r) = sum_k z_k, and each finer scale quantises what the coarser ones left. Tokens are
concatenated coarse to fine: [B, L], L = sum_k pn_k^2 (1, 2, 4, 8 -> 85). VAR quantises the
feature map of a learned VAE; here the "features" are the pixels themselves (C = 1 for grey
digits) and the codebook is learned by k-means on the residuals of the train split
(:meth:`MultiScaleQuantizer.fit`), so the reconstruction error after scale k falls with k.

encode(decode(t)) == t is *not* guaranteed, in VAR nor here: decode(t) carries the finer scales'
residuals, whose area means at a coarser scale are not zero in general, so re-encoding may pick
another coarse code (and the finer codes follow). The map x -> decode(encode(x)) projects onto
decodable images; re-encoding a sampled token map (DDO's decode -> re-encode of fakes) replaces it
by the canonical tokens of its own image, which is why it can change the fakes at all.

:meth:`next_scale_inputs` is VAR's ``idxBl_to_var_input``: the transformer's input at the
positions of scale k is the cumulative reconstruction of scales < k, area-downsampled to pn_k.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _down(f: torch.Tensor, pn: int) -> torch.Tensor:
    return f if f.shape[-1] == pn else F.interpolate(f, size=(pn, pn), mode="area")


def _up(z: torch.Tensor, size: int) -> torch.Tensor:
    return z if z.shape[-1] == size else F.interpolate(z, size=(size, size), mode="bicubic")


def check_patch_nums(patch_nums: Sequence[int]) -> tuple[int, ...]:
    """``patch_nums`` as a tuple of strictly increasing positive ints, or ValueError."""
    pns = tuple(int(p) for p in patch_nums)
    if (
        not pns
        or any(p < 1 for p in pns)
        or any(a >= b for a, b in zip(pns[:-1], pns[1:], strict=True))
    ):
        raise ValueError(f"patch_nums={patch_nums!r}: must be strictly increasing ints >= 1")
    return pns


class MultiScaleQuantizer(nn.Module):
    """Residual pyramid of ``patch_nums`` token maps over images [B, C, S, S] (S = the last
    patch number) with the shared ``codebook`` [V, C] (a buffer, saved with the model)."""

    def __init__(self, codebook: torch.Tensor, patch_nums: Sequence[int] = (1, 2, 4, 8)) -> None:
        super().__init__()
        if codebook.dim() != 2 or not codebook.is_floating_point():
            raise ValueError(f"codebook: expected a float [V, C] tensor, got {codebook.shape}")
        self.patch_nums = check_patch_nums(patch_nums)
        self.size = self.patch_nums[-1]
        self.register_buffer("codebook", codebook.detach().float().clone())

    @property
    def vocab(self) -> int:
        return self.codebook.shape[0]

    @property
    def channels(self) -> int:
        return self.codebook.shape[1]

    @property
    def seq_len(self) -> int:
        return sum(p * p for p in self.patch_nums)

    # ------------------------------------------------------------------------ fitting
    @classmethod
    def fit(
        cls,
        images: torch.Tensor,
        vocab: int = 64,
        patch_nums: Sequence[int] = (1, 2, 4, 8),
        *,
        rounds: int = 3,
        iters: int = 30,
        max_points: int = 20_000,
        seed: int = 0,
    ) -> MultiScaleQuantizer:
        """k-means codebook of ``vocab`` entries on the residuals of ``images`` [N, C, S, S].

        Round 1 clusters the unquantised residual pyramid (r_k = area_down(f_rest), f_rest -=
        up(r_k)); each later round re-encodes with the current codebook and clusters the
        residual vectors the encoder actually quantises. Lloyd iterations in float64,
        initialised from a seeded random subset (deterministic for a seed)."""
        pns = check_patch_nums(patch_nums)
        if images.dim() != 4 or images.shape[-1] != pns[-1] or images.shape[-2] != pns[-1]:
            raise ValueError(
                f"images: expected [N, C, {pns[-1]}, {pns[-1]}], got {list(images.shape)}"
            )
        if not 2 <= vocab:
            raise ValueError(f"vocab={vocab}: need at least 2 codes")
        x = images.detach().double().cpu()
        g = torch.Generator().manual_seed(seed)
        codebook = None
        for _ in range(rounds):
            vectors = cls._residual_vectors(x, pns, codebook)
            if len(vectors) < vocab:
                raise ValueError(f"vocab={vocab}: only {len(vectors)} residual vectors to fit")
            if len(vectors) > max_points:  # a seeded subset keeps Lloyd's cost bounded
                vectors = vectors[torch.randperm(len(vectors), generator=g)[:max_points]]
            codebook = _kmeans(vectors, vocab, iters, g)
        return cls(codebook.float(), pns)

    @staticmethod
    def _residual_vectors(
        x: torch.Tensor, pns: tuple[int, ...], codebook: torch.Tensor | None
    ) -> torch.Tensor:
        """Every scale's residual vectors [sum_k N pn_k^2, C] that the encoder quantises
        (unquantised pyramid when ``codebook`` is None)."""
        f_rest, out = x.clone(), []
        for pn in pns:
            r = _down(f_rest, pn)
            flat = r.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
            out.append(flat)
            if codebook is not None:
                flat = codebook[_nearest(flat, codebook)]
            z = flat.reshape(x.shape[0], pn, pn, x.shape[1]).permute(0, 3, 1, 2)
            f_rest = f_rest - _up(z, x.shape[-1])
        return torch.cat(out)

    # ------------------------------------------------------------------- encode / decode
    def _check_images(self, x: torch.Tensor) -> None:
        want = (self.channels, self.size, self.size)
        if x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"images: expected [B, {', '.join(map(str, want))}], got {x.shape}")

    def _check_tokens(self, tokens: torch.Tensor) -> None:
        if tokens.dim() != 2 or tokens.shape[1] != self.seq_len or tokens.is_floating_point():
            raise ValueError(
                f"tokens: expected integer [B, {self.seq_len}] (patch_nums {self.patch_nums}), "
                f"got {tokens.dtype} {list(tokens.shape)}"
            )

    def split(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """Per-scale views [B, pn_k^2] of ``tokens`` [B, L]."""
        return list(tokens.split([p * p for p in self.patch_nums], dim=1))

    def embed(self, idx: torch.Tensor, pn: int) -> torch.Tensor:
        """codebook[idx] of one scale's tokens [B, pn^2] as a map [B, C, pn, pn]."""
        z = self.codebook[idx.long()]
        return z.reshape(idx.shape[0], pn, pn, self.channels).permute(0, 3, 1, 2)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, C, S, S] -> tokens int64 [B, L], coarse to fine."""
        self._check_images(x)
        f_rest, out = x.float().clone(), []
        for pn in self.patch_nums:
            r = _down(f_rest, pn).permute(0, 2, 3, 1).reshape(-1, self.channels)
            idx = _nearest(r, self.codebook).reshape(x.shape[0], pn * pn)
            out.append(idx)
            f_rest = f_rest - _up(self.embed(idx, pn), self.size)
        return torch.cat(out, 1)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, scales: int | None = None) -> torch.Tensor:
        """Tokens [B, L] -> images [B, C, S, S]: sum of the first ``scales`` (default all) z_k."""
        self._check_tokens(tokens)
        parts = self.split(tokens)[: len(self.patch_nums) if scales is None else scales]
        f_hat = self.codebook.new_zeros(tokens.shape[0], self.channels, self.size, self.size)
        for idx, pn in zip(parts, self.patch_nums, strict=False):
            f_hat = f_hat + _up(self.embed(idx, pn), self.size)
        return f_hat

    def next_scale_inputs(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, L - pn_1^2, C]: for each scale k >= 2, area_down(sum_{j<k} z_j, pn_k) flattened
        (VAR's teacher-forcing input). Depends on the tokens of scales < K only."""
        self._check_tokens(tokens)
        f_hat = self.codebook.new_zeros(tokens.shape[0], self.channels, self.size, self.size)
        out = []
        parts = self.split(tokens)
        for k in range(1, len(self.patch_nums)):
            f_hat = f_hat + _up(self.embed(parts[k - 1], self.patch_nums[k - 1]), self.size)
            out.append(self.scale_input(f_hat, self.patch_nums[k]))
        if not out:
            return f_hat.new_zeros(tokens.shape[0], 0, self.channels)
        return torch.cat(out, 1)

    def scale_input(self, f_hat: torch.Tensor, pn: int) -> torch.Tensor:
        """area_down(f_hat, pn) as [B, pn^2, C]: one scale's input from the reconstruction."""
        return _down(f_hat, pn).permute(0, 2, 3, 1).reshape(f_hat.shape[0], pn * pn, -1)

    def add_scale(self, f_hat: torch.Tensor, idx: torch.Tensor, pn: int) -> torch.Tensor:
        """f_hat + up(codebook[idx]): the reconstruction after one more scale (sampling)."""
        return f_hat + _up(self.embed(idx, pn), self.size)


def _nearest(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """argmin_v |x - c_v|^2 [N] (ties: the lowest index)."""
    d = (x * x).sum(1, keepdim=True) - 2 * x @ codebook.T + (codebook * codebook).sum(1)
    return d.argmin(1)


def _kmeans(x: torch.Tensor, k: int, iters: int, g: torch.Generator) -> torch.Tensor:
    """Lloyd's k-means [k, C] on rows of ``x`` (float64); an empty cluster is re-seeded at the
    point farthest from its centre."""
    centres = x[torch.randperm(len(x), generator=g)[:k]].clone()
    for _ in range(iters):
        assign = _nearest(x, centres)
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        empty = counts == 0
        centres = torch.where(empty[:, None], centres, sums / counts.clamp_min(1)[:, None])
        if empty.any():
            err = (x - centres[assign]).square().sum(1)
            far = err.topk(int(empty.sum())).indices
            centres[empty] = x[far]
    return centres
