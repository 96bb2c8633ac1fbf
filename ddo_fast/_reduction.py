"""``Reduction``: how a DDO loss reduces its per-sample terms, one enum for every language.

The integer values are the ``int reduction`` argument of the operator schemas (``csrc/ops.cpp``),
mirrored by ``enum class Reduction`` in ``csrc/cpu/reduction.h`` and by the ``tl.constexpr``
constants of ``kernels/loss_head.py``. A leaf module (imports nothing from ddo_fast), so the
Triton kernels can import it without an import cycle.
"""

from __future__ import annotations

import enum


class Reduction(enum.IntEnum):
    NONE = 0  # per-sample losses [B]
    MEAN = 1  # sum_real l / n_real + sum_fake l / n_fake (an empty group adds 0)
    SUM = 2  # sum_b l_b

    @classmethod
    def parse(cls, reduction: str) -> Reduction:
        """``"none" | "mean" | "sum"`` -> member; anything else raises a ValueError."""
        member = _BY_NAME.get(reduction) if isinstance(reduction, str) else None
        if member is None:
            raise ValueError(
                f"ddo_fast: reduction must be one of {tuple(_BY_NAME)}, got {reduction!r}"
            )
        return member


# The public spelling is lower case only ("mean", not "MEAN"); a dict lookup keeps parse cheap.
_BY_NAME = {member.name.lower(): member for member in Reduction}
