"""Grid sweeps over a preset's settings, one table at the end.

    python -m ddo_fast.examples.sweep --preset digits-diffusion --out DIR alpha=1,2 beta=0.05,0.1

Presets and their settings: :data:`ddo_fast.examples.presets.PRESETS`. Every combination runs
the preset in this process with ``run_name`` = the combination, so the
pre-trained model, the classifier and identical fake pools are computed once (cached in DIR).
Writes DIR/sweep-<preset>.md with the before/after feature FD of each run.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

from .presets import PRESETS, parse_value, run_preset


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", required=True, choices=sorted(PRESETS))
    p.add_argument("--out", required=True)
    p.add_argument("grid", nargs="+", help="key=v1,v2,... (also fixed key=v)")
    args = p.parse_args(argv)
    keys, values = [], []
    for item in args.grid:
        key, _, raw = item.partition("=")
        keys.append(key)
        values.append([parse_value(v) for v in raw.split(",")])
    out = Path(args.out)
    rows = []
    for combo in itertools.product(*values):
        setting = dict(zip(keys, combo, strict=True))
        name = "-".join(f"{k}{v}" for k, v in setting.items())
        res = run_preset(args.preset, out, run_name=f"sweep-{name}", plot=False, **setting)
        before, after = res["before"], res["after"]
        best = res["rounds"][-1]
        rows.append((setting, before, after, best))
        print(f"SWEEP {setting}: fd {before['fd']:.3f} -> {after['fd']:.3f}")
    lines = [
        "| " + " | ".join(keys) + " | FD before | FD after | change | pixel FD after | "
        "class acc after | best step |",
        "|" + "---|" * (len(keys) + 6),
    ]
    for setting, before, after, best in rows:
        change = 100 * (after["fd"] - before["fd"]) / before["fd"]
        lines.append(
            "| "
            + " | ".join(str(setting[k]) for k in keys)
            + f" | {before['fd']:.3f} | {after['fd']:.3f} | {change:+.1f}% | "
            f"{after['pixel_fd']:.3f} | {100 * after['class_acc']:.1f}% | "
            f"{best['best_step_in_round']} |"
        )
    table = "\n".join(lines)
    (out / f"sweep-{args.preset}.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
