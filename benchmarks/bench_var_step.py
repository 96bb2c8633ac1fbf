"""A VAR-d16-like DDO training step at VAR's real token shape, and the loss's share of it.

The model is a :class:`~ddo_fast.models.VARTransformer` over VAR's pyramid (patch_nums 1, 2, 3,
4, 5, 6, 8, 10, 13, 16: L = 680 tokens, V = 4096 codes, a random 32-d codebook), 16 blocks as
VAR-d16 but, on CPU, at a reduced width (default 256 instead of 1024; ``--width 1024`` for the
real one), under bf16 autocast (the logits stay fp32, as in VAR). One step is the training
loop's: theta forward on B real + B fake rows, the DDO loss with the reference's log-probs
from the ref-logprob cache (no reference forward), backward, Adam. Variants:

``stats``   :class:`~ddo_fast.adapters.VAR` as shipped: ``token_logprobs`` + ``ddo_loss`` (the
            per-scale r of ``LossOutput.stats`` come from the same pass);
``fused``   ``VAR(scale_stats=False)``: the fused ``ar_ddo_loss``;
``eager``   the fused path on the ``torch`` backend (log_softmax + gather in PyTorch).

``loss_only`` times the loss's forward+backward alone on fp32 logits [2B, 680, 4096] with each
backend, and the share is loss_only / step. ``python benchmarks/bench_var_step.py [--width 256]
[--batch 2] [--reps 3] [--json out.json]``; prints the machine and load average; wall and
CPU seconds (the shares are reported in both).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

import torch

from ddo_fast import adapters as A
from ddo_fast import ops
from ddo_fast.models import MultiScaleQuantizer, VARTransformer

PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
VOCAB, CODE_DIM, DEPTH = 4096, 32, 16


def build(width: int, batch: int, variant: str) -> Callable[[], None]:
    g = torch.Generator().manual_seed(0)
    q = MultiScaleQuantizer(torch.randn(VOCAB, CODE_DIM, generator=g), PATCH_NUMS)
    torch.manual_seed(0)
    model = VARTransformer(
        q, 1000, dim=width, layers=DEPTH, heads=max(1, width // 64), label_dropout=0.0
    )
    adapter = A.VAR(
        patch_nums=PATCH_NUMS,
        null_label=1000,
        scale_stats=variant == "stats",
        backend="torch" if variant == "eager" else None,
        check_first_step=False,
    )
    length = q.seq_len
    real = (
        torch.randint(0, VOCAB, (batch, length), generator=g),
        torch.randint(0, 1000, (batch,), generator=g),
    )
    fake = (
        torch.randint(0, VOCAB, (batch, length), generator=g),
        torch.randint(0, 1000, (batch,), generator=g),
    )
    noise = adapter.draw(batch, (length,), g)
    s = len(PATCH_NUMS)
    # cached reference log-probs [2B, 2S] (own label, null label): values near log(1/V) * pn^2
    per_scale = torch.tensor([p * p for p in PATCH_NUMS], dtype=torch.float32) * -8.3
    ref_lp = per_scale.repeat(2 * batch, 2) + torch.randn(2 * batch, 2 * s, generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = adapter.loss(
                model, None, real, fake, noise, alpha=1.0, beta=0.02, ref_logprob=ref_lp
            )
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    return step


def loss_only(batch: int, backend: str | None) -> Callable[[], None]:
    g = torch.Generator().manual_seed(1)
    rows, length = 2 * batch, sum(p * p for p in PATCH_NUMS)
    logits = torch.randn(rows, length, VOCAB, generator=g).requires_grad_()
    tokens = torch.randint(0, VOCAB, (rows, length), generator=g)
    ref = torch.randn(rows, generator=g) - 8.3 * length
    is_real = torch.arange(rows) < batch

    def run() -> None:
        loss = ops.ar_ddo_loss(logits, tokens, ref, is_real, beta=0.02, backend=backend)
        torch.autograd.grad(loss, logits)

    return run


def timed(fn: Callable[[], None], reps: int) -> dict[str, float]:
    """Median and min wall seconds, and median CPU seconds of this process (on a loaded
    machine the CPU time is the steadier figure; with T threads it counts up to T x wall)."""
    fn()  # warm-up
    wall, cpu = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {
        "median_s": statistics.median(wall),
        "min_s": min(wall),
        "cpu_median_s": statistics.median(cpu),
        "reps": reps,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--batch", type=int, default=2, help="B real + B fake rows per step")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", default="")
    a = p.parse_args()
    load0 = os.getloadavg()
    res: dict = {
        "shape": {"L": 680, "V": VOCAB, "depth": DEPTH, "width": a.width, "rows": 2 * a.batch},
        "patch_nums": list(PATCH_NUMS),
        "dtypes": {
            "step": "bf16 autocast (CPU), logits and loss fp32",
            "loss_only": "fp32 logits [rows, L, V], fp32 loss",
        },
        "note": "CPU at reduced width (VAR-d16 is width 1024): the loss share at width 1024 "
        "is smaller, the step's matmuls growing ~width^2 while the loss does not change",
        "command": "python benchmarks/bench_var_step.py "
        + " ".join(f"--{k} {v}" for k, v in vars(a).items() if k != "json"),
        "machine": {"cpu_count": os.cpu_count(), "threads": torch.get_num_threads()},
    }
    for variant in ("stats", "fused", "eager"):
        res[f"step_{variant}"] = timed(build(a.width, a.batch, variant), a.reps)
        print(variant, res[f"step_{variant}"], flush=True)
    for name, backend in (("ddo_fast", None), ("torch", "torch")):
        res[f"loss_only_{name}"] = timed(loss_only(a.batch, backend), a.reps)
        print("loss_only", name, res[f"loss_only_{name}"], flush=True)
    step = res["step_fused"]["median_s"]
    res["loss_share_fused"] = res["loss_only_ddo_fast"]["median_s"] / step
    res["loss_share_eager"] = res["loss_only_torch"]["median_s"] / res["step_eager"]["median_s"]
    res["loss_share_fused_cpu"] = (
        res["loss_only_ddo_fast"]["cpu_median_s"] / res["step_fused"]["cpu_median_s"]
    )
    res["loss_share_eager_cpu"] = (
        res["loss_only_torch"]["cpu_median_s"] / res["step_eager"]["cpu_median_s"]
    )
    res["machine"]["loadavg_before_after"] = [load0, os.getloadavg()]
    print(json.dumps(res, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
