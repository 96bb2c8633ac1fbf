#!/usr/bin/env bash
# One run on a lent GPU (H100/H200, torch 2.11+cu130, triton 3.6, no network), from the repo
# root of a fresh copy of the repository (nothing prebuilt):
#
#     bash benchmarks/gpu_run.sh            # writes everything under $OUT (default ./gpu-run-out)
#
# Stages, each under `timeout` and independent (a failing stage does not stop the next):
#   env    versions, nvidia-smi, L2 size                                   (~5 s)
#   build  pip install --no-build-isolation --no-deps --no-index -e . against the machine's
#          torch; fallback: python setup.py build_ext --inplace + PYTHONPATH  (~40-90 s, cap 120)
#   bench  the CUDA bench suite, both clocks (graph + wall), cold call, p50/p95, checks
#          (ddo-fast bench --device cuda, via gpu_check.py --stage bench)     (~120-180 s, cap 200)
#   host   host overhead per call at tiny size, profiler tables, wall/graph (~20-40 s, cap 90)
#   tests  pytest -m "not slow" on CUDA, junit XML                   (the time left, cap 200)
#   summary  $OUT/SUMMARY.txt: stage return codes and durations, the tables
# The whole run stays under GPU_RUN_TOTAL_S seconds (default 450): each stage's limit is the
# smaller of its cap and the time left, keeping a reserve for the stages after it.
# GPU_RUN_STAGES picks stages (default "env build bench host tests"); GPU_RUN_ROUNDS sets the
# samples per clock (default 40).
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu-run-out}
mkdir -p "$OUT"
START=$(date +%s)
TOTAL=${GPU_RUN_TOTAL_S:-450}
ROUNDS=${GPU_RUN_ROUNDS:-40}
PY=${PYTHON:-python3}
export PATH="$(dirname "$("$PY" -c 'import sys; print(sys.executable)')"):$PATH"  # ninja
export MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
: >"$OUT/stages.tsv"

# stage NAME CAP RESERVE CMD...: run CMD with a limit of min(CAP, time left - RESERVE) seconds.
STAGES=" ${GPU_RUN_STAGES:-env build bench host tests} "
stage() {
    local name=$1 cap=$2 reserve=$3
    shift 3
    case "$STAGES" in *" $name "*) ;; *) return ;; esac
    local left=$((START + TOTAL - $(date +%s) - reserve))
    local limit=$((cap < left ? cap : left))
    if [ "$limit" -lt 10 ]; then
        printf '%s\tskipped\t0\tno time left\n' "$name" >>"$OUT/stages.tsv"
        echo "[$name] skipped: no time left"
        return
    fi
    local t0=$(date +%s)
    echo "[$name] limit ${limit}s: $*"
    # `timeout` runs programs, not shell functions: run a function in a child bash (exported below).
    if declare -F "$1" >/dev/null; then
        timeout -k 10 "$limit" bash -c '"$@"' _ "$@" >"$OUT/$name.log" 2>&1
    else
        timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    fi
    local rc=$?
    printf '%s\t%s\t%s\tlimit %s\n' "$name" "$rc" "$(($(date +%s) - t0))" "$limit" >>"$OUT/stages.tsv"
    echo "[$name] rc=$rc in $(($(date +%s) - t0))s"
    tail -n 5 "$OUT/$name.log"
}

env_info() {
    "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton; print("triton", triton.__version__)
except ImportError as e:
    print("triton missing", e)
import numpy, setuptools; print("numpy", numpy.__version__, "setuptools", setuptools.__version__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(torch.cuda.get_device_name(), "SMs", p.multi_processor_count,
          "L2 MiB", getattr(p, "L2_cache_size", 0) / 2**20, "mem GiB", p.total_memory / 2**30)
EOF
    command -v ninja && ninja --version
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.total --format=csv
}

build() {
    # Against the machine's torch: no build isolation (it would want a torch from the network).
    if "$PY" -m pip install -q --no-build-isolation --no-deps --no-index -e . &&
        (cd /tmp && "$PY" -c "import ddo_fast, ddo_fast.kernels"); then
        echo "editable install OK"
        return 0
    fi
    echo "pip editable install failed or not importable; building in place"
    "$PY" setup.py build_ext --inplace || return 1
    [ -e ddo_fast/kernels ] || ln -s ../kernels ddo_fast/kernels  # setup.py's package_dir
    echo "in-place build OK (stages run with PYTHONPATH=$ROOT)"
    touch "$OUT/.inplace"
}

export -f env_info build
export PY OUT ROOT
stage env 30 0 env_info
stage build 120 250 build
if [ -e "$OUT/.inplace" ]; then export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}; fi
stage bench 200 110 "$PY" benchmarks/gpu_check.py --stage bench --rounds "$ROUNDS" --out "$OUT"
stage host 90 40 "$PY" -m ddo_fast.bench.host --device cuda --out "$OUT/host"
# pytest gets SIGINT 30 s before the stage's limit, so that it still writes junit XML.
TESTS_LIMIT=$((START + TOTAL - $(date +%s) - 15))
TESTS_LIMIT=$((TESTS_LIMIT < 200 ? TESTS_LIMIT : 200))
stage tests 200 15 "$PY" benchmarks/gpu_check.py --stage tests --out "$OUT" \
    --tests-timeout $((TESTS_LIMIT > 50 ? TESTS_LIMIT - 30 : 20))

# A bench cut short by its limit still leaves bench.partial.json: tabulate it.
if [ ! -e "$OUT/bench/bench.json" ] && [ -e "$OUT/bench/bench.partial.json" ]; then
    timeout 30 "$PY" -c "
import json, sys
from ddo_fast.bench import runner
r = json.load(open(sys.argv[1]))
open(sys.argv[2], 'w').write(runner.format_table(r) + '\n')
" "$OUT/bench/bench.partial.json" "$OUT/bench/bench.txt" >>"$OUT/bench.log" 2>&1
fi

{
    echo "gpu_run.sh summary ($(date -u +%FT%TZ), $(($(date +%s) - START)) s in all)"
    echo
    echo "stage	rc	seconds	note"
    cat "$OUT/stages.tsv"
    echo
    echo "== env"
    cat "$OUT/env.log" 2>/dev/null
    echo
    echo "== tests"
    cat "$OUT/tests/summary.txt" 2>/dev/null || tail -n 20 "$OUT/tests.log" 2>/dev/null
    echo
    echo "== bench ($([ -e "$OUT/bench/bench.json" ] && echo complete || echo PARTIAL))"
    cat "$OUT/bench/bench.txt" 2>/dev/null || tail -n 40 "$OUT/bench.log" 2>/dev/null
    echo
    echo "== host"
    cat "$OUT/host/host.txt" 2>/dev/null || tail -n 40 "$OUT/host.log" 2>/dev/null
} >"$OUT/SUMMARY.txt"
echo "wrote $OUT/SUMMARY.txt ($(($(date +%s) - START)) s)"
