"""Seed-0 sweep driver for the tiny-lm preset (kept under results/tiny_lm_sweeps/ for the record).

    OMP_NUM_THREADS=1 python sweep_tiny_lm.py OUT RESULT_DIR NAME 'BASE_JSON' 'CELL_JSON' ...

Each cell = BASE overrides | CELL overrides, run once by run_preset("tiny-lm", seeds=[0]); a
cell's MLE control runs when the cell says "control": true. Writes RESULT_DIR/NAME/sweep.json and
sweep.md after each cell: held-out greedy / sampled exact match of baseline, DDO, control.
"""

import json
import sys
import time
from pathlib import Path

import torch

from ddo_fast.examples.presets import run_preset

torch.set_num_threads(1)
out, res_dir, name = Path(sys.argv[1]), Path(sys.argv[2]) / sys.argv[3], sys.argv[3]
base = json.loads(sys.argv[4])
cells = [json.loads(c) for c in sys.argv[5:]]
res_dir.mkdir(parents=True, exist_ok=True)
rows = []
for i, cell in enumerate(cells):
    setting = {**base, **cell}
    control = bool(setting.pop("control", False))
    tag = "-".join(f"{k}{v}" for k, v in cell.items() if k != "control") or f"cell{i}"
    t0 = time.time()
    res = run_preset(
        "tiny-lm", out, run_name=f"{name}-{tag}", seeds=[0], control=control, **setting
    )
    run = res["runs"][0]
    rows.append(
        {
            "cell": cell,
            "seed": run["seed"],  # the scoring seed (always the selection seed 0 here)
            "setting": setting,
            "control": control,
            "seconds": round(time.time() - t0, 1),
            **{
                k: run[k]
                for k in ("baseline", "ddo", "mle_control", "converged", "gain")
                if k in run
            },
        }
    )
    cmd = (
        f"OMP_NUM_THREADS=1 python sweep_tiny_lm.py OUT results/tiny_lm_sweeps {name} "
        + f"'{json.dumps(base)}' "
        + " ".join(f"'{json.dumps(c)}'" for c in cells)
    )
    (res_dir / "sweep.json").write_text(json.dumps({"command": cmd, "rows": rows}, indent=1))
    lines = [
        f"# tiny-lm sweep {name} (selection seed 0 only)",
        "",
        f"Base overrides: `{json.dumps(base)}`",
        "",
        "| cell | base greedy | base sampled | DDO greedy | DDO sampled | DDO best step | "
        "control greedy | control sampled | DDO - better (sampled) | s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b, d, c = r["baseline"], r["ddo"], r.get("mle_control")
        better = max(b["exact_sampled"], c["exact_sampled"]) if c else b["exact_sampled"]
        lines.append(
            f"| `{json.dumps(r['cell'])}` | {b['exact_greedy']:.1f} | {b['exact_sampled']:.1f} | "
            f"{d['exact_greedy']:.1f} | {d['exact_sampled']:.1f} | {d.get('best_step', '')} | "
            + (f"{c['exact_greedy']:.1f} | {c['exact_sampled']:.1f} | " if c else " |  | ")
            + f"{d['exact_sampled'] - better:+.1f}{'' if c else ' (vs baseline)'} | "
            + f"{r['seconds']} |"
        )
    (res_dir / "sweep.md").write_text("\n".join(lines) + "\n\nCommand: `" + cmd + "`\n")
    print("\n".join(lines), flush=True)
