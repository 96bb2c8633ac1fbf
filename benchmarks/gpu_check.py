"""One-command GPU verification: build, CUDA tests, the bench suite, the host-overhead report.

    python benchmarks/gpu_check.py [--out DIR] [--stage all|build|tests|bench|host] [--quick]

A thin wrapper for a CUDA machine that has torch and triton and no network; the numbers come
from the same code as ``ddo-fast bench --device cuda`` (``ddo_fast.bench.runner``) and
``python -m ddo_fast.bench.host``. Stages, each independent of the others' success:

``build``  ``pip install --no-build-isolation --no-deps --no-index -e .``; if that fails,
           ``python setup.py build_ext --inplace`` (later stages get the repo on ``PYTHONPATH``).
``tests``  ``pytest -m "not slow"`` on the CUDA machine (tests run their CUDA variants when a
           GPU is present), junit XML and a summary under ``--out/tests``.
``bench``  the CUDA suite with both clocks (CUDA-graph device time, L2 flushed before each
           replay; eager wall time) and the cold first call, every provider checked against
           eager first; ``--out/bench/bench.{json,txt,csv,png}`` (``bench.partial.json`` after
           every case, so a run cut short keeps what it measured).
``host``   host time per fused forward+backward at a tiny size (target <= 100 us), the
           torch.profiler table per op, and wall/graph ratios at the headline sizes;
           ``--out/host``.

benchmarks/gpu_run.sh runs these stages under time limits for a lent GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("build", "tests", "bench", "host")


def _run(cmd: list[str], log: Path, timeout: float, **kw) -> int:
    """Run ``cmd`` with its output in ``log``; past ``timeout`` it gets SIGINT first (pytest
    then still writes its summary and junit XML), SIGKILL 20 s later."""
    start = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, text=True, **kw)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            rc = 124
            f.write(f"\nTIMEOUT after {timeout:.0f}s\n")
    print(f"[{log.stem}] rc={rc} in {time.time() - start:.0f}s: {' '.join(cmd)[:160]}")
    return rc


def build(out: Path) -> int:
    """Editable install against the machine's torch; in-place build as the fallback."""
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps"]
    rc = _run(pip + ["--no-index", "-e", str(ROOT)], out / "build_pip.log", 600, cwd=ROOT)
    if rc == 0:
        return 0
    rc = _run(
        [sys.executable, "setup.py", "build_ext", "--inplace"], out / "build_ext.log", 600, cwd=ROOT
    )
    link = ROOT / "ddo_fast" / "kernels"
    if rc == 0 and not link.exists():
        link.symlink_to(ROOT / "kernels")  # setup.py's package_dir mapping, for the in-place tree
    print(f"[build] in place: run with PYTHONPATH={ROOT}")
    return rc


def tests(out: Path, timeout: float = 240) -> int:
    """``pytest -m "not slow"`` with junit XML; CUDA variants run because a GPU is present."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "not slow", "-p", "no:cacheprovider"]
    cmd += ["--tb=short", f"--junitxml={out / 'junit.xml'}", str(ROOT / "tests")]
    if importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", "8"]  # Triton/inductor compiles dominate: spread them over the cores
    if importlib.util.find_spec("pytest_timeout") is not None:
        cmd += ["--timeout", "120"]  # one hung test must not eat the stage
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    rc = _run(cmd, out / "pytest.log", timeout, cwd=ROOT, env=env)
    lines = [ln for ln in (out / "pytest.log").read_text().splitlines() if ln.strip()]
    failed = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
    summary = failed[:40] + lines[-3:]
    (out / "summary.txt").write_text(f"rc={rc}\n" + "\n".join(summary) + "\n")
    print("\n".join(failed[:15] + lines[-1:]))
    return rc


def bench(out: Path, quick: bool, rounds: int | None) -> int:
    from ddo_fast.bench import runner

    result = runner.run(quick=quick, device="cuda", rounds=rounds, out=out)
    table = runner.format_table(result)
    print(table)
    (out / "bench.txt").write_text(table + "\n")
    runner.write_outputs(result, out)
    bad = [r for r in result["rows"] if str(r.get("check", "")).startswith("MISMATCH")]
    failed = [r for r in result["rows"] if r.get("kind") == "error"]
    return 1 if bad or failed else 0


def host(out: Path) -> int:
    from ddo_fast.bench.host import main as host_main

    return host_main(["--device", "cuda", "--out", str(out)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu-check-out"))
    parser.add_argument("--stage", choices=("all", *STAGES), default="all")
    parser.add_argument("--quick", action="store_true", help="the short CUDA bench suite")
    parser.add_argument("--rounds", type=int, help="samples per clock (default 50)")
    parser.add_argument("--tests-timeout", type=float, default=240)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.stage == "all":
        # Each stage in a fresh interpreter: the editable install's import hook is read at
        # start-up, and a stage that crashes must not take the others with it.
        rcs = {}
        # The repo on the path: needed after an in-place build, harmless after pip install -e.
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        env = os.environ | {"PYTHONPATH": path}
        for stage in STAGES:
            cmd = [sys.executable, __file__, "--stage", stage, "--out", str(out)]
            cmd += ["--quick"] if args.quick else []
            cmd += ["--rounds", str(args.rounds)] if args.rounds else []
            rcs[stage] = subprocess.run(cmd, env=env).returncode
        (out / "summary.json").write_text(json.dumps(rcs, indent=1))
        print(f"[gpu_check] stage return codes: {rcs}")
        return max(rcs.values())
    if args.stage == "build":
        return build(out)
    if args.stage == "tests":
        return tests(out / "tests", args.tests_timeout)
    if args.stage == "bench":
        return bench(out / "bench", args.quick, args.rounds)
    return host(out / "host")


if __name__ == "__main__":
    sys.exit(main())
