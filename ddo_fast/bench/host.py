"""Host overhead of one fused forward+backward per op: ``python -m ddo_fast.bench.host``.

    python -m ddo_fast.bench.host [--device cpu|cuda] [--out DIR] [--calls N]
    TRITON_INTERPRET=1 python -m ddo_fast.bench.host --stub-triton   # no GPU: the Python part

At a tiny size (where the device work is negligible) for each public op, forward+backward
through ``torch.autograd.grad``:

* ``host_us``: host time per call, the median over 9 batches of ``calls / 9`` calls back to
  back with no synchronisation in the timed span (the device keeps up at this size, so this is
  what the host pays per call); ``host_min_us`` the fastest batch (robust to a busy machine).
  Target on CUDA: <= 100 us.
* ``op_us``: the part of ``host_us`` spent inside the ``ddo_fast::*`` operators: ``host_us``
  times their share of the CPU time in a ``torch.profiler`` run (CPU activity only) of the same
  calls; on CUDA that is the Triton launches, on CPU the C++ kernels. ``python_us`` =
  ``host_us - op_us`` is the Python wrapper, argument checks, dispatch and autograd around them.
* the profiler's per-operator table (top entries by CPU time) in ``host_<op>.txt``.

``--stub-triton`` (CPU tensors, ``TRITON_INTERPRET=1``): the Triton route with every
``kernel[grid](...)`` a no-op (``kernels/launch.py::stubbed_launches``), so ``host_us`` is the
Python part of a Triton call (checks, allocations, grid arithmetic, autograd) without a GPU.
It runs the launchers through the interpreter route's ``autograd.Function`` (built like the
one torch.library generates for the CUDA route); the dispatcher's hop into the Python kernel,
which only the CUDA route makes, is not in that figure.

On CUDA it also gives, for the ``ddo_fast`` provider, the wall/graph ratio (p50 of each clock,
see ``timing.py``) at the [64,4,64,64] diffusion case and the VAR AR step shapes (B = 8, 16).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from .. import ops as ddo_fast
from .._backend import TRITON_INTERPRET
from . import cases as C
from . import timing as T
from .runner import machine_info

F32, BF16 = torch.float32, torch.bfloat16
TARGET_US = 100.0
TINY = {
    "diffusion_ddo_loss": ("diffusion", (2, 3, 8, 8)),
    "token_logprobs": ("token", (2, 16, 64)),
    "ar_ddo_loss": ("ar", (2, 16, 64)),
}
RATIO_CASES = [
    ("diffusion", (64, 4, 64, 64), F32),
    ("ar", (8, 680, 4096), F32),
    ("ar", (16, 680, 4096), BF16),
]


def _ddo_loss_step(device: str):
    r = torch.randn(8, device=device, requires_grad=True)
    is_real = torch.arange(8, device=device) % 2 == 0

    def step():
        loss = ddo_fast.ddo_loss(r, is_real, alpha=C.ALPHA, beta=C.BETA_AR)
        return loss.detach(), torch.autograd.grad(loss, r)[0]

    return step


def tiny_steps(device: str) -> dict:
    """One zero-argument fused forward+backward per public op, on a tiny input (the backend
    from ``$DDO_FAST_BACKEND``, else auto)."""
    makers = {"diffusion": C.diffusion_case, "token": C.token_case, "ar": C.ar_case}
    steps = {"ddo_loss": _ddo_loss_step(device)}
    for op, (kind, shape) in TINY.items():
        steps[op] = makers[kind](shape, F32, device, providers=("ddo_fast",)).step("ddo_fast")
    return steps


def profile_step(step, device: str, calls: int) -> tuple[float, str]:
    """Share of a call's CPU time spent inside ``ddo_fast::*`` operators (their CPU time over
    the wall time of the profiled calls), and the profiler's table."""
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(calls):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
        wall_us = (time.perf_counter() - start) * 1e6
    events = prof.key_averages()
    op_us = sum(e.cpu_time_total for e in events if e.key.startswith("ddo_fast::"))
    table = events.table(sort_by="cpu_time_total", row_limit=15, max_name_column_width=60)
    return min(1.0, op_us / wall_us), table


def host_report(device: str, calls: int, out: Path | None, stub: bool = False) -> list[dict]:
    rows = []
    for op, step in tiny_steps(device).items():
        samples = sorted(T.host_seconds(step, device, calls))
        host_us, min_us = samples[len(samples) // 2] * 1e6, samples[0] * 1e6
        share, table = profile_step(step, device, max(10, calls // 10))
        op_us = host_us * share
        row = {
            "op": op,
            "device": device,
            "host_us": host_us,
            "host_min_us": min_us,
            "op_us": op_us,
            "python_us": host_us - op_us,
        }
        if device == "cuda":
            row |= {"target_us": TARGET_US, "meets_target": host_us <= TARGET_US}
        if stub:
            row["stubbed_launches"] = True
        rows.append(row)
        if out is not None:
            (out / f"host_{op}.txt").write_text(table + "\n")
    return rows


def ratio_report(rounds: int) -> list[dict]:
    """Wall/graph p50 of the ddo_fast provider at the headline sizes (CUDA only)."""
    from .runner import MAKERS, _Clocks

    clocks = _Clocks("cuda", rounds, batch=10)
    cache = T.cache_bytes("cuda")
    rows = []
    for kind, shape, dtype in RATIO_CASES:
        case = MAKERS[kind](shape, dtype, "cuda", providers=("ddo_fast",))
        n = C.sets_for(case.set_bytes, cache)
        if n > 1:
            case = MAKERS[kind](shape, dtype, "cuda", providers=("ddo_fast",), sets=n)
        case.step("ddo_fast")()  # compile and autotune outside the clocks
        s = clocks.measure(case, "ddo_fast")
        rows.append(
            {"case": case.name, **s, "wall_over_graph": s["wall_p50_ms"] / s["graph_p50_ms"]}
        )
        del case
        torch.cuda.empty_cache()
    return rows


def format_report(result: dict) -> str:
    lines = [
        f"host overhead per fused forward+backward on {result['device']} "
        f"({result['calls']} calls, target <= {TARGET_US:.0f} us on CUDA)"
        + (", Triton route with launches stubbed" if result.get("stub_triton") else ""),
        f"{'op':20} {'host us':>9} {'min us':>9} {'in ddo_fast:: ops':>18} {'python etc.':>12}"
        "  target",
    ]
    for r in result["host"]:
        mark = {True: "met", False: "MISSED"}.get(r.get("meets_target"), "n/a (CPU)")
        if r.get("stubbed_launches"):
            mark = "n/a (launches stubbed)"
        lines.append(
            f"{r['op']:20} {r['host_us']:9.1f} {r['host_min_us']:9.1f} {r['op_us']:18.1f} "
            f"{r['python_us']:12.1f}  {mark}"
        )
    if result.get("ratio"):
        lines += ["", f"{'case (ddo_fast)':36} {'wall p50':>9} {'graph p50':>9} {'wall/graph':>10}"]
        for r in result["ratio"]:
            lines.append(
                f"{r['case']:36} {r['wall_p50_ms']:9.3f} {r['graph_p50_ms']:9.3f} "
                f"{r['wall_over_graph']:10.2f}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", choices=["cpu", "cuda"], default=default)
    parser.add_argument("--out", default=os.environ.get("OUT"))
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=50, help="samples per clock (ratios)")
    parser.add_argument(
        "--stub-triton",
        action="store_true",
        help="CPU: the Triton route with launches stubbed out (needs TRITON_INTERPRET=1)",
    )
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    result = {"device": args.device, "calls": args.calls, "machine": machine_info(args.device)}
    if args.stub_triton:
        if args.device != "cpu" or not TRITON_INTERPRET:
            parser.error("--stub-triton needs --device cpu and TRITON_INTERPRET=1 in the env")
        from ..kernels.launch import stubbed_launches

        result["stub_triton"] = True
        saved = os.environ.get("DDO_FAST_BACKEND")
        os.environ["DDO_FAST_BACKEND"] = "triton"  # the public functions' default route
        try:
            with stubbed_launches():
                result["host"] = host_report(args.device, args.calls, out, stub=True)
        finally:
            if saved is None:
                del os.environ["DDO_FAST_BACKEND"]
            else:
                os.environ["DDO_FAST_BACKEND"] = saved
    else:
        result["host"] = host_report(args.device, args.calls, out)
    if args.device == "cuda":
        result["ratio"] = ratio_report(args.rounds)
    text = format_report(result)
    print(text)
    if out is not None:
        (out / "host.json").write_text(json.dumps(result, indent=1))
        (out / "host.txt").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
