"""Which allocator for the CPU kernels' large gradients: ``python -m ddo_fast.bench.alloc``.

    python -m ddo_fast.bench.alloc [--steps N] [--out DIR]

Chooses between the policies of :mod:`ddo_fast._alloc` (``plain``, ``thp``, ``pool``) by the
p95 of a training-like loop, each policy in a fresh process (so its cold start counts):

* ``token``: a linear LM head makes fresh logits [8, 680, 4096] fp32 (89 MB, VAR's step shape)
  from hidden states every step, ``ddo_fast.token_logprobs`` forward+backward on them, then the
  head's backward consumes the gradient and it is freed: the gradient buffer is released and
  requested again every step, with the model's own allocations in between.
* ``diffusion``: a linear denoiser makes predictions [256, 4, 64, 64] fp32 (16 MB), the fused
  ``diffusion_ddo_loss`` forward+backward, the denoiser's backward.
* ``diffusion_b64``: the same at [64, 4, 64, 64] fp32 (a 4 MiB gradient): the 2-8 MiB range
  that the policy covers from 2 MiB up, measured here rather than assumed (from glibc's heap
  such a buffer can be trimmed and faulted in again between calls).

Per step: ``op`` = the ddo_fast forward+backward alone (wall clock), ``step`` = the whole step.
Reported: cold (first step), p50, p95 and max of each, per policy, with the CPU model and the
kernel's THP settings; the policy with the lowest ``op`` p95 on this machine is named.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import timing as T

POLICIES = ("plain", "thp", "pool")
CASES = ("token", "diffusion", "diffusion_b64")
DIFFUSION_BATCH = {"diffusion": 256, "diffusion_b64": 64}  # predictions [B, 4, 64, 64] fp32


def _token_loop(steps: int) -> tuple[list[float], list[float]]:
    import ddo_fast

    g = torch.Generator().manual_seed(0)
    b, length, vocab, width = 8, 680, 4096, 64
    head = torch.nn.Linear(width, vocab)
    hidden = torch.randn(b, length, width, generator=g, requires_grad=True)
    targets = torch.randint(vocab, (b, length), generator=g)
    op_s, step_s = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        logits = head(hidden)  # fresh [B, L, V] every step, like a model's forward
        leaf = logits.detach().requires_grad_()
        t1 = time.perf_counter()
        logp = ddo_fast.token_logprobs(leaf, targets)
        (grad,) = torch.autograd.grad(logp.sum(), leaf)
        t2 = time.perf_counter()
        logits.backward(grad)  # the model's backward consumes the gradient
        del grad, leaf, logits, logp
        head.zero_grad(set_to_none=True)
        hidden.grad = None
        step_s.append(time.perf_counter() - t0)
        op_s.append(t2 - t1)
    return op_s, step_s


def _diffusion_loop(steps: int, b: int) -> tuple[list[float], list[float]]:
    import ddo_fast

    g = torch.Generator().manual_seed(0)
    dim, width = 4 * 64 * 64, 64
    net = torch.nn.Linear(width, dim)
    z = torch.randn(b, width, generator=g)
    target = torch.randn(b, dim, generator=g)
    weight = torch.rand(b, generator=g)
    is_real = torch.arange(b) < b // 2
    op_s, step_s = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        pred = net(z)
        with torch.no_grad():
            pred_ref = pred + 0.01
        leaf = pred.detach().requires_grad_()
        t1 = time.perf_counter()
        loss = ddo_fast.diffusion_ddo_loss(leaf, pred_ref, target, weight, is_real, beta=0.02)
        (grad,) = torch.autograd.grad(loss, leaf)
        t2 = time.perf_counter()
        pred.backward(grad)
        del grad, leaf, pred, pred_ref, loss
        net.zero_grad(set_to_none=True)
        step_s.append(time.perf_counter() - t0)
        op_s.append(t2 - t1)
    return op_s, step_s


def child(case: str, steps: int) -> None:
    """One policy (from $DDO_FAST_CPU_ALLOC), one case, in this fresh process: JSON on stdout."""
    from .. import _alloc

    if case == "token":
        op_s, step_s = _token_loop(steps)
    else:
        op_s, step_s = _diffusion_loop(steps, DIFFUSION_BATCH[case])
    print(
        json.dumps(
            {
                "op": op_s,
                "step": step_s,
                "policy": _alloc.cpu_alloc(),
                "pool": _alloc.cpu_buffer_stats(),
            }
        )
    )


def _stats(samples: list[float]) -> dict[str, float]:
    warm = samples[1:]
    return {"cold_ms": samples[0] * 1e3, **T.summary(warm), "max_ms": max(warm) * 1e3}


def _thp() -> dict[str, str]:
    out = {}
    for name in ("enabled", "defrag"):
        try:
            text = open(f"/sys/kernel/mm/transparent_hugepage/{name}").read().strip()
        except OSError:
            text = "n/a"
        out[name] = text
    return out


def study(steps: int) -> dict:
    from .runner import machine_info

    machine = machine_info("cpu")  # before the loop: its loadavg_start is the start
    rows = []
    for case in CASES:
        for policy in POLICIES:
            env = os.environ | {"DDO_FAST_CPU_ALLOC": policy}
            cmd = [sys.executable, "-m", "ddo_fast.bench.alloc", "--child", case, str(steps)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            assert res["policy"] == policy, (res["policy"], policy)
            rows.append(
                {
                    "case": case,
                    "policy": policy,
                    "op": _stats(res["op"]),
                    "step": _stats(res["step"]),
                    "pool": res["pool"],
                }
            )
    best = {
        case: min((r for r in rows if r["case"] == case), key=lambda r: r["op"]["p95_ms"])["policy"]
        for case in CASES
    }
    return {
        "machine": machine,
        "thp": _thp(),
        "steps": steps,
        "rows": rows,
        "best_by_op_p95": best,
        "loadavg_end": os.getloadavg(),
        "method": "fresh process per policy and case; wall clock per step; p50/p95 over "
        "steps 2..N (nearest rank), cold = step 1",
    }


def format_study(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"CPU large-buffer policy by p95 ({m.get('cpu')}, {m['threads']} threads, "
        f"THP enabled={result['thp']['enabled']!r} defrag={result['thp']['defrag']!r}, "
        f"{result['steps']} steps)",
        f"{'case':13} {'policy':7} {'op cold':>8} {'op p50':>8} {'op p95':>8} {'op max':>8} "
        f"{'step p50':>9} {'step p95':>9}  (ms)",
    ]
    for r in result["rows"]:
        o, s = r["op"], r["step"]
        lines.append(
            f"{r['case']:13} {r['policy']:7} {o['cold_ms']:8.1f} {o['p50_ms']:8.1f} "
            f"{o['p95_ms']:8.1f} {o['max_ms']:8.1f} {s['p50_ms']:9.1f} {s['p95_ms']:9.1f}"
        )
    lines.append(f"lowest op p95: {result['best_by_op_p95']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", nargs=2, metavar=("CASE", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], int(args.child[1]))
        return 0
    result = study(args.steps)
    print(format_study(result))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "cpu_alloc.json").write_text(json.dumps(result, indent=1))
        (out / "cpu_alloc.txt").write_text(format_study(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
