"""ar_ddo_loss against the fp64 reference, on every kernel backend."""

import pytest
import torch
from utils import (
    DTYPES,
    GRAD_TOL,
    KERNEL_BACKENDS,
    assert_close_scaled,
    assert_raises_out_of_range,
    batch_strided,
    rand_mask,
    upstream_like,
)

import ddo_fast
from ddo_fast import reference as R


def _inputs(shape, dtype, device, strided=False):
    logits = (2 * torch.randn(shape, device=device)).to(dtype)
    if strided:
        logits = batch_strided(logits)
    targets = torch.randint(0, shape[2], shape[:2], device=device)
    if shape[0] * shape[1] > 2:
        targets[0, -1] = -100
    ref_logprob = torch.randn(shape[0], device=device) * 3 - shape[1] * 2.5
    return logits.requires_grad_(), targets, ref_logprob


@pytest.mark.parametrize("backend_device", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 3), (4, 3, 37), (3, 5, 129)], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_and_grad_match_reference(backend_device, dtype, shape, reduction):
    backend, device = backend_device
    logits, targets, ref = _inputs(shape, dtype, device, strided=shape[0] == 3)
    is_real = rand_mask(shape[0], device)
    sw = torch.rand(shape[0], device=device) + 0.5 if reduction != "sum" else None
    kw = dict(alpha=4.0, beta=0.2, sample_weight=sw, reduction=reduction)
    out = ddo_fast.ar_ddo_loss(logits, targets, ref, is_real, backend=backend, **kw)
    logits64 = logits.detach().double().requires_grad_()
    expected = R.ar_ddo_loss_ref(logits64, targets, ref.double(), is_real, **kw)
    assert out.dtype == torch.float32 and out.shape == expected.shape
    assert_close_scaled(out, expected, rtol=1e-5, atol_frac=1e-5)
    grad_up = upstream_like(out)
    (grad,) = torch.autograd.grad(out, logits, grad_up)
    (grad64,) = torch.autograd.grad(expected, logits64, grad_up.double())
    assert grad.dtype == dtype
    tol = GRAD_TOL[dtype]
    assert_close_scaled(grad, grad64, rtol=tol["rtol"], atol_frac=tol["rtol"])


@pytest.mark.parametrize("backend_device", KERNEL_BACKENDS)
def test_ref_logprob_from_sequence_logprob_gives_zero_ratio(backend_device):
    """theta == ref: r = 0 exactly in expectation of the API: loss = (1 + alpha) log 2."""
    backend, device = backend_device
    logits, targets, _ = _inputs((4, 6, 21), torch.float32, device)
    with torch.no_grad():
        ref = ddo_fast.sequence_logprob(logits, targets, backend=backend)
    is_real = torch.tensor([True, True, False, False], device=device)
    loss = ddo_fast.ar_ddo_loss(logits, targets, ref, is_real, alpha=3.0, backend=backend)
    torch.testing.assert_close(loss.cpu(), torch.tensor(4 * 0.6931471805599453))


@pytest.mark.parametrize("backend_device", KERNEL_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_empty_batch(backend_device, reduction):
    backend, device = backend_device
    logits = torch.randn(0, 4, 7, device=device, requires_grad=True)
    targets = torch.zeros(0, 4, dtype=torch.long, device=device)
    empty = torch.zeros(0, device=device)
    out = ddo_fast.ar_ddo_loss(
        logits, targets, empty, empty.bool(), reduction=reduction, backend=backend
    )
    assert torch.all(out == 0)
    out.sum().backward()
    assert logits.grad is not None and logits.grad.shape == logits.shape


@pytest.mark.parametrize("backend_device", KERNEL_BACKENDS)
def test_out_of_range_target_raises(backend_device):
    backend, device = backend_device
    assert_raises_out_of_range(
        f"""
        import torch, ddo_fast
        logits = torch.randn(2, 3, 11, device="{device}", requires_grad=True)
        targets = torch.randint(0, 11, (2, 3), device="{device}")
        targets[0, 0] = 11
        is_real = torch.tensor([True, False], device="{device}")
        ddo_fast.ar_ddo_loss(logits, targets, torch.zeros(2, device="{device}"), is_real,
                             backend="{backend}")
        """,
        device,
    )
