"""token_logprobs and sequence_logprob against the fp64 reference, on every kernel backend."""

import pytest
import torch
from utils import (
    ALL_BACKENDS,
    DTYPES,
    GRAD_TOL,
    KERNEL_BACKENDS,
    assert_close_scaled,
    assert_raises_out_of_range,
    noncontiguous,
)

import ddo_fast
from ddo_fast import reference as R

# (B, L, V): singletons, V=3, V not a multiple of 8, and V past the one-tile limit of the
# Triton kernel (8192) so the blocked online logsumexp runs too.
SHAPES = [(1, 1, 3), (2, 3, 37), (3, 2, 129), (1, 2, 8200)]


def _inputs(shape, dtype, device, layout="contiguous", ignore_index=-100):
    logits = (3 * torch.randn(shape, device=device)).to(dtype)
    if layout == "noncontiguous":
        logits = noncontiguous(logits)
    targets = torch.randint(0, shape[2], shape[:2], device=device)
    if shape[0] * shape[1] > 1:
        targets.view(-1)[1] = ignore_index
    return logits.requires_grad_(), targets


@pytest.mark.parametrize("backend_device", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "noncontiguous"])
def test_token_logprobs_match_reference(backend_device, dtype, shape, layout):
    backend, device = backend_device
    logits, targets = _inputs(shape, dtype, device, layout)
    out = ddo_fast.token_logprobs(logits, targets, backend=backend)
    logits64 = logits.detach().double().requires_grad_()
    expected = R.token_logprobs_ref(logits64, targets)
    assert out.dtype == torch.float32 and out.shape == targets.shape
    assert_close_scaled(out, expected, rtol=1e-5, atol_frac=1e-6)
    grad_up = torch.randn_like(out)  # per-token upstream gradient
    (grad,) = torch.autograd.grad(out, logits, grad_up)
    (grad64,) = torch.autograd.grad(expected, logits64, grad_up.double())
    assert grad.dtype == dtype
    tol = GRAD_TOL[dtype]
    assert_close_scaled(grad, grad64, rtol=tol["rtol"], atol_frac=tol["rtol"])
    ignored = targets == -100
    assert torch.all(out[ignored] == 0) and torch.all(grad[ignored] == 0)


@pytest.mark.parametrize("backend_device", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sequence_logprob_matches_reference(backend_device, dtype):
    backend, device = backend_device
    logits, targets = _inputs((3, 5, 33), dtype, device, "noncontiguous")
    out = ddo_fast.sequence_logprob(logits, targets, backend=backend)
    logits64 = logits.detach().double().requires_grad_()
    expected = R.sequence_logprob_ref(logits64, targets)
    assert out.shape == (3,) and out.dtype == torch.float32
    assert_close_scaled(out, expected, rtol=1e-5, atol_frac=1e-6)
    g = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, logits, g)
    (grad64,) = torch.autograd.grad(expected, logits64, g.double())
    assert_close_scaled(
        grad, grad64, rtol=GRAD_TOL[dtype]["rtol"], atol_frac=GRAD_TOL[dtype]["rtol"]
    )


@pytest.mark.parametrize("backend_device", KERNEL_BACKENDS)
def test_custom_ignore_index_and_masked_vocabulary(backend_device):
    """A non-default ignore_index, and -inf logits (a masked vocabulary) giving 0 probability."""
    backend, device = backend_device
    logits, targets = _inputs((2, 3, 17), torch.float32, device, ignore_index=5)
    with torch.no_grad():
        logits[..., 16] = float("-inf")
    targets[targets == 16] = 0
    out = ddo_fast.token_logprobs(logits, targets, ignore_index=5, backend=backend)
    expected = R.token_logprobs_ref(logits.double(), targets, ignore_index=5)
    assert_close_scaled(out, expected, rtol=1e-5, atol_frac=1e-6)
    (grad,) = torch.autograd.grad(out.sum(), logits)
    assert torch.isfinite(grad).all() and torch.all(grad[..., 16] == 0)


@pytest.mark.parametrize("backend_device", KERNEL_BACKENDS)
@pytest.mark.parametrize("bad", [-1, 37])
@pytest.mark.parametrize("fn", ["token_logprobs", "sequence_logprob"])
def test_out_of_range_target_raises(backend_device, bad, fn):
    backend, device = backend_device
    assert_raises_out_of_range(
        f"""
        import torch, ddo_fast
        logits = torch.randn(2, 3, 37, device="{device}")
        targets = torch.randint(0, 37, (2, 3), device="{device}")
        targets[1, 2] = {bad}
        ddo_fast.{fn}(logits, targets, backend="{backend}")
        """,
        device,
    )


# --------------------------------------------------------------- precision at large logit offsets
@pytest.mark.parametrize("backend_device", ALL_BACKENDS)
@pytest.mark.parametrize("vocab", [37, 9001], ids=["single-tile", "blocked"])
@pytest.mark.parametrize("offset", [1e3, -1e3, 1e4, -1e4], ids=str)
def test_logprobs_precise_at_large_offsets(backend_device, vocab, offset):
    """logp = (x_t - m) - log s keeps full precision where fp32 m + log s would round away
    ~5e-4 (the ulp of 1e4). Bounds: 2e-5 on logp (measured <= 1.4e-6) and 1e-6 * |upstream| on
    every gradient element (measured <= 3e-7), against float64 on the same fp32 logits.
    V = 9001 runs the blocked online-logsumexp path of the Triton kernel."""
    backend, device = backend_device
    logits = (offset + 3 * torch.randn(2, 3, vocab, device=device)).requires_grad_()
    targets = torch.randint(0, vocab, (2, 3), device=device)
    out = ddo_fast.token_logprobs(logits, targets, backend=backend)
    logits64 = logits.detach().double().requires_grad_()
    expected = torch.log_softmax(logits64, -1).gather(-1, targets[..., None])[..., 0]
    assert (out.double() - expected).abs().max() <= 2e-5
    up = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, logits, up)
    (grad64,) = torch.autograd.grad(expected, logits64, up.double())
    assert torch.all((grad.double() - grad64).abs() <= 1e-6 * up.double().abs()[..., None])


# ------------------------------------------------------------------------------ target dtypes
@pytest.mark.parametrize("backend_device", ALL_BACKENDS)
@pytest.mark.parametrize(
    "target_dtype", [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8], ids=str
)
def test_any_integer_target_dtype(backend_device, target_dtype):
    """Targets are read in their own integer dtype; ignore_index is compared as int64 (200 for
    uint8, which cannot hold -100)."""
    backend, device = backend_device
    ignore_index = 200 if target_dtype == torch.uint8 else -100
    logits = (3 * torch.randn(2, 3, 37, device=device)).requires_grad_()
    targets = torch.randint(0, 37, (2, 3), device=device)
    targets[0, 1] = ignore_index
    out = ddo_fast.token_logprobs(
        logits, targets.to(target_dtype), ignore_index=ignore_index, backend=backend
    )
    logits64 = logits.detach().double().requires_grad_()
    expected = R.token_logprobs_ref(logits64, targets, ignore_index=ignore_index)
    assert_close_scaled(out, expected, rtol=1e-5, atol_frac=1e-6)
    assert out[0, 1] == 0
    up = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, logits, up)
    (grad64,) = torch.autograd.grad(expected, logits64, up.double())
    assert_close_scaled(grad, grad64, rtol=1e-5, atol_frac=1e-6)


@pytest.mark.parametrize("backend_device", ALL_BACKENDS)
@pytest.mark.parametrize("bad_dtype", [torch.bool, torch.float32], ids=str)
def test_bool_or_float_targets_raise(backend_device, bad_dtype):
    backend, device = backend_device
    logits = torch.randn(2, 3, 5, device=device)
    targets = torch.randint(0, 2, (2, 3), device=device).to(bad_dtype)
    with pytest.raises(TypeError, match="targets"):
        ddo_fast.token_logprobs(logits, targets, backend=backend)


# ------------------------------------------------------------------------------------ fast_exp
def _ulp32(x: torch.Tensor) -> torch.Tensor:
    """The fp32 spacing at |x| (x finite float32, as float64); 2^-149 at 0 and in subnormals."""
    a = x.abs()
    return (torch.nextafter(a, torch.tensor(float("inf"))) - a).double()


def test_fast_exp_on_the_whole_float_range():
    """The C++ exp (csrc/cpu/vec_math.h) against double exp: <= 2 ulp of the fp32 result where
    it is finite (normal and subnormal), inf above the overflow threshold, 0 at -inf, NaN in
    NaN out."""
    fast_exp = torch.ops.ddo_fast_testing.fast_exp
    x = torch.cat(
        [
            torch.linspace(-110.0, 90.0, 2_000_001),
            torch.linspace(-1.0, 1.0, 100_001),
            torch.tensor([88.72, 88.7228, 88.7229, 89.0, 1e3, 3e38, -87.33, -87.34, -103.97]),
            torch.tensor([-103.98, -104.0, -1e3, -3e38, 0.0, -0.0, 1e-30, -1e-30]),
        ]
    )
    y = fast_exp(x)
    exact = torch.exp(x.double())
    rounded = exact.float()
    finite = torch.isfinite(rounded)
    ulps = (y.double() - exact).abs()[finite] / _ulp32(rounded[finite])
    assert ulps.max() <= 2.0, float(ulps.max())
    assert torch.all(y[~finite] == float("inf"))  # every x past the overflow threshold
    assert torch.all(y[x < -103.98] == 0)
    special = fast_exp(torch.tensor([float("inf"), float("-inf"), float("nan")]))
    assert special[0] == float("inf") and special[1] == 0 and special[2].isnan()


def test_subnormal_softmax_through_cpp_gradient():
    """A row whose softmax entries are subnormal in fp32 (x - m in [-104, -87]): the C++
    gradient keeps them (within 2 ulp of the subnormal grid) and gives exact 0 below."""
    row = torch.tensor([0.0, -88.0, -90.5, -95.0, -100.0, -103.0, -110.0, float("-inf")])
    logits = row.reshape(1, 1, -1).clone().requires_grad_()
    targets = torch.zeros(1, 1, dtype=torch.long)
    out = ddo_fast.token_logprobs(logits, targets, backend="cpp")
    (grad,) = torch.autograd.grad(out, logits, torch.ones_like(out))
    exact = -torch.softmax(row.double(), -1)
    exact[0] += 1.0
    err = (grad[0, 0, 1:].double() - exact[1:]).abs()
    assert torch.all(err <= 2 * _ulp32(exact[1:].float()))
    assert grad[0, 0, 1] != 0 and grad[0, 0, 5] != 0 and grad[0, 0, 6] == 0
