"""The reference itself, against hand-derived closed forms and finite differences; and the edge
case semantics (zero weight, integer targets, empty batch; see ``ddo_fast.reference``) on every
backend."""

import math

import pytest
import torch
from utils import HAS_CUDA, HAS_TRITON

import ddo_fast
from ddo_fast import reference as R
from ddo_fast.adapters import edm_weight

LOG2 = math.log(2.0)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 50.0])
def test_zero_logratio_gives_one_plus_alpha_log2(alpha):
    r = torch.zeros(6, dtype=torch.float64)
    is_real = torch.tensor([True, False, True, False, False, True])
    assert R.ddo_loss_ref(r, is_real, alpha=alpha, beta=0.02).item() == pytest.approx(
        (1 + alpha) * LOG2, rel=1e-12
    )


def test_sign_and_alpha_beta_placement():
    """One real sample with r=2 and one fake with r=-1, alpha=3, beta=0.5, by hand."""
    r = torch.tensor([2.0, -1.0], dtype=torch.float64)
    is_real = torch.tensor([True, False])
    per = R.ddo_loss_ref(r, is_real, alpha=3.0, beta=0.5, reduction="none")
    sig = lambda z: 1.0 / (1.0 + math.exp(-z))  # noqa: E731
    assert per[0].item() == pytest.approx(-math.log(sig(0.5 * 2.0)), rel=1e-12)
    assert per[1].item() == pytest.approx(-3.0 * math.log(1.0 - sig(0.5 * -1.0)), rel=1e-12)
    assert R.ddo_loss_ref(r, is_real, alpha=3.0, beta=0.5, reduction="sum").item() == pytest.approx(
        per.sum().item(), rel=1e-12
    )


def test_mean_is_per_group():
    r = torch.tensor([1.0, 2.0, 3.0, -1.0], dtype=torch.float64)
    is_real = torch.tensor([True, True, True, False])
    per = R.ddo_loss_ref(r, is_real, reduction="none")
    mean = R.ddo_loss_ref(r, is_real, reduction="mean")
    assert mean.item() == pytest.approx(per[:3].mean().item() + per[3].item(), rel=1e-12)


def test_diffusion_logratio_closed_form():
    """pred one unit closer to the target than pred_ref in one coordinate: r = w * (1 - 4)."""
    target = torch.zeros(2, 3, dtype=torch.float64)
    pred_ref = target.clone()
    pred_ref[:, 0] = 2.0
    pred = target.clone()
    pred[:, 0] = 1.0
    weight = torch.tensor([1.0, 0.25], dtype=torch.float64)
    r = R.diffusion_logratio_ref(pred, pred_ref, target, weight)
    torch.testing.assert_close(r, torch.tensor([3.0, 0.75], dtype=torch.float64))


@pytest.mark.parametrize(
    ("sigma", "sigma_data", "expected"),
    [
        (0.5, 0.5, 8.0),  # (0.25 + 0.25) / 0.0625
        (2.0, 0.5, 4.25),  # (4 + 0.25) / 1
        (0.1, 1.0, 101.0),  # (0.01 + 1) / 0.01
        (80.0, 0.5, (6400.0 + 0.25) / 1600.0),
    ],
)
def test_edm_weighting_example(sigma, sigma_data, expected):
    """``edm_weight`` is lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2 (Karras et al.
    2022, Table 1), checked against values computed by hand."""
    out = edm_weight(torch.tensor([sigma, sigma], dtype=torch.float64), sigma_data)
    torch.testing.assert_close(
        out, torch.full((2,), expected, dtype=torch.float64), rtol=1e-14, atol=0
    )
    out32 = edm_weight(torch.tensor([sigma]), sigma_data)
    assert out32.dtype == torch.float32
    assert out32.item() == pytest.approx(expected, rel=1e-6)


def test_token_logprobs_closed_form():
    logits = torch.tensor([[[0.0, math.log(3.0)]]], dtype=torch.float64)  # p = [1/4, 3/4]
    out = R.token_logprobs_ref(logits, torch.tensor([[1]]))
    assert out.item() == pytest.approx(math.log(0.75), rel=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck(reduction):
    torch.manual_seed(0)
    is_real = torch.tensor([True, False, True, False])
    sw = torch.rand(4, dtype=torch.float64)
    pred = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    pred_ref, target, weight = (
        torch.randn(4, 3, dtype=torch.float64),
        torch.randn(4, 3, dtype=torch.float64),
        torch.rand(4, dtype=torch.float64),
    )
    torch.autograd.gradcheck(
        lambda p: R.diffusion_ddo_loss_ref(
            p,
            pred_ref,
            target,
            weight,
            is_real,
            alpha=2.0,
            beta=0.3,
            sample_weight=sw,
            reduction=reduction,
        ),
        (pred,),
    )
    logits = torch.randn(4, 2, 5, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([[0, 4], [1, -100], [2, 3], [4, 4]])
    ref = torch.randn(4, dtype=torch.float64)
    torch.autograd.gradcheck(
        lambda x: R.ar_ddo_loss_ref(
            x, targets, ref, is_real, alpha=5.0, beta=0.1, reduction=reduction
        ),
        (logits,),
    )


# ------------------------------------------------------------- semantics on every backend
BACKENDS = ["torch", "cpp"] + (["triton"] if HAS_TRITON else [])
DEVICE = {"torch": "cpu", "cpp": "cpu", "triton": "cuda" if HAS_CUDA else "cpu"}
INT_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64]


def _grad(out, leaf):
    (g,) = torch.autograd.grad(out, leaf, torch.ones_like(out))
    return g


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_weight_term_is_zero_even_when_beta_r_overflows(backend):
    """c_b = 0 (alpha = 0 on a fake sample, or sample_weight 0) gives loss 0 and gradient 0
    although beta * r = +-1e40 is inf in fp32 (0 * inf would be NaN); other terms are finite."""
    dev = DEVICE[backend]
    r = torch.tensor([1e36, -1e36, -1e36, 1e36, 1e-4, -1e-4], device=dev, requires_grad=True)
    is_real = torch.tensor([False, False, True, True, True, False], device=dev)
    sw = torch.tensor([1.0, 1.0, 0.0, 0.0, 2.0, 1.0], device=dev)
    for reduction in ("none", "sum", "mean"):
        out = ddo_fast.ddo_loss(
            r,
            is_real,
            alpha=0.0,
            beta=1e4,
            sample_weight=sw,
            reduction=reduction,
            backend=backend,
        )
        g = _grad(out, r)
        assert torch.isfinite(out).all() and torch.isfinite(g).all(), (reduction, out, g)
        assert (g[:4] == 0).all() and (g[5] == 0), g
        assert g[4] != 0
        if reduction == "none":
            assert (out[:4] == 0).all() and out[5] == 0
            expected = -2.0 * torch.nn.functional.logsigmoid(torch.tensor(1e4 * 1e-4))
            torch.testing.assert_close(out[4].cpu(), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_weight_term_keeps_nan(backend):
    """A NaN log-ratio propagates through a zero-weight term: loss and gradient are NaN."""
    dev = DEVICE[backend]
    r = torch.tensor([float("nan"), 1.0, float("nan")], device=dev, requires_grad=True)
    is_real = torch.tensor([False, True, True], device=dev)
    sw = torch.tensor([1.0, 1.0, 0.0], device=dev)
    out = ddo_fast.ddo_loss(
        r, is_real, alpha=0.0, sample_weight=sw, reduction="none", backend=backend
    )
    g = _grad(out, r)
    assert out[0].isnan() and out[2].isnan() and out[1].isfinite(), out
    assert g[0].isnan() and g[2].isnan() and g[1].isfinite(), g
    total = ddo_fast.ddo_loss(r, is_real, alpha=0.0, sample_weight=sw, backend=backend)
    assert total.isnan()


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_weight_fused_losses(backend):
    """The fused diffusion / AR losses follow the same rule: a huge r on a zero-weight sample
    (beta * r overflows fp32) contributes 0 to the loss and to the gradient."""
    dev = DEVICE[backend]
    is_real = torch.tensor([True, False, True], device=dev)
    sw = torch.tensor([0.0, 1.0, 1.0], device=dev)
    pred = torch.randn(3, 5, device=dev, requires_grad=True)
    target = torch.randn(3, 5, device=dev)
    weight = torch.tensor([1e33, 1e33, 1.0], device=dev)  # r_0, r_1 ~ 1e33, beta * r = inf
    out = ddo_fast.diffusion_ddo_loss(
        pred,
        target + 1.0,
        target,
        weight,
        is_real,
        alpha=0.0,
        beta=1e6,
        sample_weight=sw,
        reduction="none",
        backend=backend,
    )
    g = _grad(out, pred)
    assert (out[:2] == 0).all() and out[2].isfinite(), out
    assert (g[:2] == 0).all() and g[2].isfinite().all() and (g[2] != 0).any(), g

    logits = torch.randn(3, 4, 7, device=dev, requires_grad=True)
    targets = torch.randint(0, 7, (3, 4), device=dev)
    ref = torch.tensor([1e38, -1e38, 0.0], device=dev)  # beta * r = +-inf for the first two
    out = ddo_fast.ar_ddo_loss(
        logits,
        targets,
        ref,
        is_real,
        alpha=0.0,
        beta=100.0,
        sample_weight=sw,
        reduction="none",
        backend=backend,
    )
    g = _grad(out, logits)
    assert (out[:2] == 0).all() and out[2].isfinite(), out
    assert (g[:2] == 0).all() and g[2].isfinite().all() and (g[2] != 0).any(), g


def _token_calls(logits, targets, ignore_index, backend):
    ref = torch.zeros(targets.shape[0], device=logits.device)
    is_real = torch.arange(targets.shape[0], device=logits.device) % 2 == 0
    kw = dict(ignore_index=ignore_index, backend=backend)
    return {
        "token_logprobs": ddo_fast.token_logprobs(logits, targets, **kw),
        "sequence_logprob": ddo_fast.sequence_logprob(logits, targets, **kw),
        "ar_ddo_loss": ddo_fast.ar_ddo_loss(logits, targets, ref, is_real, reduction="none", **kw),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", INT_DTYPES, ids=str)
def test_any_integer_target_dtype(backend, dtype):
    """Targets of every integer dtype give the int64 answer (values and gradients); uint8 with
    ignore_index=-100 must not wrap -100 around to 156."""
    dev = DEVICE[backend]
    logits = torch.randn(3, 5, 100, device=dev, requires_grad=True)
    targets = torch.randint(0, 100, (3, 5), device=dev)
    for ignore_index in (-100, 99):
        if ignore_index == 99:
            targets[0, 1] = 99
        expected = _token_calls(logits, targets, ignore_index, "torch")
        actual = _token_calls(logits, targets.to(dtype), ignore_index, backend)
        for name, value in actual.items():
            torch.testing.assert_close(value, expected[name], msg=name)
            torch.testing.assert_close(
                _grad(value, logits), _grad(expected[name], logits), msg=name
            )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bool, torch.float32, torch.float16], ids=str)
def test_bool_and_float_targets_raise_type_error(backend, dtype):
    dev = DEVICE[backend]
    logits = torch.randn(2, 3, 4, device=dev)
    targets = torch.ones(2, 3, dtype=dtype, device=dev)
    for call in (ddo_fast.token_logprobs, ddo_fast.sequence_logprob):
        with pytest.raises(TypeError, match="targets"):
            call(logits, targets, backend=backend)
    with pytest.raises(TypeError, match="targets"):
        ddo_fast.ar_ddo_loss(
            logits,
            targets,
            torch.zeros(2, device=dev),
            torch.tensor([True, False], device=dev),
            backend=backend,
        )


@pytest.mark.skipif(HAS_CUDA, reason="on CUDA the check is a device-side assert (test_api)")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("dtype", "bad"),
    [(torch.uint8, 4), (torch.uint8, 200)]
    + [(dt, bad) for dt in (torch.int16, torch.int64) for bad in (4, 200, -1, -101)],
    ids=str,
)
def test_out_of_range_target_raises_index_error(backend, dtype, bad):
    logits = torch.randn(2, 3, 4)
    targets = torch.ones(2, 3, dtype=dtype)
    targets[1, 2] = bad
    for call in (ddo_fast.token_logprobs, ddo_fast.sequence_logprob):
        with pytest.raises(IndexError, match="targets"):
            call(logits, targets, backend=backend)
    with pytest.raises(IndexError, match="targets"):
        ddo_fast.ar_ddo_loss(
            logits, targets, torch.zeros(2), torch.tensor([True, False]), backend=backend
        )


def _empty_batch_calls(backend, dev, reduction):
    """(name, output, leaf) for every public function on a batch of 0 samples."""
    is_real = torch.zeros(0, dtype=torch.bool, device=dev)
    sw = torch.zeros(0, device=dev)
    loss_kw = dict(reduction=reduction, backend=backend, sample_weight=sw)
    r = torch.zeros(0, device=dev, requires_grad=True)
    pred = torch.zeros(0, 3, 4, device=dev, requires_grad=True)
    other, weight = torch.zeros(0, 3, 4, device=dev), torch.zeros(0, device=dev)
    logits = torch.zeros(0, 5, 7, device=dev, requires_grad=True)
    targets = torch.zeros(0, 5, dtype=torch.long, device=dev)
    ref = torch.zeros(0, device=dev)
    return [
        ("ddo_loss", ddo_fast.ddo_loss(r, is_real, **loss_kw), r),
        (
            "diffusion_logratio",
            ddo_fast.diffusion_logratio(pred, other, other, weight, backend=backend),
            pred,
        ),
        (
            "diffusion_ddo_loss",
            ddo_fast.diffusion_ddo_loss(pred, other, other, weight, is_real, **loss_kw),
            pred,
        ),
        ("token_logprobs", ddo_fast.token_logprobs(logits, targets, backend=backend), logits),
        ("sequence_logprob", ddo_fast.sequence_logprob(logits, targets, backend=backend), logits),
        ("ar_ddo_loss", ddo_fast.ar_ddo_loss(logits, targets, ref, is_real, **loss_kw), logits),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch(backend, reduction):
    """B = 0: loss 0 (mean/sum) or [0] (none); log-ratios/log-probs empty; gradients of the
    input's (empty) shape."""
    dev = DEVICE[backend]
    for name, out, leaf in _empty_batch_calls(backend, dev, reduction):
        assert out.dtype == torch.float32, name
        if name in ("ddo_loss", "diffusion_ddo_loss", "ar_ddo_loss") and reduction != "none":
            assert out.shape == () and out.item() == 0.0, (name, out)
        else:
            assert out.numel() == 0, (name, out.shape)
        g = _grad(out, leaf)
        assert g.shape == leaf.shape and g.dtype == leaf.dtype, name
