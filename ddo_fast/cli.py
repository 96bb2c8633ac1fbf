"""The ``ddo-fast`` command line: ``demo``, ``train --preset NAME``, ``bench``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _out_dir(arg: str | None, prefix: str) -> Path:
    """--out (created if missing), or a new folder of its own in the working directory
    (``checkpoint.new_out_dir``: two launches in the same second never share one)."""
    if not arg:
        from .training.checkpoint import new_out_dir

        return new_out_dir(Path.cwd(), prefix)
    path = Path(arg)
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


def _parse_overrides(rest: list[str]) -> dict[str, object]:
    """``--key value`` / ``--key=value`` pairs; values parsed as Python literals where they are
    one."""
    from .examples.presets import parse_value

    out: dict[str, object] = {}
    it = iter(rest)
    for token in it:
        if not token.startswith("--"):
            raise SystemExit(f"ddo-fast train: expected --key value, got {token!r}")
        key, eq, raw = token[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            raw = next(it, None)
            if raw is None:
                raise SystemExit(f"ddo-fast train: --{key} needs a value")
        out[key] = parse_value(raw)
    return out


def _run_preset(name: str, out: Path, rest: list[str]) -> int:
    from .examples.presets import run_preset, settings

    overrides = _parse_overrides(rest)
    try:
        settings(name, **{k: v for k, v in overrides.items() if k != "run_name"})
    except ValueError as exc:  # an unknown or invalid setting: say which, no traceback
        raise SystemExit(f"ddo-fast train: {exc}") from exc
    print(f"ddo-fast: preset {name}, writing to {out}")
    run_preset(name, out, **overrides)
    print(f"ddo-fast: files in {out}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    import json

    from .bench import runner

    out = _out_dir(args.out, "ddo-bench")
    previous = json.loads(Path(args.compare).read_text()) if args.compare else None
    result = runner.run(
        quick=args.quick, device=args.device, rounds=args.rounds, memory=not args.no_memory
    )
    table = runner.format_table(result, previous)
    print(table)
    (out / "bench.txt").write_text(table + "\n")
    for path in runner.write_outputs(result, out):
        print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ddo-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the 2-D DDO demo (numbers and a picture)")
    demo.add_argument("--out", help="output folder (default: a new folder here)")
    losses = sub.add_parser("losses", help="the fused losses on one batch, per backend")
    losses.add_argument("--out", help="output folder (default: a new folder here)")
    bench = sub.add_parser("bench", help="speed, memory and bandwidth vs eager and compile")
    bench.add_argument("--quick", action="store_true", help="the small set (minutes on 2 CPUs)")
    bench.add_argument("--out", help="output folder (default: a new folder here)")
    bench.add_argument("--compare", help="a previous bench.json to compare against")
    bench.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available")
    bench.add_argument("--rounds", type=int, help="timed rounds per case (default 5 CPU, 50 GPU)")
    bench.add_argument("--no-memory", action="store_true", help="skip peak-memory measurement")
    from .examples.presets import PRESETS

    train = sub.add_parser(
        "train",
        help="a preset DDO run: ddo-fast train --preset NAME [--SETTING VALUE ...]",
        description="Presets (settings: ddo_fast/examples/presets.py; any TrainConfig field or "
        "preset option can be overridden with --SETTING VALUE): "
        + "; ".join(f"{k}: {p.summary}" for k, p in PRESETS.items()),
    )
    train.add_argument("--preset", required=True, help="one of: " + ", ".join(PRESETS))
    train.add_argument("--out", help="output folder (default: a new folder here)")
    args, rest = parser.parse_known_args(argv)
    if args.command != "train" and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "bench":
        return _bench(args)
    if args.command == "losses":
        return _loss_demo(_out_dir(args.out, "ddo-losses"))
    if args.command == "demo":
        return _run_preset("toy2d", _out_dir(args.out, "ddo-demo"), [])
    if args.command == "train":
        if args.preset not in PRESETS:
            parser.error(f"unknown preset {args.preset!r}; choose one of {', '.join(PRESETS)}")
        return _run_preset(args.preset, _out_dir(args.out, f"ddo-{args.preset}"), rest)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
