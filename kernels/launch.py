"""Launch-size heuristics shared by the kernels.

On a GPU the grids aim at several waves of resident programs (bandwidth-bound kernels need many
bytes in flight); under the interpreter every program costs ~1.7 ms of Python, so grids are kept
as small as the kernels allow.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator

import torch

from .._backend import TRITON_INTERPRET


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@functools.cache
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def target_programs(device: torch.device) -> int:
    """Programs that keep every SM busy for a few waves (1 when interpreting)."""
    if TRITON_INTERPRET or device.type != "cuda":
        return 1
    return 8 * sm_count(device.index if device.index is not None else torch.cuda.current_device())


def rows_2d(x: torch.Tensor, batch: int) -> torch.Tensor:
    """``x`` as [batch, D] with unit inner stride, copying only when no such view exists."""
    # the product of the shape, not x[0].numel(): indexing builds a view (~2 us per call)
    rows = x.reshape(batch, math.prod(x.shape[1:]) if batch else 0)
    if rows.shape[1] > 1 and rows.stride(1) != 1:
        rows = rows.contiguous()
    return rows


def vector(x: torch.Tensor | None) -> torch.Tensor | None:
    """A contiguous [B] tensor (a no-op in the usual case) so kernels index it with ``b``."""
    return None if x is None else x.contiguous()


# ---------------------------------------------------------------- test/benchmark-only hook
STUBBED = False  # True inside stubbed_launches(): kernels are not run, outputs are garbage


@contextlib.contextmanager
def stubbed_launches() -> Iterator[None]:
    """Every ``kernel[grid](...)`` becomes a no-op while the context is open.

    For measuring the host (Python) part of a launcher on a machine without a GPU
    (``python -m ddo_fast.bench.host --stub-triton``): what is left is argument checks,
    allocations, grid arithmetic and autograd, i.e. the host cost of a CUDA call minus the
    launches themselves. Outputs are uninitialised memory, so checks that read kernel results
    on the host (the CPU branch of ``assert_targets``) are skipped. Never use it for results.
    """
    import triton.runtime.jit as jit

    global STUBBED
    original = jit.KernelInterface.__getitem__
    jit.KernelInterface.__getitem__ = lambda self, grid: _no_launch
    STUBBED = True
    try:
        yield
    finally:
        jit.KernelInterface.__getitem__ = original
        STUBBED = False


def _no_launch(*args, **kwargs) -> None:
    return None
