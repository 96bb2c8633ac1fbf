"""Property-based fuzzing (hypothesis) of every public function against a float64 oracle.

(The logits-level functions; the fused-linear ones, whose oracle must also model the matmul's
rounding to the input dtype, have their own property test in tests/test_fused_linear_ar_ddo.py.)

Each example draws the sizes (batch 0..9, odd extents, V up to 9000 including > 8192, the Triton
single-tile limit, D above 16384, the C++ chunk), an independent dtype (fp32 / bf16 / fp16) and
memory layout (contiguous, permuted, strided slice, stride-0 expansion) per tensor, the loss
settings (alpha in [0, 50], beta in [0.01, 1e4], reduction, sample weights with zeros and
negatives, ignore_index in {-100, -1, V + 5}, all-ignored rows, any integer target dtype) and
injected NaN / inf; it then compares forward values and gradients of ``backend=`` torch, cpp and
triton (the interpreter on CPU, CUDA tensors where a GPU exists) with the oracle below. The
oracle is written here, independently of ``ddo_fast.reference``: it upcasts every tensor from
its own dtype to float64, as the library reads each input in its own dtype.

Tolerance rule (derived, not tuned). ``u = 2^-24`` is the fp32 unit roundoff; ``K = 8`` absorbs
the few roundings per term. An fp32 sum of ``n`` terms ``a_i`` has a statistical error of about
``sqrt(n) u sum|a_i|``: the scale is the magnitude of the summed terms, not of the result (a
difference of squares can cancel). So

* ``r`` (diffusion): ``K u (sqrt(D) + 1) |w| sum((p - t)^2 + (q - t)^2) + K u |r|``;
* log-prob of a token: ``K u (|x_t - m| + |log s| + sqrt(V) + 1)`` with ``m`` the row max and
  ``s = sum exp(x - m)``; a row's offset ``m`` does not enter (the precise form computes
  ``(x_t - m) - log s``; ``x_t - (m + log s)`` loses ``u |m|`` and fails at offsets ~1e4);
  a sequence adds ``K u sqrt(L) sum|logp|``; ``r = seq - ref`` adds ``K u (|seq| + |ref|)``;
* loss head, through its condition number: ``l = -c logsigmoid(z)``, ``z = +-beta r``:
  ``|dl| <= |c| (sigmoid(-z) (beta dr + K u |z|) + K u |logsigmoid(z)|)``; the gradient
  ``g = -+c beta sigmoid(-z)`` adds ``|c| beta sigmoid(z) sigmoid(-z) (beta dr + K u |z|)``;
  a reduction adds ``K u (sqrt(B) + 1) sum|l_b|``; ``fp32 underflow`` adds ``2^-126`` times the
  factors in front of the underflowing quantity;
* every output is rounded once to its dtype: half an ulp (``2^-24``, ``2^-8``, ``2^-11`` for
  fp32, bf16, fp16 gradients) plus half the smallest subnormal.

This is a few hundred ulps for small inputs: a target rounded to bf16, a logsumexp taken as
``m + log s`` at offset 1e4, or ``log(sigmoid(z))`` in place of logsigmoid all fail it.
NaN in the oracle must be NaN in the result, +-inf must be the same inf.

Profiles: ``DDO_FAST_FUZZ=ci`` (default: derandomized, 300 examples per function for torch, cpp
and Triton on CUDA, 100 for the Triton interpreter) or ``DDO_FAST_FUZZ=long`` (5000 each, random).
"""

from __future__ import annotations

import math
import os
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from utils import HAS_CUDA, HAS_TRITON

import ddo_fast

# ----------------------------------------------------------------------------------- profiles
settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("long", settings.get_profile("ci"), derandomize=False)
PROFILE = os.environ.get("DDO_FAST_FUZZ", "ci")
if PROFILE not in ("ci", "long"):
    raise ValueError(f"DDO_FAST_FUZZ must be 'ci' or 'long', got {PROFILE!r}")
# examples per test: "fast" = torch, cpp, Triton on CUDA; "interpret" = Triton interpreter
EXAMPLES = {"ci": {"fast": 300, "interpret": 100}, "long": {"fast": 5000, "interpret": 5000}}

TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"
BACKENDS = [pytest.param(("torch", "cpu"), id="torch"), pytest.param(("cpp", "cpu"), id="cpp")]
if HAS_TRITON:
    BACKENDS.append(pytest.param(("triton", TRITON_DEVICE), id=f"triton-{TRITON_DEVICE}"))


def _interpreted(backend: str, device: str) -> bool:
    return backend == "triton" and device == "cpu"


def _fuzz(case, backend: str, device: str, cheap: bool = False) -> None:
    """Run ``case(data, backend, device)`` for the profile's number of examples (the "fast"
    count when ``cheap``: the case fails before any interpreted kernel runs, mostly)."""
    kind = "interpret" if _interpreted(backend, device) and not cheap else "fast"
    OUT_ROUNDOFF[torch.bfloat16] = 2.0**-7 if kind == "interpret" else 2.0**-8
    cfg = settings(settings.get_profile(PROFILE), max_examples=EXAMPLES[PROFILE][kind])
    if kind == "interpret":  # shrinking costs hundreds of interpreted runs: report as found
        cfg = settings(cfg, phases=[p for p in Phase if p != Phase.shrink])

    passed = 0

    @cfg
    @given(data=st.data())
    def run(data):
        nonlocal passed
        case(data, backend, device)
        passed += 1

    run()
    # `pytest -s` shows how many examples ran (the long profile's counts for the record)
    print(f"\n{case.__name__}[{backend}-{device}]: {passed} examples passed")


# --------------------------------------------------------------------------------- tolerances
K = 8.0
U32 = 2.0**-24
TINY32 = 2.0**-126  # fp32 values below this may be flushed to zero (CUDA ftz)
FLOATS = (torch.float32, torch.bfloat16, torch.float16)
# rounding of an output to its dtype. triton 3.6's interpreter converts fp32 -> bf16 by
# truncation (up to one ulp, 2^-7; ``fp_downcast_rounding="rtne"`` is ignored there), compiled
# Triton and PyTorch round to nearest (half an ulp): _fuzz sets the bf16 entry per backend.
OUT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
ATOL_OUT = {torch.float32: TINY32, torch.bfloat16: TINY32, torch.float16: 2.0**-25}


def _clean(tol: torch.Tensor) -> torch.Tensor:
    """0 * inf in a tolerance is a term that does not contribute (e.g. sigmoid(-inf) * inf)."""
    return torch.nan_to_num(tol, nan=0.0, posinf=math.inf)


def _check(
    name: str, actual: torch.Tensor, expected: torch.Tensor, tol: torch.Tensor, dtype
) -> None:
    """NaN where the oracle is NaN, the same inf where it is inf, else within ``tol`` plus one
    rounding to ``dtype``."""
    assert actual.dtype == dtype, f"{name}: dtype {actual.dtype}, expected {dtype}"
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{name}: shape {list(actual.shape)}, expected {list(expected.shape)}"
    )
    a = actual.detach().to("cpu", torch.float64)
    # Round to nearest: |x| >= top + ulp(top)/2 becomes inf, top < |x| below that becomes top.
    top, eps = torch.finfo(dtype).max, torch.finfo(dtype).eps
    overflow = top + top / (2 - eps) * eps / 2
    sign = expected.sign()
    big = expected.abs()
    e = torch.where(big >= overflow, sign * math.inf, torch.where(big > top, sign * top, expected))
    tol = _clean(torch.as_tensor(tol, dtype=torch.float64)).expand_as(e)
    tol = tol + OUT_ROUNDOFF[dtype] * e.abs().nan_to_num(posinf=0.0) + ATOL_OUT[dtype]
    finite = e.isfinite()
    ok = torch.where(e.isnan(), a.isnan(), torch.where(finite, (a - e).abs() <= tol, a == e))
    # Within the tolerance of that threshold the fp32 math may land on either side of it (found
    # by the long profile: an fp16 gradient of 65504 where the exact value rounds to inf).
    near = expected.isfinite() & ((big - overflow).abs() <= tol)
    ok = ok | (near & ((a == sign * math.inf) | (a == sign * top)))
    if not bool(ok.all()):
        bad = (~ok).nonzero()
        idx = tuple(bad[0].tolist())
        excess = ((a - e).abs() / tol)[finite & ~ok]
        worst = f", worst |err|/tol {excess.max().item():.3g}" if excess.numel() else ""
        raise AssertionError(
            f"{name}: {len(bad)} of {e.numel()} values wrong{worst}; first at {list(idx)}: "
            f"got {a[idx].item()!r}, oracle {e[idx].item()!r}, tol {tol[idx].item():.3g}"
        )


# ------------------------------------------------------------------------- float64 oracle
def _oracle_head(r, r_tol, is_real, c, beta, reduction, upstream):
    """DDO loss head (Eq. 13) in float64 on r [B], with the semantics every backend shares:
    c_b = 0 zeroes the term and its gradient unless r_b is NaN.

    Returns (loss, loss_tol, dloss/dr [B] times upstream, its tol).
    """
    sign = torch.where(is_real, 1.0, -1.0).double()
    z = sign * beta * r
    ls = F.logsigmoid(z)
    sig_neg, sig_pos = torch.sigmoid(-z), torch.sigmoid(z)
    dropped = (c == 0) & ~r.isnan()
    zero = torch.zeros((), dtype=torch.float64)
    per = torch.where(dropped, zero, -c * ls)
    dper = torch.where(dropped, zero, -c * beta * sign * sig_neg)
    dz = beta * r_tol + K * U32 * z.abs()
    per_tol = c.abs() * (_clean(sig_neg * dz) + K * U32 * ls.abs() + TINY32)
    per_tol = torch.where(dropped, zero, _clean(per_tol))
    batch = r.shape[0]
    if reduction == "none":
        scale = torch.ones_like(r)
    elif reduction == "sum":
        scale = torch.ones_like(r)
    else:
        n_real = max(int(is_real.sum()), 1)
        n_fake = max(int((~is_real).sum()), 1)
        scale = torch.where(is_real, 1.0 / n_real, 1.0 / n_fake).double()
    if reduction == "none":
        loss, loss_tol = per, per_tol
    else:
        loss = (scale * per).sum()
        loss_tol = (scale * per_tol).sum() + K * U32 * (math.sqrt(batch) + 1) * _clean(
            (scale * per).abs()
        ).sum()
    u = upstream.double() * scale
    grad = u * dper
    grad_tol = u.abs() * (
        K * U32 * dper.abs() + c.abs() * beta * (_clean(sig_pos * sig_neg * dz) + TINY32)
    )
    grad_tol = torch.where(dropped, zero, _clean(grad_tol))
    return loss, loss_tol, grad, grad_tol


def _oracle_diffusion_r(p, q, t, w):
    """r_b = -w_b sum_i ((p - t)^2 - (q - t)^2) and its fp32 error bound; all [B, ...] f64."""
    batch = p.shape[0]
    n = math.prod(p.shape[1:])
    a = ((p - t).square() - (q - t).square()).reshape(batch, n)
    mag = ((p - t).square() + (q - t).square()).reshape(batch, n).sum(1)
    r = -w * a.sum(1)
    tol = K * U32 * (math.sqrt(n) + 1) * w.abs() * mag + K * U32 * r.abs() + w.abs() * n * TINY32
    return r, _clean(tol)


def _oracle_tokens(x, y, ignore_index):
    """Per-token log-prob [B, L], its tol, softmax [B, L, V] and its tol; ignored rows 0."""
    vocab = x.shape[-1]
    valid = y != ignore_index
    xv = torch.where(valid.unsqueeze(-1), x, 0.0)  # ignored rows are never read
    if vocab:
        m = xv.amax(-1, keepdim=True)
        m = torch.where(xv.isnan().any(-1, keepdim=True), math.nan, m)
    else:
        m = xv.new_zeros(*xv.shape[:-1], 1)
    d = xv - m
    lse = torch.logsumexp(d, -1, keepdim=True)
    # logsumexp of a row holding NaN must be NaN (torch.logsumexp already propagates it)
    picked = d.gather(-1, torch.where(valid, y, 0).unsqueeze(-1).clamp_max(max(vocab - 1, 0)))
    logp = (picked - lse).squeeze(-1)
    base = K * U32 * (lse.abs() + math.sqrt(max(vocab, 1)) + 2)
    logp_tol = K * U32 * picked.abs().squeeze(-1) + base.squeeze(-1)
    soft = torch.exp(d - lse)
    soft_tol = soft * (K * U32 * d.abs() + base) + TINY32
    zero = torch.zeros((), dtype=torch.float64)
    logp = torch.where(valid, logp, zero)
    logp_tol = torch.where(valid, _clean(logp_tol), zero)
    soft = torch.where(valid.unsqueeze(-1), soft, zero)
    soft_tol = torch.where(valid.unsqueeze(-1), _clean(soft_tol), zero)
    return logp, logp_tol, soft, soft_tol, valid


def _onehot(y, valid, vocab):
    idx = torch.where(valid, y, 0).clamp_max(max(vocab - 1, 0))
    hot = F.one_hot(idx, max(vocab, 1))[..., :vocab].double()
    return hot * valid.unsqueeze(-1)


def _f64(t: torch.Tensor) -> torch.Tensor:
    """The oracle's view of an input: its own dtype's values, upcast exactly."""
    return t.detach().to("cpu").to(torch.float64 if t.is_floating_point() else torch.int64)


# ------------------------------------------------------------------------- input strategies
LAYOUTS = ("contiguous", "permuted", "strided", "expanded")


def _place(data, values: torch.Tensor, device: str, label: str, requires_grad=False, expand=True):
    """``values`` (already in the target dtype) in a drawn memory layout on ``device``; returns
    the tensor the library gets (an expanded layout repeats the first slice along one dim)."""
    layouts = LAYOUTS if expand else tuple(x for x in LAYOUTS if x != "expanded")
    layout = data.draw(st.sampled_from(layouts), label=f"{label}.layout")
    nd = values.dim()
    if layout == "expanded" and nd and values.numel():
        dim = data.draw(st.integers(0, nd - 1), label=f"{label}.expand_dim")
        base = values.narrow(dim, 0, 1).clone().to(device).requires_grad_(requires_grad)
        return base.expand(values.shape)
    if layout == "permuted" and nd >= 2:
        perm = data.draw(st.permutations(range(nd)), label=f"{label}.perm")
        inv = [perm.index(i) for i in range(nd)]
        base = values.permute(perm).contiguous().to(device).requires_grad_(requires_grad)
        return base.permute(inv)
    if layout in ("strided", "permuted") and nd:
        dim = data.draw(st.integers(0, nd - 1), label=f"{label}.stride_dim")
        offset = data.draw(st.integers(0, 1), label=f"{label}.offset")
        big_shape = list(values.shape)
        big_shape[dim] = 2 * big_shape[dim] + 1
        big = torch.zeros(big_shape, dtype=values.dtype)
        index = [slice(None)] * nd
        index[dim] = slice(offset, offset + 2 * values.shape[dim], 2)
        big[tuple(index)] = values
        big = big.to(device).requires_grad_(requires_grad)
        return big[tuple(index)]
    return values.clone().to(device).requires_grad_(requires_grad)


def _gen(data, label: str) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(data.draw(st.integers(0, 2**32 - 1), label=f"{label}.seed"))
    return g


def _dtype(data, label: str):
    return data.draw(st.sampled_from(FLOATS), label=f"{label}.dtype")


def _inject(data, values: torch.Tensor, g: torch.Generator, label: str, kinds) -> torch.Tensor:
    """Maybe overwrite a few entries of float64 ``values`` with NaN or +-inf."""
    kind = data.draw(st.sampled_from(("none",) * 4 + tuple(kinds)), label=f"{label}.inject")
    if kind == "none" or not values.numel():
        return values
    flat = values.flatten().clone()
    count = data.draw(st.integers(1, 3), label=f"{label}.inject_count")
    pos = torch.randint(0, flat.numel(), (count,), generator=g)
    special = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}[kind]
    flat[pos] = special
    return flat.reshape(values.shape)


def _batch(data, label="B", hi=9):
    return data.draw(st.integers(0, hi), label=label)


def _is_real(data, batch, device, g):
    values = torch.rand(batch, generator=g) < data.draw(st.sampled_from([0.0, 0.5, 1.0]))
    if batch >= 2 and data.draw(st.booleans(), label="is_real.both_groups"):
        values[0], values[1] = True, False
    return _place(data, values, device, "is_real")


def _loss_settings(data):
    alpha = data.draw(
        st.one_of(st.sampled_from([0.0, 1.0, 50.0]), st.floats(0.0, 50.0)), label="alpha"
    )
    beta = 10.0 ** data.draw(st.floats(-2.0, 4.0), label="log10_beta")
    reduction = data.draw(st.sampled_from(["none", "mean", "sum"]), label="reduction")
    # The library applies alpha and beta in fp32 (the loss is computed in fp32): the oracle takes
    # the same fp32 values, so an alpha that underflows fp32 (1e-55, say) is the zero weight it
    # is there, not a tiny positive one (found by the long profile).
    return _fp32(alpha), _fp32(beta), reduction


def _fp32(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float32))


def _sample_weight(data, batch, device, g):
    """None, or [B] weights with zeros and negatives, in a drawn dtype and layout."""
    if not data.draw(st.booleans(), label="has_sample_weight"):
        return None
    w = torch.randn(batch, generator=g, dtype=torch.float64) * 2
    w = torch.where(torch.rand(batch, generator=g) < 0.3, 0.0, w)
    w = _inject(data, w, g, "sample_weight", ("nan",))
    return _place(data, w.to(_dtype(data, "sample_weight")), device, "sample_weight")


def _weights(is_real, sample_weight, alpha, batch):
    """c_b of the oracle (float64 [B])."""
    w = torch.ones(batch, dtype=torch.float64) if sample_weight is None else _f64(sample_weight)
    return torch.where(_f64(is_real).bool(), w, alpha * w)


def _upstream(out: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A random upstream gradient: per-sample for reduction none, a random scalar otherwise."""
    return (torch.randn(out.shape, generator=g, dtype=torch.float64) + 2.0 * (out.dim() == 0)).to(
        out.device, torch.float32
    )


def _grad(out, leaf, upstream):
    (g,) = torch.autograd.grad(out, leaf, upstream)
    return g


# ----------------------------------------------------------------------------- ddo_loss
def _case_ddo_loss(data, backend, device):
    g = _gen(data, "values")
    batch = _batch(data)
    alpha, beta, reduction = _loss_settings(data)
    is_real = _is_real(data, batch, device, g)
    sample_weight = _sample_weight(data, batch, device, g)
    c = _weights(is_real, sample_weight, alpha, batch)
    r_dtype = _dtype(data, "logratio")
    scale = 10.0 ** data.draw(st.integers(-3, 4), label="logratio.log10_scale")
    r = torch.randn(batch, generator=g, dtype=torch.float64) * scale
    r = _inject(data, r, g, "logratio", ("nan", "inf", "-inf"))
    huge = r_dtype != torch.float16 and data.draw(st.booleans(), label="huge_if_dropped")
    if huge:  # beta * r overflows fp32 on the zero-weight samples only (so no expanded layout)
        r = torch.where(c == 0, 2e38 * torch.sign(torch.randn(batch, generator=g)), r)
    logratio = _place(data, r.to(r_dtype), device, "logratio", requires_grad=True, expand=not huge)

    out = ddo_fast.ddo_loss(
        logratio, is_real, alpha=alpha, beta=beta, sample_weight=sample_weight,
        reduction=reduction, backend=backend,
    )  # fmt: skip
    up = _upstream(out, g)
    grad = _grad(out, logratio, up)

    loss, loss_tol, dr, dr_tol = _oracle_head(
        _f64(logratio), torch.zeros(batch, dtype=torch.float64), _f64(is_real).bool(), c, beta,
        reduction, _f64(up),
    )  # fmt: skip
    _check("loss", out, loss, loss_tol, torch.float32)
    _check("d logratio", grad, dr, dr_tol, r_dtype)


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_fuzz_ddo_loss(backend_device):
    _fuzz(_case_ddo_loss, *backend_device)


# ------------------------------------------------------------------------------ diffusion
def _diffusion_inputs(data, device, budget):
    """pred (leaf view), pred_ref, target, weight, is_real, their generator; D may exceed the
    C++ chunk (16384) and the row shape may be empty ([B] tensors)."""
    g = _gen(data, "values")
    size = data.draw(st.integers(0, 9), label="D.class")
    if size == 9:  # beyond one C++ chunk / several Triton blocks
        row = data.draw(
            st.sampled_from([[16385], [3, 5462], [17001], [2, 3, 2731]]), label="row_shape"
        )
        batch = _batch(data, hi=max(budget // math.prod(row), 0))
    else:
        hi = 5 if size < 6 else 40
        row = data.draw(st.lists(st.integers(1, hi), min_size=0, max_size=3), label="row_shape")
        batch = _batch(data, hi=min(9, budget // max(math.prod(row), 1)))
    shape = [batch, *row]
    scale = 10.0 ** data.draw(st.integers(-2, 1), label="value.log10_scale")
    noise = 10.0 ** data.draw(st.integers(-3, 0), label="value.log10_noise")
    t = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    p = t + torch.randn(shape, generator=g, dtype=torch.float64) * scale * noise
    q = t + torch.randn(shape, generator=g, dtype=torch.float64) * scale * noise
    w = torch.rand(batch, generator=g, dtype=torch.float64) * 4
    w = torch.where(torch.rand(batch, generator=g) < 0.2, 0.0, w)
    if data.draw(st.booleans(), label="negative_weight"):
        w = -w
    kinds = ("nan", "inf", "-inf")
    p = _inject(data, p, g, "pred", kinds)
    q = _inject(data, q, g, "pred_ref", kinds)
    t = _inject(data, t, g, "target", kinds)
    w = _inject(data, w, g, "weight", ("nan",))
    dts = [_dtype(data, n) for n in ("pred", "pred_ref", "target", "weight")]
    return g, batch, (p, q, t, w), dts


def _place_diffusion(data, device, values, dts, expand_weight=True):
    p, q, t, w = values
    pred = _place(data, p.to(dts[0]), device, "pred", requires_grad=True)
    pred_ref = _place(data, q.to(dts[1]), device, "pred_ref")
    target = _place(data, t.to(dts[2]), device, "target")
    weight = _place(data, w.to(dts[3]), device, "weight", expand=expand_weight)
    return pred, pred_ref, target, weight


def _budget(backend, device):
    return 20000 if _interpreted(backend, device) else 40000


def _dpred_oracle(pred, target, weight, dr, dr_tol):
    """d loss / d pred = dr_b * (-2 w_b (p - t)) and its tol, [B, ...]."""
    p, t, w = _f64(pred), _f64(target), _f64(weight)
    bshape = (-1,) + (1,) * (p.dim() - 1)
    factor = -2.0 * w.reshape(bshape) * (p - t)
    grad = dr.reshape(bshape) * factor
    tol = K * U32 * grad.abs() + _clean(dr_tol.reshape(bshape) * factor.abs())
    tol = tol + dr.abs().reshape(bshape) * 2 * w.abs().reshape(bshape) * TINY32
    return grad, tol


def _case_diffusion_logratio(data, backend, device):
    g, batch, values, dts = _diffusion_inputs(data, device, _budget(backend, device))
    pred, pred_ref, target, weight = _place_diffusion(data, device, values, dts)
    out = ddo_fast.diffusion_logratio(pred, pred_ref, target, weight, backend=backend)
    up = _upstream(out, g)
    grad = _grad(out, pred, up)
    r, r_tol = _oracle_diffusion_r(_f64(pred), _f64(pred_ref), _f64(target), _f64(weight))
    _check("r", out, r, r_tol, torch.float32)
    dpred, dpred_tol = _dpred_oracle(pred, target, weight, _f64(up), torch.zeros(batch))
    _check("d pred", grad, dpred, dpred_tol, dts[0])


def _case_diffusion_ddo_loss(data, backend, device):
    g, batch, values, dts = _diffusion_inputs(data, device, _budget(backend, device))
    alpha, beta, reduction = _loss_settings(data)
    is_real = _is_real(data, batch, device, g)
    sample_weight = _sample_weight(data, batch, device, g)
    c = _weights(is_real, sample_weight, alpha, batch)
    p, q, t, w = values
    huge = dts[3] != torch.float16 and data.draw(st.booleans(), label="huge_if_dropped")
    if huge:  # r_b ~ 1e30 on zero-weight samples only: beta * r_b overflows fp32 there
        w = torch.where(c == 0, 1e30, w)
    pred, pred_ref, target, weight = _place_diffusion(data, device, (p, q, t, w), dts, not huge)
    want_r = data.draw(st.booleans(), label="return_logratio")
    res = ddo_fast.diffusion_ddo_loss(
        pred, pred_ref, target, weight, is_real, alpha=alpha, beta=beta,
        sample_weight=sample_weight, reduction=reduction, backend=backend,
        return_logratio=want_r,
    )  # fmt: skip
    out = res[0] if want_r else res
    up = _upstream(out, g)
    grad = _grad(out, pred, up)

    r, r_tol = _oracle_diffusion_r(_f64(pred), _f64(pred_ref), _f64(target), _f64(weight))
    loss, loss_tol, dr, dr_tol = _oracle_head(
        r, r_tol, _f64(is_real).bool(), c, beta, reduction, _f64(up)
    )
    _check("loss", out, loss, loss_tol, torch.float32)
    if want_r:
        _check("r", res[1], r, r_tol, torch.float32)
    dpred, dpred_tol = _dpred_oracle(pred, target, weight, dr, dr_tol)
    _check("d pred", grad, dpred, dpred_tol, dts[0])


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_fuzz_diffusion_logratio(backend_device):
    _fuzz(_case_diffusion_logratio, *backend_device)


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_fuzz_diffusion_ddo_loss(backend_device):
    _fuzz(_case_diffusion_ddo_loss, *backend_device)


# ---------------------------------------------------------------------------- token ops
INT_RANGES = {
    torch.uint8: (0, 255),
    torch.int8: (-128, 127),
    torch.int16: (-(2**15), 2**15 - 1),
    torch.int32: (-(2**31), 2**31 - 1),
    torch.int64: (-(2**63), 2**63 - 1),
}


def _token_inputs(data, backend, device):
    """logits (leaf view) [B, L, V], targets [B, L] of a drawn integer dtype, ignore_index."""
    g = _gen(data, "values")
    interp = _interpreted(backend, device)
    size = data.draw(st.integers(0, 9), label="V.class")
    if size == 9:  # above the 8192 single-tile Triton path
        vocab = data.draw(st.integers(8193, 9000), label="V")
        batch, length = _batch(data, hi=2), data.draw(st.integers(1, 2), label="L")
    else:
        vocab = data.draw(st.integers(1, 64 if size < 6 else 2100), label="V")
        rows = 12 if interp else 200
        budget = 20000 if interp else 30000
        length = data.draw(st.integers(1, 9), label="L")
        hi = min(9, rows // length, budget // (length * vocab))
        batch = _batch(data, hi=hi)
    ignore_index = data.draw(st.sampled_from([-100, -1, vocab + 5]), label="ignore_index")
    shape = (batch, length, vocab)
    scale = 10.0 ** data.draw(st.integers(-2, 1), label="logits.log10_scale")
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    dtype = _dtype(data, "logits")
    offset = data.draw(st.sampled_from([0.0, 0.0, -30.0, 1e4]), label="logits.offset")
    if dtype == torch.float16 and offset == 1e4:
        offset = 3e4  # still inside fp16's range (65504)
    x = x + offset
    y = torch.randint(0, vocab, (batch, length), generator=g)
    if data.draw(st.booleans(), label="mask_with_-inf") and vocab > 1:
        # -inf logits on non-target entries (masked vocabulary): finite, exact answers
        masked = torch.rand(shape, generator=g) < 0.3
        masked &= F.one_hot(y, vocab) == 0
        x = torch.where(masked, -math.inf, x)
    x = _inject(data, x, g, "logits", ("nan", "inf"))
    ignored = torch.rand(batch, length, generator=g) < data.draw(
        st.sampled_from([0.0, 0.3]), label="ignored.fraction"
    )
    if batch and data.draw(st.booleans(), label="all_ignored_row"):
        ignored[torch.randint(0, batch, (1,), generator=g)] = True
    tdtype = data.draw(st.sampled_from(list(INT_RANGES)), label="targets.dtype")
    lo, hi_t = INT_RANGES[tdtype]
    if vocab - 1 > hi_t:
        tdtype = torch.int64
    elif not lo <= ignore_index <= hi_t:
        ignored[:] = False  # an unrepresentable ignore_index matches no target
    y = torch.where(ignored, ignore_index, y)
    logits = _place(data, x.to(dtype), device, "logits", requires_grad=True)
    targets = _place(data, y.to(tdtype), device, "targets")
    return g, logits, targets, ignore_index, dtype


def _case_token_logprobs(data, backend, device):
    g, logits, targets, ignore_index, dtype = _token_inputs(data, backend, device)
    out = ddo_fast.token_logprobs(logits, targets, ignore_index=ignore_index, backend=backend)
    up = _upstream(out, g)
    grad = _grad(out, logits, up)
    x, y = _f64(logits), _f64(targets)
    logp, logp_tol, soft, soft_tol, valid = _oracle_tokens(x, y, ignore_index)
    _check("logp", out, logp, logp_tol, torch.float32)
    u = _f64(up).unsqueeze(-1)
    expected = u * (_onehot(y, valid, x.shape[-1]) - soft)
    _check("d logits", grad, expected, u.abs() * soft_tol + K * U32 * expected.abs(), dtype)


def _sequence_oracle(x, y, ignore_index):
    logp, logp_tol, soft, soft_tol, valid = _oracle_tokens(x, y, ignore_index)
    seq = logp.sum(-1)
    n = max(logp.shape[-1], 1)
    seq_tol = logp_tol.sum(-1) + K * U32 * (math.sqrt(n) + 1) * _clean(logp.abs()).sum(-1)
    return seq, seq_tol, soft, soft_tol, valid


def _dlogits_oracle(x, y, valid, soft, soft_tol, k, k_tol):
    """d / d logits of sum_l k_b logp_{b,l}: k_b (onehot - softmax), and its tol."""
    kb = k.reshape(-1, 1, 1)
    diff = _onehot(y, valid, x.shape[-1]) - soft
    grad = torch.where(valid.unsqueeze(-1), kb * diff, 0.0)  # ignored rows: exactly 0
    tol = kb.abs() * soft_tol + K * U32 * grad.abs() + _clean(k_tol.reshape(-1, 1, 1) * diff.abs())
    return grad, tol


def _case_sequence_logprob(data, backend, device):
    g, logits, targets, ignore_index, dtype = _token_inputs(data, backend, device)
    out = ddo_fast.sequence_logprob(logits, targets, ignore_index=ignore_index, backend=backend)
    up = _upstream(out, g)
    grad = _grad(out, logits, up)
    x, y = _f64(logits), _f64(targets)
    seq, seq_tol, soft, soft_tol, valid = _sequence_oracle(x, y, ignore_index)
    _check("sequence logp", out, seq, seq_tol, torch.float32)
    k = _f64(up)
    dx, dx_tol = _dlogits_oracle(x, y, valid, soft, soft_tol, k, torch.zeros_like(k))
    _check("d logits", grad, dx, dx_tol, dtype)


def _case_ar_ddo_loss(data, backend, device):
    g, logits, targets, ignore_index, dtype = _token_inputs(data, backend, device)
    batch = logits.shape[0]
    alpha, beta, reduction = _loss_settings(data)
    is_real = _is_real(data, batch, device, g)
    sample_weight = _sample_weight(data, batch, device, g)
    c = _weights(is_real, sample_weight, alpha, batch)
    x, y = _f64(logits), _f64(targets)
    seq, seq_tol, soft, soft_tol, valid = _sequence_oracle(x, y, ignore_index)
    # the reference log-prob close to the model's, so that beta * r spans the loss head
    gap = 10.0 ** data.draw(st.integers(-3, 1), label="ref.log10_gap")
    ref = seq.nan_to_num(0.0, 0.0, 0.0) + torch.randn(batch, generator=g, dtype=torch.float64) * gap
    ref = _inject(data, ref, g, "ref_logprob", ("nan", "inf", "-inf"))
    ref_dtype = _dtype(data, "ref_logprob")
    huge = ref_dtype != torch.float16 and data.draw(st.booleans(), label="huge_if_dropped")
    if huge:  # beta * r overflows fp32 on the zero-weight samples only
        ref = torch.where(c == 0, 2e38 * torch.sign(torch.randn(batch, generator=g)), ref)
    ref_logprob = _place(data, ref.to(ref_dtype), device, "ref_logprob", expand=not huge)
    want_r = data.draw(st.booleans(), label="return_logratio")
    res = ddo_fast.ar_ddo_loss(
        logits, targets, ref_logprob, is_real, alpha=alpha, beta=beta,
        ignore_index=ignore_index, sample_weight=sample_weight, reduction=reduction,
        backend=backend, return_logratio=want_r,
    )  # fmt: skip
    out = res[0] if want_r else res
    up = _upstream(out, g)
    grad = _grad(out, logits, up)

    ref64 = _f64(ref_logprob)
    r = seq - ref64
    r_tol = seq_tol + K * U32 * _clean(seq.abs() + ref64.abs())
    loss, loss_tol, dr, dr_tol = _oracle_head(
        r, r_tol, _f64(is_real).bool(), c, beta, reduction, _f64(up)
    )
    _check("loss", out, loss, loss_tol, torch.float32)
    if want_r:
        _check("r", res[1], r, r_tol, torch.float32)
    dx, dx_tol = _dlogits_oracle(x, y, valid, soft, soft_tol, dr, dr_tol)
    _check("d logits", grad, dx, dx_tol, dtype)


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_fuzz_token_logprobs(backend_device):
    _fuzz(_case_token_logprobs, *backend_device)


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_fuzz_sequence_logprob(backend_device):
    _fuzz(_case_sequence_logprob, *backend_device)


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_fuzz_ar_ddo_loss(backend_device):
    _fuzz(_case_ar_ddo_loss, *backend_device)


# ------------------------------------------------------------------------------ bad input
def _valid_call(data, device, fn):
    """Arguments of a small valid call to public function ``fn`` (name, args, kwargs)."""
    b = data.draw(st.integers(1, 4), label="B")
    length, vocab = data.draw(st.integers(1, 3), label="L"), data.draw(st.integers(2, 6))
    is_real = torch.arange(b, device=device) % 2 == 0
    if fn == "ddo_loss":
        return [torch.randn(b, device=device), is_real], {
            "sample_weight": torch.ones(b, device=device)
        }
    if fn.startswith("diffusion"):
        args = [torch.randn(b, 3, 2, device=device) for _ in range(3)] + [
            torch.rand(b, device=device)
        ]
        kw = {}
        if fn == "diffusion_ddo_loss":
            args.append(is_real)
            kw = {"sample_weight": torch.ones(b, device=device)}
        return args, kw
    args = [
        torch.randn(b, length, vocab, device=device),
        torch.randint(0, vocab, (b, length), device=device),
    ]
    if fn == "ar_ddo_loss":
        args += [torch.randn(b, device=device), is_real]
        return args, {"sample_weight": torch.ones(b, device=device)}
    return args, {}


ARG_NAMES = {
    "ddo_loss": ["logratio", "is_real"],
    "diffusion_logratio": ["pred", "pred_ref", "target", "weight"],
    "diffusion_ddo_loss": ["pred", "pred_ref", "target", "weight", "is_real"],
    "token_logprobs": ["logits", "targets"],
    "sequence_logprob": ["logits", "targets"],
    "ar_ddo_loss": ["logits", "targets", "ref_logprob", "is_real"],
}


def _corrupt(data, fn, args, kwargs, device):
    """Break one argument; returns (exception type, argument name)."""
    names = ARG_NAMES[fn] + list(kwargs)
    if fn in ("ddo_loss", "diffusion_ddo_loss", "ar_ddo_loss"):
        names.append("reduction")
    name = data.draw(st.sampled_from(names), label="broken_arg")
    if name == "reduction":
        kwargs["reduction"] = data.draw(st.sampled_from(["avg", "mean ", "", "elementwise"]))
        return ValueError, name
    i = ARG_NAMES[fn].index(name) if name in ARG_NAMES[fn] else None
    t = args[i] if i is not None else kwargs[name]
    how = data.draw(st.sampled_from(["shape", "dtype"] + ["range"] * (name == "targets")))
    if how == "shape":
        if name == "targets":
            bad = t[:, :-1] if t.shape[1] > 1 else t[:, None]
        elif name == "logits":  # [B, L, V] -> 2-D or 1-D
            bad = t[0] if data.draw(st.booleans()) else t.flatten()
        elif name in ("pred_ref", "target"):
            bad = t[..., :-1] if data.draw(st.booleans()) else t.flatten()
        elif name == "pred":
            bad = t[0, 0, 0]  # a 0-d tensor: no batch dimension
        elif name == "logratio":  # its length defines B: only an extra dim is an error of its own
            bad = t[:, None]
        else:  # [B] vectors: wrong length or an extra dim
            bad = torch.cat([t, t[:1]]) if data.draw(st.booleans()) else t[:, None]
        error = ValueError
    elif how == "dtype":
        if name == "is_real":
            bad = t.float()
        elif name == "targets":
            bad = t.to(data.draw(st.sampled_from([torch.bool, torch.float32, torch.float16])))
        else:
            bad = t.to(data.draw(st.sampled_from([torch.int64, torch.int32, torch.bool])))
        error = TypeError
    else:  # out-of-range target
        vocab = args[0].shape[-1]
        bad = t.clone()
        bad.view(-1)[0] = data.draw(st.sampled_from([vocab, vocab + 7, -2, -101]))
        error = IndexError
    if i is not None:
        args[i] = bad
    else:
        kwargs[name] = bad
    return error, name


FUNCTIONS = list(ARG_NAMES)


def _case_invalid(data, backend, device):
    fn = data.draw(st.sampled_from(FUNCTIONS), label="function")
    args, kwargs = _valid_call(data, device, fn)
    error, name = _corrupt(data, fn, args, kwargs, device)
    if error is IndexError and device != "cpu":
        return  # a device-side assert on CUDA (poisons the context): tests/utils.py covers it
    with pytest.raises(error, match=rf"\b{re.escape(name)}\b"):
        getattr(ddo_fast, fn)(*args, **kwargs, backend=backend)


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_fuzz_invalid_inputs_raise_naming_the_argument(backend_device):
    _fuzz(_case_invalid, *backend_device, cheap=True)
