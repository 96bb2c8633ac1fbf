"""Benchmark cases shared by ``ddo-fast bench``, benchmarks/bench_*.py and gpu_check.py.

A case builds one or more identical-shape *input sets* (rotated between timed calls so that no
call finds its inputs in a cache left warm by the previous one, see ``timing.py``) and one
function per provider that runs a forward+backward on a set and returns ``(value, grad)``:

``eager``          the PyTorch a user would write: the AR/token gather is
                   ``log_softmax(x, -1, dtype=torch.float32).gather(...)`` (no fp32 copy of bf16
                   logits), the diffusion error is formed in fp32;
``cross_entropy``  the AR/token gather through ``F.cross_entropy`` on the logits as they are;
``compile``        ``torch.compile`` of exactly the ``eager`` function;
``ddo_fast``       the public ``ddo_fast`` function (C++ on CPU, Triton on CUDA).

Every provider computes the same value and gradient; the runner checks that before timing.
``min_bytes`` counts what any fused forward+backward must move: every input read once by the
forward, the backward's inputs read once and the gradient written once.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .. import ops as ddo_fast
from .. import reference as R

ALPHA, BETA_DIFFUSION, BETA_AR = 1.0, 0.02, 0.02
F32 = torch.float32

Inputs = tuple
StepFn = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]


@dataclass
class Case:
    """``fns[name](*sets[i])`` runs provider ``name`` once on input set ``i``."""

    op: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: str
    min_bytes: int
    set_bytes: int = 0  # bytes one call touches at least (inputs + gradient)
    sets: list[Inputs] = field(default_factory=list)
    fns: dict[str, StepFn] = field(default_factory=dict)
    checked: bool = True  # False: providers compute different things (copy, floors)

    @property
    def name(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        return f"{self.op}[{'x'.join(map(str, self.shape))},{dt}]"

    def step(self, name: str, index: int = 0) -> Callable[[], tuple]:
        fn, args = self.fns[name], self.sets[index % len(self.sets)]
        return lambda: fn(*args)

    @property
    def providers(self) -> dict[str, Callable[[], tuple]]:
        """One zero-argument step per provider, on the first input set."""
        return {name: self.step(name) for name in self.fns}


def sets_for(set_bytes: int, cache_bytes: int, cap: int = 64) -> int:
    """Input sets to rotate so that >= 4x the cache lies between two uses of one set."""
    return max(1, min(cap, math.ceil(4 * cache_bytes / max(set_bytes, 1))))


@functools.cache
def compiled(fn: Callable) -> Callable:
    """``torch.compile`` of a provider function, one per function (static shapes)."""
    return torch.compile(fn, dynamic=False)


def _with_grad(loss_fn: Callable[..., torch.Tensor], x: torch.Tensor, *rest):
    value = loss_fn(x, *rest)
    (grad,) = torch.autograd.grad(value.sum(), x)
    return value.detach(), grad


def _forward_only(loss_fn: Callable[..., torch.Tensor], x: torch.Tensor, *rest):
    with torch.no_grad():
        return loss_fn(x, *rest), None


def _mask(batch: int, device: str) -> torch.Tensor:
    return torch.arange(batch, device=device) % 2 == 0


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _head(r: torch.Tensor, is_real: torch.Tensor, beta: float) -> torch.Tensor:
    return R.ddo_loss_ref(r, is_real, alpha=ALPHA, beta=beta)


# --- diffusion ------------------------------------------------------------------------------


def diffusion_eager(pred, pred_ref, target, weight, is_real):
    """Eq. (diffusion log-ratio): r_b = -w_b sum((pred - x)^2 - (pred_ref - x)^2), in fp32."""
    x = target.to(F32)
    err = (pred.to(F32) - x).square() - (pred_ref.to(F32) - x).square()
    return _head(-weight * err.flatten(1).sum(1), is_real, BETA_DIFFUSION)


def diffusion_fused(pred, pred_ref, target, weight, is_real):
    return ddo_fast.diffusion_ddo_loss(
        pred, pred_ref, target, weight, is_real, alpha=ALPHA, beta=BETA_DIFFUSION
    )


def diffusion_case(
    shape,
    dtype,
    device,
    providers=("eager", "compile", "ddo_fast"),
    mode="fwd+bwd",
    sets: int = 1,
) -> Case:
    batch = shape[0]
    numel = math.prod(shape)
    es = torch.empty((), dtype=dtype).element_size()
    case = Case(
        "diffusion_ddo" + ("" if mode == "fwd+bwd" else "_fwd"),
        tuple(shape),
        dtype,
        device,
        min_bytes=numel * es * (3 if mode == "fwd" else 6),
        set_bytes=numel * es * (3 if mode == "fwd" else 4),
    )
    for _ in range(sets):
        case.sets.append(
            (
                torch.randn(shape, device=device, dtype=dtype, requires_grad=True),
                torch.randn(shape, device=device, dtype=dtype),
                torch.randn(shape, device=device, dtype=dtype),
                torch.rand(batch, device=device) + 0.5,
                _mask(batch, device),
            )
        )
    table = {"eager": diffusion_eager, "ddo_fast": diffusion_fused}
    table["compile"] = compiled(diffusion_eager)
    step = _with_grad if mode == "fwd+bwd" else _forward_only
    case.fns = {name: functools.partial(step, table[name]) for name in providers}
    return case


# --- token log-probs and the AR loss ------------------------------------------------------


def token_eager(logits, targets):
    """log softmax(logits)[targets] [B, L] in fp32, read from logits in their own dtype."""
    logp = torch.log_softmax(logits, dim=-1, dtype=F32)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def token_cross_entropy(logits, targets):
    batch, length, vocab = logits.shape
    nll = F.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1), reduction="none")
    return -nll.view(batch, length).to(F32)


def token_fused(logits, targets):
    return ddo_fast.token_logprobs(logits, targets)


def _ar_from(token_fn):
    def loss(logits, targets, ref, is_real):
        """r_b = sum_l log p(y_bl) - ref_b, then the DDO loss head (mean per group)."""
        return _head(token_fn(logits, targets).sum(1) - ref, is_real, BETA_AR)

    loss.__name__ = loss.__qualname__ = f"ar_{token_fn.__name__.removeprefix('token_')}"
    return loss


ar_eager = _ar_from(token_eager)
ar_cross_entropy = _ar_from(token_cross_entropy)


def ar_fused(logits, targets, ref, is_real):
    return ddo_fast.ar_ddo_loss(logits, targets, ref, is_real, alpha=ALPHA, beta=BETA_AR)


def _logits_case(op, shape, dtype, device, mode, sets, extra) -> Case:
    batch, length, vocab = shape
    es = torch.empty((), dtype=dtype).element_size()
    logits_bytes = batch * length * vocab * es
    case = Case(
        op + ("" if mode == "fwd+bwd" else "_fwd"),
        tuple(shape),
        dtype,
        device,
        min_bytes=logits_bytes * (1 if mode == "fwd" else 3),
        set_bytes=logits_bytes * (1 if mode == "fwd" else 2),
    )
    for _ in range(sets):
        logits = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
        targets = torch.randint(0, vocab, (batch, length), device=device)
        case.sets.append((logits, targets, *extra(batch, length)))
    return case


def token_case(
    shape,
    dtype,
    device,
    providers=("eager", "cross_entropy", "compile", "ddo_fast"),
    mode="fwd+bwd",
    sets: int = 1,
) -> Case:
    """token_logprobs [B, L] with upstream gradient ones (their sum), vs log_softmax+gather and
    F.cross_entropy(reduction="none")."""
    case = _logits_case("token_logprobs", shape, dtype, device, mode, sets, lambda b, n: ())
    table = {"eager": token_eager, "cross_entropy": token_cross_entropy, "ddo_fast": token_fused}
    table["compile"] = compiled(token_eager)
    step = _with_grad if mode == "fwd+bwd" else _forward_only
    case.fns = {name: functools.partial(step, table[name]) for name in providers}
    return case


def ar_case(
    shape,
    dtype,
    device,
    providers=("eager", "cross_entropy", "compile", "ddo_fast"),
    mode="fwd+bwd",
    sets: int = 1,
) -> Case:
    def extra(batch, length):
        # log p_ref near the model's own sequence log-likelihood (|beta r| of order 10).
        ref = torch.randn(batch, device=device) - length * math.log(shape[2]) - 0.5 * length
        return ref, _mask(batch, device)

    case = _logits_case("ar_ddo", shape, dtype, device, mode, sets, extra)
    table = {"eager": ar_eager, "cross_entropy": ar_cross_entropy, "ddo_fast": ar_fused}
    table["compile"] = compiled(ar_eager)
    step = _with_grad if mode == "fwd+bwd" else _forward_only
    case.fns = {name: functools.partial(step, table[name]) for name in providers}
    return case


# --- baselines: copy and the CPU byte+exp floor ---------------------------------------------


def copy_case(nbytes: int, device: str, sets: int = 1) -> Case:
    """A copy moving ``nbytes`` (half read, half written): the bandwidth a case is compared
    with, built and timed exactly like the case (same sizes, same rotation, same clock)."""
    n = max(1, nbytes // 8)
    case = Case("copy", (n,), F32, device, min_bytes=8 * n, set_bytes=8 * n, checked=False)
    for _ in range(sets):
        case.sets.append((torch.randn(n, device=device), torch.zeros(n, device=device)))
    case.fns = {"copy": lambda src, dst: (dst.copy_(src), None)}
    return case


def empty_large(sizes: list[int]) -> torch.Tensor:
    """An fp32 CPU tensor from the kernels' large-output allocator (``csrc/cpu/large_alloc.h``,
    the policy in force), via the test hook ``ddo_fast_testing::empty_large``."""
    from .._library import load_ops

    load_ops()
    return torch.ops.ddo_fast_testing.empty_large(list(sizes))


def floor_case(kind: str, shape, dtype, device: str, sets: int = 1) -> Case:
    """The memory floor of a fused forward+backward on CPU (fp32): the op's minimum bytes moved
    with the least arithmetic the op needs, by the kernels' own vector loops, ISA and threads
    (``ddo_fast_testing::floor_pass``), so that it is a lower bound for ``ddo_fast``:

    * token/AR: a pass reading the logits and summing ``fast_exp`` (the forward; the kernel's
      max pass and log are left out), then a pass reading them and writing ``fast_exp(x)``
      logits-sized (the backward);
    * diffusion: a pass reading pred, pred_ref and target and summing them (the forward), then
      a pass reading pred and target and writing ``pred - target`` (the backward).

    ``floor_touched`` writes the backward's result into one buffer reused call after call,
    made by the kernels' own large-output allocator (``ddo_fast_testing::empty_large``: 2 MiB
    aligned, huge-page advised, under the policy in force), as the ``pool`` allocator (the
    default) hands the op its recycled gradient buffer: the same kind of memory, already
    touched. ``floor_fresh`` writes into a fresh ``torch.empty`` (page faults included where
    the allocator maps fresh pages: glibc does above its mmap threshold, at most 32 MiB, and
    may serve smaller buffers from its heap, touched or trimmed). The runner takes a
    provider's ratio to the floor against the lower of the two at each percentile, so that it
    stays a lower bound whichever memory happens to be faster in a run."""
    if device != "cpu" or dtype != F32:
        raise ValueError(f"floor_case: the floor is CPU fp32 only, got {device} {dtype}")
    token = kind in ("token", "ar")
    numel = math.prod(shape)
    passes = 3 if token else 6
    case = Case(
        f"floor_{kind}",
        tuple(shape),
        dtype,
        device,
        min_bytes=numel * 4 * passes,
        set_bytes=numel * 4 * (2 if token else 4),
        checked=False,
    )
    # One output buffer from the op's own allocator, touched once here (reused, as the pool
    # gives the op its recycled gradient): a 4 KiB-page torch.zeros wrote measurably slower.
    out = empty_large([numel]).zero_()  # loads the C++ library (and its test-hook operators)
    floor_pass = torch.ops.ddo_fast_testing.floor_pass.default  # looked up once, not per call
    for _ in range(sets):
        reads = [torch.randn(numel) for _ in range(1 if token else 3)]
        case.sets.append((reads, out))

    def touched(reads, out):
        total = floor_pass(reads, None, token)
        floor_pass(reads[:1] if token else [reads[0], reads[2]], out, token)
        return total, None

    def fresh(reads, out):
        total = floor_pass(reads, None, token)
        floor_pass(reads[:1] if token else [reads[0], reads[2]], torch.empty_like(out), token)
        return total, None

    case.fns = {"floor_touched": touched, "floor_fresh": fresh}
    return case


def copy_bandwidth(
    device: str, timer: Callable[[Callable[[], None]], float], nbytes: int = 1 << 30
) -> float:
    """Copy bandwidth in GB/s of one ``nbytes``-sized copy (bytes read plus written)."""
    src = torch.empty(nbytes // 8, dtype=F32, device=device).normal_()
    dst = torch.empty_like(src)
    seconds = timer(lambda: dst.copy_(src))
    return nbytes / seconds / 1e9
