"""The benchmark runner: every provider's output is checked, every row carries both percentiles,
the cold call and its method, and a provider computing something else is caught."""

import math

import torch

from ddo_fast.bench import cases as C
from ddo_fast.bench import runner, timing

TINY = [
    ("diffusion", (4, 3, 8, 8), torch.float32),
    ("token", (2, 5, 33), torch.bfloat16),
    ("ar", (4, 5, 33), torch.float32),
]


def _no_compile(monkeypatch):
    """torch.compile costs seconds per case on CPU; the eager function stands in for it."""
    monkeypatch.setattr(C, "compiled", lambda fn: fn)


def test_run_rows_have_both_percentiles_cold_and_method(monkeypatch, tmp_path):
    _no_compile(monkeypatch)
    result = runner.run(device="cpu", rounds=3, memory=False, cases=TINY, log=lambda s: None)
    rows = result["rows"]
    ops = [r for r in rows if r["kind"] == "op"]
    assert {r["provider"] for r in ops} == {"eager", "cross_entropy", "compile", "ddo_fast"}
    for r in ops:
        assert r["check"] == "ok", r
        assert r["wall_p50_ms"] <= r["wall_p95_ms"]
        assert r["cold_ms"] > 0 and r["bandwidth_clock"] == "wall"
        assert math.isfinite(r["pct_copy"]) and math.isfinite(r["x_eager_wall"])
    kinds = {r["case"]: {x["kind"] for x in rows if x["case"] == r["case"]} for r in ops}
    assert kinds["ar_ddo[4x5x33,float32]"] == {"op", "copy", "floor"}
    assert kinds["diffusion_ddo[4x3x8x8,float32]"] == {"op", "copy", "floor"}
    fused = [r for r in ops if r["provider"] == "ddo_fast" and r["dtype"] == "float32"]
    assert len(fused) == 2 and all(r["over_floor_p95"] >= 0 for r in fused)
    assert kinds["token_logprobs[2x5x33,bfloat16]"] == {"op", "copy"}  # the floor is fp32 only
    assert {"wall", "cold", "copy", "bandwidth"} <= set(result["meta"]["methods"])
    table = runner.format_table(result)
    assert "wall p95" in table and "cold ms" in table and "floor_fresh" in table
    paths = runner.write_outputs(result, tmp_path)
    assert (tmp_path / "bench.json").exists() and paths


def test_check_catches_a_wrong_gradient():
    case = C.ar_case((2, 4, 9), torch.float32, "cpu", providers=("eager", "ddo_fast"))
    outputs = {name: case.step(name)() for name in case.fns}
    assert set(runner.check_outputs(outputs, torch.float32).values()) == {"ok"}
    value, grad = outputs["ddo_fast"]
    outputs["ddo_fast"] = (value, grad * 1.01)
    assert runner.check_outputs(outputs, torch.float32)["ddo_fast"].startswith("MISMATCH")


def test_sets_cover_four_times_the_cache():
    assert C.sets_for(10, 100) == 40
    assert C.sets_for(1000, 100) == 1
    assert C.sets_for(1, 10**9) == 64  # capped
    assert timing.cache_bytes("cpu") > 0


def test_summary_percentiles_nearest_rank():
    s = timing.summary([i / 1e3 for i in range(1, 101)])
    assert s["p50_ms"] == 50 and s["p95_ms"] == 95 and s["n"] == 100


def test_host_report_on_cpu_with_triton_launches_stubbed(tmp_path, monkeypatch):
    """``--stub-triton`` times the Triton route's Python part: launches really are skipped
    inside the context (a kernel output keeps the sentinel it was given), restored after."""
    import json
    import os

    import pytest

    from ddo_fast import _backend
    from ddo_fast.bench import host

    if not _backend.TRITON_INTERPRET:
        pytest.skip("needs TRITON_INTERPRET=1 (set by .ci/run and tests/conftest.py)")
    from ddo_fast.kernels import launch
    from ddo_fast.kernels.token_logprobs import stats_kernel

    def run_kernel() -> torch.Tensor:
        x = torch.randn(1, 1, 4)
        logp = torch.full((1,), 123.0)
        stats = torch.empty(2, 1)
        y = torch.zeros(1, dtype=torch.long)
        stats_kernel[(1,)](x, y, logp, stats, 1, 1, 4, 4, 4, -100, BLOCK_V=4, SINGLE=True)
        return logp

    monkeypatch.delenv("DDO_FAST_BACKEND", raising=False)
    with launch.stubbed_launches():
        assert launch.STUBBED
        assert run_kernel().item() == 123.0  # the kernel did not run
    assert not launch.STUBBED
    assert run_kernel().item() != 123.0  # and runs again afterwards
    argv = ["--device", "cpu", "--stub-triton", "--calls", "18", "--out", str(tmp_path)]
    assert host.main(argv) == 0
    assert "DDO_FAST_BACKEND" not in os.environ  # restored
    result = json.loads((tmp_path / "host.json").read_text())
    assert result["stub_triton"] and "cpu" in result["machine"]
    assert {r["op"] for r in result["host"]} == {"ddo_loss", *host.TINY}
    assert all(r["stubbed_launches"] and r["host_us"] > 0 for r in result["host"])
