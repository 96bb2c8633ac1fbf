"""One seed-0 tiny-lm fine-tuning run (DDO or the MLE control) with diagnostics at every eval.

    OMP_NUM_THREADS=1 python diag_train.py OUT NAME '{"kind": "ddo", "beta": 0.1, ...}'

The protocol of ``tiny_lm.run_seed`` on seed 0: same Task, pre-trained model, adapter
(HFCausalLM, 4 new tokens, temperature 1), TrainConfig = the ``tiny-lm`` preset row with the
given overrides (TrainConfig fields only), checkpoint selection by the same eval_fn key
``exact`` (temperature-1 exact match on the 256 train selection prompts, generator
(0, "select")), and the same held-out metrics (``tiny_lm.metrics``). Extra keys, not in the
preset: ``kind`` ("ddo" | "mle": the MLEControl adapter), ``x_trainable`` ("all", or
"+"-separated parameter-name prefixes: the others get requires_grad False, for DDO and the
control alike), ``x_init`` (start from this state dict instead of the pre-trained model),
``x_save`` (save the selected model there).

Diagnostics per eval (never used for selection): pstar / nll on all train prompts and the 500
held-out prompts (common.token_stats), the response-token entropy, and ||ln_f.weight|| relative
to the start. The loop's own metrics.csv (loss, discriminator acc, r_real, r_fake, grad norm)
lands in OUT/NAME/run. Writes OUT/NAME/diag.json.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import torch
from common import SEED, setup, token_stats

from ddo_fast.adapters import MLEControl
from ddo_fast.examples import tiny_lm as T
from ddo_fast.examples.presets import settings
from ddo_fast.training import train
from ddo_fast.training.data import generator


def main(out: Path, name: str, overrides: dict) -> None:
    kind = overrides.pop("kind", "ddo")
    extra = {k: overrides.pop(k) for k in list(overrides) if k.startswith("x_")}
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    cfg, opts = settings("tiny-lm", **overrides)
    cfg = cfg.replace(seed=SEED, out_dir=str(folder / "run"))
    task, model, adapter, train_rows, held_rows = setup(extra.get("x_init"))
    lnf0 = float(model.transformer.ln_f.weight.detach().norm())
    hist: list[dict] = []
    t0 = time.time()

    def eval_fn(m: torch.nn.Module) -> dict[str, float]:
        sel = T.exact_match(adapter, m, task.select, generator(SEED, "select"), 1.0)
        tr, ho = token_stats(m, train_rows), token_stats(m, held_rows)
        hist.append(
            {
                "t": round(time.time() - t0, 1),
                "exact": sel,
                "pstar_train": tr["pstar"],
                "pstar_held": ho["pstar"],
                "ent_train": tr["ent"],
                "nll_train": tr["nll"],
                "nll_held": ho["nll"],
                "lnf": float(m.transformer.ln_f.weight.detach().norm()) / lnf0,
            }
        )
        print("EVAL", json.dumps({k: round(v, 4) for k, v in hist[-1].items()}), flush=True)
        return {"exact": sel}

    baseline = T.metrics(adapter, model, task, SEED, opts["eval_samples"])
    theta = copy.deepcopy(model)
    trainable = extra.get("x_trainable", "all")
    if trainable != "all":
        prefixes = tuple(trainable.split("+"))
        for n, p in theta.named_parameters():
            p.requires_grad_(n.startswith(prefixes))
    a = adapter if kind == "ddo" else MLEControl(adapter)
    res = train(theta, task.train, adapter=a, config=cfg, eval_fn=eval_fn)
    if "x_save" in extra:
        torch.save(res.model.state_dict(), extra["x_save"])
    selected = T.metrics(adapter, res.model, task, SEED, opts["eval_samples"])
    selected["best_step"] = [
        r["best_step_in_round"] for r in res.metrics if "best_step_in_round" in r
    ]
    print("baseline", baseline, "\nselected", selected, flush=True)
    blob = {
        "name": name,
        "seed": SEED,
        "kind": kind,
        "overrides": overrides,
        "extra": extra,
        "config": vars(cfg),
        "baseline": baseline,
        "selected": selected,
        "trajectory": hist,
        "seconds": round(time.time() - t0, 1),
    }
    (folder / "diag.json").write_text(json.dumps(blob, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]))
