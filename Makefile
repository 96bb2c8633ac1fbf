# ddo_fast: `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
VPY    := $(VENV)/bin/python
# Rebuild the extension only when a source or the build files change.
STAMP  := $(VENV)/.ddo_fast-built
SOURCES := $(wildcard csrc/*.cpp csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu) setup.py pyproject.toml

.PHONY: setup demo test bench bench-quick lint gpu-check clean

$(VPY):
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip

# torch==2.13.0 only when no torch is importable (that release is the CPU build on local disk;
# a bare `torch` would pull a multi-GB CUDA build). The build needs no isolation: torch is
# deliberately not a build requirement.
$(STAMP): $(VPY) $(SOURCES)
	@$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q "setuptools>=64" wheel
	$(VPY) -m pip install -q --no-build-isolation -e ".[test,bench,examples]"
	@touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VPY) -m ddo_fast demo --out demo-out

test: setup
	$(VPY) -m pytest -q tests

bench-quick: setup
	$(VPY) -m ddo_fast bench --quick --out bench-out

bench: setup
	$(VPY) -m ddo_fast bench --out bench-out

lint: setup
	$(VPY) -m pip install -q ruff
	$(VPY) -m ruff check ddo_fast kernels tests benchmarks setup.py

# On a CUDA machine with torch and triton installed (no venv): build, CUDA tests, timings.
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py --out gpu-check-out

clean:
	rm -rf build *.egg-info ddo_fast/_C*.so bench-out demo-out gpu-check-out
