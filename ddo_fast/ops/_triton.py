"""The one import of the Triton kernels: ``kernels/<op>.py``, installed as ``ddo_fast.kernels``.

``kernels/`` is a top-level folder of the source tree (the project's layout); ``setup.py`` maps it
to the package ``ddo_fast.kernels`` (``package_dir``), so it is imported like any subpackage.
Nothing else in ``ddo_fast`` imports it: ``ddo_fast.ops._registry`` registers these launchers for
the CUDA dispatch key and runs them on CPU tensors under ``TRITON_INTERPRET=1``.

triton is optional (the C++ CPU kernels and ``backend="torch"`` need none of it). When the import
fails, every name below is a stand-in whose ``forward``/``backward`` raise a RuntimeError that
names the cause, so the error appears only when a Triton route (CUDA tensors, or
``backend="triton"``) is actually used, never at ``import ddo_fast``.
"""

from __future__ import annotations

from typing import Any, NoReturn


class _Missing:
    """Stands in for a ``kernels/<op>.py`` module when triton cannot be imported."""

    def __init__(self, stem: str, error: ImportError) -> None:
        self.stem, self.error = stem, error

    def forward(self, *args: Any) -> NoReturn:
        raise RuntimeError(
            f"ddo_fast: the Triton kernels of `{self.stem}` (CUDA tensors, backend='triton') "
            f"need triton, which failed to import ({self.error!r}): `pip install triton`, or use "
            "backend='torch'"
        ) from self.error

    backward = forward


try:
    from ..kernels import ar_ddo, ddo_loss, diffusion_ddo, token_logprobs
except ImportError as exc:  # triton absent or broken: only the Triton routes need it
    ar_ddo = _Missing("ar_ddo", exc)
    ddo_loss = _Missing("ddo_loss", exc)
    diffusion_ddo = _Missing("diffusion_ddo", exc)
    token_logprobs = _Missing("token_logprobs", exc)

__all__ = ["ar_ddo", "ddo_loss", "diffusion_ddo", "token_logprobs"]
