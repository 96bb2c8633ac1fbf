"""DDO loss and NLL along the logit-temperature direction at a pre-trained tiny-lm model.

    OMP_NUM_THREADS=1 python curv.py SEED PRETRAINED.pt NFAKE > curvSEED.json

The referee's script (results/tiny_lm.md, "What the curvature measurements show"), reformatted
for ruff only; re-running it reproduces curv0.json and curv1.json byte for byte. Along logits
z -> (1 + t) z it evaluates, on all train prompts of SEED (data: the true answer; fake: NFAKE
temperature-1 reference samples per prompt), the DDO loss
L(t) = -E_data logsigmoid(beta r) - alpha E_fake logsigmoid(-beta r), with
r = log p_t(y|x) - log p_0(y|x) summed over response tokens, its slope and curvature at t = 0
(central differences, h = 0.05), and the train NLL per response token. ``data`` / ``fake``:
mean score, logit variance V (= the NLL Hessian / the Fisher along t) and the score's second
moment F_emp, for the second-order formula
L'' = (beta/2)(V_data - alpha V_fake) + (beta^2/4)(F_emp,data + alpha F_emp,fake).
"""

import json
import sys

import torch

from ddo_fast.examples import tiny_lm as T

torch.set_num_threads(1)
seed = int(sys.argv[1])
path = sys.argv[2]
nfake = int(sys.argv[3])
task = T.Task(2, seed, 500, 256, 0)
torch.manual_seed(seed)
model = T.make_model("gpt2", 12, 1, 2, 2)
model.load_state_dict(torch.load(path, weights_only=True))
model.eval()
ids = task.train["input_ids"]
lab = task.train["labels"]
plen = (lab == -100).long().cumprod(1).sum(1)  # prompt length incl BOS
g = torch.Generator().manual_seed(1234)


def logits_of(seqs):
    with torch.no_grad():
        return model(seqs).logits.double()


data_z, data_y, data_m = [], [], []
fake_z, fake_y, fake_m = [], [], []
for P in plen.unique().tolist():
    sel = plen == P
    rows = ids[sel]
    prompts = rows[:, :P]
    # data: response = tokens P.. (<=4), mask after EOS (labels -100)
    resp = lab[sel][:, P : P + 4]
    m = resp != -100
    seqs = torch.cat([prompts, resp.clamp_min(0)], 1)
    z = logits_of(seqs)[:, P - 1 : P + 3]
    data_z.append(z)
    data_y.append(resp.clamp_min(0))
    data_m.append(m)
    # fakes: nfake per prompt, ancestral T=1 from the reference
    pr = prompts.repeat(nfake, 1)
    seq = pr
    alive = torch.ones(len(pr), dtype=torch.bool)
    toks, ms = [], []
    for _ in range(4):
        zz = logits_of(seq)[:, -1]
        y = torch.multinomial(torch.softmax(zz, -1).float(), 1, generator=g)[:, 0]
        ms.append(alive.clone())
        toks.append(y)
        alive = alive & (y != T.EOS)
        seq = torch.cat([seq, y[:, None]], 1)
    z = logits_of(seq)[:, P - 1 : P + 3]
    fake_z.append(z)
    fake_y.append(torch.stack(toks, 1))
    fake_m.append(torch.stack(ms, 1))
Dz, Dy, Dm = torch.cat(data_z), torch.cat(data_y), torch.cat(data_m)
Fz, Fy, Fm = torch.cat(fake_z), torch.cat(fake_y), torch.cat(fake_m)


def r_of(z, y, m, t):
    def lp(s):
        return torch.log_softmax(s * z, -1).gather(-1, y[..., None])[..., 0]

    return ((lp(1 + t) - lp(1.0)) * m).sum(1)


def stats(z, y, m):
    p = torch.softmax(z, -1)
    Ez = (p * z).sum(-1)
    V = (p * z * z).sum(-1) - Ez**2
    s = (z.gather(-1, y[..., None])[..., 0] - Ez) * m
    return {
        "mean_score": float(s.sum(1).mean()),
        "V": float((V * m).sum(1).mean()),
        "F_emp": float((s.sum(1) ** 2).mean()),
    }


out = {
    "seed": seed,
    "n_data": len(Dz),
    "n_fake": len(Fz),
    "data": stats(Dz, Dy, Dm),
    "fake": stats(Fz, Fy, Fm),
}
ls = torch.nn.functional.logsigmoid
ts = [-0.5, -0.2, -0.1, -0.05, 0.0, 0.05, 0.1, 0.2, 0.5, 1.0, 2.33]
for beta in (0.1, 1.0, 3.0, 10.0):
    for alpha in (0.5, 1.0, 2.0):
        L = []
        for t in ts:
            real = -ls(beta * r_of(Dz, Dy, Dm, t)).mean()
            L.append(float(real - alpha * ls(-beta * r_of(Fz, Fy, Fm, t)).mean()))
        h = 0.05
        i0 = ts.index(0.0)
        curv = (L[ts.index(h)] - 2 * L[i0] + L[ts.index(-h)]) / h**2
        slope = (L[ts.index(h)] - L[ts.index(-h)]) / (2 * h)
        out[f"b{beta}_a{alpha}"] = {
            "slope": slope,
            "curv": curv,
            "L_minus_L0": {str(t): round(lv - L[i0], 6) for t, lv in zip(ts, L, strict=True)},
        }


def nll(t):
    lp = torch.log_softmax((1 + t) * Dz, -1).gather(-1, Dy[..., None])[..., 0]
    return float(-(lp * Dm).sum() / Dm.sum())


out["train_nll_per_tok"] = {str(t): round(nll(t), 5) for t in ts}
print(json.dumps(out, indent=1))
