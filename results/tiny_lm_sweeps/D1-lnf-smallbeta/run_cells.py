"""Run every cell of cells.json in order with diag_train.py (one process each), then the
analyses, and write sweep.json / sweep.md here.

    OMP_NUM_THREADS=1 python run_cells.py OUT

"CALIBRATED" in a cell stands for OUT/calibrated_seed0.pt: the selected model of the cell
that saves it (lnf-mle-6000, the ln_f-only MLE fine-tune), the start of the "cal-" cells.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def loop_tail(folder: Path) -> dict[str, float]:
    """Means over the last 20 % of the loop's logged steps (loss, disc. acc, r, grad norm)."""
    rows = list(csv.DictReader(open(folder / "run" / "metrics.csv")))
    rows = rows[-max(len(rows) // 5, 1) :]
    keys = ("loss", "acc", "r_real", "r_fake", "grad_norm")
    return {k: round(sum(float(r[k]) for r in rows) / len(rows), 4) for k in keys}


def main(out: Path) -> None:
    cells = json.loads((HERE / "cells.json").read_text())
    calibrated = str(out / "calibrated_seed0.pt")
    rows = []
    for name, cell in cells:
        cell = {k: calibrated if v == "CALIBRATED" else v for k, v in cell.items()}
        cmd = [sys.executable, str(HERE / "diag_train.py"), str(out), name, json.dumps(cell)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        blob = json.loads((out / name / "diag.json").read_text())
        blob["loop_last20pct"] = loop_tail(out / name)
        blob["cell"] = cells[[c[0] for c in cells].index(name)][1]
        rows.append(blob)
        s, tr = blob["selected"], blob["trajectory"]
        print(
            f"{name}: held greedy {s['exact_greedy']} sampled {s['exact_sampled']} "
            f"best {s['best_step']} pstar_held {tr[0]['pstar_held']:.1f}->"
            f"{tr[-1]['pstar_held']:.1f} {blob['seconds']}s",
            flush=True,
        )
        (HERE / "sweep.json").write_text(json.dumps({"rows": rows}, indent=1))
    fakes = next((out / "full-preset-ddo" / "run" / "fakes").glob("round-000-*.pt"))
    analysis = [sys.executable, str(HERE / "analysis.py"), str(fakes), str(HERE / "analysis.json")]
    subprocess.run(analysis, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
