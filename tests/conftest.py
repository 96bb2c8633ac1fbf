"""Test configuration: the Triton interpreter on CPU-only machines, seeding, device lists."""

import os

import torch

# Must happen before triton is first imported (torch.compile imports it too): triton reads the
# flag when it decorates its own functions.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
