"""Triton kernels of ddo_fast (installed as ``ddo_fast.kernels``).

Each module holds the ``@triton.jit`` kernels of one operator and its ``forward``/``backward``
launchers, whose signatures match the operator schemas in ``csrc/ops.cpp``; ``ddo_fast.ops``
registers them for the CUDA dispatch key. On CPU tensors they run under ``TRITON_INTERPRET=1``.
"""
