"""The ``ddo_fast`` operator schemas, and the C++ CPU kernels loaded (or compiled) on first use.

``import ddo_fast`` needs no compiled code: the schemas are defined here, the fake/autograd/
Triton registrations of ``ddo_fast.ops`` attach to them, and CUDA tensors run the Triton kernels.
The C++ CPU kernels (``csrc/``) register themselves for the CPU dispatch key when their module is
imported, by :func:`load_ops`:

* the ahead-of-time build ``ddo_fast._C`` when the install has one (``DDO_FAST_BUILD_OPS=1`` or
  ``pip install --no-build-isolation``, ``make setup``): loaded at ``import ddo_fast``;
* otherwise a just-in-time build, compiled by ``torch.utils.cpp_extension.load`` (ninja) on the
  first CPU operator call into the torch extensions cache (``$TORCH_EXTENSIONS_DIR``, default
  ``~/.cache/torch_extensions``), once per source/torch/Python/compiler combination; later
  processes import the cached library without compiling. ``DDO_FAST_JIT=1`` uses this path even
  where ``ddo_fast._C`` exists.

Until then each operator has a stand-in CompositeExplicitAutograd kernel that calls
:func:`load_ops` and runs the operator again: the C++ kernels then hold the CPU key, which takes
precedence over the composite one, so the stand-in never runs again on CPU (and raises on any
device that has no kernel instead of looping).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

import torch

from . import _build

# ----------------------------------------------------------------------------- the schemas
# Implementations register per dispatch key: CPU in csrc/cpu/*.cpp (C++), CUDA from Python
# (Triton, kernels/*.py), Meta/autograd from ddo_fast/ops/*.py. `reduction` is a Reduction code
# (csrc/cpu/reduction.h, mirrored by ddo_fast._reduction.Reduction). `group_scale` [2] fp32 is the
# scale each group's per-sample losses get in the reduction: (1/n_real, 1/n_fake) for mean, (1, 1)
# otherwise. Every tensor is read in its own dtype; gradients come back in the dtype of the
# tensor they belong to.
SCHEMAS = (
    # Loss head on per-sample log-ratios r [B]: returns (out, group_scale) where out is the
    # reduced fp32 loss (scalar) or the per-sample loss [B]. The backward returns d logratio.
    "ddo_loss_fwd(Tensor logratio, Tensor is_real, Tensor? sample_weight, float alpha, "
    "float beta, int reduction) -> (Tensor, Tensor)",
    "ddo_loss_bwd(Tensor grad_out, Tensor logratio, Tensor is_real, Tensor? sample_weight, "
    "Tensor group_scale, float alpha, float beta, int reduction) -> Tensor",
    # Diffusion: r_b = -weight_b * sum_d[(pred-target)^2 - (pred_ref-target)^2]. With is_real
    # absent only r is computed (out is empty). Returns (out, logratio [B] fp32, group_scale [2]).
    "diffusion_ddo_fwd(Tensor pred, Tensor pred_ref, Tensor target, Tensor weight, "
    "Tensor? is_real, Tensor? sample_weight, float alpha, float beta, int reduction) "
    "-> (Tensor, Tensor, Tensor)",
    "diffusion_ddo_bwd(Tensor? grad_out, Tensor? grad_logratio, Tensor pred, Tensor target, "
    "Tensor weight, Tensor logratio, Tensor? is_real, Tensor? sample_weight, "
    "Tensor group_scale, float alpha, float beta, int reduction) -> Tensor",
    # Token log-probs: returns (logp [B, L] fp32, stats [2, B, L] fp32) with stats[0] = m, the
    # row max, stats[1] = log sum_v exp(x_v - m), and logp = (x_t - m) - stats[1]; the backward
    # recomputes softmax = exp((x - m) - stats[1]).
    "token_logprobs_fwd(Tensor logits, Tensor targets, int ignore_index) -> (Tensor, Tensor)",
    "token_logprobs_bwd(Tensor grad, Tensor logits, Tensor targets, Tensor stats, "
    "int ignore_index) -> Tensor",
    # Autoregressive: r_b = sum_l logp[b, l] - ref_logprob_b. With is_real absent only r is
    # computed. Returns (out, logratio [B] fp32, group_scale [2], stats [2, B, L] fp32).
    "ar_ddo_fwd(Tensor logits, Tensor targets, Tensor? ref_logprob, Tensor? is_real, "
    "Tensor? sample_weight, float alpha, float beta, int ignore_index, int reduction) "
    "-> (Tensor, Tensor, Tensor, Tensor)",
    "ar_ddo_bwd(Tensor? grad_out, Tensor? grad_logratio, Tensor logits, Tensor targets, "
    "Tensor stats, Tensor logratio, Tensor? is_real, Tensor? sample_weight, "
    "Tensor group_scale, float alpha, float beta, int ignore_index, int reduction) -> Tensor",
)
OP_NAMES = tuple(s.split("(", 1)[0] for s in SCHEMAS)

_lib = torch.library.Library("ddo_fast", "FRAGMENT")  # module global: keeps the definitions alive
for _schema in SCHEMAS:
    _lib.define(_schema)

# ----------------------------------------------------------------------------- loading
_module: ModuleType | None = None
_lock = threading.Lock()


def load_ops() -> ModuleType:
    """Load the C++ CPU kernels (compiling them first if this install has no ahead-of-time
    build and the cache has none); returns their Python module. Idempotent and thread-safe."""
    global _module
    if _module is None:
        with _lock:
            if _module is None:
                _module = _load()
    return _module


def cpu_isa() -> str:
    """The instruction set the C++ CPU kernels run with: ``"avx512"``, ``"avx2"`` or
    ``"baseline"`` (the compiler's default target). The best one the CPU supports unless
    ``$DDO_FAST_CPU_ISA`` names one (read once per process). Loads the kernels."""
    return load_ops().cpu_isa()


def supported_cpu_isas() -> tuple[str, ...]:
    """The ISAs this build has and this CPU supports, best last."""
    return tuple(load_ops().supported_cpu_isas().split(","))


def _aot_available() -> bool:
    return importlib.util.find_spec("ddo_fast._C") is not None


def _load() -> ModuleType:
    if os.environ.get("DDO_FAST_JIT", "0") in ("", "0") and _aot_available():
        # A stale or ABI-incompatible _C raises here, naming its path: rebuild it, or delete it
        # to use the JIT build.
        from . import _C

        return _C
    return _jit_load()


def _jit_load() -> ModuleType:
    """Import the JIT build from the extensions cache, compiling it there first if needed."""
    from torch.utils import cpp_extension

    root = _build.source_root()
    cxx = os.environ.get("CXX", "c++")
    name = _build.jit_name(root, torch.__version__, cxx)
    cache = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root())
    build_dir = cache / "ddo_fast" / name
    library = build_dir / f"{name}.so"  # the name torch's JIT build gives it
    if library.is_file() and not (build_dir / "lock").exists():  # lock: a build in progress
        spec = importlib.util.spec_from_file_location(name, library)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return _compile(name, root, build_dir, cxx)


def _compile(name: str, root: Path, build_dir: Path, cxx: str) -> ModuleType:
    """Compile into ``build_dir`` with torch's JIT build (which waits on another process's build
    of the same name through its lock file) and import the result."""
    from torch.utils import cpp_extension

    if shutil.which(cxx.split()[0] if cxx.strip() else cxx) is None:
        raise RuntimeError(
            "ddo_fast: the C++ CPU kernels are compiled on their first use, and no C++ compiler "
            f"was found (CXX={cxx!r} is not on PATH). Install one (Debian/Ubuntu: "
            "`apt-get install g++`; conda: `conda install -c conda-forge gxx`) or set CXX; or "
            "install ddo_fast with the kernels built ahead of time (`DDO_FAST_BUILD_OPS=1 pip "
            "install --no-build-isolation ddo_fast`); or run without them (backend='torch', or "
            "backend='triton' on CUDA)."
        )
    _ninja_on_path()
    build_dir.mkdir(parents=True, exist_ok=True)
    print(
        f"ddo_fast: compiling the C++ CPU kernels (first use; once per install) into {build_dir}"
        " ...",
        file=sys.stderr,
        flush=True,
    )
    start = time.perf_counter()
    try:
        module = cpp_extension.load(
            name=name,
            sources=[str(p) for p in _build.sources(root)],
            extra_cflags=[*_build.cxx_flags(), f"-DDDO_FAST_MODULE_NAME={name}"],
            extra_ldflags=_build.link_flags(),
            build_directory=str(build_dir),
            verbose=os.environ.get("DDO_FAST_VERBOSE_BUILD", "0") not in ("", "0"),
            is_python_module=True,
        )
    except (RuntimeError, OSError) as exc:
        raise RuntimeError(
            f"ddo_fast: compiling the C++ CPU kernels in {build_dir} failed ({exc}). "
            "DDO_FAST_VERBOSE_BUILD=1 shows the compiler's output; backend='torch' runs without "
            "the kernels."
        ) from exc
    print(
        f"ddo_fast: C++ CPU kernels compiled in {time.perf_counter() - start:.0f} s",
        file=sys.stderr,
        flush=True,
    )
    return module


def _ninja_on_path() -> None:
    """torch's JIT build runs `ninja`; the `ninja` wheel (a dependency) puts it in the
    environment's scripts folder, which is not on PATH when the environment is not activated."""
    if shutil.which("ninja") is not None:
        return
    candidates = [Path(sys.executable).parent]
    try:
        import ninja  # the PyPI package

        candidates.insert(0, Path(ninja.BIN_DIR))
    except (ImportError, AttributeError):
        pass
    for folder in candidates:
        if (folder / "ninja").is_file():
            os.environ["PATH"] = f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"
            return
    raise RuntimeError(
        "ddo_fast: the C++ CPU kernels are compiled on their first use with ninja, which was "
        "not found: `pip install ninja`"
    )


# ----------------------------------------------------------------------------- stand-ins
def _device_of(args: tuple) -> torch.device | None:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
    return None


def _stand_in(op_name: str):
    def kernel(*args):
        device = _device_of(args)
        if device is None or device.type != "cpu" or _module is not None:
            # After loading, the C++ kernel holds the CPU key: reaching here again means a
            # device with no kernel of this operator.
            raise NotImplementedError(
                f"ddo_fast: operator {op_name} has no kernel for device {device}; use "
                "backend='torch' there (or install triton for CUDA)"
            )
        load_ops()
        return getattr(torch.ops.ddo_fast, op_name).default(*args)

    kernel.__name__ = f"{op_name}_load_then_run"
    return kernel


for _name in OP_NAMES:
    _lib.impl(_name, _stand_in(_name), "CompositeExplicitAutograd")

# The ahead-of-time build costs nothing to load: do it now, so that the CPU kernels (and the
# test-only `ddo_fast_testing` operators) are registered from the start, as before.
if os.environ.get("DDO_FAST_JIT", "0") in ("", "0") and _aot_available():
    load_ops()
