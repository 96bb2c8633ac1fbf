"""diffusion_ddo_loss / diffusion_logratio against the fp64 reference, on every kernel backend."""

import pytest
import torch
from utils import (
    DTYPES,
    GRAD_TOL,
    KERNEL_BACKENDS,
    assert_close_scaled,
    batch_strided,
    noncontiguous,
    rand_mask,
    upstream_like,
)

import ddo_fast
from ddo_fast import reference as R

# (shape, layout): B=1 and D=1, odd sizes, a D that is no multiple of any block, and the two
# non-contiguous layouts (padded inner dim, strided batch).
CASES = [
    ((1, 1), "contiguous"),
    ((3, 5, 7), "noncontiguous"),
    ((6, 3, 4, 5), "batch_strided"),
    ((5, 1037), "contiguous"),
]


def _inputs(shape, dtype, device, layout):
    def make():
        t = torch.randn(shape, dtype=torch.float32, device=device).to(dtype)
        if layout == "noncontiguous":
            return noncontiguous(t)
        if layout == "batch_strided":
            return batch_strided(t)
        return t

    pred, pred_ref, target = make(), make(), make()
    weight = torch.rand(shape[0], device=device) + 0.5
    return pred.requires_grad_(), pred_ref, target, weight


def _check(backend, device, dtype, shape, layout, reduction, with_sw, alpha=1.7, beta=0.05):
    pred, pred_ref, target, weight = _inputs(shape, dtype, device, layout)
    is_real = rand_mask(shape[0], device)
    sw = torch.rand(shape[0], device=device) if with_sw else None
    out = ddo_fast.diffusion_ddo_loss(
        pred,
        pred_ref,
        target,
        weight,
        is_real,
        alpha=alpha,
        beta=beta,
        sample_weight=sw,
        reduction=reduction,
        backend=backend,
    )
    pred64 = pred.detach().double().requires_grad_()
    expected = R.diffusion_ddo_loss_ref(
        pred64,
        pred_ref.double(),
        target.double(),
        weight,
        is_real,
        alpha=alpha,
        beta=beta,
        sample_weight=sw,
        reduction=reduction,
    )
    assert out.dtype == torch.float32 and out.shape == expected.shape
    assert_close_scaled(out, expected, rtol=1e-4, atol_frac=1e-5)
    grad_up = upstream_like(out)
    (grad,) = torch.autograd.grad(out, pred, grad_up)
    (grad64,) = torch.autograd.grad(expected, pred64, grad_up.double())
    assert grad.dtype == dtype and grad.shape == pred.shape
    tol = GRAD_TOL[dtype]
    assert_close_scaled(grad, grad64, rtol=max(tol["rtol"], 1e-4), atol_frac=tol["rtol"])


@pytest.mark.parametrize("backend_device", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}")
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_and_grad_match_reference(backend_device, dtype, case, reduction):
    backend, device = backend_device
    _check(backend, device, dtype, case[0], case[1], reduction, with_sw=False)


@pytest.mark.parametrize("backend_device", KERNEL_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_sample_weight_and_large_alpha(backend_device, reduction):
    backend, device = backend_device
    _check(
        backend,
        device,
        torch.float32,
        (6, 3, 4, 5),
        "contiguous",
        reduction,
        with_sw=True,
        alpha=25.0,
        beta=0.3,
    )


@pytest.mark.parametrize("backend_device", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_logratio_matches_reference(backend_device, dtype):
    backend, device = backend_device
    pred, pred_ref, target, weight = _inputs((4, 3, 9), dtype, device, "noncontiguous")
    r = ddo_fast.diffusion_logratio(pred, pred_ref, target, weight, backend=backend)
    pred64 = pred.detach().double().requires_grad_()
    r64 = R.diffusion_logratio_ref(pred64, pred_ref.double(), target.double(), weight)
    assert r.dtype == torch.float32
    assert_close_scaled(r, r64, rtol=1e-4, atol_frac=1e-5)
    g = torch.randn_like(r)
    (grad,) = torch.autograd.grad(r, pred, g)
    (grad64,) = torch.autograd.grad(r64, pred64, g.double())
    assert_close_scaled(
        grad, grad64, rtol=max(GRAD_TOL[dtype]["rtol"], 1e-4), atol_frac=GRAD_TOL[dtype]["rtol"]
    )


@pytest.mark.parametrize("backend_device", KERNEL_BACKENDS)
def test_logratio_and_loss_gradients_combine(backend_device):
    """Both outputs of the fused op used at once: d/dpred of loss + sum(r)."""
    backend, device = backend_device
    pred, pred_ref, target, weight = _inputs((4, 10), torch.float32, device, "contiguous")
    is_real = rand_mask(4, device)
    r = ddo_fast.diffusion_logratio(pred, pred_ref, target, weight, backend=backend)
    loss = ddo_fast.diffusion_ddo_loss(
        pred, pred_ref, target, weight, is_real, beta=0.1, backend=backend
    )
    (grad,) = torch.autograd.grad(loss + r.sum(), pred)
    pred64 = pred.detach().double().requires_grad_()
    r64 = R.diffusion_logratio_ref(pred64, pred_ref.double(), target.double(), weight)
    loss64 = R.ddo_loss_ref(r64, is_real, beta=0.1)
    (grad64,) = torch.autograd.grad(loss64 + r64.sum(), pred64)
    assert_close_scaled(grad, grad64, rtol=1e-4, atol_frac=1e-5)


@pytest.mark.parametrize("backend_device", KERNEL_BACKENDS)
def test_reference_prediction_gets_no_gradient(backend_device):
    backend, device = backend_device
    pred, pred_ref, target, weight = _inputs((3, 8), torch.float32, device, "contiguous")
    pred_ref.requires_grad_()
    loss = ddo_fast.diffusion_ddo_loss(
        pred, pred_ref, target, weight, rand_mask(3, device), backend=backend
    )
    loss.backward()
    assert pred.grad is not None and pred_ref.grad is None


@pytest.mark.parametrize("backend_device", KERNEL_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch(backend_device, reduction):
    backend, device = backend_device
    pred = torch.randn(0, 3, 4, device=device, requires_grad=True)
    other = torch.randn(0, 3, 4, device=device)
    out = ddo_fast.diffusion_ddo_loss(
        pred,
        other,
        other,
        torch.ones(0, device=device),
        torch.ones(0, dtype=torch.bool, device=device),
        reduction=reduction,
        backend=backend,
    )
    assert out.shape == ((0,) if reduction == "none" else ())
    assert torch.all(out == 0)
    out.sum().backward()
    assert pred.grad is not None and pred.grad.shape == pred.shape


def test_loss_at_identical_models_is_one_plus_alpha_log2():
    pred = torch.randn(8, 3, 4)
    alpha = 2.5
    is_real = torch.tensor([True, False] * 4)
    loss = ddo_fast.diffusion_ddo_loss(
        pred, pred, torch.randn(8, 3, 4), torch.rand(8), is_real, alpha=alpha, beta=0.02
    )
    torch.testing.assert_close(loss, torch.tensor((1 + alpha) * 0.6931471805599453))
