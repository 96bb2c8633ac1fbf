"""A CausalAR training step of a digits-AR model with and without the ref-logprob cache.

The model and step are those of the former ``digits-ar`` preset (the preset itself is now a
24-d, 1-layer model chosen by the efficacy protocol, :mod:`ddo_fast.examples.digits_ar`):
a class-conditional :class:`~ddo_fast.models.CausalTransformer` (vocab 8 grey levels, 64 tokens,
10 classes, dim 64, 2 layers), batch 64 real + 64 fake, 1797 real samples and a pool of 2000
fakes; the tokens are random (the step's cost does not depend on their values). A step is the
training loop's own ``draw_batch`` + ``train_step`` (:mod:`ddo_fast.training.loop`): ``cached``
indexes the round's reference log-probs (scored once, :mod:`ddo_fast.training.ref_cache`),
``per_step`` runs the reference forward on the 2B rows every step.

As a script (``python benchmarks/bench_ref_cache.py [--steps 300] [--threads 1] [--json out]``)
it alternates the two variants step by step (ABAB..., each on its own model copy, so that load
from other processes falls on both), times every step (p50 and p10-p90 of each), reports the
one-off scoring time of a round and the speed-up over a 300-step round including it, with the
CPU model and the load average before and after, and writes JSON. Under pytest-benchmark
(``pytest benchmarks/ --benchmark-only``) it times the same two steps like the other
``bench_*.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from ddo_fast import adapters as A
from ddo_fast.bench.runner import machine_info
from ddo_fast.models import CausalTransformer
from ddo_fast.training import TrainConfig, loop
from ddo_fast.training.data import RealData, balanced_labels, generator
from ddo_fast.training.metrics import CsvLog, NonFiniteGuard, StepLog
from ddo_fast.training.ref_cache import ref_logprobs
from ddo_fast.training.state import TrainState, trainable

QUICK = FULL = [("digits-ar", None)]  # one model: the former preset's
DIGITS = dict(levels=8, seq_len=64, classes=10, dim=64, layers=2, real=1797, fakes=2000)
CONFIG = dict(alpha=1.0, beta=1.0, lr=1e-5, batch_size=64, steps_per_round=300, log_every=25)


def build(cached: bool, device: str, out: Path) -> tuple[Callable[[], None], float]:
    """(one training step, the seconds the round's scoring pass took: 0 without the cache)."""
    d = DIGITS
    g = generator(0, "bench-ref-cache")
    tokens = torch.randint(0, d["levels"], (d["real"], d["seq_len"]), generator=g)
    labels = torch.randint(0, d["classes"], (d["real"],), generator=g)
    pool = (
        torch.randint(0, d["levels"], (d["fakes"], d["seq_len"]), generator=g),
        balanced_labels(d["classes"], d["fakes"], g),
    )
    torch.manual_seed(0)
    model = CausalTransformer(
        d["levels"], d["seq_len"], d["classes"], dim=d["dim"], layers=d["layers"]
    ).to(device)
    cfg = TrainConfig(
        **CONFIG, fake_samples_per_round=d["fakes"], ref_logprob_cache=cached, device=device
    )
    state = TrainState.create(model, cfg)
    data = RealData((tokens, labels))
    adapter = A.CausalAR(seq_len=d["seq_len"])  # the preset's adapter
    run = loop.Run(
        cfg=cfg,
        adapter=adapter,
        sample=adapter.sample,
        data=data,
        shape=data.sample_shape(),
        device=torch.device(device),
        rank=0,
        world=1,
        out=out,
        net=model,
        params=trainable(model),
        eval_fn=None,
        guard=NonFiniteGuard(cfg.nonfinite, torch.device(device), 0, 1),
        log=StepLog(out, False, None),
        evals=CsvLog(out / "evals.csv", False),
    )
    t0 = time.perf_counter()
    refs = ref_logprobs(run, state, pool, loop.weights_digest(state.ref))
    scoring = time.perf_counter() - t0 if cached else 0.0
    assert (refs is not None) == cached

    def step() -> None:
        if state.step_in_round == cfg.steps_per_round:  # stay inside the round the cache covers
            state.step_in_round = 0
            state.global_step -= cfg.steps_per_round
        loop.train_step(run, state, *loop.draw_batch(run, state, pool, refs))
        if state.step_in_round % cfg.log_every == 0:
            run.log.flush(stop_at_nonfinite=False)  # as the loop does; keeps the queue short
        if device == "cuda":
            torch.cuda.synchronize()

    return step, scoring


# -------------------------------------------------------------------------- pytest-benchmark
@pytest.mark.parametrize("variant", ["cached", "per_step"])
def test_ref_cache(benchmark, variant, shape_dtype, tmp_path):
    from conftest import DEVICE

    step, _ = build(variant == "cached", DEVICE, tmp_path)
    benchmark.group = "ref_cache[digits-ar]"
    benchmark.pedantic(step, rounds=20, warmup_rounds=3)


# ------------------------------------------------------------------------------------ script
def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _summary(times: list[float]) -> dict:
    q = statistics.quantiles(times, n=10)
    p50 = statistics.median(times)
    return {
        "p50_ms": p50 * 1e3,
        "p10_ms": q[0] * 1e3,
        "p90_ms": q[-1] * 1e3,
        "steps_per_s": 1 / p50,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the CPU is shared)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    info = machine_info(args.device)
    load_before = _uptime()
    print(f"{info['cpu']} ({info['cpus']} CPUs, {info['threads']} torch threads), {args.device}")
    print(f"load before: {load_before}")
    with tempfile.TemporaryDirectory() as tmp:
        variants = {}
        for name in ("cached", "per_step"):
            variants[name] = build(name == "cached", args.device, Path(tmp) / name)
        times: dict[str, list[float]] = {name: [] for name in variants}
        for i in range(args.warmup + args.steps):
            for name, (step, _) in variants.items():  # ABAB...
                t0 = time.perf_counter()
                step()
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - t0)
    load_after = _uptime()
    res = {name: _summary(t) for name, t in times.items()}
    speedup = res["cached"]["steps_per_s"] / res["per_step"]["steps_per_s"]
    scoring = variants["cached"][1]
    n = CONFIG["steps_per_round"]
    round_speedup = (n * res["per_step"]["p50_ms"] / 1e3) / (
        n * res["cached"]["p50_ms"] / 1e3 + scoring
    )
    for name, r in res.items():
        print(
            f"{name:>9}: p50 {r['p50_ms']:.2f} ms/step ({r['steps_per_s']:.1f} steps/s), "
            f"p10-p90 {r['p10_ms']:.2f}-{r['p90_ms']:.2f} ms"
        )
    print(f"speed-up (p50 steps/s, cached / per_step): {speedup:.3f}x")
    print(
        f"round scoring pass: {scoring:.2f} s ({DIGITS['real']} real + {DIGITS['fakes']} fake); "
        f"{n}-step round incl. scoring: {round_speedup:.3f}x"
    )
    print(f"load after: {load_after}")
    out = {
        "benchmark": "bench_ref_cache",
        "model": "digits-ar CausalTransformer " + json.dumps(DIGITS),
        "config": CONFIG,
        "machine": info,
        "load_before": load_before,
        "load_after": load_after,
        "steps_timed_per_variant": args.steps,
        "results": res,
        "speedup_steps_per_s": speedup,
        "scoring_seconds": scoring,
        "round_speedup_including_scoring": round_speedup,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
