"""pytest-benchmark harness: `pytest benchmarks/ --benchmark-only [--bench-full]`.

Each benchmark times one provider's forward+backward step of one case; on CUDA the step
synchronises the device inside the timed function, so the time is the device's, not the
launch's. GB/s over the case's minimum bytes goes into ``extra_info``.
"""

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--bench-full", action="store_true", help="all shapes, not the quick set")


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_generate_tests(metafunc):
    """Each bench module lists QUICK and FULL (shape, dtype) sets; --bench-full picks FULL."""
    if "shape_dtype" in metafunc.fixturenames:
        full = metafunc.config.getoption("--bench-full")
        cases = metafunc.module.FULL if full else metafunc.module.QUICK
        metafunc.parametrize("shape_dtype", cases, ids=[f"{s}-{d}" for s, d in cases])


@pytest.fixture
def run_case(benchmark):
    def run(case, provider: str) -> None:
        step = case.providers[provider]

        def timed():
            step()
            if DEVICE == "cuda":
                torch.cuda.synchronize()

        benchmark.group = case.name
        benchmark.extra_info["min_bytes"] = case.min_bytes
        benchmark.pedantic(timed, rounds=5 if DEVICE == "cpu" else 50, warmup_rounds=1)
        median = benchmark.stats.stats.median
        benchmark.extra_info["GBps_over_min_bytes"] = case.min_bytes / median / 1e9

    return run
