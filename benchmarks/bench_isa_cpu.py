"""The C++ CPU kernels under each instruction set, timed in one process.

    python benchmarks/bench_isa_cpu.py [--rounds 12] [--per-block 3] [--out FILE.json]

Cases (forward+backward, fp32, shapes of ``ddo-fast bench``): token log-probs [8, 680, 4096]
(VAR's step) and the diffusion DDO loss [64, 4, 64, 64]. Providers: ``ddo_fast`` under every ISA
this CPU supports (switched in process with the kernels' test hook, so every ISA runs the same
inputs, allocator state and thread pool), ``eager`` and ``cross_entropy`` (token) /``eager``
(diffusion) from ``ddo_fast.bench.cases``, the memory floor of each case
(``cases.floor_case``: the op's minimum bytes with the least arithmetic, the token floor
running the kernels' own fast_exp, by the kernels' own loops under the same ISA and threads),
with the gradient written to touched memory from the kernels' own allocator (``floor_touched``,
what the pool's recycled buffer gets) and to a fresh allocation (``floor_fresh``), and a copy of
the case's minimum bytes. ``over_floor_*`` is over the lower of the two floors at each
percentile (the one used is named in ``floor_matched_*``).

Method: wall clock per call (``ddo_fast.bench.timing.wall``); inputs rotate over sets holding
>= 4x the last-level cache; the providers are interleaved: each of ``--rounds`` rounds runs a
block of ``--per-block`` timed calls (after one untimed call) of every provider, in an order
rotated every round, so that a load change on a shared machine hits every provider alike.
p50/p95 are nearest-rank over all samples of a provider. Ratios are from this one run.
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

import ddo_fast
from ddo_fast import _library
from ddo_fast.bench import cases as C
from ddo_fast.bench import timing as T
from ddo_fast.bench.runner import machine_info

TOKEN = (8, 680, 4096)
DIFFUSION = (64, 4, 64, 64)


def _steps(case: C.Case, name: str) -> list:
    return [case.step(name, i) for i in range(len(case.sets))]


def _providers(isas: tuple[str, ...], cache: int) -> dict[str, dict[str, tuple]]:
    """{case: {provider: (steps, isa or None)}}."""
    f32 = torch.float32
    n = C.sets_for(2 * 4 * torch.Size(TOKEN).numel(), cache)  # logits + gradient, fp32
    token = C.token_case(
        TOKEN, f32, "cpu", providers=("eager", "cross_entropy", "ddo_fast"), sets=n
    )
    floor = C.floor_case("token", TOKEN, f32, "cpu", sets=n)
    # pred, pred_ref, target and the gradient, fp32
    n_diff = C.sets_for(4 * 4 * torch.Size(DIFFUSION).numel(), cache)
    diff = C.diffusion_case(DIFFUSION, f32, "cpu", providers=("eager", "ddo_fast"), sets=n_diff)
    diff_floor = C.floor_case("diffusion", DIFFUSION, f32, "cpu", sets=n_diff)
    copy = C.copy_case(diff.min_bytes, "cpu", sets=len(diff.sets))
    out = {
        "token_logprobs[8x680x4096,float32]": {
            **{f"ddo_fast_{isa}": (_steps(token, "ddo_fast"), isa) for isa in isas},
            "eager": (_steps(token, "eager"), None),
            "cross_entropy": (_steps(token, "cross_entropy"), None),
            "floor_touched": (_steps(floor, "floor_touched"), None),
            "floor_fresh": (_steps(floor, "floor_fresh"), None),
        },
        "diffusion_ddo[64x4x64x64,float32]": {
            **{f"ddo_fast_{isa}": (_steps(diff, "ddo_fast"), isa) for isa in isas},
            "eager": (_steps(diff, "eager"), None),
            "floor_touched": (_steps(diff_floor, "floor_touched"), None),
            "floor_fresh": (_steps(diff_floor, "floor_fresh"), None),
            "copy_min_bytes": (_steps(copy, "copy"), None),
        },
    }
    # Every ISA computes what eager does (the runner's check, per ISA).
    for case, ref_name in ((token, "eager"), (diff, "eager")):
        ref = case.step(ref_name)()
        for isa in isas:
            _library.load_ops()._set_cpu_isa(isa)
            got = case.step("ddo_fast")()
            for a, b in zip(got, ref, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    return out


def run(rounds: int, per_block: int) -> dict:
    module = _library.load_ops()
    default = module.cpu_isa()
    isas = _library.supported_cpu_isas()
    cache = T.cache_bytes("cpu")
    load_before = os.getloadavg()
    uptime_before = _uptime()
    start = time.time()
    table = _providers(isas, cache)
    results: dict[str, dict] = {}
    for case, providers in table.items():
        samples = {name: [] for name in providers}
        names = list(providers)
        for r in range(rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                steps, isa = providers[name]
                module._set_cpu_isa(isa or default)
                samples[name] += T.wall(steps, "cpu", per_block, warmup=1)
        module._set_cpu_isa(default)
        results[case] = {name: T.summary(s) for name, s in samples.items()}
    ratios = {}
    for case, stats in results.items():
        ratios[case] = {}
        for isa in isas:
            mine = stats[f"ddo_fast_{isa}"]
            row = {}
            for q in ("p50_ms", "p95_ms"):
                tag = q.removesuffix("_ms")
                for ref in ("eager", "cross_entropy"):
                    if ref in stats:
                        row[f"x_{ref}_{tag}"] = stats[ref][q] / mine[q]
                for fl in ("floor_touched", "floor_fresh", "copy_min_bytes"):
                    if fl in stats:
                        row[f"over_{fl}_{tag}"] = mine[q] / stats[fl][q]
                row[f"x_baseline_isa_{tag}"] = stats["ddo_fast_baseline"][q] / mine[q]
                # a lower bound is the lower floor of this run at this percentile
                floor = min(("floor_touched", "floor_fresh"), key=lambda f, q=q: stats[f][q])
                row[f"floor_matched_{tag}"] = floor
                row[f"over_floor_{tag}"] = mine[q] / stats[floor][q]
            ratios[case][isa] = row
    info = machine_info("cpu")
    info |= {
        "cpu_isas": list(isas),
        "default_isa": default,
        "cpu_alloc": _alloc_policy(),
        "loadavg_before": load_before,
        "uptime_before": uptime_before,
        "uptime_after": _uptime(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "nice": os.nice(0),
        "loadavg_after": os.getloadavg(),
        "seconds": time.time() - start,
    }
    return {
        "meta": info,
        "command": "python benchmarks/bench_isa_cpu.py " + " ".join(sys.argv[1:]),
        "method": __doc__.split("Method: ", 1)[1].strip(),
        "results": results,
        "ratios": ratios,
    }


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def _alloc_policy() -> str | None:
    try:
        from ddo_fast import _alloc

        return _alloc.cpu_alloc()
    except (ImportError, AttributeError, RuntimeError):
        return None


def format_table(result: dict) -> str:
    lines = [
        f"CPU: {result['meta'].get('cpu')}, {result['meta']['threads']} threads, ISAs "
        f"{', '.join(result['meta']['cpu_isas'])}; load average before/after "
        f"{result['meta']['loadavg_before'][0]:.1f}/{result['meta']['loadavg_after'][0]:.1f}",
        "",
        "| case | provider | p50 ms | p95 ms | n |",
        "|---|---|---|---|---|",
    ]
    for case, stats in result["results"].items():
        for name, s in stats.items():
            lines.append(f"| {case} | {name} | {s['p50_ms']:.2f} | {s['p95_ms']:.2f} | {s['n']} |")
    lines += ["", "| case | ISA | ratio | p50 | p95 |", "|---|---|---|---|---|"]
    for case, by_isa in result["ratios"].items():
        for isa, row in by_isa.items():
            ratio_keys = {k.rsplit("_", 1)[0] for k, v in row.items() if k.endswith("_p50")}
            for key in sorted(k for k in ratio_keys if not k.startswith("floor_matched")):
                lines.append(
                    f"| {case} | {isa} | {key} | {row[key + '_p50']:.2f} | "
                    f"{row[key + '_p95']:.2f} |"
                )
            lines.append(
                f"| {case} | {isa} | floor_matched | {row['floor_matched_p50']} | "
                f"{row['floor_matched_p95']} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--per-block", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results_isa_cpu.json"))
    args = parser.parse_args(argv)
    if not hasattr(ddo_fast, "cpu_isa"):
        raise SystemExit("this ddo_fast has no ISA dispatch")
    result = run(args.rounds, args.per_block)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(result))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
