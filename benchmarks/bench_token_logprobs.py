"""Token log-probs forward+backward: ddo_fast vs log_softmax+gather, F.cross_entropy, compile."""

import pytest
import torch
from conftest import DEVICE

from ddo_fast.bench.cases import token_case

QUICK = [((8, 680, 4096), torch.float32)]
FULL = QUICK + [
    ((8, 680, 4096), torch.bfloat16),
    ((16, 680, 4096), torch.float32),
    ((16, 680, 4096), torch.bfloat16),
    ((32, 680, 4096), torch.float32),
]
PROVIDERS = ["eager", "cross_entropy", "compile", "ddo_fast"]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_token_logprobs(run_case, shape_dtype, provider):
    run_case(token_case(*shape_dtype, DEVICE, providers=(provider,)), provider)
