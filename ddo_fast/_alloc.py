"""The CPU kernels' allocator for large outputs (the gradients of the logits and predictions).

A fresh multi-megabyte CPU allocation faults on every 4 KiB page at first write; at the sizes
of a training step those faults can cost more than the kernel (``csrc/cpu/large_alloc.h``).
Three policies, per process:

``"plain"`` ``torch.empty``: every call pays the faults.
``"thp"``   2 MiB-aligned memory advised for transparent huge pages: 512x fewer faults, but a
            huge-page fault may compact memory synchronously (slow single calls: a tail).
``"pool"``  (default) the ``thp`` buffers, recycled: when a gradient is freed its buffer goes
            back to a bounded cache (at most 2 buffers of one size, 4 GiB in all) and the next
            call of that size reuses it without faulting, as the CUDA caching allocator does.
            :func:`release_cpu_buffers` hands the cache back to the OS.

Outputs of 2 MiB and more follow the policy; smaller ones always come from ``torch.empty``.
The default comes from ``$DDO_FAST_CPU_ALLOC`` (read when the first large buffer is made), else
``"pool"``; ``python -m ddo_fast.bench.alloc`` measured the choice (p95 of a training-like loop,
``benchmarks/results_cpu_alloc.json``).
"""

from __future__ import annotations

import torch

POLICIES = ("plain", "thp", "pool")


def _op(name: str):
    # registered by the C++ library (csrc/cpu/large_alloc.cpp), loaded (or compiled) on first use
    from ._library import load_ops

    load_ops()
    return getattr(torch.ops.ddo_fast, name)


def cpu_alloc(policy: str | None = None) -> str:
    """Set the large-buffer policy (``None`` keeps it) and return the policy in force.
    Leaving ``"pool"`` releases its cache."""
    if policy is not None and policy not in POLICIES:
        raise ValueError(f"ddo_fast.cpu_alloc: policy must be one of {POLICIES}, got {policy!r}")
    return _op("cpu_alloc")(policy or "")


def release_cpu_buffers() -> int:
    """Free the pool's cached buffers; returns the bytes handed back."""
    return _op("cpu_buffers")("release")


def cpu_buffer_stats() -> dict[str, int]:
    """``{"cached": bytes held by the pool, "hits": reuses, "misses": fresh buffers}``."""
    return {k: _op("cpu_buffers")(k) for k in ("cached", "hits", "misses")}
