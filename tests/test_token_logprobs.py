"""token_logprobs and sequence_logprob against the fp64 reference, on every kernel backend."""

import pytest
import torch
from utils import (
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
