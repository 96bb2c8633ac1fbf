"""Build ddo_fast: the Python package, the Triton kernels as ``ddo_fast.kernels``, the C++ sources
as package data (``ddo_fast/csrc``), and, when asked, the C++ CPU kernels ahead of time.

* ``pip install .`` / ``pip wheel .`` (isolated build, no torch needed): a pure-Python wheel. The
  C++ CPU kernels are compiled from the shipped sources on their first use
  (``ddo_fast/_library.py``, ``torch.utils.cpp_extension.load``), into the torch extensions cache.
* ``pip install --no-build-isolation .`` (torch importable at build time), or
  ``DDO_FAST_BUILD_OPS=1``: also builds the extension ``ddo_fast._C`` now (the wheel is then
  platform-specific). ``DDO_FAST_BUILD_OPS=0`` never builds it, even where torch is importable.

CUDA C++ sources in csrc/cuda/ are compiled (ahead of time only) when torch has CUDA and CUDA_HOME
resolves; the CUDA path of every operator is the Triton kernels in kernels/, registered from
Python, so a CPU-only build is complete.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent

# ddo_fast/_build.py: the sources and flags the JIT build uses too (loaded by path: importing the
# ddo_fast package would import torch).
_spec = importlib.util.spec_from_file_location("_ddo_fast_build", ROOT / "ddo_fast" / "_build.py")
_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_build)


def _want_ops() -> bool:
    """Build ddo_fast._C now? DDO_FAST_BUILD_OPS=1: yes (torch must be importable); =0: no;
    unset: when torch is importable, i.e. a --no-build-isolation build against the installed
    torch (an isolated build has only setuptools and wheel)."""
    mode = os.environ.get("DDO_FAST_BUILD_OPS", "")
    if mode not in ("", "0", "1"):
        raise SystemExit(f"DDO_FAST_BUILD_OPS must be 0 or 1, got {mode!r}")
    has_torch = importlib.util.find_spec("torch") is not None
    if mode == "1" and not has_torch:
        raise SystemExit(
            "DDO_FAST_BUILD_OPS=1 builds the C++ kernels against the installed torch, which this "
            "build cannot import: `pip install torch`, then "
            "`DDO_FAST_BUILD_OPS=1 pip install --no-build-isolation .`"
        )
    return mode == "1" or (mode == "" and has_torch)


def _want_cuda(torch) -> bool:
    if os.environ.get("DDO_FAST_CUDA", "1") == "0" or torch.version.cuda is None:
        return False
    if os.environ.get("CUDA_HOME") is None and os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    from torch.utils import cpp_extension

    cpp_extension.CUDA_HOME = cpp_extension.CUDA_HOME or os.environ.get("CUDA_HOME")
    return cpp_extension.CUDA_HOME is not None and bool(glob.glob("csrc/cuda/*.cu"))


def _extension_and_command():
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    # Relative paths: setuptools requires them for sources.
    sources = [str(p.relative_to(ROOT)) for p in _build.sources(ROOT / "csrc")]
    kwargs = dict(
        extra_compile_args={"cxx": [*_build.cxx_flags(), "-DDDO_FAST_MODULE_NAME=_C"]},
        extra_link_args=_build.link_flags(),
    )
    command = BuildExtension.with_options(use_ninja=True)
    if _want_cuda(torch):
        if not torch.cuda.is_available():
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        kwargs["extra_compile_args"]["nvcc"] = ["-O3", "--use_fast_math"]
        cuda = sorted(glob.glob("csrc/cuda/*.cu"))
        return CUDAExtension("ddo_fast._C", sources + cuda, **kwargs), command
    return CppExtension("ddo_fast._C", sources, **kwargs), command


class BuildPyWithSources(build_py):
    """build_py that also copies the C++ sources into the package as ``ddo_fast/csrc/`` (the JIT
    build's input; ``csrc/`` is a top-level folder of the repository, like ``kernels/``)."""

    def run(self):
        super().run()
        root = ROOT / "csrc"
        for rel in _build.package_files(root):
            dest = Path(self.build_lib) / "ddo_fast" / "csrc" / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / rel, dest)


ext_modules, cmdclass = [], {"build_py": BuildPyWithSources}
if _want_ops():
    extension, cmdclass["build_ext"] = _extension_and_command()
    ext_modules.append(extension)

setup(
    # Every subpackage of ddo_fast/, plus the top-level kernels/ folder mapped to
    # ddo_fast.kernels (the layout keeps the Triton kernels beside csrc/; see kernels/__init__.py).
    packages=find_packages(include=["ddo_fast", "ddo_fast.*"]) + ["ddo_fast.kernels"],
    package_dir={"ddo_fast": "ddo_fast", "ddo_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
