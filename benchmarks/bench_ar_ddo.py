"""Fused autoregressive DDO loss forward+backward (VAR: L=680, V=4096) vs eager and compile."""

import pytest
import torch
from conftest import DEVICE

from ddo_fast.bench.cases import ar_case

QUICK = [((8, 680, 4096), torch.float32)]
FULL = QUICK + [
    ((1, 680, 4096), torch.float32),
    ((32, 680, 4096), torch.float32),
    ((8, 680, 4096), torch.bfloat16),
    ((16, 680, 4096), torch.float32),
    ((16, 680, 4096), torch.bfloat16),
]
PROVIDERS = ["eager", "cross_entropy", "compile", "ddo_fast"]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_ar_ddo(run_case, shape_dtype, provider):
    run_case(ar_case(*shape_dtype, DEVICE, providers=(provider,)), provider)
