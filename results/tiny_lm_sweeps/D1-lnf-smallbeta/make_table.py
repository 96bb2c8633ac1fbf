"""sweep.json + analysis.json -> sweep.md, the tables of README.md: python make_table.py."""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
DDO_ONLY = ("alpha", "beta")


def control_key(row: dict) -> str:
    """The MLE control of a DDO cell: same TrainConfig overrides but alpha / beta, same
    trainable parameters and start."""
    keep = {k: v for k, v in row["cell"].items() if k not in DDO_ONLY + ("kind", "x_save")}
    return json.dumps(keep, sort_keys=True)


def main() -> None:
    rows = json.loads((HERE / "sweep.json").read_text())["rows"]
    controls = {control_key(r): r for r in rows if r["kind"] == "mle"}
    lines = [
        "# D1: why DDO does not sharpen the tiny-lm reference (selection seed 0 only)",
        "",
        "Every row scored on seed 0 (`seed` in sweep.json). held = the 500 held-out prompts "
        "(greedy; sampled: 2 temperature-1 samples each, in %); pstar = 100 * mean p(y*|x) "
        "of the true answer (noise-free expected sampled exact match) at the first and last "
        "eval of the run (max over evals); ent = train response-token entropy at the last eval "
        "(start 0.418); ln_f = ||ln_f.weight|| / start; loop = means over the last 20 % of "
        "the logged steps (loss, discriminator acc = mean(r_real > r_fake), r_real, r_fake). "
        "vs ctrl = DDO held sampled minus its MLE control's (same TrainConfig but alpha / beta, "
        "same trainable parameters and start). Preset row (tiny-lm) unless named: lr 1e-3, "
        "batch 64, 1000 steps, 1 round, 8000 fakes, warmup 50, EMA 0.99, beta 1, alpha 1.",
        "",
        "| cell | kind | overrides | held greedy | held sampled | best step | pstar held "
        "(max) | ent | ln_f | loop loss / acc / r_real / r_fake | vs ctrl | s |",
        "|" + "---|" * 12,
    ]
    for r in rows:
        s, tr, lp = r["selected"], r["trajectory"], r["loop_last20pct"]
        over = {k: v for k, v in r["cell"].items() if k != "kind"}
        over = {k: ("calibrated" if k == "x_init" else v) for k, v in over.items()}
        over.pop("x_save", None)
        ctrl = controls.get(control_key(r)) if r["kind"] == "ddo" else None
        vs = f"{s['exact_sampled'] - ctrl['selected']['exact_sampled']:+.1f}" if ctrl else ""
        loop = (
            f"{lp['loss']:.3f} / {lp['acc']:.2f} / {lp['r_real']:.2f} / {lp['r_fake']:.2f}"
            if r["kind"] == "ddo"
            else f"{lp['loss']:.3f} (NLL)"
        )
        lines.append(
            f"| {r['name']} | {r['kind']} | `{json.dumps(over)}` | {s['exact_greedy']:.1f} | "
            f"{s['exact_sampled']:.1f} | {s['best_step']} | {tr[0]['pstar_held']:.1f} -> "
            f"{tr[-1]['pstar_held']:.1f} ({max(t['pstar_held'] for t in tr):.1f}) | "
            f"{tr[-1]['ent_train']:.3f} | {tr[-1]['lnf']:.2f} | {loop} | {vs} | {r['seconds']} |"
        )
    base = rows[0]["baseline"]
    lines += [
        "",
        f"Baseline (pre-trained reference): held greedy {base['exact_greedy']:.1f}, sampled "
        f"{base['exact_sampled']:.1f}, NLL {base['nll']:.4f}. The cal- cells start from the "
        "selected model of lnf-mle-6000 instead.",
    ]
    for file, what in (
        ("analysis.json", "the pre-trained reference"),
        ("analysis_calibrated.json", "the ln_f-calibrated reference (lnf-mle-6000)"),
    ):
        path = HERE / file
        if not path.exists():
            continue
        a = json.loads(path.read_text())
        lines += [
            "",
            f"## {what}: logits x s (temperature 1/s), seed 0",
            "",
            "| s | held greedy | held sampled | pstar held | NLL train | NLL held |",
            "|---|---|---|---|---|---|",
        ]
        for x in a["scale"]:
            lines.append(
                f"| {x['s']} | {x['exact_greedy']:.1f} | {x['exact_sampled']:.1f} | "
                f"{x['pstar_held']:.1f} | {x['nll_train']:.4f} | {x['nll']:.4f} |"
            )
        d = a["ddo_along_s"]
        lines += [
            "",
            f"## {what}: argmin over s of the DDO loss along logits x s (fakes: its samples)",
            "",
            f"Grid s = {d['s']}; train NLL per token is lowest at s = "
            f"{d['s'][min(range(len(d['s'])), key=lambda i: d['nll_train_per_tok'][i])]}.",
            "",
            "| beta | alpha 0.5 | alpha 1 | alpha 2 | alpha 4 |",
            "|---|---|---|---|---|",
        ]
        for beta in (0.03, 0.1, 0.3, 1.0, 3.0):
            cells = [str(d[f"b{beta}_a{alpha}"]["argmin_s"]) for alpha in (0.5, 1.0, 2.0, 4.0)]
            lines.append(f"| {beta} | " + " | ".join(cells) + " |")
        lines += [
            "",
            f"## {what}: minibatch gradients at theta = ref (batch 64, 200 batches)",
            "",
            "| loss | SNR all | SNR ln_f | SNR rest | scale-direction component mean / std | "
            "batches with a loss decrease when sharpening |",
            "|---|---|---|---|---|---|",
        ]
        for k, v in a["snr"].items():
            sd = v["scale_direction"]
            lines.append(
                f"| {k} | {v['all']['snr']:.3f} | {v['ln_f']['snr']:.3f} | {v['rest']['snr']:.3f}"
                f" | {sd['mean']:.5f} / {sd['std']:.5f} | {100 * sd['frac_negative']:.0f} % |"
            )
    (HERE / "sweep.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
