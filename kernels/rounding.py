"""Storing fp32 results in a tensor's own dtype, rounded to nearest even on every backend.

On a GPU ``x.to(tl.bfloat16)`` is one ``cvt.rn`` (round to nearest even). The Triton interpreter
(triton 3.6) converts fp32 to bf16 by truncating the mantissa (up to one bf16 ulp off) and
mangles subnormals; under it the bits are rounded here instead. fp16 and the other dtypes
convert correctly everywhere.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .launch import TRITON_INTERPRET

INTERPRETING: tl.constexpr = tl.constexpr(TRITON_INTERPRET)


@triton.jit
def cast_for_store(x, ptr):
    """fp32 ``x`` in the element type of ``ptr``, rounded to nearest even; NaN stays NaN."""
    dtype: tl.constexpr = ptr.dtype.element_ty
    if INTERPRETING and dtype == tl.bfloat16:
        # round the fp32 bits to their top 16 (nearest even), then reinterpret those as bf16:
        # exact for normals, subnormals, +-inf and overflow to inf
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + (0x7FFF + ((bits >> 16) & 1))
        bits = tl.where(x != x, 0x7FC00000, bits)  # a quiet NaN (a payload could round to inf)
        y = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(dtype)
    return y
