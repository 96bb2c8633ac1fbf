"""A whole DDO training step (small VAR-like transformer, small U-Net denoiser) with the fused
ddo_fast loss vs the same loss in eager PyTorch, and the loss alone (its share of the step)."""

import pytest
from conftest import DEVICE

from ddo_fast.bench.train_step import loss_only, train_step

# No shape sets: one size per model (see ddo_fast.bench.train_step.SIZES).
QUICK = FULL = [("model", None)]
BACKENDS = {"ddo_fast": None, "eager": "torch"}


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("kind", ["var", "unet"])
@pytest.mark.parametrize("what", ["step", "loss_only"])
def test_train_step(benchmark, kind, backend, what, shape_dtype):
    make = train_step if what == "step" else loss_only
    fn = make(kind, DEVICE, BACKENDS[backend])
    benchmark.group = f"train_step[{kind}]"
    benchmark.pedantic(fn, rounds=5, warmup_rounds=1)
