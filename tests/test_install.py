"""`pip wheel .` gives a pure-Python wheel; installed in a fresh venv it compiles the C++ CPU
kernels on the first operator call (once), and they compute what the ahead-of-time build does.

The venv is made without copying torch: a .pth file puts this environment's site-packages
(torch, numpy, ninja, ...) after the venv's own, where the wheel is installed; nothing of the
source tree is importable from the child (it runs in a temporary folder). The wheel is built
from a copy of the sources (an in-tree build would write build/ and *.egg-info into the
repository), by pip's isolated build (setuptools and wheel from the configured index).
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import ddo_fast

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["ddo_fast", "kernels", "csrc", "setup.py", "pyproject.toml", "README.md", "MANIFEST.in"]

# The child's work: both ops forward+backward on saved inputs; outputs saved for the parent.
CHILD = """
import sys, torch, ddo_fast
assert "site-packages" in ddo_fast.__file__, ddo_fast.__file__
x = torch.load(sys.argv[1])
logits = x["logits"].requires_grad_()
logp = ddo_fast.token_logprobs(logits, x["targets"])
(g_tok,) = torch.autograd.grad(logp, logits, x["up_tok"])
pred = x["pred"].requires_grad_()
r = ddo_fast.diffusion_logratio(pred, x["pred_ref"], x["target"], x["weight"])
(g_dif,) = torch.autograd.grad(r, pred, x["up_dif"])
torch.save({"logp": logp, "g_tok": g_tok, "r": r, "g_dif": g_dif, "isa": ddo_fast.cpu_isa()},
           sys.argv[2])
"""


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "logits": torch.randn(2, 7, 1003, generator=g) * 4,
        "targets": torch.randint(0, 1003, (2, 7), generator=g),
        "up_tok": torch.randn(2, 7, generator=g),
        "pred": torch.randn(3, 4, 33, 33, generator=g),
        "pred_ref": torch.randn(3, 4, 33, 33, generator=g),
        "target": torch.randn(3, 4, 33, 33, generator=g),
        "weight": torch.rand(3, generator=g) + 0.5,
        "up_dif": torch.randn(3, generator=g),
    }


def _expected(x: dict) -> dict:
    """The same computation in this process: the ahead-of-time build (`make setup`)."""
    logits = x["logits"].clone().requires_grad_()
    logp = ddo_fast.token_logprobs(logits, x["targets"], backend="cpp")
    (g_tok,) = torch.autograd.grad(logp, logits, x["up_tok"])
    pred = x["pred"].clone().requires_grad_()
    r = ddo_fast.diffusion_logratio(pred, x["pred_ref"], x["target"], x["weight"], backend="cpp")
    (g_dif,) = torch.autograd.grad(r, pred, x["up_dif"])
    return {"logp": logp, "g_tok": g_tok, "r": r, "g_dif": g_dif, "isa": ddo_fast.cpu_isa()}


def _run(cmd: list[str], cwd: Path, env: dict | None = None, timeout: int = 600):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
def test_pure_wheel_compiles_on_first_call(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
        else:
            shutil.copy2(path, src / name)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DDO_FAST_")}

    # 1. The wheel: pure Python (py3-none-any), the C++ sources and the Triton kernels inside.
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), "."],
        src,
        env,
    )
    (wheel,) = tmp_path.glob("ddo_fast-*.whl")
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name
    names = zipfile.ZipFile(wheel).namelist()
    for needed in (
        "ddo_fast/csrc/ops.cpp",
        "ddo_fast/csrc/cpu/isa/avx512.cpp",
        "ddo_fast/csrc/cpu/vec_math.h",
        "ddo_fast/kernels/__init__.py",
        "ddo_fast/_library.py",
    ):
        assert needed in names, needed
    assert not [n for n in names if n.endswith((".so", ".pyd"))]

    # 2. A fresh venv that sees this environment's torch (after its own site-packages).
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, env)
    py = venv / "bin" / "python"
    (child_site,) = (venv / "lib").glob("python*/site-packages")
    (child_site / "parent_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(py),
            "install",
            "--no-deps",
            "-q",
            str(wheel),
        ],
        tmp_path,
        env,
    )

    # 3. No compiler: a clear error at the first call (nothing compiled, nothing cached).
    work = tmp_path / "work"
    work.mkdir()
    env["TORCH_EXTENSIONS_DIR"] = str(tmp_path / "extensions")
    torch.save(_inputs(), work / "in.pt")
    bad = subprocess.run(
        [str(py), "-c", CHILD, "in.pt", "out.pt"],
        cwd=work,
        env={**env, "CXX": "/nonexistent/g++"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode != 0 and "no C++ compiler was found" in bad.stderr, bad.stderr[-2000:]

    # 4. First call compiles (one progress line), the second process reuses the cache.
    first = _run([str(py), "-c", CHILD, "in.pt", "out.pt"], work, env, timeout=2400)
    assert "compiling the C++ CPU kernels" in first.stderr, first.stderr[-2000:]
    second = _run([str(py), "-c", CHILD, "in.pt", "out2.pt"], work, env)
    assert "compiling" not in second.stderr, second.stderr[-2000:]

    expected = _expected(_inputs())
    for out in ("out.pt", "out2.pt"):
        got = torch.load(work / out)
        assert got.pop("isa") == expected["isa"]
        for key, value in got.items():
            # Same sources, flags and ISA as the ahead-of-time build: the same bits.
            assert torch.equal(value, expected[key]), key
