"""The C++ CPU kernels under every instruction set this CPU supports (csrc/cpu/isa/).

The kernels' inner loops are compiled for baseline x86-64, AVX2 and AVX-512 and chosen at run
time (best supported, or $DDO_FAST_CPU_ISA). Each ISA is checked here against float64 references,
in process through the test hook ``_set_cpu_isa``; the slow test runs a subset of the op test
files in subprocesses under ``DDO_FAST_CPU_ISA=<isa>`` (the public switch).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from utils import GRAD_TOL, ULP, assert_within_rounding, noncontiguous

import ddo_fast
from ddo_fast import _library

ROOT = Path(__file__).resolve().parents[1]
ISAS = _library.supported_cpu_isas()
ALL_ISAS = ("baseline", "avx2", "avx512")


@pytest.fixture(params=ISAS)
def isa(request):
    """Runs the test under one ISA, then restores the process's own choice."""
    module = _library.load_ops()
    default = module.cpu_isa()
    assert module._set_cpu_isa(request.param)
    try:
        yield request.param
    finally:
        module._set_cpu_isa(default)


def test_isa_list_and_choice():
    """baseline is always there; on x86-64 the default is the best ISA the CPU has (what
    /proc/cpuinfo lists), and no ISA is offered that the CPU lacks."""
    assert ISAS[0] == "baseline" and set(ISAS) <= set(ALL_ISAS)
    try:
        flags = set(open("/proc/cpuinfo").read().split())
    except OSError:
        pytest.skip("no /proc/cpuinfo to compare with")
    want = ["baseline"]
    if {"avx2", "fma", "f16c"} <= flags:
        want.append("avx2")
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
            want.append("avx512")
    if os.uname().machine == "x86_64":
        assert list(ISAS) == want
    if not os.environ.get("DDO_FAST_CPU_ISA"):
        assert ddo_fast.cpu_isa() == ISAS[-1]


def test_switch_is_reported(isa):
    assert ddo_fast.cpu_isa() == isa


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_token_logprobs_each_isa(isa, dtype):
    """log-probs and their gradient vs float64, with a vocabulary that is not a multiple of any
    vector width (tails), strided logits and ignored tokens."""
    batch, length, vocab = 3, 5, 1037
    x = (torch.randn(batch, length, vocab) * 3).to(dtype)
    logits = noncontiguous(x).requires_grad_()
    targets = torch.randint(0, vocab, (batch, length))
    targets[0, 1] = -100
    grad_out = torch.randn(batch, length)
    logp = ddo_fast.token_logprobs(logits, targets, backend="cpp")
    (grad,) = torch.autograd.grad(logp, logits, grad_out)

    x64 = x.double().requires_grad_()
    keep = targets != -100
    ref = torch.log_softmax(x64, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0] * keep
    (ref_grad,) = torch.autograd.grad(ref, x64, grad_out.double())
    assert_within_rounding(logp, ref, rel=8 * ULP[torch.float32], floor=1e-5)
    tol = GRAD_TOL[dtype]
    torch.testing.assert_close(grad.double(), ref_grad, rtol=tol["rtol"], atol=tol["atol"])
    assert torch.all(grad[0, 1] == 0)


@pytest.mark.parametrize(
    "dtypes",
    [(torch.float32,) * 3, (torch.bfloat16, torch.float16, torch.float32), (torch.float64,) * 3],
    ids=["f32", "bf16-f16-f32", "f64"],
)
def test_diffusion_each_isa(isa, dtypes):
    """r and d pred vs float64 over a sample of 70_001 elements (5 chunks of 2^14 and a tail),
    each tensor in its own dtype."""
    shape = (4, 7, 10_001)
    pred = torch.randn(shape).to(dtypes[0]).requires_grad_()
    pred_ref = torch.randn(shape).to(dtypes[1])
    target = torch.randn(shape).to(dtypes[2])
    weight = torch.rand(4) + 0.5
    r = ddo_fast.diffusion_logratio(pred, pred_ref, target, weight, backend="cpp")
    up = torch.randn(4)
    (grad,) = torch.autograd.grad(r, pred, up)

    p64, q64, t64 = (t.detach().double() for t in (pred, pred_ref, target))
    p64.requires_grad_()
    ref = -weight.double() * ((p64 - t64) ** 2 - (q64 - t64) ** 2).flatten(1).sum(1)
    (ref_grad,) = torch.autograd.grad(ref, p64, up.double())
    scale = ((p64 - t64) ** 2 + (q64 - t64) ** 2).flatten(1).sum(1).max().item()
    # Sums in fp32 (double when an input is double), r stored in fp32: one fp32 rounding of r.
    rel = 1e-12 if dtypes[0] == torch.float64 else 1e-5
    torch.testing.assert_close(
        r.double(), ref.detach(), rtol=ULP[torch.float32], atol=rel * scale * 2
    )
    tol = GRAD_TOL.get(pred.dtype, dict(rtol=1e-12, atol=1e-12))
    torch.testing.assert_close(grad.double(), ref_grad, rtol=tol["rtol"], atol=tol["atol"])


def test_fast_exp_each_isa(isa):
    """The vectorised exp of every ISA within 2 ulp of double exp (normal and subnormal
    results), inf past overflow, 0 at -inf, NaN in NaN out."""
    x = torch.cat([torch.linspace(-110.0, 90.0, 400_001), torch.tensor([88.7228, -103.97])])
    y = torch.ops.ddo_fast_testing.fast_exp(x)
    exact = torch.exp(x.double())
    rounded = exact.float()
    finite = torch.isfinite(rounded)
    a = rounded[finite].abs()
    ulp = (torch.nextafter(a, torch.tensor(float("inf"))) - a).double()
    assert ((y.double() - exact).abs()[finite] / ulp).max() <= 2.0
    special = torch.ops.ddo_fast_testing.fast_exp(torch.tensor([float("inf"), -float("inf"), 0.0]))
    assert special[0] == float("inf") and special[1] == 0 and special[2] == 1
    assert torch.ops.ddo_fast_testing.fast_exp(torch.tensor([float("nan")])).isnan().all()


def test_floor_passes_each_isa(isa):
    """The benchmarks' memory floors (csrc/cpu/test_hooks.cpp) compute what they claim, against
    float64: the read passes sum 1..3 arrays or fast_exp of one, the write passes store a - b or
    fast_exp(a) in place; lengths that are not a multiple of the chunk or the vector width."""
    floor_pass = torch.ops.ddo_fast_testing.floor_pass
    g = torch.Generator().manual_seed(0)
    n = (1 << 14) * 3 + 37
    xs = [torch.randn(n, generator=g) for _ in range(3)]
    for k in (1, 2, 3):
        want = sum(x.double() for x in xs[:k]).sum()
        got = floor_pass(xs[:k], None, False)
        assert abs(got.item() - want.item()) <= 1e-4 * sum(x.abs().sum().item() for x in xs[:k])
    want = torch.exp(xs[0].double()).sum()
    assert abs(floor_pass(xs[:1], None, True).item() / want.item() - 1) <= 1e-5
    out = torch.full((n,), float("nan"))
    floor_pass(xs[:2], out, False)
    assert torch.equal(out, xs[0] - xs[1])
    floor_pass(xs[:1], out, True)
    torch.testing.assert_close(out.double(), torch.exp(xs[0].double()), rtol=3e-7, atol=0)
    with pytest.raises(ValueError, match="reads"):
        floor_pass(xs[:2], None, True)
    with pytest.raises(ValueError, match="out"):
        floor_pass(xs[:2], torch.empty(n - 1), False)


# A bad name raises (and selects nothing, so the variable is read again at the next call); a
# good one is then used. C getenv sees os.environ's changes (putenv).
ENV_CHECK = """
import os, torch, ddo_fast
try:
    ddo_fast.token_logprobs(torch.randn(1, 2, 8), torch.zeros(1, 2, dtype=torch.long))
except ValueError as exc:
    print("ValueError:", exc)
os.environ["DDO_FAST_CPU_ISA"] = "baseline"
print("isa:", ddo_fast.cpu_isa())
"""


@pytest.mark.slow
def test_env_var_forces_and_validates():
    """DDO_FAST_CPU_ISA selects the ISA of a process (baseline: never the default on a CPU
    with AVX2); an unknown name raises ValueError naming the variable at the first use."""
    env = {**os.environ, "DDO_FAST_CPU_ISA": "sse9"}
    proc = subprocess.run(
        [sys.executable, "-c", ENV_CHECK],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "DDO_FAST_CPU_ISA must be auto, baseline, avx2 or avx512, got 'sse9'" in proc.stdout
    assert proc.stdout.splitlines()[-1] == "isa: baseline"


# The op tests' C++ cases, rerun under each forced ISA (the default one ran in the suite).
SUBSET = [
    "tests/test_token_logprobs.py",
    "tests/test_ar_ddo.py",
    "tests/test_diffusion_ddo.py",
    "tests/test_dtype_mix.py",
]


@pytest.mark.slow
@pytest.mark.parametrize("forced", [i for i in ISAS if i != ISAS[-1]])
def test_op_tests_under_forced_isa(forced):
    env = {**os.environ, "DDO_FAST_CPU_ISA": forced, "TRITON_INTERPRET": "1"}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-x",
        "-p",
        "no:cacheprovider",
        "-m",
        "not slow",
        "-k",
        "cpp and not triton",
        *SUBSET,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout
