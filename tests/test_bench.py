"""The benchmark runner: every provider's output is checked, every row carries both percentiles,
the cold call and its method, and a provider computing something else is caught."""

import math

import pytest
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
    assert len(fused) == 2
    for r in fused:
        floors = {x["provider"]: x for x in rows if x["case"] == r["case"] and x["kind"] == "floor"}
        assert set(floors) == {"floor_touched", "floor_fresh"}
        for q in ("p50", "p95"):
            # the ratio is over the lower of the two floors at that percentile, from these rows
            matched = r["floor_matched"][q]
            lower = min(f[f"wall_{q}_ms"] for f in floors.values())
            assert floors[matched][f"wall_{q}_ms"] == lower
            want = r[f"wall_{q}_ms"] / floors[matched][f"wall_{q}_ms"]
            assert r[f"over_floor_{q}"] == pytest.approx(want, rel=1e-12)
    assert result["meta"]["git_dirty"] in (True, False, None)
    assert result["meta"]["git_head"] is None or len(result["meta"]["git_head"]) == 40
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


def test_floor_samples_are_interleaved_with_the_providers(monkeypatch):
    """The floor is timed in the same rotation as the providers (round by round), not after
    them: the call log of one case alternates between the op's providers and the floors."""
    _no_compile(monkeypatch)
    calls = []
    case = C.diffusion_case((4, 3, 8, 8), torch.float32, "cpu", providers=("eager", "ddo_fast"))
    floor = C.floor_case("diffusion", (4, 3, 8, 8), torch.float32, "cpu")
    for c in (case, floor):
        for name, fn in list(c.fns.items()):
            c.fns[name] = lambda *a, fn=fn, name=name: calls.append(name) or fn(*a)
    clocks = runner._Clocks("cpu", rounds=3, batch=1)
    stats, floor_stats = runner._time_case(case, clocks, lambda s: None, floor)
    assert set(stats) == {"eager", "ddo_fast"}
    assert set(floor_stats) == {"floor_touched", "floor_fresh"}
    timed = calls[4:]  # after the 4 cold calls
    first_floor = min(timed.index("floor_touched"), timed.index("floor_fresh"))
    last_op = max(i for i, n in enumerate(timed) if n in ("eager", "ddo_fast"))
    assert first_floor < last_op  # interleaved: a floor ran before the providers were done


def test_floor_touched_buffer_comes_from_the_kernels_allocator():
    """floor_touched writes into memory from ``empty_large`` (the op's own allocator under the
    default pool policy), the same buffer on every call."""
    from ddo_fast import _alloc

    shape = (2, 256, 1024)  # 2 MiB: the size from which the allocator's policy applies
    before = _alloc.cpu_alloc("pool")
    try:
        floor = C.floor_case("token", shape, torch.float32, "cpu")
    finally:
        _alloc.cpu_alloc(before)
    reads, out = floor.sets[0]
    assert out.numel() == math.prod(shape) and out.dtype == torch.float32
    assert out.data_ptr() % (2 << 20) == 0  # 2 MiB aligned: not torch.zeros' memory
    ptr = out.data_ptr()
    floor.step("floor_touched")()
    assert out.data_ptr() == ptr
    torch.testing.assert_close(out.double(), reads[0].double().exp(), rtol=3e-7, atol=0)


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
