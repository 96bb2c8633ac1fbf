"""How the C++ CPU kernels are built: one source list and one set of flags for both builds.

Imported without torch: ``setup.py`` loads this file by path for the ahead-of-time build
(``ddo_fast._C``), and :mod:`ddo_fast._library` uses it for the just-in-time build
(``torch.utils.cpp_extension.load`` on the first CPU operator call). The two builds therefore
compile the same sources with the same flags, and give the same results.

No ``-march``/``-mavx*`` flag appears here: the kernels' inner loops are compiled once per ISA by
``#pragma GCC target`` in ``csrc/cpu/isa/{baseline,avx2,avx512}.cpp`` and chosen at run time
(``DDO_FAST_CPU_ISA``), so one build runs on every x86-64 CPU.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def source_root() -> Path:
    """The ``csrc/`` folder: shipped inside the installed package (``ddo_fast/csrc``), or the
    repository's top-level ``csrc/`` in a source tree (editable or in-place builds)."""
    for root in (PACKAGE_DIR / "csrc", PACKAGE_DIR.parent / "csrc"):
        if (root / "ops.cpp").is_file():
            return root
    raise FileNotFoundError(
        f"ddo_fast: the C++ sources (csrc/ops.cpp) are neither in {PACKAGE_DIR / 'csrc'} nor in "
        f"{PACKAGE_DIR.parent / 'csrc'}; reinstall ddo_fast"
    )


def sources(root: Path) -> list[Path]:
    """The translation units, in link order. The per-ISA objects come last and in ISA order
    (baseline, avx2, avx512): where two objects hold the same inline library function, the
    linker keeps the first copy, which is then never code for a newer ISA than its callers."""
    isa = [root / "cpu" / "isa" / f"{name}.cpp" for name in ("baseline", "avx2", "avx512")]
    rest = sorted(set(root.glob("*.cpp")) | set(root.glob("cpu/**/*.cpp")) - set(isa))
    return rest + isa


def package_files(root: Path) -> list[Path]:
    """Every file the JIT build reads (sources and headers), relative to ``root``."""
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.suffix in (".cpp", ".h", ".cu"))


def cxx_flags(debug: bool | None = None) -> list[str]:
    """Compiler flags of both builds (the build adds the torch includes and ``-std``).

    -fno-math-errno/-fno-trapping-math let GCC vectorise floor() and selects in the exp loops;
    neither changes results (no code reads errno or FP exception flags)."""
    if debug is None:
        debug = os.environ.get("DDO_FAST_DEBUG") == "1"
    if debug:
        return ["-O0", "-g", "-fopenmp"]
    return ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]


def link_flags() -> list[str]:
    """Linker flags of both builds.

    On Linux the shared libstdc++ that torch has already loaded is linked explicitly. A toolchain
    that ships only a static libstdc++.a (the GPU machine's /opt/gcc g++) would otherwise put a
    private copy into the library; formatting a number in a TORCH_CHECK message then reads the
    other copy's locale data and segfaults (seen under torch 2.11 there), or truncates it."""
    flags = ["-fopenmp"]
    if platform.system() == "Linux":
        flags.append("-l:libstdc++.so.6")
    return flags


def jit_name(root: Path, torch_version: str, cxx: str) -> str:
    """The JIT module's name, unique to the sources, the flags, the torch version, the Python
    and the compiler: a build made for another torch is never loaded (the extensions cache is
    shared by every environment of a user)."""
    h = hashlib.sha256()
    for rel in package_files(root):
        h.update(str(rel).encode() + b"\0" + (root / rel).read_bytes() + b"\0")
    h.update(repr((cxx_flags(), link_flags(), torch_version, sys.version, cxx)).encode())
    return f"ddo_fast_cpu_{h.hexdigest()[:16]}"
