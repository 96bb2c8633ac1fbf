"""Benchmark cases shared by ``ddo-fast bench``, benchmarks/bench_*.py and gpu_check.py.

A case builds its inputs once and exposes one forward+backward callable per provider:
``eager`` (the obvious PyTorch a user would write, fp32 math), ``compile`` (torch.compile of that
same code), ``cross_entropy`` (the AR gather through F.cross_entropy), and ``ddo_fast`` (C++ on CPU,
Triton on CUDA). ``min_bytes`` counts what any fused forward+backward must move: every input read
once by the forward, the backward's inputs read once and the gradient written once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .. import ops as ddo_fast
from .. import reference as R

ALPHA, BETA_DIFFUSION, BETA_AR = 1.0, 0.02, 0.02


@dataclass
class Case:
    op: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: str
    min_bytes: int
    providers: dict[str, Callable[[], object]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        return f"{self.op}[{'x'.join(map(str, self.shape))},{dt}]"


def _mask(batch: int, device: str) -> torch.Tensor:
    return torch.arange(batch, device=device) % 2 == 0


def _eager_ar_cross_entropy(logits, targets, ref, is_real):
    """The AR loss with the token gather done by F.cross_entropy (what many trainers use)."""
    batch, length, vocab = logits.shape
    nll = F.cross_entropy(logits.reshape(-1, vocab).float(), targets.reshape(-1), reduction="none")
    r = -nll.view(batch, length).sum(1) - ref
    return R.ddo_loss_ref(r, is_real, alpha=ALPHA, beta=BETA_AR)


def _grad_step(loss_fn: Callable[..., torch.Tensor], x: torch.Tensor, *rest) -> Callable[[], None]:
    def run() -> None:
        torch.autograd.grad(loss_fn(x, *rest), x)

    return run


def _forward_step(loss_fn: Callable[..., torch.Tensor], x: torch.Tensor, *rest):
    def run() -> None:
        with torch.no_grad():
            loss_fn(x, *rest)

    return run


def diffusion_case(
    shape, dtype, device, providers=("eager", "compile", "ddo_fast"), mode="fwd+bwd"
) -> Case:
    batch = shape[0]
    numel = 1
    for s in shape:
        numel *= s
    pred = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    pred_ref = torch.randn(shape, device=device, dtype=dtype)
    target = torch.randn(shape, device=device, dtype=dtype)
    weight = torch.rand(batch, device=device) + 0.5
    is_real = _mask(batch, device)
    es = pred.element_size()
    min_bytes = numel * es * (3 if mode == "fwd" else 6)
    case = Case(
        "diffusion_ddo" + ("" if mode == "fwd+bwd" else "_fwd"),
        tuple(shape),
        dtype,
        device,
        min_bytes,
    )

    def eager(p):
        return R.diffusion_ddo_loss_ref(
            p, pred_ref, target, weight, is_real, alpha=ALPHA, beta=BETA_DIFFUSION
        )

    def fused(p):
        return ddo_fast.diffusion_ddo_loss(
            p, pred_ref, target, weight, is_real, alpha=ALPHA, beta=BETA_DIFFUSION
        )

    step = _grad_step if mode == "fwd+bwd" else _forward_step
    table = {"eager": eager, "compile": torch.compile(eager), "ddo_fast": fused}
    case.providers = {name: step(table[name], pred) for name in providers}
    return case


def ar_case(
    shape,
    dtype,
    device,
    providers=("eager", "cross_entropy", "compile", "ddo_fast"),
    mode="fwd+bwd",
) -> Case:
    batch, length, vocab = shape
    logits = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, vocab, (batch, length), device=device)
    ref = torch.randn(batch, device=device) - length * 8.0
    is_real = _mask(batch, device)
    es = logits.element_size()
    min_bytes = batch * length * vocab * es * (1 if mode == "fwd" else 3)
    case = Case(
        "ar_ddo" + ("" if mode == "fwd+bwd" else "_fwd"), tuple(shape), dtype, device, min_bytes
    )

    def eager(x):
        return R.ar_ddo_loss_ref(x, targets, ref, is_real, alpha=ALPHA, beta=BETA_AR)

    def fused(x):
        return ddo_fast.ar_ddo_loss(x, targets, ref, is_real, alpha=ALPHA, beta=BETA_AR)

    step = _grad_step if mode == "fwd+bwd" else _forward_step
    table = {
        "eager": eager,
        "cross_entropy": _eager_ar_cross_entropy,
        "compile": torch.compile(eager),
        "ddo_fast": fused,
    }
    rest = {"cross_entropy": (targets, ref, is_real)}
    case.providers = {name: step(table[name], logits, *rest.get(name, ())) for name in providers}
    return case


def token_case(
    shape,
    dtype,
    device,
    providers=("eager", "cross_entropy", "compile", "ddo_fast"),
    mode="fwd+bwd",
) -> Case:
    """token_logprobs with a per-token upstream gradient (its sum), vs log_softmax+gather and
    F.cross_entropy(reduction="none")."""
    batch, length, vocab = shape
    logits = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, vocab, (batch, length), device=device)
    es = logits.element_size()
    min_bytes = batch * length * vocab * es * (1 if mode == "fwd" else 3)
    case = Case(
        "token_logprobs" + ("" if mode == "fwd+bwd" else "_fwd"),
        tuple(shape),
        dtype,
        device,
        min_bytes,
    )

    def eager(x):
        return R.token_logprobs_ref(x, targets).sum()

    def cross_entropy(x):
        return -F.cross_entropy(
            x.reshape(-1, vocab).float(), targets.reshape(-1), reduction="none"
        ).sum()

    def fused(x):
        return ddo_fast.token_logprobs(x, targets).sum()

    step = _grad_step if mode == "fwd+bwd" else _forward_step
    table = {
        "eager": eager,
        "cross_entropy": cross_entropy,
        "compile": torch.compile(eager),
        "ddo_fast": fused,
    }
    case.providers = {name: step(table[name], logits) for name in providers}
    return case


def copy_bandwidth(
    device: str, timer: Callable[[Callable[[], None]], float], nbytes: int = 1 << 30
) -> float:
    """Device-to-device (or RAM) copy bandwidth in GB/s, counting bytes read plus written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    seconds = timer(lambda: dst.copy_(src))
    return 2 * nbytes / seconds / 1e9
