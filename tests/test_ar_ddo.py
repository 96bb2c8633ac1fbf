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
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_model_equal_to_reference_gives_zero_ratio(backend_device, dtype):
    """theta == ref, with ref_logprob from float64 (not from the backend under test, which would
    hide a wrong log-prob): r = 0 to fp32 accumulation, loss = (1 + alpha) log 2, and the
    gradient that of the float64 loss at r = 0."""
    backend, device = backend_device
    logits, targets, _ = _inputs((4, 6, 21), dtype, device)
    logits64 = logits.detach().double().requires_grad_()
    ref = R.sequence_logprob_ref(logits64, targets)
    is_real = torch.tensor([True, True, False, False], device=device)
    loss, r = ddo_fast.ar_ddo_loss(
        logits, targets, ref.detach(), is_real, alpha=3.0, backend=backend, return_logratio=True
    )
    assert r.abs().max() <= 1e-5 * ref.detach().abs().max()
    torch.testing.assert_close(loss.cpu(), torch.tensor(4 * 0.6931471805599453))
    loss64 = R.ddo_loss_ref(
        R.sequence_logprob_ref(logits64, targets) - ref.detach(), is_real, alpha=3.0
    )
    (grad,) = torch.autograd.grad(loss, logits)
    (grad64,) = torch.autograd.grad(loss64, logits64)
    tol = GRAD_TOL[dtype]
    assert_close_scaled(grad, grad64, rtol=tol["rtol"], atol_frac=tol["rtol"])


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("backend_device", KERNEL_BACKENDS)
def test_fused_zero_alpha_with_overflowing_beta(backend_device):
    """alpha = 0, only fake samples: loss and gradient exactly 0 though beta * r overflows."""
    backend, device = backend_device
    logits, targets, ref = _inputs((3, 4, 9), torch.float32, device)
    is_real = torch.zeros(3, dtype=torch.bool, device=device)
    out = ddo_fast.ar_ddo_loss(logits, targets, ref, is_real, alpha=0.0, beta=1e37, backend=backend)
    out.backward()
    assert out == 0 and torch.all(logits.grad == 0)


@pytest.mark.parametrize("backend_device", KERNEL_BACKENDS)
@pytest.mark.parametrize("target_dtype", [torch.int8, torch.int32, torch.uint8], ids=str)
def test_integer_target_dtypes(backend_device, target_dtype):
    backend, device = backend_device
    logits, targets, ref = _inputs((3, 4, 37), torch.float32, device)
    ignore_index = 250 if target_dtype == torch.uint8 else -100
    targets[0, -1] = ignore_index
    is_real = rand_mask(3, device)
    kw = dict(alpha=2.0, beta=0.4, ignore_index=ignore_index, reduction="none")
    out = ddo_fast.ar_ddo_loss(
        logits, targets.to(target_dtype), ref, is_real, backend=backend, **kw
    )
    logits64 = logits.detach().double().requires_grad_()
    expected = R.ar_ddo_loss_ref(logits64, targets, ref.double(), is_real, **kw)
    assert_close_scaled(out, expected, rtol=1e-5, atol_frac=1e-6)
    up = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, logits, up)
    (grad64,) = torch.autograd.grad(expected, logits64, up.double())
    assert_close_scaled(grad, grad64, rtol=1e-5, atol_frac=1e-6)


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
