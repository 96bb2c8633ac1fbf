"""Diagnostics of the ``digits-var`` baseline on one seed (the selection seed by default):

    python -m ddo_fast.examples.digits_var_diag --cache DIR/cache [--seed 0] [--json OUT]

- the tokenizer floor: feature FD (vs held-out) of decode(encode(x)) of the unseen slice next
  to that of the images themselves, and the pixel MSE after each scale;
- how far token maps are from fixed points of R = encode∘decode, for the train token maps
  (encoder outputs of images) and for samples: the share of maps t with R(t) = t (per scale
  too for samples) and the share of tokens kept, R(t)_i = t_i (per scale too for train maps).
  Real maps are encoder outputs of x, not of decode(encode(x)), so few are exact fixed points
  either; what separates them from samples is the share of tokens kept, a gap that could let
  the DDO discriminator tell un-re-encoded fakes from reals by their tokens alone;
- held-out FD at temperature 1, 0.9, 0.8, 0.7 and with CFG 0.5 (how much sharpening helps), and
  of the re-encoded samples (the same images, decoded again);
- the per-scale NLL (nats) of the train and held-out token maps.

The cache holds the preset's pre-trained model, quantiser and classifier (built if missing).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..adapters.var import scale_sums
from ..ops import token_logprobs
from ..training.data import generator
from .digits import frechet_distance
from .digits_var import Seed
from .presets import PRESETS


def diagnose(seed: int, cache: Path) -> dict:
    opts = dict(PRESETS["digits-var"].options)
    s = Seed(seed, Path(cache), opts)
    q, m, model = s.model.quantizer, s.metrics, s.model.eval()

    def fd(x: torch.Tensor) -> float:
        feats = m.clf.features(x.reshape(len(x), 64).clamp(-1, 1)).double().numpy()
        return frechet_distance(feats, m.held_feats)

    unseen = m.x_unseen.view(-1, 1, 8, 8)
    codes = q.encode(unseen)
    out: dict = {
        "seed": seed,
        "floor": s.floor,
        "fd_unseen_vs_held": fd(m.x_unseen),
        "fd_recon_unseen_vs_held": fd(q.decode(codes)),
        "pixel_mse_after_scale": [
            float((q.decode(codes, scales=k) - unseen).square().mean())
            for k in range(1, len(q.patch_nums) + 1)
        ],
    }
    # Real token maps are encoder outputs of images, not of decoded token maps, so they need not
    # be fixed points of encode∘decode either: the separating statistic is the share kept.
    real_same = q.encode(q.decode(s.tokens)) == s.tokens
    out["train_tokens_fixed_points"] = float(real_same.all(1).double().mean())
    out["train_tokens_kept"] = float(real_same.double().mean())
    out["train_tokens_kept_per_scale"] = [float(c.double().mean()) for c in q.split(real_same)]
    labels = m.labels
    samplers = {
        "T1": {},
        "T0.9": {"temperature": 0.9},
        "T0.8": {"temperature": 0.8},
        "T0.7": {"temperature": 0.7},
        "cfg0.5": {"cfg": 0.5},
    }
    for name, kw in samplers.items():
        toks = model.sample(len(labels), labels, generator(seed, "select"), **kw)
        again = q.encode(q.decode(toks))
        same = again == toks
        out[name] = {
            "fd_held": fd(q.decode(toks)),
            "fd_held_reencoded": fd(q.decode(again)),
            "fixed_points": float(same.all(1).double().mean()),
            "fixed_points_per_scale": [float(c.all(1).double().mean()) for c in q.split(same)],
            "tokens_kept": float(same.double().mean()),
        }
    held = q.encode(s.split.x_held.view(-1, 1, 8, 8))
    with torch.no_grad():
        parts = (("train", s.tokens, s.split.y_train), ("held", held, s.split.y_held))
        for name, tokens, y in parts:
            lp = scale_sums(token_logprobs(model(tokens, y), tokens), q.patch_nums)
            out[f"nll_{name}_per_scale"] = (-lp.mean(0)).tolist()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="")
    a = p.parse_args(argv)
    res = diagnose(a.seed, Path(a.cache))
    text = json.dumps(res, indent=1)
    print(text)
    if a.json:
        Path(a.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
