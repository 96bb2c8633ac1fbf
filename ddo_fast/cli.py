"""The ``ddo-fast`` command line: ``demo``, ``train --preset NAME``, ``bench``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _out_dir(arg: str | None, prefix: str) -> Path:
    """--out, or a new folder in the working directory; created, and said out loud."""
    path = Path(arg) if arg else Path.cwd() / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _loss_demo(out: Path) -> int:
    """The fused losses on one random batch, every available backend side by side."""
    import torch

    import ddo_fast
    from ddo_fast._backend import TRITON_INSTALLED, TRITON_INTERPRET

    torch.manual_seed(0)
    pred, pred_ref, target = (torch.randn(8, 4, 16, 16) for _ in range(3))
    weight, is_real = torch.rand(8) + 0.5, torch.arange(8) % 2 == 0
    logits, targets = torch.randn(8, 32, 512), torch.randint(0, 512, (8, 32))
    ref = torch.randn(8) - 32 * 6.5
    backends = ["torch", "cpp"] + (["triton"] if TRITON_INSTALLED and TRITON_INTERPRET else [])
    lines = [f"{'backend':8} {'diffusion_ddo_loss':>20} {'ar_ddo_loss':>14}"]
    for backend in backends:
        d = ddo_fast.diffusion_ddo_loss(
            pred, pred_ref, target, weight, is_real, beta=0.02, backend=backend
        )
        a = ddo_fast.ar_ddo_loss(logits, targets, ref, is_real, beta=0.02, backend=backend)
        lines.append(f"{backend:8} {d.item():20.6f} {a.item():14.6f}")
    text = "\n".join(lines)
    print(text)
    (out / "losses.txt").write_text(text + "\n")
    print(f"wrote {out / 'losses.txt'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ddo-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the 2-D DDO demo (numbers and a picture)")
    demo.add_argument("--out", help="output folder (default: a new folder here)")
    losses = sub.add_parser("losses", help="the fused losses on one batch, per backend")
    losses.add_argument("--out", help="output folder (default: a new folder here)")
    args = parser.parse_args(argv)
    if args.command in ("demo", "losses"):
        return _loss_demo(_out_dir(args.out, "ddo-" + args.command))
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
