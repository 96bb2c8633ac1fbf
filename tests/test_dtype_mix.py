"""Every tensor is read in its own dtype (INTERFACES §4): mixed-dtype inputs against float64 math
on the given values, on every backend, forward and backward.

The oracle upcasts each input from its own dtype to float64; nothing is cast to a common dtype
first. Kernels accumulate in fp32, so r must match to fp32 accumulation error relative to the
size of its terms, sum_d |(p-t)^2| + |(q-t)^2| (1e-5; casting any input to a 16-bit dtype first
would be off by ~1e-3 of it), and each gradient element must be the exact value rounded once to
its tensor's dtype.
"""

import itertools

import pytest
import torch
from utils import ALL_BACKENDS, assert_within_rounding, batch_strided, noncontiguous, rand_mask

import ddo_fast
from ddo_fast import reference as R

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
MIXES = list(itertools.product([F32, BF16, F16], repeat=3))  # (pred, pred_ref, target)
# Odd shapes; some in non-contiguous layouts (cycled over the mixes).
SHAPES = [((3, 5, 7), "contiguous"), ((4, 37), "noncontiguous"), ((5, 2, 3, 9), "batch_strided")]
R_REL = 1e-5  # r error, relative to sum_d |(p-t)^2| + |(q-t)^2|


def _name(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "noncontiguous":
        return noncontiguous(t)
    if layout == "batch_strided":
        return batch_strided(t)
    return t


def _r64(pred, pred_ref, target, weight):
    """(r, sum of |terms|) in float64 from the given values (each upcast from its own dtype)."""
    p, q, t = (x.detach().to(F64).reshape(x.shape[0], -1) for x in (pred, pred_ref, target))
    dp, dq = (p - t) ** 2, (q - t) ** 2
    w = weight.to(F64)
    return -w * (dp - dq).sum(1), w.abs() * (dp + dq).sum(1)


def _diffusion_case(mix, index, device, *, near_ref=False):
    shape, layout = SHAPES[index % len(SHAPES)]
    pd, qd, td = mix
    target = torch.randn(shape, device=device)
    pred = target + torch.randn(shape, device=device)
    # near_ref: the DDO regime (theta close to ref), where r is a small difference of big sums
    pred_ref = pred + 1e-2 * torch.randn(shape, device=device) if near_ref else torch.randn(shape)
    pred = _layout(pred.to(pd), layout).requires_grad_()
    pred_ref = _layout(pred_ref.to(device).to(qd), layout)
    target = _layout(target.to(td), layout)
    wd = (F32, BF16, F16)[index % 3]  # weight / sample_weight dtypes too
    weight = (torch.rand(shape[0], device=device) + 0.5).to(wd)
    sample_weight = (torch.rand(shape[0], device=device) + 0.25).to((F16, F32, BF16)[index % 3])
    return pred, pred_ref, target, weight, sample_weight


@pytest.mark.parametrize("backend_device", ALL_BACKENDS)
@pytest.mark.parametrize("mix", MIXES, ids=lambda m: "-".join(map(_name, m)))
def test_diffusion_dtype_mix(backend_device, mix):
    backend, device = backend_device
    index = MIXES.index(mix)
    pred, pred_ref, target, weight, sw = _diffusion_case(mix, index, device)
    is_real = rand_mask(pred.shape[0], device)
    reduction = ("none", "mean", "sum")[index % 3]
    kw = dict(alpha=1.5, beta=0.05, sample_weight=sw, reduction=reduction)
    out, r = ddo_fast.diffusion_ddo_loss(
        pred, pred_ref, target, weight, is_real, backend=backend, return_logratio=True, **kw
    )
    r64, scale = _r64(pred, pred_ref, target, weight)
    assert r.dtype == torch.float32 and out.dtype == torch.float32
    assert torch.all((r.double() - r64).abs() <= R_REL * scale), (r, r64)
    # the loss and d pred from float64 autograd on the same values
    pred64 = pred.detach().to(F64).requires_grad_()
    r64_graph = R.diffusion_logratio_ref(pred64, pred_ref.to(F64), target.to(F64), weight.to(F64))
    loss64 = R.ddo_loss_ref(r64_graph, is_real, **(kw | {"sample_weight": sw.to(F64)}))
    torch.testing.assert_close(out.double(), loss64.detach(), rtol=1e-5, atol=1e-6)
    up = torch.randn_like(out) if out.dim() else torch.tensor(1.3, device=device)
    (grad,) = torch.autograd.grad(out, pred, up)
    (grad64,) = torch.autograd.grad(loss64, pred64, up.to(F64))
    assert grad.dtype == pred.dtype and grad.shape == pred.shape
    # one rounding to pred's dtype; for fp32 the fp32 error of r feeds k, hence 1e-5
    rel = 1e-5 if pred.dtype == F32 else None
    assert_within_rounding(grad, grad64, rel=rel, floor=1e-7 * float(grad64.abs().max()))


@pytest.mark.parametrize("backend_device", ALL_BACKENDS)
@pytest.mark.parametrize("pred_dtype", [BF16, F16], ids=_name)
def test_diffusion_low_precision_pred_near_reference(backend_device, pred_dtype):
    """Only pred in 16 bits, pred_ref and target fp32, theta close to ref: casting the others to
    pred's dtype (the old kernels) got r wrong by far more than r itself, flipping its sign."""
    backend, device = backend_device
    mix = (pred_dtype, F32, F32)
    pred, pred_ref, target, weight, _ = _diffusion_case(mix, 0, device, near_ref=True)
    r = ddo_fast.diffusion_logratio(pred, pred_ref, target, weight, backend=backend)
    r64, scale = _r64(pred, pred_ref, target, weight)
    assert torch.all((r.double() - r64).abs() <= R_REL * scale)
    assert torch.all(torch.sign(r.double()) == torch.sign(r64))


@pytest.mark.parametrize("backend_device", ALL_BACKENDS)
@pytest.mark.parametrize("vec_dtype", [BF16, F16, F64], ids=_name)
@pytest.mark.parametrize("logit_dtype", [F32, BF16], ids=_name)
def test_ar_vectors_in_their_own_dtype(backend_device, vec_dtype, logit_dtype):
    """ref_logprob and sample_weight in 16-bit or fp64 next to fp32/bf16 logits."""
    backend, device = backend_device
    batch, length, vocab = 3, 4, 29
    logits = (2 * torch.randn(batch, length, vocab, device=device)).to(logit_dtype)
    logits.requires_grad_()
    targets = torch.randint(0, vocab, (batch, length), device=device)
    ref = (torch.randn(batch, device=device) * 2 - 12).to(vec_dtype)
    sw = (torch.rand(batch, device=device) + 0.5).to(vec_dtype)
    is_real = rand_mask(batch, device)
    kw = dict(alpha=2.0, beta=0.3, reduction="none")
    out, r = ddo_fast.ar_ddo_loss(
        logits, targets, ref, is_real, sample_weight=sw, backend=backend, return_logratio=True, **kw
    )
    logits64 = logits.detach().to(F64).requires_grad_()
    r64 = R.sequence_logprob_ref(logits64, targets) - ref.to(F64)
    loss64 = R.ddo_loss_ref(r64, is_real, sample_weight=sw.to(F64), **kw)
    torch.testing.assert_close(r.double(), r64.detach(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(out.double(), loss64.detach(), rtol=1e-5, atol=1e-6)
    up = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, logits, up)
    (grad64,) = torch.autograd.grad(loss64, logits64, up.to(F64))
    assert grad.dtype == logit_dtype
    rel = 1e-5 if logit_dtype == F32 else None
    assert_within_rounding(grad, grad64, rel=rel, floor=1e-6 * float(grad64.abs().max()))


@pytest.mark.parametrize("backend_device", ALL_BACKENDS)
@pytest.mark.parametrize("r_dtype", [BF16, F16, F64], ids=_name)
def test_ddo_loss_gradient_in_logratio_dtype(backend_device, r_dtype):
    backend, device = backend_device
    r = (torch.randn(7, device=device) * 4).to(r_dtype).requires_grad_()
    sw = (torch.rand(7, device=device) + 0.5).to((BF16, F16, F64)[[BF16, F16, F64].index(r_dtype)])
    is_real = rand_mask(7, device)
    kw = dict(alpha=1.5, beta=0.7, sample_weight=sw, reduction="none")
    out = ddo_fast.ddo_loss(r, is_real, backend=backend, **kw)
    r64 = r.detach().to(F64).requires_grad_()
    loss64 = R.ddo_loss_ref(r64, is_real, **(kw | {"sample_weight": sw.to(F64)}))
    torch.testing.assert_close(out.double(), loss64.detach(), rtol=1e-6, atol=1e-6)
    up = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, r, up)
    (grad64,) = torch.autograd.grad(loss64, r64, up.to(F64))
    assert grad.dtype == r_dtype
    rel = 1e-6 if r_dtype == F64 else None  # fp64 r: fp32 loss-head math
    assert_within_rounding(grad, grad64, rel=rel)
