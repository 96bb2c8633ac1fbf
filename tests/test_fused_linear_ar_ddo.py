"""fused_linear_ar_ddo_loss / fused_linear_sequence_logprob against a float64 oracle.

The oracle below is written here, independently of ``ddo_fast.reference``: float64 logits
``h W^T + b`` from the inputs' values, rounded (value only, straight-through for the gradient) to
the dtype the unfused ``hidden @ weight.T + bias`` produces them in, so that a 16-bit case is
compared with the exact function of the logits the unfused path actually sees; then
``log_softmax``, the per-sequence sum, and the DDO loss (Zheng et al. 2025, Eq. 13), all in
float64. Values and all three gradients (hidden, weight, bias) are checked on every backend
(C++, Triton through the interpreter on CPU / on CUDA where present, and the plain unfused
``torch`` path), in fp32/bf16/fp16 and mixed dtypes, with chunk sizes that do not divide the
token count, the packed [N, H] + ``seq_ids`` form and V = 128256.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from utils import (
    ALL_BACKENDS,
    HAS_CUDA,
    HAS_TRITON,
    KERNEL_BACKENDS,
    assert_close_scaled,
    rand_mask,
)

import ddo_fast
from ddo_fast.ops import fused_linear_ar_ddo as FL

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16

# (rtol, atol as a fraction of the largest expected magnitude). Values (r, loss): fp32 math on
# the same rounded logits as the oracle's, so fp32-level even for 16-bit logits (measured <= 2e-7
# relative to max |r|; an oracle on unrounded logits is off by 2e-3 (bf16) and 3.5e-4 (fp16), so
# these bounds tell the two apart; the 16-bit slack covers a rare one-ulp tie flip of a logit).
VALUE_TOL = {F32: (2e-5, 2e-5), F16: (1e-4, 1e-4), BF16: (3e-4, 3e-4)}
# Gradients: the logits' gradient is rounded to the logits' dtype, the result to the parameter's
# (measured max error / max |grad|: 5e-3 bf16, 7e-4 fp16, 3.5e-7 fp32); ~3x margin.
GRAD_TOL = {F32: (2e-5, 2e-5), F16: (2e-3, 2e-3), BF16: (1.6e-2, 1.6e-2)}
TOL = {**GRAD_TOL, torch.float64: (1e-9, 1e-9)}
_PRECISION = [torch.float64, F32, F16, BF16]  # most to least precise


def _coarser(*dtypes: torch.dtype) -> torch.dtype:
    return max(dtypes, key=_PRECISION.index)


# --------------------------------------------------------------------------------- the oracle
def _ste_round(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x rounded to `dtype` in value, identity for the gradient."""
    return x + (x.to(dtype).double() - x).detach()


def oracle(
    hidden,
    weight,
    bias,
    targets,
    ref,
    is_real,
    *,
    alpha=1.0,
    beta=1.0,
    ignore_index=-100,
    sample_weight=None,
    reduction="mean",
    seq_ids=None,
):
    """(loss, r, (d hidden, d weight, d bias) closure inputs) all in float64."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    b = None if bias is None else bias.detach().double().requires_grad_()
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    if bias is not None:
        dtype = torch.promote_types(dtype, bias.dtype)
    z = _ste_round(h @ w.t(), dtype)  # the matmul's result, rounded once
    if b is not None:
        z = _ste_round(z + b, dtype)  # the bias add, rounded once more
    y = targets.long()
    valid = y != ignore_index
    logp = torch.log_softmax(z, -1).gather(-1, torch.where(valid, y, 0)[..., None])[..., 0]
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    if seq_ids is None:
        seq = logp.sum(-1)
    else:
        seq = torch.zeros(ref.shape[0], dtype=torch.float64).index_add(0, seq_ids.long(), logp)
    r = seq - ref.double()
    wgt = torch.ones_like(r) if sample_weight is None else sample_weight.double()
    c = torch.where(is_real, wgt, alpha * wgt)
    per = -c * F.logsigmoid(torch.where(is_real, beta * r, -beta * r))
    per = torch.where(c == 0, torch.zeros_like(per), per)
    if reduction == "none":
        loss = per
    elif reduction == "sum":
        loss = per.sum()
    else:
        n_real = is_real.sum().clamp_min(1)
        n_fake = (~is_real).sum().clamp_min(1)
        loss = per[is_real].sum() / n_real + per[~is_real].sum() / n_fake
    return loss, r, (h, w, b)


def _make(shape, h_dtype=F32, w_dtype=F32, with_bias=True, ignore_index=-100, scale=1.0):
    """hidden [B, L, H], weight [V, H], bias [V] (in the weight's dtype), targets, ref, is_real."""
    batch, length, size, vocab = shape
    hidden = (scale * torch.randn(batch, length, size)).to(h_dtype).requires_grad_()
    weight = (2 * torch.randn(vocab, size) / max(size, 1) ** 0.5).to(w_dtype).requires_grad_()
    bias = torch.randn(vocab).to(w_dtype).requires_grad_() if with_bias else None
    targets = torch.randint(0, vocab, (batch, length))
    if batch * length > 2:
        targets[0, -1] = ignore_index
    ref = torch.randn(batch) * 2 - length * 3.0
    return hidden, weight, bias, targets, ref, rand_mask(batch, "cpu")


def _to(device, *tensors):
    out = []
    for t in tensors:
        if t is None or t.device.type == device:
            out.append(t)
        else:
            leaf = t.detach().to(device)
            out.append(leaf.requires_grad_() if t.requires_grad else leaf)
    return out


def _check(
    backend,
    device,
    shape,
    h_dtype=F32,
    w_dtype=F32,
    with_bias=True,
    chunk_size=4,
    reduction="mean",
    seq_ids=None,
    ignore_index=-100,
    num_seq=None,
):
    hidden, weight, bias, targets, ref, is_real = _make(
        shape, h_dtype, w_dtype, with_bias, ignore_index
    )
    if seq_ids is not None:  # packed: [N, H] rows in the given sequence order
        hidden = hidden.detach().reshape(-1, shape[2]).requires_grad_()
        targets = targets.reshape(-1)
        if num_seq is not None:
            ref, is_real = torch.randn(num_seq) * 2 - 6.0, rand_mask(num_seq, "cpu")
    hidden, weight, bias, targets, ref, is_real = _to(
        device, hidden, weight, bias, targets, ref, is_real
    )
    sw = torch.rand(ref.shape[0], device=device) + 0.5 if reduction != "sum" else None
    args = dict(
        alpha=3.0, beta=0.3, ignore_index=ignore_index, sample_weight=sw, reduction=reduction
    )
    loss, r = ddo_fast.fused_linear_ar_ddo_loss(
        hidden,
        weight,
        targets,
        ref,
        is_real,
        bias=bias,
        chunk_size=chunk_size,
        backend=backend,
        return_logratio=True,
        seq_ids=seq_ids,
        **args,
    )
    cpu = [None if t is None else t.cpu() for t in (hidden, weight, bias, targets, ref, is_real)]
    exp_loss, exp_r, leaves = oracle(
        *cpu,
        seq_ids=None if seq_ids is None else seq_ids.cpu(),
        **{**args, "sample_weight": None if sw is None else sw.cpu()},
    )
    dtype = FL.compute_dtype(hidden, weight, bias)
    assert loss.dtype == F32 and r.dtype == F32 and loss.shape == exp_loss.shape
    rtol, atol = VALUE_TOL[_coarser(dtype, F32)]
    assert_close_scaled(r.cpu(), exp_r, rtol=rtol, atol_frac=atol)
    assert_close_scaled(loss.cpu(), exp_loss, rtol=rtol, atol_frac=atol)
    up = torch.randn_like(loss) if loss.dim() else torch.tensor(1.7, device=device)
    params = [t for t in (hidden, weight, bias) if t is not None]
    grads = torch.autograd.grad(loss, params, up)
    exp_grads = torch.autograd.grad(
        exp_loss, [t for t in leaves if t is not None], up.cpu().double()
    )
    for got, want, leaf in zip(grads, exp_grads, params, strict=True):
        assert got.dtype == leaf.dtype and got.shape == leaf.shape
        rtol, atol = GRAD_TOL[_coarser(dtype, leaf.dtype)]
        assert_close_scaled(got.cpu(), want, rtol=rtol, atol_frac=atol)
    return loss, r, grads


# ------------------------------------------------------------------------------------- values
DTYPE_PAIRS = [(F32, F32), (BF16, BF16), (F16, F16), (BF16, F32), (F32, BF16), (F16, F32)]


@pytest.mark.parametrize("backend_device", ALL_BACKENDS)
@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=lambda d: f"{d[0]}-{d[1]}")
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_matches_oracle_in_every_dtype(backend_device, dtypes, with_bias):
    backend, device = backend_device
    _check(backend, device, (3, 5, 17, 37), *dtypes, with_bias=with_bias, chunk_size=4)


@pytest.mark.parametrize("backend_device", ALL_BACKENDS)
@pytest.mark.parametrize("chunk_size", [1, 2, 7, 14, 15, 100, None])
def test_chunk_sizes(backend_device, chunk_size):
    """15 tokens in chunks of 1, 2, 7 (not dividing), 14, 15, more than N, and the default."""
    backend, device = backend_device
    _check(backend, device, (3, 5, 9, 29), chunk_size=chunk_size)


@pytest.mark.parametrize("backend_device", ALL_BACKENDS)
def test_weight_gradient_accumulates_in_fp32(backend_device):
    """256 one-token chunks in bf16: the weight and bias gradients stay within 8e-3 of the
    largest (measured 2.0e-3 / 3.5e-3, the final bf16 rounding); a bf16 running sum over the
    chunks drifts to 2.2e-2 / 2.7e-2."""
    backend, device = backend_device
    hidden, weight, bias, targets, ref, is_real = _make((4, 64, 8, 16), BF16, BF16)
    args = _to(device, hidden, weight, bias, targets, ref, is_real)
    loss = ddo_fast.fused_linear_ar_ddo_loss(
        *args[:2],
        args[3],
        args[4],
        args[5],
        bias=args[2],
        chunk_size=1,
        reduction="sum",
        backend=backend,
    )
    exp_loss, _, leaves = oracle(hidden, weight, bias, targets, ref, is_real, reduction="sum")
    got = torch.autograd.grad(loss, (args[1], args[2]))
    want = torch.autograd.grad(exp_loss, leaves[1:])
    for g, e in zip(got, want, strict=True):
        assert (g.cpu().double() - e).abs().max() <= 8e-3 * e.abs().max()


@pytest.mark.parametrize("backend_device", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions(backend_device, reduction):
    backend, device = backend_device
    _check(backend, device, (4, 3, 8, 21), reduction=reduction, chunk_size=5)


@pytest.mark.parametrize("backend_device", ALL_BACKENDS)
def test_packed_tokens_with_seq_ids(backend_device):
    """[N, H] rows of 5 sequences in shuffled order, one sequence with no tokens at all."""
    backend, device = backend_device
    n = 13
    seq_ids = torch.tensor([0, 3, 1, 0, 3, 3, 1, 0, 4, 4, 1, 0, 3], device=device)  # 2: empty
    _check(
        backend,
        device,
        (1, n, 11, 19),
        chunk_size=4,
        seq_ids=seq_ids,
        reduction="none",
        ignore_index=-1,
        num_seq=5,
    )


@pytest.mark.parametrize("backend_device", ALL_BACKENDS)
def test_packed_form_is_the_batched_form(backend_device):
    """Contiguous seq_ids over a flattened [B, L] give the batched loss (same chunking)."""
    backend, device = backend_device
    hidden, weight, bias, targets, ref, is_real = _to(device, *_make((3, 4, 8, 23)))
    batched = ddo_fast.fused_linear_ar_ddo_loss(
        hidden, weight, targets, ref, is_real, bias=bias, chunk_size=5, backend=backend
    )
    seq_ids = torch.arange(3, device=device).repeat_interleave(4)
    packed = ddo_fast.fused_linear_ar_ddo_loss(
        hidden.reshape(12, 8),
        weight,
        targets.reshape(12),
        ref,
        is_real,
        bias=bias,
        seq_ids=seq_ids,
        chunk_size=5,
        backend=backend,
    )
    torch.testing.assert_close(packed, batched, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend_device", ALL_BACKENDS)
def test_custom_ignore_index_and_fully_ignored_sequence(backend_device):
    backend, device = backend_device
    hidden, weight, bias, targets, ref, is_real = _make((3, 4, 6, 13), ignore_index=7)
    targets[targets == 7] = 0
    targets[1] = 7  # a whole sequence ignored: log p = 0, no gradient into its hidden rows
    targets[0, -1] = 7
    hidden, weight, bias, targets, ref, is_real = _to(
        device, hidden, weight, bias, targets, ref, is_real
    )
    loss, r = ddo_fast.fused_linear_ar_ddo_loss(
        hidden,
        weight,
        targets,
        ref,
        is_real,
        bias=bias,
        ignore_index=7,
        chunk_size=3,
        backend=backend,
        return_logratio=True,
    )
    exp_loss, exp_r, _ = oracle(
        *[t.cpu() for t in (hidden, weight, bias, targets, ref, is_real)], ignore_index=7
    )
    assert_close_scaled(r.cpu(), exp_r, rtol=2e-5, atol_frac=2e-5)
    assert r[1].item() == -ref[1].item()
    (d_hidden,) = torch.autograd.grad(loss, hidden)
    assert torch.all(d_hidden[1] == 0) and torch.all(d_hidden[0, -1] == 0)


@pytest.mark.parametrize("backend_device", ALL_BACKENDS)
@pytest.mark.parametrize("vocab", [128256, 8200, 4097], ids=str)
def test_large_and_odd_vocabularies(backend_device, vocab):
    """V = 128256 (Llama 3; Triton's blocked online logsumexp, the C++ long-row path) and V just
    past the Triton single-tile limit / block size, at a small token count."""
    backend, device = backend_device
    _check(backend, device, (2, 3, 8, vocab), chunk_size=4)


# ------------------------------------------------------------------ sequence_logprob, module
@pytest.mark.parametrize("backend_device", ALL_BACKENDS)
@pytest.mark.parametrize("packed", [False, True], ids=["batched", "packed"])
def test_sequence_logprob_matches_oracle(backend_device, packed):
    backend, device = backend_device
    hidden, weight, bias, targets, ref, _ = _to(device, *_make((3, 4, 7, 31), BF16, F32))
    seq_ids = None
    if packed:
        hidden = hidden.detach().reshape(12, 7).requires_grad_()
        targets = targets.reshape(12)
        seq_ids = torch.tensor([2, 0, 1] * 4, device=device)
    seq = ddo_fast.fused_linear_sequence_logprob(
        hidden,
        weight,
        targets,
        bias=bias,
        seq_ids=seq_ids,
        num_sequences=3 if packed else None,
        chunk_size=5,
        backend=backend,
    )
    h, w, b = (t.detach().cpu().double().requires_grad_() for t in (hidden, weight, bias))
    z = _ste_round(_ste_round(h @ w.t(), F32) + b, F32)
    y = targets.cpu()
    lp = torch.log_softmax(z, -1).gather(-1, y.clamp_min(0)[..., None])[..., 0]
    lp = torch.where(y == -100, torch.zeros_like(lp), lp)
    exp = (
        lp.sum(-1)
        if not packed
        else torch.zeros(3, dtype=torch.float64).index_add(0, seq_ids.cpu(), lp)
    )
    assert seq.shape == (3,) and seq.dtype == F32
    assert_close_scaled(seq.cpu(), exp, rtol=2e-5, atol_frac=2e-5)
    up = torch.randn(3)
    got = torch.autograd.grad(seq, (hidden, weight, bias), up.to(device))
    want = torch.autograd.grad(exp, (h, w, b), up.double())
    for g, e, tol in zip(got, want, (TOL[BF16], TOL[F32], TOL[F32]), strict=True):
        assert_close_scaled(g.cpu(), e, rtol=tol[0], atol_frac=tol[1])


def test_theta_equals_ref_gives_log2_loss():
    hidden, weight, bias, targets, _, _ = _make((4, 5, 8, 21))
    with torch.no_grad():
        ref = ddo_fast.fused_linear_sequence_logprob(hidden, weight, targets, bias=bias)
    is_real = torch.tensor([True, True, False, False])
    loss = ddo_fast.fused_linear_ar_ddo_loss(
        hidden, weight, targets, ref, is_real, bias=bias, alpha=3.0
    )
    torch.testing.assert_close(loss, torch.tensor(4 * 0.6931471805599453))


def test_module_form():
    hidden, weight, bias, targets, ref, is_real = _make((3, 4, 8, 23))
    module = ddo_fast.FusedLinearARDDOLoss(alpha=2.0, beta=0.5, reduction="sum", chunk_size=5)
    got = module(hidden, weight, targets, ref, is_real, bias=bias)
    want = ddo_fast.fused_linear_ar_ddo_loss(
        hidden,
        weight,
        targets,
        ref,
        is_real,
        bias=bias,
        alpha=2.0,
        beta=0.5,
        reduction="sum",
        chunk_size=5,
    )
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend_device", ALL_BACKENDS)
def test_empty_batch(backend_device):
    backend, device = backend_device
    hidden, weight, bias, targets, ref, is_real = _to(device, *_make((0, 3, 4, 9)))
    loss = ddo_fast.fused_linear_ar_ddo_loss(
        hidden, weight, targets, ref, is_real, bias=bias, backend=backend
    )
    assert loss.item() == 0
    grads = torch.autograd.grad(loss, (hidden, weight, bias))
    for g, t in zip(grads, (hidden, weight, bias), strict=True):
        assert g.shape == t.shape and torch.all(g == 0)


def test_nan_propagates():
    hidden, weight, bias, targets, ref, is_real = _make((2, 3, 4, 9))
    with torch.no_grad():
        hidden[1, 0, 0] = float("nan")
    loss, r = ddo_fast.fused_linear_ar_ddo_loss(
        hidden,
        weight,
        targets,
        ref,
        is_real,
        bias=bias,
        reduction="none",
        return_logratio=True,
        backend="cpp",
    )
    assert r[1].isnan() and not r[0].isnan() and loss[1].isnan()


def test_default_chunk_size_follows_the_budget():
    """The default chunk keeps logits + their gradient (+ fp32 copy for 16-bit) in the budget."""
    budget = FL.CHUNK_BUDGET_BYTES
    assert FL.default_chunk_size(5440, 4096, F32, 4096 * 1024 * 4) == budget // (4096 * 8)
    assert FL.default_chunk_size(5440, 4096, BF16, 4096 * 1024 * 2) == budget // (4096 * 8)
    big = 128256 * 512 * 4  # a large head: the budget grows to weight bytes / 8
    assert FL.default_chunk_size(2048, 128256, F32, big) == (big // 8) // (128256 * 8)
    assert FL.default_chunk_size(3, 37, F32, 100) == 3 and FL.default_chunk_size(0, 5, F32, 1) == 1


# --------------------------------------------------------------------------- argument errors
def _good():
    hidden, weight, bias, targets, ref, is_real = _make((2, 3, 4, 9))
    return dict(
        hidden=hidden, weight=weight, targets=targets, ref_logprob=ref, is_real=is_real, bias=bias
    )


@pytest.mark.parametrize(
    "change, error, name",
    [
        (dict(hidden=torch.randn(6, 4)), ValueError, "hidden"),
        (dict(hidden=torch.ones(2, 3, 4, dtype=torch.long)), TypeError, "hidden"),
        (dict(weight=torch.randn(9, 5)), ValueError, "weight"),
        (dict(weight=torch.randn(9)), ValueError, "weight"),
        (dict(bias=torch.randn(8)), ValueError, "bias"),
        (dict(bias=torch.ones(9, dtype=torch.long)), TypeError, "bias"),
        (dict(targets=torch.zeros(2, 3)), TypeError, "targets"),
        (dict(targets=torch.zeros(2, 3, dtype=torch.bool)), TypeError, "targets"),
        (dict(targets=torch.zeros(2, 4, dtype=torch.long)), ValueError, "targets"),
        (dict(ref_logprob=torch.zeros(3)), ValueError, "ref_logprob"),
        (dict(is_real=torch.ones(3, dtype=torch.bool)), ValueError, "is_real"),
        (dict(is_real=torch.ones(2)), TypeError, "is_real"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(chunk_size=-3), ValueError, "chunk_size"),
        (dict(chunk_size=2.5), TypeError, "chunk_size"),
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(backend="cuda"), ValueError, "backend"),
        (dict(seq_ids=torch.zeros(6, dtype=torch.long)), ValueError, "hidden"),
    ],
)
def test_bad_arguments_name_the_argument(change, error, name):
    kw = {**_good(), **change}
    with pytest.raises(error, match=name):
        ddo_fast.fused_linear_ar_ddo_loss(**kw)


def test_bad_packed_arguments():
    kw = _good()
    kw.update(hidden=kw["hidden"].detach().reshape(6, 4), targets=kw["targets"].reshape(6))
    with pytest.raises(ValueError, match="seq_ids"):
        ddo_fast.fused_linear_ar_ddo_loss(**kw, seq_ids=torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="seq_ids"):
        ddo_fast.fused_linear_ar_ddo_loss(**kw, seq_ids=torch.zeros(6))
    with pytest.raises(IndexError):  # an id outside [0, B): index_add's own check on CPU
        ddo_fast.fused_linear_ar_ddo_loss(**kw, seq_ids=torch.tensor([0, 1, 2, 0, 1, 0]))
    with pytest.raises(ValueError, match="num_sequences"):
        ddo_fast.fused_linear_sequence_logprob(
            kw["hidden"], kw["weight"], kw["targets"], seq_ids=torch.zeros(6, dtype=torch.long)
        )


@pytest.mark.parametrize("backend_device", ALL_BACKENDS)
@pytest.mark.parametrize("bad", [-1, 9])
def test_out_of_range_target_raises(backend_device, bad):
    backend, device = backend_device
    if device == "cuda":
        pytest.skip("device-side assert: covered by the token_logprobs CUDA subprocess test")
    kw = _good()
    kw["targets"][1, 2] = bad
    with pytest.raises((IndexError, RuntimeError), match="targets"):
        ddo_fast.fused_linear_ar_ddo_loss(**kw, backend=backend)


# ---------------------------------------------------------------------- opcheck and compile
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    """Schema, fakes, autograd registration and AOT dispatch of the forward op (which exercises
    the backward op), with and without bias, in fp32 and bf16 / mixed, chunked unevenly."""
    op = torch.ops.ddo_fast.fused_linear_ar_ddo_fwd.default
    for h_dtype, w_dtype, with_bias, chunk in [
        (F32, F32, True, 4),
        (F32, F32, False, 100),
        (BF16, BF16, True, 3),
        (BF16, F32, True, 5),
    ]:
        hidden, weight, bias, targets, _, _ = _to(
            device, *_make((2, 5, 6, 11), h_dtype, w_dtype, with_bias)
        )
        args = (hidden.reshape(10, 6), weight, bias, targets.reshape(10), -100, chunk)
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_parity(device):
    backend = "cpp" if device == "cpu" else "triton"
    hidden, weight, bias, targets, ref, is_real = _to(device, *_make((3, 4, 8, 23)))
    seq_ids = torch.tensor([0, 1, 2] * 4, device=device)

    def step(hidden, weight, bias):
        a = ddo_fast.fused_linear_ar_ddo_loss(
            hidden,
            weight,
            targets,
            ref,
            is_real,
            bias=bias,
            alpha=2.0,
            chunk_size=5,
            backend=backend,
        )
        b = ddo_fast.fused_linear_sequence_logprob(
            hidden.reshape(12, 8),
            weight,
            targets.reshape(12),
            seq_ids=seq_ids,
            num_sequences=3,
            backend=backend,
        )
        return a + 1e-2 * b.sum()

    eager = step(hidden, weight, bias)
    eager_grads = torch.autograd.grad(eager, (hidden, weight, bias))
    compiled = torch.compile(step, fullgraph=True)(hidden, weight, bias)
    compiled_grads = torch.autograd.grad(compiled, (hidden, weight, bias))
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for a, b in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------------------- property testing
_BACKENDS = [("torch", "cpu", 100), ("cpp", "cpu", 100)]
if HAS_TRITON:
    _BACKENDS.append(("triton", "cuda", 100) if HAS_CUDA else ("triton", "cpu", 20))


@st.composite
def _cases(draw):
    batch = draw(st.integers(0, 4))
    length = draw(st.integers(1, 6))
    size = draw(st.integers(1, 24))
    vocab = draw(st.sampled_from([1, 2, 3, 17, 64, 255, 1000, 4097]))
    h_dtype = draw(st.sampled_from([F32, BF16, F16]))
    w_dtype = draw(st.sampled_from([F32, BF16, F16]))
    return dict(
        shape=(batch, length, size, vocab),
        h_dtype=h_dtype,
        w_dtype=w_dtype,
        with_bias=draw(st.booleans()),
        chunk_size=draw(st.one_of(st.none(), st.integers(1, batch * length + 2))),
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        packed=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@pytest.mark.parametrize(
    "backend, device, examples", _BACKENDS, ids=[f"{b}-{d}" for b, d, _ in _BACKENDS]
)
def test_property_matches_oracle(backend, device, examples):
    """Random shapes (empty batch, V = 1, V past the Triton tile), dtype mixes, bias, chunking,
    reduction and the packed form against the float64 oracle."""

    @settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(_cases())
    def run(case):
        torch.manual_seed(case["seed"])
        batch, length = case["shape"][:2]
        seq_ids = None
        if case["packed"] and batch:
            seq_ids = torch.randint(0, batch, (batch * length,), device=device)
        _check(
            backend,
            device,
            case["shape"],
            case["h_dtype"],
            case["w_dtype"],
            case["with_bias"],
            case["chunk_size"],
            case["reduction"],
            seq_ids=seq_ids,
        )

    run()


# ------------------------------------------------------------------ the single-pass fast path
def _is_single_pass(loss: torch.Tensor) -> bool:
    """The loss came from the single-pass op (its autograd node), not the recompute path."""
    return "fused_linear_ar_ddo_loss" in type(loss.grad_fn).__name__


def _check_single(
    backend,
    device,
    shape,
    h_dtype=F32,
    w_dtype=F32,
    with_bias=True,
    chunk_size=None,
    reduction="mean",
    alpha=3.0,
    ignore_index=-100,
    single=True,
    upstream=3.7,
):
    """Value and the gradients of ``upstream * loss`` against the oracle; a zero sample weight on
    a real and a fake sample. ``single``: which path must have run."""
    hidden, weight, bias, targets, ref, is_real = _to(
        device, *_make(shape, h_dtype, w_dtype, with_bias, ignore_index)
    )
    sw = torch.rand(ref.shape[0], device=device) + 0.5
    sw[:2] = 0  # is_real[0] is True, is_real[1] False (rand_mask)
    args = dict(
        alpha=alpha, beta=0.3, ignore_index=ignore_index, sample_weight=sw, reduction=reduction
    )
    loss = ddo_fast.fused_linear_ar_ddo_loss(
        hidden,
        weight,
        targets,
        ref,
        is_real,
        bias=bias,
        chunk_size=chunk_size,
        backend=backend,
        **args,
    )
    assert _is_single_pass(loss) == single
    cpu = [None if t is None else t.cpu() for t in (hidden, weight, bias, targets, ref, is_real)]
    exp_loss, _, leaves = oracle(*cpu, **{**args, "sample_weight": sw.cpu()})
    dtype = FL.compute_dtype(hidden, weight, bias)
    assert loss.dtype == F32 and loss.shape == ()
    rtol, atol = VALUE_TOL[_coarser(dtype, F32)]
    assert_close_scaled(loss.cpu(), exp_loss, rtol=rtol, atol_frac=atol)
    params = [t for t in (hidden, weight, bias) if t is not None]
    grads = torch.autograd.grad(loss * upstream, params)
    exp_grads = torch.autograd.grad(exp_loss * upstream, [t for t in leaves if t is not None])
    for got, want, leaf in zip(grads, exp_grads, params, strict=True):
        assert got.dtype == leaf.dtype and got.shape == leaf.shape
        rtol, atol = GRAD_TOL[_coarser(dtype, leaf.dtype)]
        assert_close_scaled(got.cpu(), want, rtol=rtol, atol_frac=atol)
    return loss, grads


SINGLE_DTYPES = [(F32, F32), (BF16, BF16), (F16, F16), (BF16, F32)]


@pytest.mark.parametrize("backend_device", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtypes", SINGLE_DTYPES, ids=lambda d: f"{d[0]}-{d[1]}")
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_single_pass_matches_oracle(backend_device, dtypes, with_bias, reduction):
    """3 sequences of 5 tokens in chunks of 2 sequences (10 tokens), upstream gradient 3.7."""
    backend, device = backend_device
    _check_single(
        backend,
        device,
        (3, 5, 17, 37),
        *dtypes,
        with_bias=with_bias,
        chunk_size=10,
        reduction=reduction,
    )


@pytest.mark.parametrize("backend_device", KERNEL_BACKENDS)
@pytest.mark.parametrize(
    "chunk_size, single",
    [
        (5, True),
        (9, True),
        (10, True),
        (20, True),
        (100, True),
        (None, True),
        (1, False),
        (4, False),
    ],
)
def test_single_pass_chunks(backend_device, chunk_size, single):
    """Chunks of 1 (5, 9 tokens), 2, all 4 and more sequences, the default; a chunk shorter than
    one sequence (1, 4 tokens) takes the recompute path."""
    backend, device = backend_device
    _check_single(backend, device, (4, 5, 9, 29), chunk_size=chunk_size, single=single)


@pytest.mark.parametrize("backend_device", KERNEL_BACKENDS)
def test_single_pass_alpha_zero_and_ignore_index(backend_device):
    """alpha = 0 (no fake term) with a custom ignore_index and a fully ignored sequence."""
    backend, device = backend_device
    hidden, weight, bias, targets, ref, is_real = _to(device, *_make((4, 3, 6, 13)))
    targets = torch.where((targets == 7) | (targets < 0), 0, targets)
    targets[2] = 7
    targets[0, 1] = 7
    loss = ddo_fast.fused_linear_ar_ddo_loss(
        hidden,
        weight,
        targets,
        ref,
        is_real,
        bias=bias,
        alpha=0.0,
        ignore_index=7,
        chunk_size=6,
        backend=backend,
    )
    assert _is_single_pass(loss)
    cpu = [t.cpu() for t in (hidden, weight, bias, targets, ref, is_real)]
    exp_loss, _, leaves = oracle(*cpu, alpha=0.0, ignore_index=7)
    assert_close_scaled(loss.cpu(), exp_loss, rtol=2e-5, atol_frac=2e-5)
    got = torch.autograd.grad(loss, (hidden, weight, bias))
    want = torch.autograd.grad(exp_loss, leaves)
    for g, e in zip(got, want, strict=True):
        assert_close_scaled(g.cpu(), e, rtol=2e-5, atol_frac=2e-5)
    assert torch.all(got[0][2] == 0) and torch.all(got[0][0, 1] == 0)


@pytest.mark.parametrize("backend_device", KERNEL_BACKENDS)
def test_single_pass_sub_blocks(backend_device, monkeypatch):
    """The logits gradient written back in sub-blocks of 3 rows (not dividing a 10-row chunk)."""
    backend, device = backend_device
    monkeypatch.setattr(FL, "SUB_BLOCK_BYTES", 3 * 29 * 4)
    _check_single(backend, device, (4, 5, 9, 29), chunk_size=10)
    _check_single(backend, device, (4, 5, 9, 29), BF16, BF16, chunk_size=10)


def test_single_pass_long_sequence_falls_back(monkeypatch):
    """One sequence's logits over the default chunk budget: the recompute path, same values."""
    shape = (3, 6, 8, 64)  # one sequence: 6 * 64 * 4 bytes of fp32 logits
    _check_single("cpp", "cpu", shape, chunk_size=None, single=True)
    monkeypatch.setattr(FL, "CHUNK_BUDGET_BYTES", 5 * 64 * 4)
    _check_single("cpp", "cpu", shape, chunk_size=None, single=False)


def test_single_pass_only_when_every_gradient_is_wanted():
    """No grad mode: the plain forward (same value); a frozen input: the recompute path."""
    hidden, weight, bias, targets, ref, is_real = _make((3, 4, 8, 23))
    kw = dict(bias=bias, chunk_size=8, reduction="sum")
    loss = ddo_fast.fused_linear_ar_ddo_loss(hidden, weight, targets, ref, is_real, **kw)
    assert _is_single_pass(loss)
    with torch.no_grad():
        plain = ddo_fast.fused_linear_ar_ddo_loss(hidden, weight, targets, ref, is_real, **kw)
    assert plain.grad_fn is None
    torch.testing.assert_close(plain, loss.detach(), rtol=1e-6, atol=1e-6)
    frozen = ddo_fast.fused_linear_ar_ddo_loss(hidden, weight.detach(), targets, ref, is_real, **kw)
    assert not _is_single_pass(frozen)
    got = torch.autograd.grad(frozen, (hidden, bias))
    want = torch.autograd.grad(loss, (hidden, bias))
    for g, e in zip(got, want, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend_device", KERNEL_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_single_pass_agrees_with_recompute(backend_device, reduction):
    """The same loss through both paths (return_logratio=True forces the recompute path)."""
    backend, device = backend_device
    hidden, weight, bias, targets, ref, is_real = _to(device, *_make((4, 6, 12, 41)))
    kw = dict(bias=bias, alpha=1.5, beta=0.4, reduction=reduction, chunk_size=12, backend=backend)
    fast = ddo_fast.fused_linear_ar_ddo_loss(hidden, weight, targets, ref, is_real, **kw)
    slow, _ = ddo_fast.fused_linear_ar_ddo_loss(
        hidden, weight, targets, ref, is_real, return_logratio=True, **kw
    )
    assert _is_single_pass(fast) and not _is_single_pass(slow)
    torch.testing.assert_close(fast, slow, rtol=1e-6, atol=1e-6)
    params = (hidden, weight, bias)
    for f, s in zip(
        torch.autograd.grad(fast, params), torch.autograd.grad(slow, params), strict=True
    ):
        torch.testing.assert_close(f, s, rtol=1e-5, atol=1e-6)


def test_single_pass_second_backward():
    """Upstream 3.7 scales the gradients exactly; a second backward through the same graph and
    a double backward raise instead of returning twice-scaled / wrong gradients."""
    hidden, weight, bias, targets, ref, is_real = _make((3, 4, 8, 23))
    params = (hidden, weight, bias)

    def loss_fn():
        return ddo_fast.fused_linear_ar_ddo_loss(
            hidden, weight, targets, ref, is_real, bias=bias, chunk_size=8
        )

    unit = torch.autograd.grad(loss_fn(), params)
    scaled = torch.autograd.grad(loss_fn() * 3.7, params)
    for u, s in zip(unit, scaled, strict=True):
        torch.testing.assert_close(s, u * 3.7, rtol=1e-6, atol=0)
    loss = loss_fn()
    first = torch.autograd.grad(loss * 3.7, params, retain_graph=True)
    kept = [g.clone() for g in first]
    with pytest.raises(RuntimeError, match="inplace"):
        torch.autograd.grad(loss, params)
    for g, k in zip(first, kept, strict=True):
        assert torch.equal(g, k)  # the first backward's gradients were not touched
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss_fn(), params, create_graph=True)


@pytest.mark.parametrize("device", DEVICES)
def test_single_pass_opcheck(device):
    """The forward op: schema, fakes and autograd registration. Its backward scales the op's own
    gradient outputs in place (they are the saved gradients, never returned to users), which
    AOT dispatch cannot express for an op whose outputs escape, so test_aot_dispatch_dynamic
    runs on the backward op alone here and on the forward through the public function in the
    compile tests."""
    fwd = torch.ops.ddo_fast.fused_linear_ar_ddo_loss_fwd.default
    for h_dtype, w_dtype, with_bias, code, chunk in [
        (F32, F32, True, 1, 1),
        (F32, F32, False, 2, 3),
        (BF16, BF16, True, 1, 2),
        (BF16, F32, True, 2, 1),
    ]:
        hidden, weight, bias, targets, ref, is_real = _to(
            device, *_make((3, 4, 6, 11), h_dtype, w_dtype, with_bias)
        )
        sw = torch.rand(3, device=device)
        args = (hidden, weight, bias, targets, ref, is_real, sw, 2.0, 0.5, -100, code, chunk)
        torch.library.opcheck(
            fwd, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor")
        )
    bwd = torch.ops.ddo_fast.fused_linear_ar_ddo_loss_bwd.default
    grads = (torch.randn(3, 4, 6), torch.randn(11, 6).bfloat16(), torch.randn(11))
    torch.library.opcheck(bwd, (torch.tensor(3.7), *_to(device, *grads)))


@pytest.mark.parametrize("device", DEVICES)
def test_single_pass_torch_compile_parity(device):
    backend = "cpp" if device == "cpu" else "triton"
    hidden, weight, _, targets, ref, is_real = _to(device, *_make((4, 5, 8, 23)))
    sw = torch.tensor([0.0, 1.0, 2.0, 0.5], device=device)

    def step(hidden, weight):
        loss = ddo_fast.fused_linear_ar_ddo_loss(
            hidden,
            weight,
            targets,
            ref,
            is_real,
            sample_weight=sw,
            reduction="sum",
            chunk_size=10,
            backend=backend,
        )
        return loss * 3.7

    eager = step(hidden, weight)
    assert "fused_linear_ar_ddo_loss" in type(eager.grad_fn.next_functions[0][0]).__name__
    eager_grads = torch.autograd.grad(eager, (hidden, weight))
    compiled = torch.compile(step, fullgraph=True)(hidden, weight)
    compiled_grads = torch.autograd.grad(compiled, (hidden, weight))
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for a, b in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
