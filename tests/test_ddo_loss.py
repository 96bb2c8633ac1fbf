"""ddo_loss against the fp64 reference, on every kernel backend."""

import pytest
import torch
from utils import ALL_BACKENDS, KERNEL_BACKENDS, assert_close_scaled, rand_mask, upstream_like

import ddo_fast
from ddo_fast import reference as R


@pytest.mark.parametrize("backend_device", KERNEL_BACKENDS)
@pytest.mark.parametrize("batch", [1, 2, 7, 300])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("with_sw", [False, True])
def test_matches_reference(backend_device, batch, reduction, with_sw):
    backend, device = backend_device
    r = (torch.randn(batch, device=device) * 30).requires_grad_()
    is_real = rand_mask(batch, device)
    sw = torch.rand(batch, device=device) if with_sw else None
    kw = dict(alpha=3.0, beta=0.7, sample_weight=sw, reduction=reduction)
    out = ddo_fast.ddo_loss(r, is_real, backend=backend, **kw)
    r64 = r.detach().double().requires_grad_()
    expected = R.ddo_loss_ref(r64, is_real, **kw)
    assert out.dtype == torch.float32
    assert_close_scaled(out, expected, rtol=1e-5, atol_frac=1e-6)
    g = upstream_like(out)
    (grad,) = torch.autograd.grad(out, r, g)
    (grad64,) = torch.autograd.grad(expected, r64, g.double())
    assert_close_scaled(grad, grad64, rtol=1e-5, atol_frac=1e-6)


@pytest.mark.parametrize("backend_device", KERNEL_BACKENDS)
@pytest.mark.parametrize("all_real", [True, False])
def test_one_group_only_has_no_nan(backend_device, all_real):
    backend, device = backend_device
    r = torch.randn(5, device=device, requires_grad=True)
    is_real = torch.full((5,), all_real, device=device)
    out = ddo_fast.ddo_loss(r, is_real, backend=backend)
    expected = R.ddo_loss_ref(r.detach().double(), is_real)
    assert torch.isfinite(out)
    assert_close_scaled(out, expected, rtol=1e-5, atol_frac=1e-6)


@pytest.mark.parametrize("backend_device", KERNEL_BACKENDS)
def test_extreme_logratios_are_finite(backend_device):
    backend, device = backend_device
    r = torch.tensor([1e4, -1e4, 1e4, -1e4, 0.0], device=device, requires_grad=True)
    is_real = torch.tensor([True, True, False, False, True], device=device)
    out = ddo_fast.ddo_loss(r, is_real, reduction="none", backend=backend)
    expected = R.ddo_loss_ref(r.detach().double(), is_real, reduction="none")
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)
    out.sum().backward()
    assert torch.isfinite(r.grad).all()


@pytest.mark.parametrize("backend_device", KERNEL_BACKENDS)
def test_fp64_and_bf16_logratio(backend_device):
    backend, device = backend_device
    for dtype in (torch.float64, torch.bfloat16):
        r = torch.randn(6, device=device).to(dtype).requires_grad_()
        is_real = rand_mask(6, device)
        out = ddo_fast.ddo_loss(r, is_real, backend=backend)
        assert out.dtype == torch.float32
        out.backward()
        assert r.grad.dtype == dtype


@pytest.mark.parametrize("backend_device", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_noncontiguous_low_precision_logratio(backend_device, dtype):
    """A strided [B] view in fp16/bf16: same loss and gradient as the fp64 reference."""
    backend, device = backend_device
    wide = (torch.randn(2 * 9, device=device) * 5).to(dtype)
    r = wide[::2].detach().requires_grad_()
    assert not r.is_contiguous()
    is_real = rand_mask(9, device)
    out = ddo_fast.ddo_loss(r, is_real, alpha=2.0, beta=0.3, reduction="none", backend=backend)
    r64 = r.detach().double().requires_grad_()
    expected = R.ddo_loss_ref(r64, is_real, alpha=2.0, beta=0.3, reduction="none")
    assert_close_scaled(out, expected, rtol=1e-5, atol_frac=1e-6)
    g = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, r, g)
    (grad64,) = torch.autograd.grad(expected, r64, g.double())
    assert grad.dtype == dtype
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    assert_close_scaled(grad, grad64, rtol=tol, atol_frac=tol)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_bad_ddo_loss_inputs(backend):
    is_real = torch.tensor([True, False])
    with pytest.raises(ValueError, match="logratio"):
        ddo_fast.ddo_loss(torch.zeros(2, 1), is_real, backend=backend)
    with pytest.raises(TypeError, match="logratio"):
        ddo_fast.ddo_loss(torch.zeros(2, dtype=torch.long), is_real, backend=backend)
    with pytest.raises(ValueError, match="is_real"):
        ddo_fast.ddo_loss(torch.zeros(3), is_real, backend=backend)
    with pytest.raises(ValueError, match="sample_weight"):
        ddo_fast.ddo_loss(torch.zeros(2), is_real, sample_weight=torch.ones(3), backend=backend)


# ----------------------------------------------------------------- zero-weight terms (§5)
OVERFLOW_OK = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")


@OVERFLOW_OK  # the interpreter's numpy reports the (intended) beta * r overflow
@pytest.mark.parametrize("backend_device", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_zero_weight_terms_are_exactly_zero(backend_device, reduction):
    """c_b = 0 (alpha = 0 on a fake sample, or sample_weight 0) gives exactly 0 loss and
    gradient although beta * r_b = +-1e40 overflows fp32 (0 * inf would be NaN)."""
    backend, device = backend_device
    r = torch.tensor([1e30, -1e30, 1e-10, -1e30, 1e30, -2e-10], device=device).requires_grad_()
    is_real = torch.tensor([False, False, True, True, True, False], device=device)
    sw = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 1.0], device=device)
    kw = dict(alpha=0.0, beta=1e10, sample_weight=sw, reduction=reduction)
    out = ddo_fast.ddo_loss(r, is_real, backend=backend, **kw)
    per_sample = torch.zeros(6, dtype=torch.float64)
    per_sample[2] = -torch.nn.functional.logsigmoid(torch.tensor(1.0, dtype=torch.float64))
    n_real = 3 if reduction == "mean" else 1
    expected = per_sample if reduction == "none" else per_sample.sum() / n_real
    torch.testing.assert_close(out.double().cpu(), expected, rtol=1e-6, atol=0)
    up = torch.ones_like(out)
    (grad,) = torch.autograd.grad(out, r, up)
    dense = torch.zeros(6, dtype=torch.float64)
    dense[2] = -1e10 * torch.sigmoid(torch.tensor(-1.0, dtype=torch.float64)) / n_real
    torch.testing.assert_close(grad.double().cpu(), dense, rtol=1e-6, atol=0)
    assert torch.all(grad[[0, 1, 3, 4, 5]] == 0)


@OVERFLOW_OK
@pytest.mark.parametrize("backend_device", ALL_BACKENDS)
def test_zero_weight_keeps_nan(backend_device):
    """A NaN r_b propagates to its loss and gradient even when its weight is 0."""
    backend, device = backend_device
    nan = float("nan")
    r = torch.tensor([nan, nan, 0.5, 1e30], device=device).requires_grad_()
    is_real = torch.tensor([False, True, True, False], device=device)
    sw = torch.tensor([1.0, 0.0, 1.0, 1.0], device=device)
    out = ddo_fast.ddo_loss(
        r, is_real, alpha=0.0, beta=1e10, sample_weight=sw, reduction="none", backend=backend
    )
    (grad,) = torch.autograd.grad(out, r, torch.ones_like(out))
    assert out[0].isnan() and out[1].isnan() and grad[0].isnan() and grad[1].isnan()
    assert out[3] == 0 and grad[3] == 0
    assert torch.isfinite(out[2]) and torch.isfinite(grad[2])
    total = ddo_fast.ddo_loss(r, is_real, alpha=0.0, sample_weight=sw, backend=backend)
    assert total.isnan()
