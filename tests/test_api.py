"""Public API contract: backends, modules, argument errors, opcheck, torch.compile parity."""

import pytest
import torch
from utils import HAS_CUDA, rand_mask

import ddo_fast
from ddo_fast import reference as R


def _diffusion_args(batch=4, device="cpu"):
    pred = torch.randn(batch, 3, 5, device=device, requires_grad=True)
    return (
        pred,
        torch.randn(batch, 3, 5, device=device),
        torch.randn(batch, 3, 5, device=device),
        torch.rand(batch, device=device) + 0.5,
        rand_mask(batch, device),
    )


def _ar_args(batch=3, device="cpu"):
    logits = torch.randn(batch, 4, 9, device=device, requires_grad=True)
    targets = torch.randint(0, 9, (batch, 4), device=device)
    return logits, targets, torch.randn(batch, device=device) - 9, rand_mask(batch, device)


# ------------------------------------------------------------------------------- backends
def test_unknown_backend_raises():
    with pytest.raises(ValueError, match="backend"):
        ddo_fast.ddo_loss(torch.zeros(2), torch.ones(2, dtype=torch.bool), backend="cuda")


def test_env_var_selects_backend(monkeypatch):
    monkeypatch.setenv("DDO_FAST_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="nonsense"):
        ddo_fast.ddo_loss(torch.zeros(2), torch.ones(2, dtype=torch.bool))
    monkeypatch.setenv("DDO_FAST_BACKEND", "torch")
    out = ddo_fast.ddo_loss(torch.zeros(2, requires_grad=True), torch.tensor([True, False]))
    assert "SubBackward" in type(out.grad_fn).__name__ or out.grad_fn is not None


def test_cpp_backend_refuses_non_cpu_tensors():
    device = "cuda" if HAS_CUDA else "meta"
    with pytest.raises(RuntimeError, match="cpp"):
        ddo_fast.diffusion_ddo_loss(*_diffusion_args(device=device), backend="cpp")


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setattr(ddo_fast._backend, "TRITON_INTERPRET", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        ddo_fast.ddo_loss(torch.zeros(2), torch.tensor([True, False]), backend="triton")


def test_torch_backend_equals_reference():
    args = _diffusion_args()
    torch.testing.assert_close(
        ddo_fast.diffusion_ddo_loss(*args, backend="torch"), R.diffusion_ddo_loss_ref(*args).float()
    )


def test_modules_hold_settings():
    args = _diffusion_args()
    module = ddo_fast.DiffusionDDOLoss(alpha=2.0, beta=0.1, reduction="sum", backend="cpp")
    torch.testing.assert_close(
        module(*args), ddo_fast.diffusion_ddo_loss(*args, alpha=2.0, beta=0.1, reduction="sum")
    )
    assert "alpha=2.0" in repr(module)
    logits, targets, ref, is_real = _ar_args()
    ar = ddo_fast.ARDDOLoss(alpha=5.0, beta=0.2, reduction="none", ignore_index=3)
    torch.testing.assert_close(
        ar(logits, targets, ref, is_real),
        ddo_fast.ar_ddo_loss(
            logits, targets, ref, is_real, alpha=5.0, beta=0.2, reduction="none", ignore_index=3
        ),
    )
    r = torch.randn(4)
    torch.testing.assert_close(
        ddo_fast.DDOLoss(alpha=3.0)(r, is_real[:3].repeat(2)[:4]),
        ddo_fast.ddo_loss(r, is_real[:3].repeat(2)[:4], alpha=3.0),
    )
    with pytest.raises(ValueError, match="reduction"):
        ddo_fast.DDOLoss(reduction="avg")


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_bad_diffusion_inputs(backend):
    pred, pred_ref, target, weight, is_real = _diffusion_args()
    call = lambda **kw: ddo_fast.diffusion_ddo_loss(  # noqa: E731
        **(
            {
                "pred": pred,
                "pred_ref": pred_ref,
                "target": target,
                "weight": weight,
                "is_real": is_real,
                "backend": backend,
            }
            | kw
        )
    )
    with pytest.raises(ValueError, match="pred_ref"):
        call(pred_ref=pred_ref[:, :2])
    with pytest.raises(ValueError, match="weight"):
        call(weight=weight[:3])
    with pytest.raises(TypeError, match="is_real"):
        call(is_real=is_real.float())
    with pytest.raises(ValueError, match="is_real"):
        call(is_real=is_real[:2])
    with pytest.raises(TypeError, match="pred"):
        call(pred=pred.long())
    with pytest.raises(ValueError, match="sample_weight"):
        call(sample_weight=torch.ones(5))
    with pytest.raises(ValueError, match="reduction"):
        call(reduction="avg")
    with pytest.raises(TypeError, match="target"):
        call(target=[1, 2])


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_bad_token_inputs(backend):
    logits, targets, ref, is_real = _ar_args()
    with pytest.raises(TypeError, match="logits"):
        ddo_fast.token_logprobs(logits.long(), targets, backend=backend)
    with pytest.raises(TypeError, match="targets"):
        ddo_fast.token_logprobs(logits, targets.float(), backend=backend)
    with pytest.raises(ValueError, match="targets"):
        ddo_fast.token_logprobs(logits, targets[:, :2], backend=backend)
    with pytest.raises(ValueError, match="logits"):
        ddo_fast.token_logprobs(logits[0], targets, backend=backend)
    with pytest.raises(ValueError, match="ref_logprob"):
        ddo_fast.ar_ddo_loss(logits, targets, ref[:2], is_real, backend=backend)
    with pytest.raises(ValueError, match="is_real"):
        ddo_fast.ar_ddo_loss(logits, targets, ref, is_real[:1], backend=backend)


def test_mismatched_devices_name_the_argument():
    if not HAS_CUDA:
        pred, pred_ref, target, weight, is_real = _diffusion_args()
        with pytest.raises(ValueError, match="weight"):
            ddo_fast.diffusion_ddo_loss(pred, pred_ref, target, weight.to("meta"), is_real)
        return
    pred, pred_ref, target, weight, is_real = _diffusion_args(device="cuda")
    with pytest.raises(ValueError, match="weight"):
        ddo_fast.diffusion_ddo_loss(pred, pred_ref, target, weight.cpu(), is_real)


# --------------------------------------------------------------------- opcheck and compile
def _opcheck_cases(device):
    pred, pred_ref, target, weight, is_real = _diffusion_args(device=device)
    logits, targets, ref, is_real3 = _ar_args(device=device)
    targets[0, 1] = -100
    sw = torch.rand(4, device=device)
    ops = torch.ops.ddo_fast
    yield (
        ops.ddo_loss_fwd.default,
        (torch.randn(4, device=device, requires_grad=True), is_real, sw, 2.0, 0.5, 1),
    )
    for reduction in (0, 1, 2):
        yield (
            ops.diffusion_ddo_fwd.default,
            (pred, pred_ref, target, weight, is_real, sw, 2.0, 0.1, reduction),
        )
        yield (
            ops.ar_ddo_fwd.default,
            (logits, targets, ref, is_real3, None, 3.0, 0.2, -100, reduction),
        )
    yield ops.diffusion_ddo_fwd.default, (pred, pred_ref, target, weight, None, None, 1.0, 1.0, 0)
    yield ops.ar_ddo_fwd.default, (logits, targets, None, None, None, 1.0, 1.0, -100, 0)
    yield ops.token_logprobs_fwd.default, (logits, targets, -100)


DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    """Schema, fake tensor, autograd registration and AOT dispatch of every operator (on CPU the
    C++ kernels, on CUDA the Triton kernels)."""
    for op, args in _opcheck_cases(device):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_parity(device):
    backend = "cpp" if device == "cpu" else "triton"
    pred, pred_ref, target, weight, is_real = _diffusion_args(device=device)
    logits, targets, ref, is_real3 = _ar_args(device=device)

    def step(pred, logits):
        a = ddo_fast.diffusion_ddo_loss(
            pred, pred_ref, target, weight, is_real, beta=0.1, backend=backend
        )
        b = ddo_fast.ar_ddo_loss(logits, targets, ref, is_real3, alpha=2.0, backend=backend)
        c = ddo_fast.token_logprobs(logits, targets, backend=backend).sum()
        d = ddo_fast.sequence_logprob(logits, targets, backend=backend).sum()
        e = ddo_fast.diffusion_logratio(pred, pred_ref, target, weight, backend=backend).sum()
        f = ddo_fast.ddo_loss(e.reshape(1).expand(4) * 1e-3, is_real, backend=backend)
        return a + b + c * 1e-2 + d * 1e-2 + f

    eager = step(pred, logits)
    eager_grads = torch.autograd.grad(eager, (pred, logits))
    compiled = torch.compile(step, fullgraph=True)(pred, logits)
    compiled_grads = torch.autograd.grad(compiled, (pred, logits))
    # inductor may reorder the small reductions around the ops: fp32 rounding differences only
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for a, b in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
