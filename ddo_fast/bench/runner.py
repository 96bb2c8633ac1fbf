"""``ddo-fast bench``: the benchmark suite as one command, with a table, JSON, CSV and a plot.

Every run first measures the machine's copy bandwidth (bytes read + written by a large copy),
then for every case and provider: the forward+backward time (median and inter-quartile range
over rounds; CUDA events on GPU, a wall clock on CPU), GB/s over the case's minimum bytes and its
share of the copy bandwidth, the speed-up against eager PyTorch and torch.compile, and the peak
extra memory of one step (CUDA: ``max_memory_allocated`` delta; CPU: the peak-RSS delta of a
child process that builds the inputs, resets its peak via /proc/self/clear_refs and runs the step).
"""

from __future__ import annotations

import csv
import gc
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from . import cases as C

F32, BF16 = torch.float32, torch.bfloat16

# (kind, shape, dtype): shapes of real models (CIFAR-10, ImageNet-64, EDM2 latents; VAR-d16/d30).
QUICK = [
    ("diffusion", (64, 3, 32, 32), F32),
    ("diffusion", (64, 4, 64, 64), F32),
    ("token", (8, 680, 4096), F32),
    ("ar", (8, 680, 4096), F32),
    ("ar", (8, 680, 4096), BF16),
]
FULL = QUICK + [
    ("diffusion", (64, 3, 64, 64), F32),
    ("diffusion", (64, 4, 64, 64), BF16),
    ("diffusion", (256, 3, 32, 32), F32),
    ("ar", (1, 680, 4096), F32),
    ("ar", (32, 680, 4096), F32),
    ("token", (8, 680, 4096), BF16),
]
MAKERS = {"diffusion": C.diffusion_case, "ar": C.ar_case, "token": C.token_case}


def _timer(device: str, rounds: int) -> Callable[[Callable[[], object]], list[float]]:
    def cpu(fn):
        fn()
        out = []
        for _ in range(rounds):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
        return out

    def cuda(fn):
        fn()
        torch.cuda.synchronize()
        out = []
        for _ in range(rounds):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b) / 1e3)
        return out

    return cuda if device == "cuda" else cpu


def _quantiles(samples: list[float]) -> tuple[float, float, float]:
    s = sorted(samples)
    pick = lambda q: s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]  # noqa: E731
    return pick(0.25), pick(0.5), pick(0.75)


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_child(kind: str, shape: tuple[int, ...], dtype: str, providers: tuple[str, ...]) -> None:
    """Run in a child process: print each provider's peak extra RSS of one step, one per line.

    The inputs are built once; before each provider's measured step, a warm-up step (compile,
    first touch, lazy initialisation) runs and the peak is reset via /proc/self/clear_refs.
    """
    case = MAKERS[kind](shape, getattr(torch, dtype), "cpu", providers=providers)
    for name in providers:
        step = case.providers[name]
        step()
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (peak RSS) to the current RSS
        base = _rss_bytes("VmRSS")
        step()
        print(name, _rss_bytes("VmHWM") - base, flush=True)


def _peak_extra(case: C.Case, kind: str, providers: list[str]) -> dict[str, float]:
    """Peak extra memory of one step per provider, in MiB (NaN where it cannot be measured)."""
    nan = float("nan")
    if case.device == "cuda":
        out = {}
        for name in providers:
            step = case.providers[name]
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            out[name] = (torch.cuda.max_memory_allocated() - base) / 2**20
        return out
    if not os.path.exists("/proc/self/clear_refs") or not providers:
        return dict.fromkeys(providers, nan)
    dtype = str(case.dtype).removeprefix("torch.")
    code = (
        "from ddo_fast.bench.runner import peak_child; "
        f"peak_child({kind!r}, {tuple(case.shape)!r}, {dtype!r}, {tuple(providers)!r})"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    out = dict.fromkeys(providers, nan)
    for line in proc.stdout.splitlines():
        name, _, value = line.partition(" ")
        if name in out and value.strip().isdigit():
            out[name] = int(value) / 2**20
    return out


def machine_info(device: str) -> dict:
    import numpy

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": device,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    else:
        try:
            with open("/proc/cpuinfo") as f:
                names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
            info["cpu"] = names[0] if names else platform.processor()
        except OSError:
            info["cpu"] = platform.processor()
    return info


def run(
    quick: bool = False,
    device: str | None = None,
    rounds: int | None = None,
    memory: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Run the suite; returns ``{"meta": ..., "rows": [...]}``."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    rounds = rounds or (5 if device == "cpu" else 50)
    timer = _timer(device, rounds)
    copy_gbs = C.copy_bandwidth(
        device, lambda fn: _quantiles(timer(fn))[1], 1 << (28 if device == "cpu" else 30)
    )
    meta = machine_info(device) | {"copy_GBps": copy_gbs, "rounds": rounds, "quick": quick}
    log(f"copy bandwidth {copy_gbs:.1f} GB/s on {meta.get('gpu') or meta.get('cpu')}")
    rows = []
    for kind, shape, dtype in QUICK if quick else FULL:
        case = MAKERS[kind](shape, dtype, device)
        medians = {}
        # On CPU, memory is measured in one child per case; --quick leaves torch.compile out of
        # it (its compile in the child would dominate the run).
        mem_providers = [p for p in case.providers if not (quick and p == "compile")]
        peaks = _peak_extra(case, kind, mem_providers) if memory else {}
        for name, step in case.providers.items():
            q1, med, q3 = _quantiles(timer(step))
            medians[name] = med
            gbs = case.min_bytes / med / 1e9
            row = {
                "case": case.name,
                "op": case.op,
                "shape": list(shape),
                "dtype": str(dtype).removeprefix("torch."),
                "provider": name,
                "median_ms": med * 1e3,
                "iqr_ms": (q3 - q1) * 1e3,
                "GBps": gbs,
                "pct_copy": 100 * gbs / copy_gbs,
                "min_MB": case.min_bytes / 2**20,
            }
            if memory:
                row["peak_extra_MB"] = peaks.get(name, float("nan"))
            rows.append(row)
            log(f"  {case.name:36} {name:14} {med * 1e3:9.2f} ms")
        for row in rows:
            if row["case"] == case.name:
                for ref in ("eager", "compile"):
                    if ref in medians:
                        row[f"x_vs_{ref}"] = medians[ref] / (row["median_ms"] / 1e3)
        del case
    return {"meta": meta, "rows": rows}


def format_table(result: dict, previous: dict | None = None) -> str:
    prev = {}
    if previous:
        prev = {(r["case"], r["provider"]): r["median_ms"] for r in previous["rows"]}
    head = (
        f"{'case':36} {'provider':14} {'median ms':>10} {'IQR':>7} {'GB/s':>7} {'%copy':>6} "
        f"{'x eager':>7} {'x comp':>6} {'peak MB':>8}" + (f" {'x prev':>7}" if prev else "")
    )
    lines = [head, "-" * len(head)]
    nan = float("nan")
    for r in result["rows"]:
        line = (
            f"{r['case']:36} {r['provider']:14} {r['median_ms']:10.2f} {r['iqr_ms']:7.2f} "
            f"{r['GBps']:7.1f} {r['pct_copy']:6.1f} {r.get('x_vs_eager', nan):7.2f} "
            f"{r.get('x_vs_compile', nan):6.2f} {r.get('peak_extra_MB', nan):8.1f}"
        )
        if prev:
            old = prev.get((r["case"], r["provider"]))
            line += f" {old / r['median_ms'] if old else nan:7.2f}"
        lines.append(line)
    return "\n".join(lines)


def write_outputs(result: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "bench.json", out / "bench.csv"]
    paths[0].write_text(json.dumps(result, indent=1))
    keys = sorted({k for r in result["rows"] for k in r})
    with open(paths[1], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for r in result["rows"]:
            writer.writerow(r | {"shape": "x".join(map(str, r["shape"]))})
    png = plot(result, out / "bench.png")
    if png:
        paths.append(png)
    return paths


def plot(result: dict, path: Path) -> Path | None:
    """Time and peak memory per provider for every case (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = result["rows"]
    cases = list(dict.fromkeys(r["case"] for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.6 * len(cases)), 8), sharex=True)
    width = 0.8 / len(providers)
    for i, prov in enumerate(providers):
        xs, ts, ms = [], [], []
        for j, case in enumerate(cases):
            match = [r for r in rows if r["case"] == case and r["provider"] == prov]
            if match:
                xs.append(j + i * width)
                ts.append(match[0]["median_ms"])
                ms.append(match[0].get("peak_extra_MB", float("nan")))
        axes[0].bar(xs, ts, width, label=prov)
        axes[1].bar(xs, ms, width, label=prov)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("forward+backward median (ms, log)")
    axes[1].set_ylabel("peak extra memory (MiB)")
    axes[1].set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
    axes[1].set_xticklabels(cases, rotation=25, ha="right", fontsize=8)
    axes[0].legend(ncol=len(providers), fontsize=8)
    meta = result["meta"]
    where = meta.get("gpu") or meta.get("cpu", "")
    fig.suptitle(f"ddo_fast benchmarks on {where} (torch {meta['torch']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
