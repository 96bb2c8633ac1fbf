"""pytest-benchmark harness: `pytest benchmarks/ --benchmark-only [--bench-full]`.

Each benchmark times one provider's forward+backward step of one case. Before every round an
untimed setup flushes the last-level cache (a buffer of >= 4x the CPU LLC or GPU L2 is zeroed,
``ddo_fast.bench.timing.Flusher``), so no round finds its inputs cached; on CUDA the step
synchronises the device inside the timed function, so the time is the device's plus the host's
launch cost (``ddo-fast bench`` separates the two clocks). GB/s over the case's minimum bytes
goes into ``extra_info``.
"""

import pytest
import torch

from ddo_fast.bench.timing import Flusher


def pytest_addoption(parser):
    parser.addoption("--bench-full", action="store_true", help="all shapes, not the quick set")


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_generate_tests(metafunc):
    """Each bench module lists QUICK and FULL (shape, dtype) sets; --bench-full picks FULL."""
    if "shape_dtype" in metafunc.fixturenames:
        full = metafunc.config.getoption("--bench-full")
        cases = metafunc.module.FULL if full else metafunc.module.QUICK
        metafunc.parametrize("shape_dtype", cases, ids=[f"{s}-{d}" for s, d in cases])


@pytest.fixture(scope="session")
def flush():
    return Flusher(DEVICE)


@pytest.fixture
def run_case(benchmark, flush):
    def run(case, provider: str) -> None:
        step = case.providers[provider]

        def timed():
            step()
            if DEVICE == "cuda":
                torch.cuda.synchronize()

        def setup():
            flush()
            if DEVICE == "cuda":
                torch.cuda.synchronize()

        benchmark.group = case.name
        benchmark.extra_info["min_bytes"] = case.min_bytes
        benchmark.extra_info["method"] = "per round: LLC/L2 flushed (untimed), one synced call"
        rounds = 5 if DEVICE == "cpu" else 50
        benchmark.pedantic(timed, setup=setup, rounds=rounds, warmup_rounds=1)
        median = benchmark.stats.stats.median
        benchmark.extra_info["GBps_over_min_bytes"] = case.min_bytes / median / 1e9

    return run
