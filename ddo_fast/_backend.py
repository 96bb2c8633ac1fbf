"""Backend selection: which implementation of an operator runs.

=========  ==========================================================================
``auto``   C++ kernels on CPU tensors, Triton kernels on CUDA tensors (the default)
``cpp``    the C++ kernels (``ddo_fast._C``); CPU tensors only
``triton`` the Triton kernels; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``
``torch``  plain PyTorch (``ddo_fast.reference``), any device
=========  ==========================================================================

The default comes from the ``backend=`` argument, else ``$DDO_FAST_BACKEND``, else ``auto``.
A backend that cannot run raises; nothing ever falls back silently to another one.
"""

from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "cpp", "triton", "torch")

# Routes: how a public function runs its operator (``ddo_fast.ops._registry.OpSpec.run``).
DISPATCH = "dispatch"  # the registered operator: torch.library picks C++ (CPU) or Triton (CUDA)
INTERPRETER = "triton-interpret"  # the Triton launchers on CPU tensors (TRITON_INTERPRET=1)
TORCH = "torch"  # ddo_fast.reference, plain PyTorch


# Read once at import: both are fixed for the life of the process (triton reads the interpreter
# flag when it is first imported), and module constants keep resolve_backend traceable by dynamo.
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The route of ``backend`` on ``device``: ``DISPATCH``, ``INTERPRETER`` or ``TORCH``.

    Reads only the device type and module constants (no tensor data), so it costs a few string
    comparisons per call and dynamo traces it to a constant."""
    name = backend if backend is not None else os.environ.get("DDO_FAST_BACKEND", "auto")
    if name not in BACKENDS:
        raise ValueError(f"ddo_fast: backend must be one of {BACKENDS} or None, got {name!r}")
    if name == "torch":
        return TORCH
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(
            f"ddo_fast: backend={name!r} has no kernels for device {device}; "
            "use backend='torch' there"
        )
    if name == "auto":
        if device.type == "cuda" and not TRITON_INSTALLED:
            raise RuntimeError(
                "ddo_fast: CUDA tensors run the Triton kernels, and triton is not installed: "
                "`pip install triton`, or pass backend='torch'"
            )
        return DISPATCH
    if name == "cpp":
        if device.type != "cpu":
            raise RuntimeError(
                f"ddo_fast: backend='cpp' runs on CPU tensors, got tensors on {device}; "
                "use backend='triton' or 'auto' for CUDA"
            )
        return DISPATCH
    # name == "triton"
    if not TRITON_INSTALLED:
        raise RuntimeError("ddo_fast: backend='triton' needs triton: `pip install triton`")
    if device.type == "cuda":
        return DISPATCH
    if not TRITON_INTERPRET:
        raise RuntimeError(
            "ddo_fast: backend='triton' on CPU tensors needs the Triton interpreter: set "
            "TRITON_INTERPRET=1 before triton is first imported (or use backend='cpp')"
        )
    return INTERPRETER
