"""Seed-0 analyses at the pre-trained reference (no training).

    OMP_NUM_THREADS=1 python analysis.py FAKES.pt OUT.json [INIT.pt]

FAKES.pt: the round-0 pool of 8000 samples of the reference (written by a seed-0 DDO run of
diag_train.py under run/fakes/); INIT.pt: another reference than the pre-trained model (the
ln_f-calibrated one, with the pool of a cal- run). Three parts:

``scale``: the reference with logits multiplied by s (ln_f weight and bias times s; GPT-2 has no
head bias, so this is exactly temperature 1/s): held-out greedy / sampled exact match
(tiny_lm.metrics), pstar and NLL on train and held-out.

``ddo_along_s``: the DDO loss L(s) = -mean_data logsigmoid(beta r) - alpha mean_fake
logsigmoid(-beta r), r = log p_s(y|x) - log p_1(y|x) summed over response tokens, on all train
reals and the 8000 fakes (samples of the s = 1 reference, as in training), and its argmin over
the grid of s, for beta in {0.03, 0.1, 0.3, 1, 3} and alpha in {0.5, 1, 2, 4}.

``snr``: minibatch gradients at theta = ref (batch 64 reals + 64 fakes drawn uniformly, 200
batches, like the loop) of the DDO loss (alpha 1; beta 1 and 0.1) and of the MLE loss: norm of
their mean, mean norm of the per-batch deviation from it, their ratio (per-batch SNR), for all
parameters, the ln_f parameters and the rest; and the per-batch component along the exact
logit-scale direction (ln_f weight and bias, normalised): mean, std, fraction < 0 (a loss
decrease when sharpening).
"""

from __future__ import annotations

import copy
import json
import sys

import torch
import torch.nn.functional as F
from common import SEED, setup, token_stats

from ddo_fast.adapters.hf_causal_lm import positions, shifted_targets, unpack
from ddo_fast.examples import tiny_lm as T

GRID = [1, 1.25, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10, 15, 20]


def scaled(model: torch.nn.Module, s: float) -> torch.nn.Module:
    m = copy.deepcopy(model)
    m.transformer.ln_f.weight.data *= s
    m.transformer.ln_f.bias.data *= s
    return m


def scale_part(task, model, adapter, train_rows, held_rows) -> list[dict]:
    rows = []
    for s in (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0, 10.0):
        m = scaled(model, s)
        tr, ho = token_stats(m, train_rows), token_stats(m, held_rows)
        met = T.metrics(adapter, m, task, SEED, 2)
        rows.append(
            {"s": s, "pstar_train": tr["pstar"], "pstar_held": ho["pstar"], "nll_train": tr["nll"]}
            | met
        )
        print("scale", json.dumps(rows[-1]), flush=True)
    return rows


def ddo_part(model, train_rows, fakes) -> dict:
    @torch.no_grad()
    def logits(x):
        ids, labels, mask = unpack(x)
        z = model(ids, attention_mask=mask, position_ids=positions(mask)).logits.double()
        return z, shifted_targets(labels)

    def seq_lp(z, targets, s):
        keep = targets != -100
        lp = torch.log_softmax(s * z, -1).gather(-1, targets.clamp_min(0)[..., None])[..., 0]
        return (lp * keep).sum(1)

    zr, tr = logits(train_rows)
    zf, tf = logits(fakes)
    lr0, lf0 = seq_lp(zr, tr, 1.0), seq_lp(zf, tf, 1.0)
    out = {"s": GRID, "nll_train_per_tok": []}
    for s in GRID:
        out["nll_train_per_tok"].append(float(-seq_lp(zr, tr, s).sum() / (tr != -100).sum()))
    for beta in (0.03, 0.1, 0.3, 1.0, 3.0):
        for alpha in (0.5, 1.0, 2.0, 4.0):
            loss = []
            for s in GRID:
                rr, rf = seq_lp(zr, tr, s) - lr0, seq_lp(zf, tf, s) - lf0
                loss.append(
                    float(-F.logsigmoid(beta * rr).mean() - alpha * F.logsigmoid(-beta * rf).mean())
                )
            best = min(range(len(GRID)), key=lambda k: loss[k])
            out[f"b{beta}_a{alpha}"] = {
                "argmin_s": GRID[best],
                "L_minus_L1": [round(v - loss[0], 5) for v in loss],
            }
            print(f"ddo_along_s beta {beta} alpha {alpha}: argmin s {GRID[best]}", flush=True)
    return out


def snr_part(model, adapter, train_rows, fakes, batches: int = 200, batch: int = 64) -> dict:
    ref = copy.deepcopy(model)
    named = list(model.named_parameters())
    is_lnf = torch.cat(
        [torch.full((p.numel(),), n.startswith("transformer.ln_f")) for n, p in named]
    )
    direction = torch.cat(
        [
            p.detach().flatten() if n.startswith("transformer.ln_f") else torch.zeros(p.numel())
            for n, p in named
        ]
    )
    direction /= direction.norm()
    g = torch.Generator().manual_seed(0)
    out = {}
    for kind, beta in (("ddo", 1.0), ("mle", None), ("ddo", 0.1)):
        grads = []
        for _ in range(batches):
            ri = torch.randint(len(train_rows), (batch,), generator=g)
            fi = torch.randint(len(fakes), (batch,), generator=g)
            model.zero_grad()
            if kind == "ddo":
                real, fake = (train_rows[ri], None), (fakes[fi], None)
                loss = adapter.loss(model, ref, real, fake, None, alpha=1.0, beta=beta).loss
            else:
                loss = adapter.mle_loss(model, (train_rows[ri], None), None)
            loss.backward()
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        G = torch.stack(grads)
        mean = G.mean(0)
        dev = G - mean
        res = {}
        for part, sel in (("all", torch.ones_like(is_lnf)), ("ln_f", is_lnf), ("rest", ~is_lnf)):
            sig, noise = float(mean[sel].norm()), float(dev[:, sel].norm(dim=1).mean())
            res[part] = {"mean_norm": sig, "per_batch_dev_norm": noise, "snr": sig / noise}
        c = G @ direction
        res["scale_direction"] = {
            "mean": float(c.mean()),
            "std": float(c.std()),
            "frac_negative": float((c < 0).float().mean()),
        }
        key = f"{kind}_b{beta}" if beta else kind
        out[key] = res
        print("snr", key, json.dumps(res), flush=True)
    return out


def main(fakes_path: str, out_path: str, init: str | None = None) -> None:
    task, model, adapter, train_rows, held_rows = setup(init)
    adapter.prepare_data({k: task.train[k] for k in ("input_ids", "labels", "attention_mask")})
    fakes = torch.load(fakes_path, weights_only=False)["x"].long()
    out = {
        "seed": SEED,
        "reference": init or "pre-trained",
        "n_fakes": len(fakes),
        "scale": scale_part(task, model, adapter, train_rows, held_rows),
        "ddo_along_s": ddo_part(model, train_rows, fakes),
        "snr": snr_part(model, adapter, train_rows, fakes),
    }
    with open(out_path, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:4])
