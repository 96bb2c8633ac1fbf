"""One-command GPU verification: build, CUDA tests, then timings against eager and torch.compile.

    python benchmarks/gpu_check.py [--out DIR] [--skip-build] [--skip-tests]

For a CUDA machine that already has torch and triton and no network. It (1) builds the extension
in place (`pip install --no-build-isolation --no-deps --no-index -e .`), (2) runs the test suite
(the Triton kernels on CUDA tensors, opcheck and torch.compile on CUDA), (3) times each CUDA op
forward+backward with ``triton.testing.do_bench`` (median) against eager PyTorch and
``torch.compile`` of the same code, and prints a table last: time, GB/s over the minimum bytes, %
of a device-to-device copy measured in the same run, speed-ups, peak extra memory. Finishes in
well under 6 minutes on an H100; writes ``gpu_check.json`` and the test log under ``--out``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _build() -> None:
    start = time.time()
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-build-isolation",
        "--no-deps",
        "--no-index",
        "-e",
        str(ROOT),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    print(f"[build] rc={proc.returncode} in {time.time() - start:.0f}s", flush=True)
    if proc.returncode:
        print(proc.stdout[-3000:], proc.stderr[-3000:])
        raise SystemExit("build failed")


def _tests(out: Path) -> int:
    start = time.time()
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "--tb=short",
        str(ROOT / "tests"),
    ]
    if importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", "8"]  # Triton/inductor compiles dominate: spread them over the cores
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    (out / "gpu_tests.log").write_text(proc.stdout + proc.stderr)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    tail = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))][:15] + lines[-3:]
    print("\n".join(tail))
    print(f"[tests] rc={proc.returncode} in {time.time() - start:.0f}s", flush=True)
    return proc.returncode


def _timer():
    import torch
    from triton.testing import do_bench

    def timer(fn) -> float:
        fn()  # compile / autotune outside the timed region
        torch.cuda.synchronize()
        return do_bench(fn, warmup=50, rep=200, return_mode="median") / 1e3

    return timer


def _graph_timer(fn) -> float:
    """Device time: the step captured in a CUDA graph and replayed, so host launch overhead
    (Python, dispatcher, autograd) is excluded. NaN when the step cannot be captured."""
    from triton.testing import do_bench_cudagraph

    try:
        return do_bench_cudagraph(fn, rep=100, return_mode="median") / 1e3
    except Exception as exc:
        print(f"[bench] graph capture failed: {type(exc).__name__}: {str(exc)[:200]}")
        return float("nan")


def _diagnose() -> None:
    """An out-of-range target on the C++ CPU path, in a child with faulthandler on."""
    code = (
        "import torch, ddo_fast\nx = torch.randn(2, 3, 7)\ny = torch.zeros(2, 3, "
        "dtype=torch.long)\ny[1, 1] = 9\ntry:\n    ddo_fast.token_logprobs(x, y, "
        "backend='cpp')\nexcept IndexError as e:\n    print('IndexError OK:', e)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-X", "faulthandler", "-c", code],
        capture_output=True,
        text=True,
        cwd="/tmp",
    )
    print(f"[diagnose] rc={proc.returncode} {proc.stdout.strip()[:300]}")
    if proc.returncode:
        print("\n".join(proc.stderr.splitlines()[-25:]))


def _peak_extra_bytes(fn) -> int:
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _cases():
    import torch

    from ddo_fast.bench.cases import ar_case, diffusion_case, token_case

    f32, bf16 = torch.float32, torch.bfloat16
    yield lambda: diffusion_case((64, 4, 64, 64), f32, "cuda")
    yield lambda: diffusion_case((64, 4, 64, 64), bf16, "cuda")
    yield lambda: diffusion_case((512, 3, 32, 32), f32, "cuda")
    yield lambda: diffusion_case((8, 4, 128, 128), f32, "cuda")
    yield lambda: diffusion_case((256, 4, 64, 64), bf16, "cuda")
    yield lambda: ar_case((8, 680, 4096), f32, "cuda")
    yield lambda: ar_case((8, 680, 4096), bf16, "cuda")
    yield lambda: ar_case((32, 680, 4096), bf16, "cuda")
    yield lambda: token_case((8, 680, 4096), f32, "cuda")


def _bench(out: Path) -> list[dict]:
    import torch
    import triton

    from ddo_fast.bench.cases import copy_bandwidth

    timer = _timer()
    copy_gbs = copy_bandwidth("cuda", timer)
    print(
        f"[bench] {torch.cuda.get_device_name()} torch {torch.__version__} triton "
        f"{triton.__version__}: device-to-device copy {copy_gbs:.0f} GB/s",
        flush=True,
    )
    rows = []
    for make in _cases():
        case = make()
        times = {}
        for name, fn in case.providers.items():
            try:
                seconds = timer(fn)
                peak = _peak_extra_bytes(fn)
            except Exception as exc:  # a provider failing must not hide the others
                print(f"[bench] {case.name} {name} failed: {type(exc).__name__}: {exc}")
                continue
            device_s = _graph_timer(fn)
            times[name] = device_s if device_s == device_s else seconds
            gbs = case.min_bytes / times[name] / 1e9
            rows.append(
                {
                    "case": case.name,
                    "provider": name,
                    "ms": seconds * 1e3,
                    "graph_ms": device_s * 1e3,
                    "GB/s": gbs,
                    "pct_copy": 100 * gbs / copy_gbs,
                    "peak_extra_MB": peak / 2**20,
                }
            )
        for row in rows:
            if row["case"] == case.name:
                mine = times[row["provider"]]
                for ref in ("eager", "compile"):
                    if ref in times:
                        row[f"x_vs_{ref}"] = times[ref] / mine
        print(f"[bench] {case.name} done", flush=True)
        del case
        torch.cuda.empty_cache()
    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "copy_GBps": copy_gbs,
    }
    (out / "gpu_check.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return rows


def _print_table(rows: list[dict]) -> None:
    print(
        "ms: do_bench wall median (host launch overhead included); graph ms: CUDA-graph replay "
        "(device time); GB/s, %copy and speed-ups use graph ms"
    )
    head = (
        f"{'case':34} {'provider':13} {'ms':>7} {'graph ms':>8} {'GB/s':>6} {'%copy':>6} "
        f"{'x eager':>7} {'x comp':>6} {'peak MB':>7}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['case']:34} {r['provider']:13} {r['ms']:7.3f} {r['graph_ms']:8.3f} "
            f"{r['GB/s']:6.0f} {r['pct_copy']:6.1f} {r.get('x_vs_eager', float('nan')):7.2f} "
            f"{r.get('x_vs_compile', float('nan')):6.2f} {r['peak_extra_MB']:7.1f}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu-check-out"))
    parser.add_argument("--skip-build", action="store_true")
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.skip_build:
        _build()
        # The editable install's import hook is read at interpreter start: continue in a fresh
        # interpreter so that `import ddo_fast` finds the package just built.
        argv = [sys.executable, __file__, "--skip-build", "--out", str(out)]
        os.execv(sys.executable, argv + (["--skip-tests"] if args.skip_tests else []))
    _diagnose()
    rc = 0 if args.skip_tests else _tests(out)
    rows = _bench(out)
    _print_table(rows)
    return rc


if __name__ == "__main__":
    sys.exit(main())
