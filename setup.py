"""Build ddo_fast: the C++ extension `ddo_fast._C` and the Triton kernels as `ddo_fast.kernels`.

Install with `pip install --no-build-isolation -e .` after torch is installed (build isolation would
pull a different, multi-GB torch into the build environment). CUDA C++ sources in csrc/cuda/ are
compiled only when torch has CUDA and CUDA_HOME resolves; the CUDA path of every operator is the
Triton kernels in kernels/, registered from Python, so a CPU-only build is complete.
"""

from __future__ import annotations

import glob
import os
import platform

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # pragma: no cover - exercised only on a machine without torch
    raise SystemExit(
        "ddo_fast needs torch installed before it is built: `pip install torch`, then "
        "`pip install --no-build-isolation -e .`"
    ) from exc


def _cpu_flags() -> list[str]:
    """-O3, OpenMP, and AVX2/FMA when the build machine has them (DDO_FAST_NATIVE=0 disables)."""
    # No -std flag: BuildExtension picks the standard the installed torch headers need.
    # -fno-math-errno/-fno-trapping-math let GCC vectorise floor() and selects in the exp loops;
    # neither changes results (no code reads errno or FP exception flags).
    flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    native = os.environ.get("DDO_FAST_NATIVE", "1") != "0"
    if not native or platform.machine() not in ("x86_64", "AMD64"):
        return flags
    try:
        with open("/proc/cpuinfo") as f:
            cpu = f.read()
    except OSError:
        return flags
    if " avx2" in cpu and " fma" in cpu:
        flags += ["-mavx2", "-mfma", "-mf16c"]
    return flags


def _want_cuda() -> bool:
    if os.environ.get("DDO_FAST_CUDA", "1") == "0" or torch.version.cuda is None:
        return False
    if os.environ.get("CUDA_HOME") is None and os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    from torch.utils import cpp_extension

    cpp_extension.CUDA_HOME = cpp_extension.CUDA_HOME or os.environ.get("CUDA_HOME")
    return cpp_extension.CUDA_HOME is not None and bool(glob.glob("csrc/cuda/*.cu"))


def _extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx = _cpu_flags()
    if os.environ.get("DDO_FAST_DEBUG") == "1":
        cxx = ["-O0", "-g", "-fopenmp"]
    link = ["-fopenmp"]
    if platform.system() == "Linux":
        # Link the shared libstdc++ that torch has already loaded. A toolchain that ships only a
        # static libstdc++.a (the GPU machine's /opt/gcc g++) would otherwise put a private copy
        # into _C.so; formatting a number in a TORCH_CHECK message then reads the other copy's
        # locale data and segfaults (seen under torch 2.11 there), or truncates the message.
        link.append("-l:libstdc++.so.6")
    kwargs = dict(extra_compile_args={"cxx": cxx}, extra_link_args=link)
    if _want_cuda():
        if not torch.cuda.is_available():
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        kwargs["extra_compile_args"]["nvcc"] = ["-O3", "--use_fast_math"]
        return CUDAExtension("ddo_fast._C", sources + sorted(glob.glob("csrc/cuda/*.cu")), **kwargs)
    return CppExtension("ddo_fast._C", sources, **kwargs)


setup(
    # Every subpackage of ddo_fast/, plus the top-level kernels/ folder mapped to
    # ddo_fast.kernels (the layout keeps the Triton kernels beside csrc/; see kernels/__init__.py).
    packages=find_packages(include=["ddo_fast", "ddo_fast.*"]) + ["ddo_fast.kernels"],
    package_dir={"ddo_fast": "ddo_fast", "ddo_fast.kernels": "kernels"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
