"""Fused diffusion DDO loss, forward+backward: ddo_fast vs eager PyTorch and torch.compile."""

import pytest
import torch
from conftest import DEVICE

from ddo_fast.bench.cases import diffusion_case

QUICK = [((64, 4, 64, 64), torch.float32), ((64, 3, 32, 32), torch.float32)]
FULL = QUICK + [((64, 3, 64, 64), torch.float32), ((64, 4, 64, 64), torch.bfloat16)]
PROVIDERS = ["eager", "compile", "ddo_fast"]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_diffusion_ddo(run_case, shape_dtype, provider):
    run_case(diffusion_case(*shape_dtype, DEVICE, providers=(provider,)), provider)
