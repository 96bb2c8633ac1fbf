"""Triton kernels of ddo_fast, installed as the subpackage ``ddo_fast.kernels``.

The project's layout keeps the kernels in a top-level ``kernels/`` folder next to ``csrc/``;
``setup.py`` maps it into the package (``package_dir={"ddo_fast.kernels": "kernels"}``), so the
installed (and editable) package imports it as ``ddo_fast.kernels`` and the modules here use
relative imports into ``ddo_fast`` (``from .._reduction import Reduction``).

One module per operator stem (``ddo_loss``, ``diffusion_ddo``, ``token_logprobs``, ``ar_ddo``)
holds its ``@triton.jit`` kernels and two launchers, ``forward``/``backward``, whose positional
arguments and outputs match the schemas ``ddo_fast::<stem>_fwd``/``_bwd`` (in
``ddo_fast/_library.py``);
``loss_head`` and ``launch`` hold what several of them share. The only importer is
``ddo_fast/ops/_triton.py`` (guarded: without triton the error appears when a Triton route is
used); ``ddo_fast.ops._registry`` registers the launchers for CUDA and runs them on CPU tensors
under ``TRITON_INTERPRET=1``.
"""
