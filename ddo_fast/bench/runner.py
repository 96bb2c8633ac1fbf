"""``ddo-fast bench``: the benchmark suite as one command, with a table, JSON, CSV and a plot.

For every case (one op, shape and dtype) and provider (eager, cross_entropy, compile, ddo_fast):

1. the *cold* first call is timed, and its value and gradient are checked against ``eager``'s
   (every provider must compute the same thing; a mismatch is reported in the ``check`` column);
2. two clocks (see ``timing.py``): ``wall`` (host time included; on CUDA eager calls in batches
   with one synchronize per batch) and, on CUDA, ``graph`` (CUDA-graph replay, device time),
   each as p50 and p95; no sample finds its inputs in a cache: inputs rotate over sets holding
   >= 4x the last-level cache, and the L2 is flushed before each graph replay / wall batch;
3. a copy of the case's own ``min_bytes``, timed with the same clock, sizes and rotation, so that
   "% of copy" compares like with like (GB/s and % copy use the graph clock on CUDA, the wall
   clock on CPU);
4. the speed-ups against eager and torch.compile in every clock, and the peak extra memory of
   one step (CUDA: ``max_memory_allocated`` delta; CPU: the peak-RSS delta of a child process
   that builds the inputs, resets its peak via /proc/self/clear_refs and runs the step);
5. on CPU, for fp32 cases, the memory floor of the op (``cases.floor_case``: its minimum bytes
   with the least arithmetic, exp included for token/AR, by the kernels' own loops) twice
   (``floor_touched``: the gradient written to memory already touched, from the kernels' own
   allocator; ``floor_fresh``: to a fresh allocation), timed interleaved with the providers
   (one rotation over all of them, round by round, so that a load change on a shared machine
   hits floor and op alike), and every provider's time over each floor at p50 and p95;
   ``over_floor_*`` is over the lower of the two at that percentile (``floor_matched``).

The JSON records the method of every number (``meta.methods`` and per row ``bandwidth_clock``).
"""

from __future__ import annotations

import csv
import gc
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from . import cases as C
from . import timing as T

F32, BF16 = torch.float32, torch.bfloat16
VAR = (680, 4096)  # VAR-d16/d30 token sequence length and codebook size

# (kind, shape, dtype): shapes of real models (CIFAR-10, ImageNet-64, EDM2 latents; VAR).
QUICK = [
    ("diffusion", (64, 3, 32, 32), F32),
    ("diffusion", (64, 4, 64, 64), F32),
    ("token", (8, *VAR), F32),
    ("ar", (8, *VAR), F32),
    ("ar", (8, *VAR), BF16),
]
FULL = QUICK + [
    ("diffusion", (64, 3, 64, 64), F32),
    ("diffusion", (64, 4, 64, 64), BF16),
    ("diffusion", (256, 3, 32, 32), F32),
    ("ar", (1, *VAR), F32),
    ("ar", (16, *VAR), F32),
    ("ar", (16, *VAR), BF16),
    ("token", (8, *VAR), BF16),
    ("token", (16, *VAR), F32),
    ("token", (16, *VAR), BF16),
]
# CUDA, most important first (a run cut short by a time limit keeps the head of the list):
# the headline diffusion shape, then the VAR training-step shapes (B = 16 and 64).
CUDA_QUICK = [
    ("diffusion", (64, 4, 64, 64), F32),
    ("ar", (16, *VAR), BF16),
    ("token", (16, *VAR), BF16),
]
CUDA_FULL = CUDA_QUICK + [
    ("ar", (16, *VAR), F32),
    ("token", (16, *VAR), F32),
    ("ar", (64, *VAR), BF16),
    ("ar", (64, *VAR), F32),
    ("token", (64, *VAR), BF16),
    ("token", (64, *VAR), F32),
    ("ar", (8, *VAR), F32),
    ("diffusion", (64, 4, 64, 64), BF16),
    ("diffusion", (512, 3, 32, 32), F32),
    ("diffusion", (256, 4, 64, 64), BF16),
]
MAKERS = {"diffusion": C.diffusion_case, "ar": C.ar_case, "token": C.token_case}
TOLERANCE = {F32: 1e-3, BF16: 3e-2}  # relative L2 error of value and gradient vs eager
REFERENCE = "eager"


def suite(device: str, quick: bool) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    if device == "cuda":
        return CUDA_QUICK if quick else CUDA_FULL
    return QUICK if quick else FULL


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_child(kind: str, shape: tuple[int, ...], dtype: str, providers: tuple[str, ...]) -> None:
    """Run in a child process: print each provider's peak extra RSS of one step, one per line.

    The inputs are built once; before each provider's measured step, a warm-up step (compile,
    first touch, lazy initialisation) runs, the C++ kernels' buffer pool is emptied (else the
    step would reuse the gradient buffer the warm-up left cached there and show none of it)
    and the peak is reset via /proc/self/clear_refs.
    """
    from .._alloc import release_cpu_buffers

    case = MAKERS[kind](shape, getattr(torch, dtype), "cpu", providers=providers)
    for name in providers:
        step = case.providers[name]
        step()
        gc.collect()
        release_cpu_buffers()
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
            step = case.step(name)
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
        "cache_bytes": T.cache_bytes(device),
        "cache": "GPU L2" if device == "cuda" else "CPU last-level cache",
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "nice": os.nice(0),
        "loadavg_start": os.getloadavg(),
    } | git_state()
    info["cpu_isa"] = info["cpu_alloc"] = None
    if device == "cpu":  # a CUDA run never loads (or compiles on first use) the C++ library
        try:
            from .. import _library

            info["cpu_isa"] = _library.cpu_isa()
        except Exception:  # noqa: BLE001 - no C++ extension (a Triton-only install): no ISA
            pass
        try:
            from .._alloc import cpu_alloc

            info["cpu_alloc"] = cpu_alloc()
        except Exception:  # noqa: BLE001 - same
            pass
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


def git_state() -> dict:
    """``git_head`` (the commit of the code that ran) and ``git_dirty`` (uncommitted changes in
    the working tree), both None where there is no git or no repository."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=30
        )
        status = subprocess.run(
            ["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return {"git_head": None, "git_dirty": None}
    if head.returncode != 0 or status.returncode != 0:
        return {"git_head": None, "git_dirty": None}
    return {"git_head": head.stdout.strip(), "git_dirty": bool(status.stdout.strip())}


def _rel_err(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    """||a - b|| / ||b|| in float64 (0 when both are missing)."""
    if a is None or b is None:
        return 0.0 if a is None and b is None else float("inf")
    if a.shape != b.shape:
        return float("inf")
    a64, b64 = a.detach().double(), b.detach().double()
    return float((a64 - b64).norm() / b64.norm().clamp_min(1e-30))


def check_outputs(outputs: dict[str, tuple], dtype: torch.dtype) -> dict[str, str]:
    """``ok`` or a mismatch message per provider, comparing (value, grad) with eager's."""
    if REFERENCE not in outputs:
        return dict.fromkeys(outputs, "unchecked")
    ref_value, ref_grad = outputs[REFERENCE]
    tol = TOLERANCE.get(dtype, 3e-2)
    result = {}
    for name, (value, grad) in outputs.items():
        ev, eg = _rel_err(value, ref_value), _rel_err(grad, ref_grad)
        ok = ev <= tol and eg <= tol
        result[name] = "ok" if ok else f"MISMATCH value {ev:.1e} grad {eg:.1e} (tol {tol:.0e})"
    return result


class _Clocks:
    """The clocks of one run (shared flush buffer on CUDA)."""

    def __init__(self, device: str, rounds: int, batch: int) -> None:
        self.device, self.rounds, self.batch = device, rounds, batch
        self.flush = T.Flusher() if device == "cuda" else None

    def measure(self, case: C.Case, name: str) -> dict[str, float]:
        steps = [case.step(name, i) for i in range(len(case.sets))]
        steps = steps[1:] + steps[:1]  # the first timed call is on a set not used just before
        out = {}
        min_seconds = 0.5 if self.device == "cpu" else 0.0  # more samples where they are cheap
        wall = T.wall(steps, self.device, self.rounds, self.batch, self.flush, 2, min_seconds)
        out |= {f"wall_{k}": v for k, v in T.summary(wall).items()}
        out |= self._graph(case, name)
        return out

    def measure_interleaved(self, cases: dict[str, C.Case]) -> dict[str, dict[str, float]]:
        """Wall clock of every provider of ``cases`` ({provider: its case}; the op's providers
        and the floors), interleaved: each of ``rounds`` rounds runs a block of every provider,
        in an order rotated every round; a block is 1 untimed call then >= 1 timed calls (more,
        up to 10, until 0.5 s / rounds is spent). One counter walks the input sets across all
        blocks, so no call reuses the set the call before it used (all cases have as many sets).
        The graph clock (CUDA) stays per provider."""
        names = list(cases)
        samples: dict[str, list[float]] = {name: [] for name in names}
        min_seconds = 0.5 / self.rounds if self.device == "cpu" else 0.0
        at = 1  # the set after the one the cold calls used
        for r in range(self.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                case = cases[name]
                n = len(case.sets)
                steps = [case.step(name, (at + i) % n) for i in range(n)]
                got = T.wall(steps, self.device, 1, self.batch, self.flush, 1, min_seconds)
                samples[name] += got
                at += 1 + len(got) * self.batch
        out = {}
        for name in names:
            out[name] = {f"wall_{k}": v for k, v in T.summary(samples[name]).items()}
            out[name] |= self._graph(cases[name], name)
        return out

    def _graph(self, case: C.Case, name: str) -> dict[str, float | str]:
        out: dict[str, float | str] = {}
        if self.flush is not None:
            try:
                samples = T.graph(case.step(name), self.rounds, self.flush)
            except Exception as exc:  # a step that cannot be captured keeps its wall clock
                out["graph_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                samples = []
            out |= {f"graph_{k}": v for k, v in T.summary(samples).items()}
        return out

    @property
    def bandwidth_clock(self) -> str:
        return "graph" if self.flush is not None else "wall"

    def methods(self) -> dict[str, str]:
        m = {
            "wall": T.WALL_METHOD[self.device].format(batch=self.batch, rounds=self.rounds),
            "cold": T.COLD_METHOD,
            "copy": "a copy of the case's min_bytes (half read, half written), same clock, "
            "same rotation over sets >= 4x cache",
            "bandwidth": f"GB/s = min_bytes / p50 of the {self.bandwidth_clock} clock; "
            "% copy = copy p50 / op p50 on that clock",
            "percentiles": "nearest rank over the samples",
        }
        if self.flush is not None:
            m["graph"] = T.GRAPH_METHOD.format(flush_mb=self.flush.nbytes >> 20)
        else:
            m["floor"] = (
                "fp32 cases: the op's minimum bytes with the least arithmetic by the kernels' own "
                "loops, ISA and threads (token/AR: read + sum fast_exp, then read + write "
                "fast_exp; diffusion: read pred/pred_ref/target + sum, then read pred/target + "
                "write the difference); floor_touched writes into one reused buffer from the "
                "kernels' own allocator (empty_large: the pool's recycled gradient memory), "
                "floor_fresh into torch.empty; both interleaved with the providers; "
                "over_floor_* = provider / min(floor_touched, floor_fresh) at the same "
                "percentile, the floor used in floor_matched"
            )
        return m


def _cold_and_check(case: C.Case, log: Callable[[str], None]) -> dict[str, dict]:
    """The cold call of every provider of ``case`` and its output checked against eager's."""
    stats: dict[str, dict] = {}
    outputs = {}
    for name in case.fns:
        seconds, out = T.cold(case.step(name), case.device)
        stats[name] = {"cold_ms": seconds * 1e3}
        outputs[name] = out
    checks = check_outputs(outputs, case.dtype) if case.checked else dict.fromkeys(outputs, "n/a")
    del outputs
    for name in case.fns:
        stats[name]["check"] = checks[name]
        if checks[name].startswith("MISMATCH"):
            log(f"  {case.name} {name}: {checks[name]}")
    return stats


def _time_case(
    case: C.Case, clocks: _Clocks, log: Callable[[str], None], floor: C.Case | None = None
) -> tuple[dict[str, dict], dict[str, dict]]:
    """Cold call, output check, then the clocks, for every provider of ``case`` and, if given,
    of ``floor``, all interleaved (``_Clocks.measure_interleaved``). Returns (case's stats,
    floor's stats)."""
    stats = _cold_and_check(case, log)
    floor_stats = _cold_and_check(floor, log) if floor is not None else {}
    members = dict.fromkeys(case.fns, case)
    if floor is not None:
        members |= dict.fromkeys(floor.fns, floor)
    timed = clocks.measure_interleaved(members)
    for name, s in timed.items():
        (stats if name in stats else floor_stats)[name] |= s
    return stats, floor_stats


def _row(case: C.Case, name: str, s: dict, copy: dict, clock: str, kind: str) -> dict:
    t = s.get(f"{clock}_p50_ms", float("nan"))
    t_copy = copy.get(f"{clock}_p50_ms", float("nan"))
    row = {
        "case": case.name,
        "op": case.op,
        "kind": kind,
        "shape": list(case.shape),
        "dtype": str(case.dtype).removeprefix("torch."),
        "provider": name,
        "sets": len(case.sets),
        "set_MB": case.set_bytes / 2**20,
        "min_MB": case.min_bytes / 2**20,
        "bandwidth_clock": clock,
        "GBps": case.min_bytes / t * 1e3 / 1e9,
        "copy_GBps": case.min_bytes / t_copy * 1e3 / 1e9,
        "pct_copy": 100 * t_copy / t,
    } | s
    row["median_ms"] = row["wall_p50_ms"]  # the name used by older bench.json files
    if "graph_p50_ms" in row:
        row["wall_over_graph"] = row["wall_p50_ms"] / row["graph_p50_ms"]
    return row


def _ratios(rows: list[dict]) -> None:
    for clock in ("wall", "graph"):
        key = f"{clock}_p50_ms"
        base = {r["provider"]: r[key] for r in rows if r["kind"] == "op" and key in r}
        for r in rows:
            if r["kind"] != "op" or key not in r:
                continue
            for ref in ("eager", "compile"):
                if ref in base:
                    r[f"x_{ref}_{clock}"] = base[ref] / r[key]
    # time / floor (the CPU target is <= 1.5 at p50 and p95). Not >= 1 by construction: both
    # sides are percentiles of a noisy clock on a shared machine, so a ratio can dip below 1.
    # ``over_floor_*`` is over the lower floor at each percentile (a lower bound must be the
    # lower of the two), named per percentile in ``floor_matched``.
    floors = {r["provider"]: r for r in rows if r["kind"] == "floor"}
    for r in rows:
        if r["kind"] != "op":
            continue
        for name, f in floors.items():
            for q in ("p50", "p95"):
                r[f"over_{name}_{q}"] = r[f"wall_{q}_ms"] / f[f"wall_{q}_ms"]
        if floors:
            r["floor_matched"] = {}
            for q in ("p50", "p95"):
                match = min(floors, key=lambda name, q=q: floors[name][f"wall_{q}_ms"])
                r["floor_matched"][q] = match
                r[f"over_floor_{q}"] = r[f"over_{match}_{q}"]


def run(
    quick: bool = False,
    device: str | None = None,
    rounds: int | None = None,
    memory: bool = True,
    log: Callable[[str], None] = print,
    out: Path | None = None,
    batch: int | None = None,
    cases: list[tuple[str, tuple[int, ...], torch.dtype]] | None = None,
) -> dict:
    """Run the suite; returns ``{"meta": ..., "rows": [...]}``. With ``out``, the results so far
    are written to ``out/bench.partial.json`` after every case (a run cut short keeps them)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    rounds = rounds or (5 if device == "cpu" else 50)
    batch = batch or (1 if device == "cpu" else 10)
    # One static compile per case: more cases than dynamo's default recompile limit.
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 256)
    clocks = _Clocks(device, rounds, batch)
    cache = T.cache_bytes(device)
    meta = machine_info(device) | {
        "rounds": rounds,
        "batch": batch,
        "quick": quick,
        "methods": clocks.methods(),
        "tolerance": {str(k).removeprefix("torch."): v for k, v in TOLERANCE.items()},
    }
    log(
        f"{meta.get('gpu') or meta.get('cpu')}: {meta['cache']} {cache / 2**20:.0f} MiB; "
        f"percentiles over {rounds} samples"
    )
    rows: list[dict] = []
    for kind, shape, dtype in cases or suite(device, quick):
        try:
            rows += _run_case(kind, shape, dtype, device, clocks, cache, memory, quick, log)
        except Exception as exc:  # one failing case must not lose the others
            log(f"  {kind}{list(shape)} {dtype} FAILED: {type(exc).__name__}: {exc}")
            rows.append({"case": f"{kind}{list(shape)}", "kind": "error", "error": repr(exc)[:500]})
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            partial = {"meta": meta, "rows": rows}
            (out / "bench.partial.json").write_text(json.dumps(partial, indent=1))
    meta["loadavg_end"] = os.getloadavg()
    return {"meta": meta, "rows": rows}


def _run_case(kind, shape, dtype, device, clocks, cache, memory, quick, log) -> list[dict]:
    case = MAKERS[kind](shape, dtype, device)
    n_sets = C.sets_for(case.set_bytes, cache)
    if n_sets > 1:
        case = MAKERS[kind](shape, dtype, device, sets=n_sets)
    copy = C.copy_case(case.min_bytes, device)
    copy = C.copy_case(case.min_bytes, device, sets=C.sets_for(copy.set_bytes, cache))
    copy_stats = _time_case(copy, clocks, log)[0]["copy"]
    floor = None
    if device == "cpu" and dtype == F32:
        floor = C.floor_case(kind, shape, dtype, device, sets=len(case.sets))
    # The op's cold calls come first (before the floor's); the floor is timed interleaved with
    # the providers. On CPU, memory is measured in one child per case; --quick leaves
    # torch.compile out of it (its compile in the child would dominate the run).
    stats, floor_stats = _time_case(case, clocks, log, floor)
    mem_providers = [p for p in case.fns if not (quick and device == "cpu" and p == "compile")]
    peaks = _peak_extra(case, kind, mem_providers) if memory else {}
    clock = clocks.bandwidth_clock
    rows = []
    for name, s in stats.items():
        row = _row(case, name, s, copy_stats, clock, "op")
        if memory:
            row["peak_extra_MB"] = peaks.get(name, float("nan"))
        rows.append(row)
    rows.append(_row(copy, "copy", copy_stats, copy_stats, clock, "copy") | {"case": case.name})
    for name, s in floor_stats.items():
        rows.append(_row(floor, name, s, copy_stats, clock, "floor") | {"case": case.name})
    _ratios(rows)
    for r in rows:
        graph = f" graph {r['graph_p50_ms']:8.3f}" if "graph_p50_ms" in r else ""
        log(
            f"  {case.name:36} {r['provider']:14} wall {r['wall_p50_ms']:9.3f} ms{graph}"
            f" cold {r['cold_ms']:9.1f} {r['check']}"
        )
    return rows


def _fmt(value: object, width: int, prec: int) -> str:
    if isinstance(value, float | int):
        return f"{value:{width}.{prec}f}"
    return f"{'n/a' if value is None else value:>{width}}"


def format_table(result: dict, previous: dict | None = None) -> str:
    """One line per case and provider; graph columns only when the run had a graph clock."""
    rows = [r for r in result["rows"] if r.get("kind") != "error"]
    prev = {}
    if previous:
        for r in previous["rows"]:
            t = r.get("wall_p50_ms", r.get("median_ms"))
            if t:
                prev[(r["case"], r["provider"])] = t
    graph = any("graph_p50_ms" in r for r in rows)
    cols = [("case", 36, None), ("provider", 14, None)]
    if graph:
        cols += [("graph_p50_ms", 9, 3), ("graph_p95_ms", 9, 3)]
    cols += [("wall_p50_ms", 9, 3), ("wall_p95_ms", 9, 3), ("cold_ms", 9, 1)]
    cols += [("GBps", 7, 1), ("pct_copy", 6, 1)]
    if any("over_floor_p50" in r for r in rows):
        cols += [("over_floor_p50", 6, 2), ("over_floor_p95", 6, 2)]
    for clock in ("graph", "wall") if graph else ("wall",):
        cols += [(f"x_eager_{clock}", 7, 2), (f"x_compile_{clock}", 7, 2)]
    if graph:
        cols += [("wall_over_graph", 6, 1)]
    cols += [("peak_extra_MB", 8, 1)]
    titles = {
        "graph_p50_ms": "graph p50",
        "graph_p95_ms": "graph p95",
        "wall_p50_ms": "wall p50",
        "wall_p95_ms": "wall p95",
        "cold_ms": "cold ms",
        "GBps": "GB/s",
        "pct_copy": "%copy",
        "over_floor_p50": "/flr50",
        "over_floor_p95": "/flr95",
        "x_eager_graph": "xeag gr",
        "x_compile_graph": "xcmp gr",
        "x_eager_wall": "xeag wl",
        "x_compile_wall": "xcmp wl",
        "wall_over_graph": "wl/gr",
        "peak_extra_MB": "peak MB",
    }
    head = " ".join(f"{titles.get(k, k):{'<' if p is None else '>'}{w}}" for k, w, p in cols)
    head += " check" + (f" {'x prev':>7}" if prev else "")
    lines = [head, "-" * len(head)]
    for r in rows:
        parts = []
        for key, width, prec in cols:
            value = r.get(key)
            parts.append(f"{value:<{width}}" if prec is None else _fmt(value, width, prec))
        line = " ".join(parts) + f" {r.get('check', '')}"
        if prev:
            old = prev.get((r["case"], r["provider"]))
            line += f" {old / r['wall_p50_ms'] if old else float('nan'):7.2f}"
        lines.append(line)
    meta = result["meta"]
    lines.append("")
    lines += [f"{k}: {v}" for k, v in meta.get("methods", {}).items()]
    for r in result["rows"]:
        if r.get("kind") == "error":
            lines.append(f"FAILED {r['case']}: {r['error']}")
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
            shape = r.get("shape")
            writer.writerow(r | ({"shape": "x".join(map(str, shape))} if shape else {}))
    png = plot(result, out / "bench.png")
    if png:
        paths.append(png)
    return paths


def plot(result: dict, path: Path) -> Path | None:
    """p50 time (graph clock where there is one, else wall) and peak memory per provider."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in result["rows"] if r.get("kind") in ("op", "copy")]
    if not rows:
        return None
    cases = list(dict.fromkeys(r["case"] for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.6 * len(cases)), 8), sharex=True)
    width = 0.8 / len(providers)
    clock = rows[0]["bandwidth_clock"]
    for i, prov in enumerate(providers):
        xs, ts, ms = [], [], []
        for j, case in enumerate(cases):
            match = [r for r in rows if r["case"] == case and r["provider"] == prov]
            if match:
                xs.append(j + i * width)
                ts.append(match[0].get(f"{clock}_p50_ms", float("nan")))
                ms.append(match[0].get("peak_extra_MB", float("nan")))
        axes[0].bar(xs, ts, width, label=prov)
        axes[1].bar(xs, ms, width, label=prov)
    axes[0].set_yscale("log")
    axes[0].set_ylabel(f"forward+backward p50, {clock} clock (ms, log)")
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
