"""diffusion_ddo_loss / diffusion_logratio against the fp64 reference, on every kernel backend."""

import pytest
import torch
from utils import (
    DTYPES,
    GRAD_TOL,
    HAS_TRITON,
    KERNEL_BACKENDS,
    assert_close_scaled,
    assert_within_rounding,
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


def _check_mixed_against_float64(backend, pred, pred_ref, target, weight, is_real, **kw):
    """Loss, r and d pred of a mixed-dtype call against float64 math on the same values."""
    out, r = ddo_fast.diffusion_ddo_loss(
        pred, pred_ref, target, weight, is_real, backend=backend, return_logratio=True, **kw
    )
    pred64 = pred.detach().double().requires_grad_()
    r64 = R.diffusion_logratio_ref(pred64, pred_ref.double(), target.double(), weight.double())
    scale = (
        weight.double().abs()[:, None]
        * ((pred64 - target.double()) ** 2 + (pred_ref.double() - target.double()) ** 2).reshape(
            pred.shape[0], -1
        )
    ).sum(1)
    assert torch.all((r.double() - r64.detach()).abs() <= 1e-5 * scale)
    loss64 = R.ddo_loss_ref(r64, is_real, **kw)
    torch.testing.assert_close(out.double(), loss64.detach(), rtol=1e-5, atol=1e-6)
    up = upstream_like(out)
    (grad,) = torch.autograd.grad(out, pred, up)
    (grad64,) = torch.autograd.grad(loss64, pred64, up.double())
    rel = 1e-5 if pred.dtype == torch.float32 else None
    assert_within_rounding(grad, grad64, rel=rel, floor=1e-7 * float(grad64.abs().max()))


@pytest.mark.skipif(not HAS_TRITON, reason="triton is a test requirement; install .[test]")
@pytest.mark.parametrize("parts", [1, 3, 1030])
def test_triton_split_d(monkeypatch, parts):
    """The GPU grid splits D into parts (one program each, summed by loss_head_kernel); the
    interpreter never does on its own, so FORCE_PARTS makes it: 1, 3 and > 1024 parts (the
    looped BLOCK_P path of loss_head_kernel), forward and backward, in a dtype mix."""
    from ddo_fast.kernels import diffusion_ddo as kernels

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dim = 16 * 1030 - 3 if parts > 1024 else 1037
    # one sample for > 1024 parts: the interpreter runs each of the B * parts programs in Python
    batch = 1 if parts > 1024 else 2
    monkeypatch.setattr(kernels, "FORCE_PARTS", parts)
    assert kernels._split(batch, dim, torch.device(device))[2] == parts
    pred = torch.randn(batch, dim, device=device).bfloat16().requires_grad_()
    pred_ref = torch.randn(batch, dim, device=device)
    target = torch.randn(batch, dim, device=device).half()
    weight = torch.rand(batch, device=device) + 0.5
    is_real = torch.tensor([True, False][:batch], device=device)
    _check_mixed_against_float64(
        "triton", pred, pred_ref, target, weight, is_real, alpha=1.3, beta=0.01, reduction="none"
    )


@pytest.mark.parametrize("backend_device", KERNEL_BACKENDS)
def test_many_chunks_against_float64(backend_device):
    """D = 40000 spans three of the C++ kernel's 16384-element chunks (the last one partial),
    in a batch-strided layout and a dtype mix."""
    backend, device = backend_device
    shape = (3, 8, 5000)
    pred = batch_strided(torch.randn(shape, device=device).bfloat16()).requires_grad_()
    pred_ref = batch_strided(torch.randn(shape, device=device))
    target = batch_strided(torch.randn(shape, device=device).half())
    weight = (torch.rand(3, device=device) + 0.5).half()
    _check_mixed_against_float64(
        backend, pred, pred_ref, target, weight, rand_mask(3, device), beta=0.002, reduction="sum"
    )


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("backend_device", KERNEL_BACKENDS)
def test_fused_zero_alpha_with_overflowing_beta(backend_device):
    """alpha = 0 and only fake samples: the loss and d pred are exactly 0, although
    beta * r overflows fp32 (the fused kernels share the loss head's zero-weight rule)."""
    backend, device = backend_device
    pred, pred_ref, target, weight = _inputs((3, 4, 5), torch.float32, device, "contiguous")
    is_real = torch.zeros(3, dtype=torch.bool, device=device)
    out = ddo_fast.diffusion_ddo_loss(
        pred, pred_ref, target, weight, is_real, alpha=0.0, beta=1e37, backend=backend
    )
    out.backward()
    assert out == 0 and torch.all(pred.grad == 0)
