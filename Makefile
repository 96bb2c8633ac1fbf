# ddo_fast: `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
VPY    := $(VENV)/bin/python
# Rebuild the extension only when a source or the build files change.
STAMP  := $(VENV)/.ddo_fast-built
SOURCES := $(wildcard csrc/*.cpp csrc/cpu/*.cpp csrc/cpu/*.h csrc/cpu/isa/*.cpp csrc/cpu/isa/*.h \
	csrc/cuda/*.cu) setup.py pyproject.toml ddo_fast/_build.py

.PHONY: setup demo test bench bench-quick lint gpu-check clean wheel

$(VPY):
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip

# torch==2.13.0 only when no torch is importable (that release is the CPU build on local disk;
# a bare `torch` would pull a multi-GB CUDA build). The development install builds the C++ CPU
# kernels ahead of time (DDO_FAST_BUILD_OPS=1, against the installed torch, hence no build
# isolation), so tests never wait for the first-use (JIT) build; tests/test_install.py covers
# that path from a wheel.
$(STAMP): $(VPY) $(SOURCES)
	@$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q "setuptools>=64" wheel
	DDO_FAST_BUILD_OPS=1 $(VPY) -m pip install -q --no-build-isolation -e ".[test,bench,examples]"
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

# The pure-Python wheel users get from `pip install .` (C++ CPU kernels compiled on first use).
wheel: $(VPY)
	$(VPY) -m pip wheel --no-deps -w dist .

clean:
	rm -rf build dist *.egg-info ddo_fast/_C*.so bench-out demo-out gpu-check-out
# ---- make test-compat: the extension under another torch and the GPU image's toolchain (not CI) --
# Builds the C++ extension the way the GPU machine's image does (its CXX=/opt/gcc/bin/g++ has only
# a static libstdc++; LDFLAGS=-static-libstdc++ makes any g++ do the same) against torch
# $(COMPAT_TORCH) in its own venv, then runs the CPU test suite there. The sources are copied to
# $(COMPAT_VENV)/src so that the in-place ddo_fast/_C*.so of .venv (another torch) is untouched.
# The default index has torch 2.11 only as a CUDA build (GBs of nvidia-* wheels): the target stops
# before downloading one. Point it at a CPU wheel with COMPAT_PIP_ARGS="--find-links DIR" (or a CPU
# wheel index), or run it with a CPU release on local disk: make test-compat COMPAT_TORCH=2.13.0
COMPAT_VENV     ?= .venv-compat
COMPAT_TORCH    ?= 2.11.0
COMPAT_PIP_ARGS ?=
COMPAT_LDFLAGS  ?= -static-libstdc++
COMPAT_PYTEST   ?= tests
CVPY := $(COMPAT_VENV)/bin/python

.PHONY: test-compat
test-compat:
	test -x $(CVPY) || $(PYTHON) -m venv $(COMPAT_VENV)
	$(CVPY) -m pip install -q --upgrade pip "setuptools>=64" wheel
	$(CVPY) -m pip install -q --dry-run --no-deps --ignore-installed $(COMPAT_PIP_ARGS) \
		--report $(COMPAT_VENV)/torch.json "torch==$(COMPAT_TORCH)"
	$(CVPY) -c "import json, sys; m = json.load(open('$(COMPAT_VENV)/torch.json'))['install'][0]['metadata']; \
		cuda = [r for r in m.get('requires_dist') or [] if r.startswith(('nvidia-', 'cuda-'))]; \
		sys.exit('test-compat: torch ' + m['version'] + ' resolves to a CUDA build (' + cuda[0] + ', ...): ' \
		'give a CPU wheel with COMPAT_PIP_ARGS' if cuda else 0)"
	$(CVPY) -m pip install -q $(COMPAT_PIP_ARGS) "torch==$(COMPAT_TORCH)"
	rm -rf $(COMPAT_VENV)/src && mkdir -p $(COMPAT_VENV)/src
	tar -c --exclude=./.git --exclude='./.venv*' --exclude=./build --exclude=./dist --exclude='*.so' \
		--exclude=__pycache__ --exclude=./bench-out --exclude=./demo-out . | tar -x -C $(COMPAT_VENV)/src
	cd $(COMPAT_VENV)/src && LDFLAGS="$(COMPAT_LDFLAGS)" ../bin/python -m pip install -q \
		--no-build-isolation -e ".[test]"
	cd $(COMPAT_VENV)/src && ../bin/python -m pytest -q -p no:cacheprovider $(COMPAT_PYTEST)
