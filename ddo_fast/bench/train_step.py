"""A whole DDO training step of small real models, with the fused loss or the eager one.

``var``: a VAR-like causal transformer (L=680 tokens, V=4096, class token) through
:class:`~ddo_fast.adapters.CausalAR`; ``unet``: a small EDM U-Net denoiser on 4x32x32 latents
through :class:`~ddo_fast.adapters.EDMDenoiser`. Each step: theta forward on [real; fake], the
reference forward under no_grad, the loss, backward, Adam. ``loss_only`` times just the loss's
forward+backward on tensors of the step's shapes, to give the loss's share of the step.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from .. import adapters as A
from .. import ops
from ..models import CausalTransformer, ConvDenoiser, EDMPrecond

SIZES = {
    "var": dict(batch=4, seq_len=680, vocab=4096, dim=128, layers=2),
    "unet": dict(batch=16, channels=4, res=32, width=64),
}


def train_step(kind: str, device: str, backend: str | None) -> Callable[[], None]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if kind == "var":
        s = SIZES["var"]
        model = CausalTransformer(s["vocab"], s["seq_len"], 10, s["dim"], s["layers"]).to(device)
        adapter: A.Adapter = A.CausalAR(seq_len=s["seq_len"], backend=backend)
        real = torch.randint(0, s["vocab"], (s["batch"], s["seq_len"]), generator=g)
        fake = torch.randint(0, s["vocab"], (s["batch"], s["seq_len"]), generator=g)
        labels = torch.randint(0, 10, (s["batch"],), generator=g).to(device)
        sample_shape: tuple[int, ...] = (s["seq_len"],)
    else:
        s = SIZES["unet"]
        model = EDMPrecond(ConvDenoiser(s["channels"], s["width"]), sigma_data=0.5).to(device)
        adapter = A.EDMDenoiser(backend=backend)
        shape = (s["batch"], s["channels"], s["res"], s["res"])
        real, fake = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        labels = None
        sample_shape = shape[1:]
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)
    real_b = (real.to(device), labels)
    fake_b = (fake.to(device), labels)
    noise = adapter.draw(s["batch"], sample_shape, g)

    def step() -> None:
        out = adapter.loss(model, ref, real_b, fake_b, noise, alpha=1.0, beta=0.02)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    return step


def loss_only(kind: str, device: str, backend: str | None) -> Callable[[], None]:
    """The loss's forward+backward alone, on inputs of the training step's shapes."""
    g = torch.Generator().manual_seed(1)
    if kind == "var":
        s = SIZES["var"]
        b = 2 * s["batch"]
        logits = torch.randn(b, s["seq_len"], s["vocab"], generator=g).to(device)
        logits.requires_grad_()
        tokens = torch.randint(0, s["vocab"], (b, s["seq_len"]), generator=g).to(device)
        ref = torch.randn(b, generator=g).to(device) - 5000
        is_real = (torch.arange(b) < b // 2).to(device)

        def run() -> None:
            loss = ops.ar_ddo_loss(logits, tokens, ref, is_real, beta=0.02, backend=backend)
            torch.autograd.grad(loss, logits)

        return run
    s = SIZES["unet"]
    shape = (2 * s["batch"], s["channels"], s["res"], s["res"])
    pred = torch.randn(shape, generator=g).to(device).requires_grad_()
    pred_ref, target = torch.randn(shape, generator=g).to(device), torch.randn(shape).to(device)
    weight = torch.rand(shape[0], generator=g).to(device) + 1
    is_real = (torch.arange(shape[0]) < s["batch"]).to(device)

    def run_d() -> None:
        loss = ops.diffusion_ddo_loss(
            pred, pred_ref, target, weight, is_real, beta=0.02, backend=backend
        )
        torch.autograd.grad(loss, pred)

    return run_d
