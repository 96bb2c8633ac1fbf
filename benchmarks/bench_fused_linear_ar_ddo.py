"""Fused-linear AR DDO loss (hidden + head weight in) vs the unfused path (linear, then the fused
``ar_ddo_loss``): peak extra memory and forward+backward time, for both fused paths: ``fused``
(the default call: the single-pass path, gradients computed in the forward, 3 matmuls) and
``recompute`` (``return_logratio=True`` forces the path that recomputes the logits in the
backward, 4 matmuls; also what runs where one sequence's logits exceed the chunk budget, as at
V = 128256 below).

As a script (``python benchmarks/bench_fused_linear_ar_ddo.py [--reps 7] [--json out.json]``)
it prints a table and writes JSON; under pytest-benchmark (``pytest benchmarks/
--benchmark-only``) it times the same two providers like the other ``bench_*.py``.

Memory (CPU): each (shape, provider) runs in a fresh child process with glibc told to serve
every allocation above 64 KiB by mmap and to return freed memory at once
(``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_``), so that RSS follows the live tensors
instead of a heap that keeps freed pages. The child builds the inputs, runs one untimed warm-up
step, frees its outputs, empties the C++ kernels' buffer pool (``ddo_fast._alloc``), resets the
peak RSS (``/proc/self/clear_refs``), runs one step and reports ``VmHWM - VmRSS before``.
``extra`` subtracts the bytes of the gradients the step returns
(the same for both providers), leaving what the loss itself holds: the unfused path's [N, V]
logits and their gradient, or the fused path's chunk. On CUDA: ``max_memory_allocated`` delta.

Time: both providers alternate (ABAB...) so that load from other processes falls on both; the
table gives p50 and the spread, with the machine's load average before and after.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import pytest
import torch

import ddo_fast
from ddo_fast._alloc import release_cpu_buffers
from ddo_fast.bench.cases import Case
from ddo_fast.bench.runner import machine_info

F32 = torch.float32
# (B, L, H, V): VAR-d16's token grid with a 1024-wide head over its 4096 codes, and a Llama 3
# vocabulary at a short batch.
MEMORY_SHAPES = [(8, 680, 1024, 4096), (2, 1024, 512, 128256)]
TIME_SHAPES = [(8, 680, 1024, 4096)]
PROVIDERS = ("unfused", "fused", "recompute")
FUSED = PROVIDERS[1:]
MEMORY_TARGET, TIME_TARGET = 0.15, 1.3  # fused / unfused

QUICK = [((8, 680, 1024, 4096), F32)]
FULL = QUICK + [((2, 1024, 512, 128256), F32), ((8, 680, 1024, 4096), torch.bfloat16)]


def make_inputs(shape, dtype=F32, device="cpu", seed=0):
    batch, length, size, vocab = shape
    gen = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(batch, length, size, generator=gen).to(device, dtype)
    weight = (torch.randn(vocab, size, generator=gen) / size**0.5).to(device, dtype)
    targets = torch.randint(0, vocab, (batch, length), generator=gen).to(device)
    ref = (torch.randn(batch, generator=gen) - length * 8.0).to(device)
    is_real = (torch.arange(batch) % 2 == 0).to(device)
    return hidden.requires_grad_(), weight.requires_grad_(), targets, ref, is_real


def unfused(hidden, weight, targets, ref, is_real):
    """The path a user writes today: the head's linear, then the fused ar_ddo_loss."""
    logits = hidden @ weight.t()
    loss = ddo_fast.ar_ddo_loss(logits, targets, ref, is_real, beta=0.02)
    return (loss.detach(), *torch.autograd.grad(loss, (hidden, weight)))


def fused(hidden, weight, targets, ref, is_real):
    loss = ddo_fast.fused_linear_ar_ddo_loss(hidden, weight, targets, ref, is_real, beta=0.02)
    return (loss.detach(), *torch.autograd.grad(loss, (hidden, weight)))


def recompute(hidden, weight, targets, ref, is_real):
    loss, _ = ddo_fast.fused_linear_ar_ddo_loss(
        hidden, weight, targets, ref, is_real, beta=0.02, return_logratio=True
    )
    return (loss.detach(), *torch.autograd.grad(loss, (hidden, weight)))


STEPS = {"unfused": unfused, "fused": fused, "recompute": recompute}


def make_case(shape, dtype, device) -> Case:
    inputs = make_inputs(shape, dtype, device)
    hidden, weight = inputs[:2]
    io = 2 * (hidden.numel() * hidden.element_size() + weight.numel() * weight.element_size())
    return Case("fused_linear_ar_ddo", shape, dtype, device, io, io, [inputs], dict(STEPS))


# ---------------------------------------------------------------------------------- memory
def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def memory_child(provider: str, shape: tuple[int, ...], dtype: str) -> dict:
    """Runs in the child process; returns the peak RSS growth of one step and its grad bytes."""
    inputs = make_inputs(shape, getattr(torch, dtype))
    step = STEPS[provider]
    out = step(*inputs)  # warm-up: lazy initialisation, first touch of the inputs
    grad_bytes = sum(t.numel() * t.element_size() for t in out[1:])
    del out
    gc.collect()
    # The C++ kernels' buffer pool would hand the step the gradient buffer the warm-up left
    # cached, hiding it from the peak: empty it, so the step's buffers count as they are made.
    release_cpu_buffers()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    base = _rss("VmRSS")
    step(*inputs)
    return {"peak": _rss("VmHWM") - base, "grad_bytes": grad_bytes}


def peak_memory(provider: str, shape, dtype=F32) -> dict:
    if torch.cuda.is_available():
        inputs = make_inputs(shape, dtype, "cuda")
        STEPS[provider](*inputs)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = STEPS[provider](*inputs)
        torch.cuda.synchronize()
        grad_bytes = sum(t.numel() * t.element_size() for t in out[1:])
        return {"peak": torch.cuda.max_memory_allocated() - base, "grad_bytes": grad_bytes}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    code = (
        "import json, sys; sys.path.insert(0, {here!r}); "
        "from bench_fused_linear_ar_ddo import memory_child; "
        "print(json.dumps(memory_child({p!r}, {s!r}, {d!r})))"
    ).format(
        here=os.path.dirname(os.path.abspath(__file__)),
        p=provider,
        s=tuple(shape),
        d=str(dtype).removeprefix("torch."),
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=1800
    )
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------ time
def time_providers(shape, dtype=F32, reps=7) -> tuple[dict, dict]:
    """(wall, cpu) seconds per rep and provider; cpu = this process's CPU time (all threads),
    less sensitive than wall time to other processes competing for the cores."""
    inputs = make_inputs(shape, dtype, "cuda" if torch.cuda.is_available() else "cpu")
    wall: dict[str, list[float]] = {p: [] for p in PROVIDERS}
    cpu: dict[str, list[float]] = {p: [] for p in PROVIDERS}
    for p in PROVIDERS:  # warm-up
        STEPS[p](*inputs)
    for _ in range(reps):
        for p in PROVIDERS:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            out = STEPS[p](*inputs)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            wall[p].append(time.perf_counter() - t0)
            cpu[p].append(time.process_time() - c0)
            del out
    return wall, cpu


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return _load()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--json", default="fused_linear_ar_ddo.json")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-time", action="store_true")
    args = parser.parse_args(argv)
    info = machine_info("cpu")
    result: dict = {
        "command": " ".join(["python", *sys.argv]),
        "machine": info,
        "load_before": _load(),
        "uptime_before": _uptime(),
        "memory": [],
        "time": [],
    }
    print(
        f"CPU: {info['cpu']} ({info['cpus']} CPUs, torch threads {info['threads']}), "
        f"torch {info['torch']}\nuptime: {result['uptime_before']}"
    )
    mib = 2**20
    if not args.skip_memory:
        print("\npeak extra memory of one forward+backward (MiB; extra = peak - returned grads)")
        print(
            f"{'shape (B,L,H,V)':>24} {'provider':>10} {'peak':>9} {'extra':>9} "
            f"{'ratio':>7} {'target':>7}"
        )
        for shape in MEMORY_SHAPES:
            row = {p: peak_memory(p, shape) for p in PROVIDERS}
            extra = {p: row[p]["peak"] - row[p]["grad_bytes"] for p in PROVIDERS}
            ratio = {p: extra[p] / extra["unfused"] for p in FUSED}
            result["memory"].append(
                {"shape": shape, "dtype": "float32", **row, "extra": extra, "ratio": ratio}
            )
            for p in PROVIDERS:
                target = f"<={MEMORY_TARGET}" if p in FUSED else ""
                print(
                    f"{str(shape):>24} {p:>10} {row[p]['peak'] / mib:9.1f} "
                    f"{extra[p] / mib:9.1f} {extra[p] / extra['unfused']:7.3f} {target:>7}"
                )
    if not args.skip_time:
        print(f"\nforward+backward time, {args.reps} alternating reps (s): wall and process CPU")
        print(
            f"{'shape (B,L,H,V)':>24} {'clock':>5} {'provider':>10} {'unfused p50':>12} "
            f"{'p50':>8} {'ratio p50':>10} {'pair ratios':>14} {'target':>7}"
        )
        for shape in TIME_SHAPES:
            clocks = dict(zip(("wall", "cpu"), time_providers(shape, reps=args.reps), strict=True))
            entry: dict = {"shape": shape, "dtype": "float32"}
            for clock, times in clocks.items():
                med = {p: statistics.median(times[p]) for p in PROVIDERS}
                pairs = {
                    p: sorted(f / u for f, u in zip(times[p], times["unfused"], strict=True))
                    for p in FUSED
                }
                entry[clock] = {
                    "times": times,
                    "p50": med,
                    "ratio_p50": {p: med[p] / med["unfused"] for p in FUSED},
                    "pair_ratios": pairs,
                }
                for p in FUSED:
                    print(
                        f"{str(shape):>24} {clock:>5} {p:>10} {med['unfused']:12.3f} "
                        f"{med[p]:8.3f} {med[p] / med['unfused']:10.3f} "
                        f"{pairs[p][0]:6.3f}-{pairs[p][-1]:<7.3f} {'<=' + str(TIME_TARGET):>7}"
                    )
            result["time"].append(entry)
    result["load_after"] = _load()
    result["uptime_after"] = _uptime()
    print(f"\nuptime after: {result['uptime_after']}")
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.json}")
    return 0


# ------------------------------------------------------------------------- pytest-benchmark
@pytest.mark.parametrize("provider", PROVIDERS)
def test_fused_linear_ar_ddo(run_case, shape_dtype, provider):
    from conftest import DEVICE

    run_case(make_case(*shape_dtype, DEVICE), provider)


if __name__ == "__main__":
    sys.exit(main())
