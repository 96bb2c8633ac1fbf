"""Shared test helpers: backends and devices to test, tolerances, input makers."""

from __future__ import annotations

import importlib.util

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None

# (backend, device) pairs that run the library's kernels here: C++ on CPU always; Triton on
# CUDA, or on CPU through the interpreter (conftest sets TRITON_INTERPRET=1 without CUDA).
KERNEL_BACKENDS = [pytest.param(("cpp", "cpu"), id="cpp-cpu")]
if HAS_TRITON:
    dev = "cuda" if HAS_CUDA else "cpu"
    KERNEL_BACKENDS.append(pytest.param(("triton", dev), id=f"triton-{dev}"))

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Every route a public function can take here: the kernel backends and plain PyTorch.
_TORCH_DEVICE = "cuda" if HAS_CUDA else "cpu"
ALL_BACKENDS = [
    *KERNEL_BACKENDS,
    pytest.param(("torch", _TORCH_DEVICE), id=f"torch-{_TORCH_DEVICE}"),
]

# Tolerances (rtol, atol) for values the kernels compute in fp32 from the same (already
# rounded) inputs: the error is fp32 accumulation order only, whatever the input dtype.
FP32_TOL = dict(rtol=2e-5, atol=2e-5)
# Gradients are written in the input dtype: one rounding to that dtype on top of fp32 math.
GRAD_TOL = {
    torch.float32: dict(rtol=2e-5, atol=1e-6),
    torch.float16: dict(rtol=2e-3, atol=1e-5),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-4),
}


# Relative size of one rounding to each dtype (half an ulp at the top of a binade is 2^-p; one
# ulp, 2^(1-p), bounds a rounding on top of a few fp32 errors).
ULP = {
    torch.float32: 2.0**-23,
    torch.float16: 2.0**-10,
    torch.bfloat16: 2.0**-7,
    torch.float64: 2.0**-52,
}
# Smallest positive subnormal of each dtype: the absolute rounding step near zero.
TINY = {
    torch.float32: 2.0**-149,
    torch.float16: 2.0**-24,
    torch.bfloat16: 2.0**-133,
    torch.float64: 2.0**-1074,
}


def assert_within_rounding(
    actual: torch.Tensor, exact: torch.Tensor, rel: float | None = None, floor: float = 0.0
) -> float:
    """Elementwise |actual - exact| <= rel * |exact| + floor + TINY, rel defaulting to one ulp of
    ``actual.dtype``: the value is the exact one rounded once to its storage dtype (on top of fp32
    math). Returns the largest error in units of that bound (for reporting)."""
    rel = ULP[actual.dtype] if rel is None else rel
    a, e = actual.detach().to(torch.float64), exact.detach().to(torch.float64)
    assert a.shape == e.shape
    bound = rel * e.abs() + floor + TINY[actual.dtype]
    err = (a - e).abs()
    same_nonfinite = (~torch.isfinite(e)) & ((a == e) | (a.isnan() & e.isnan()))
    bad = ~((err <= bound) | same_nonfinite)
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(
            f"{int(bad.sum())}/{bad.numel()} elements beyond rounding: e.g. actual "
            f"{a.flatten()[i].item()!r} exact {e.flatten()[i].item()!r} bound "
            f"{bound.flatten()[i].item():.3g}"
        )
    finite = torch.isfinite(e)
    return float((err[finite] / bound[finite]).max()) if finite.any() else 0.0


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values in a layout with a padded last dimension (stride 2 over it)."""
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]


def batch_strided(t: torch.Tensor) -> torch.Tensor:
    """The same values as rows 0, 2, 4... of a larger batch (non-unit batch stride)."""
    big = torch.empty(2 * t.shape[0], *t.shape[1:], dtype=t.dtype, device=t.device)
    big[::2] = t
    return big[::2]


def rand_mask(batch: int, device: str) -> torch.Tensor:
    """A bool mask with at least one True and one False when batch >= 2."""
    mask = torch.rand(batch, device=device) < 0.5
    if batch >= 2:
        mask[0], mask[1] = True, False
    return mask


def assert_close_scaled(
    actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol_frac: float
) -> None:
    """assert_close with atol a fraction of the largest expected magnitude (sums of many terms
    carry absolute, not relative, rounding error)."""
    expected = expected.to(torch.float64)
    scale = expected.abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(
        actual.to(torch.float64), expected, rtol=rtol, atol=atol_frac * max(scale, 1e-12)
    )


def upstream_like(out: torch.Tensor) -> torch.Tensor:
    """A random upstream gradient: per-sample for reduction none (the case that catches a
    kernel that only supports a scalar grad), a random scalar otherwise."""
    return torch.randn_like(out) if out.dim() else torch.randn((), device=out.device) + 2.0


def assert_raises_out_of_range(call_source: str, device: str) -> None:
    """An out-of-range target must stop the op: a Python exception on CPU; on CUDA a device-side
    assert (no host sync), which poisons the CUDA context, so it is checked in a subprocess."""
    import subprocess
    import sys
    import textwrap

    if device != "cuda":
        namespace: dict = {}
        with pytest.raises((IndexError, RuntimeError), match="targets"):
            exec(textwrap.dedent(call_source), namespace)
        return
    code = textwrap.dedent(call_source) + "\ntorch.cuda.synchronize()\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0, "an out-of-range target did not stop the CUDA op"
    assert "assert" in proc.stderr.lower(), proc.stderr[-2000:]
