"""Clocks of ``ddo-fast bench``: how every number is measured, with no cache left warm.

``wall``   host wall clock, host time included. CUDA: eager calls in batches of ``batch``,
           one ``synchronize`` per batch, the per-call time of a batch is one sample; CPU: one
           call per sample. Consecutive calls rotate over input sets holding >= 4x the
           last-level cache (L2 on CUDA, L3 on CPU), so no call finds its inputs cached, and
           on CUDA the L2 is also flushed before each batch.
``graph``  CUDA only, device time: the step captured once in a CUDA graph; before each replay
           a buffer of max(256 MiB, 4x L2) is zeroed (outside the timed span), then CUDA events
           around the replay give one sample.
``cold``   the first call of a provider in the process (compilation, autotuning, first touch
           and allocator growth included), wall clock, synchronised.

Every clock returns all samples; ``summary`` gives p50/p95 (nearest rank).
"""

from __future__ import annotations

import glob
import math
import time
from collections.abc import Callable

import torch

# The suite's wall clock (runner._Clocks.measure_interleaved): the providers of a case, and on
# CPU its floors, interleaved round by round.
WALL_METHOD = {
    "cpu": "wall clock per call, {rounds} rounds; each round runs a block of every provider "
    "(and of the floors) in an order rotated every round: 1 untimed call, then >= 1 timed calls "
    "(more, up to 10, until 0.5 s / {rounds} spent); inputs rotated over sets >= 4x LLC, one "
    "counter walking the sets across all blocks",
    "cuda": "wall clock, eager, {rounds} rounds; each round runs a block of every provider in an "
    "order rotated every round: 1 untimed call, then one batch of {batch} calls with one "
    "synchronize; inputs rotated over sets >= 4x L2; L2 flushed before each batch",
}
GRAPH_METHOD = (
    "CUDA graph replay, L2 flushed ({flush_mb} MiB zeroed) before each replay, CUDA events"
)
COLD_METHOD = "first call in the process, wall clock, synchronised"


def cache_bytes(device: str) -> int:
    """The last-level cache: the GPU's L2, or the largest CPU cache (sysfs, else 32 MiB)."""
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)
    best = 0
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            text = open(path).read().strip().upper()
        except OSError:
            continue
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            best = max(best, int(digits) * scale)
    return best or 32 * 2**20


def summary(samples: list[float]) -> dict[str, float]:
    """p50 and p95 (nearest rank) in ms, and the sample count."""
    s = sorted(samples)
    if not s:
        return {"p50_ms": float("nan"), "p95_ms": float("nan"), "n": 0}
    pick = lambda q: s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]  # noqa: E731
    return {"p50_ms": pick(0.5) * 1e3, "p95_ms": pick(0.95) * 1e3, "n": len(s)}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def cold(fn: Callable[[], object], device: str) -> tuple[float, object]:
    """Seconds of the first call, and its result."""
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


class Flusher:
    """Zeroes a buffer larger than the last-level cache, evicting whatever the last step left
    there: max(256 MiB, 4x L2) on CUDA, 4x the LLC on CPU."""

    def __init__(self, device: str = "cuda") -> None:
        cache = cache_bytes(device)
        self.nbytes = max(256 * 2**20, 4 * cache) if device == "cuda" else 4 * cache
        self.buf = torch.empty(self.nbytes // 4, dtype=torch.int32, device=device)

    def __call__(self) -> None:
        self.buf.zero_()


def wall(
    steps: list[Callable[[], object]],
    device: str,
    rounds: int,
    batch: int = 1,
    flush: Callable[[], None] | None = None,
    warmup: int = 2,
    min_seconds: float = 0.0,
) -> list[float]:
    """Per-call wall seconds: at least ``rounds`` samples (more, up to 10x, until
    ``min_seconds`` have been spent), each the mean of ``batch`` calls, rotating over ``steps``
    (one per input set), after ``warmup`` untimed calls (thread pools and clocks spun up)."""
    for k in range(warmup):
        steps[k % len(steps)]()
    out, k, spent = [], warmup, 0.0
    while len(out) < rounds or (spent < min_seconds and len(out) < 10 * rounds):
        if flush is not None:
            flush()
        _sync(device)
        start = time.perf_counter()
        for _ in range(batch):
            steps[k % len(steps)]()
            k += 1
        _sync(device)
        seconds = time.perf_counter() - start
        spent += seconds
        out.append(seconds / batch)
    return out


def graph(step: Callable[[], object], rounds: int, flush: Flusher) -> list[float]:
    """Device seconds per replay of ``step`` captured in a CUDA graph, L2 flushed before each."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up on a side stream, as graph capture requires
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    torch.cuda.synchronize()
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(rounds)
    ]
    g.replay()  # first replay uploads the graph
    for start, end in events:
        flush()
        start.record()
        g.replay()
        end.record()
    torch.cuda.synchronize()
    samples = [start.elapsed_time(end) / 1e3 for start, end in events]
    del g
    return samples


def host_seconds(
    step: Callable[[], object], device: str, calls: int, batches: int = 9
) -> list[float]:
    """Host seconds per call, one sample per batch of ``calls // batches`` back-to-back calls
    with no synchronisation inside the timed span (on a tiny input the device keeps up, so this
    is the host's cost per call)."""
    for _ in range(3):
        step()
    per_batch = max(1, calls // batches)
    samples = []
    for _ in range(batches):
        _sync(device)
        start = time.perf_counter()
        for _ in range(per_batch):
            step()
        samples.append((time.perf_counter() - start) / per_batch)
    _sync(device)
    return samples
