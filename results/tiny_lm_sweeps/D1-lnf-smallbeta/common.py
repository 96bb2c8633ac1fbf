"""Shared set-up of the D1 diagnostics: seed 0's tiny-lm Task, the cached pre-trained model, the
packed train / held-out rows, and noise-free per-token statistics.

The pre-trained model is the file the preset itself caches
(``pretrained-gpt2-2-0-12-1-2-10000-0.003-128-0.pt``); its folder is ``$D1_PRETRAINED_DIR``
(default ``/tmp/team2/lm/pre``, where the seed-0 sweeps C1-C3 left it).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ddo_fast.adapters import HFCausalLM
from ddo_fast.adapters.hf_causal_lm import positions, shifted_targets, unpack
from ddo_fast.examples import tiny_lm as T

SEED = 0
PRETRAINED = (
    Path(os.environ.get("D1_PRETRAINED_DIR", "/tmp/team2/lm/pre"))
    / "pretrained-gpt2-2-0-12-1-2-10000-0.003-128-0.pt"
)
KEYS = ("input_ids", "labels", "attention_mask")


def setup(init: str | None = None):
    """(task, model in eval mode, adapter, train rows [N, 3, L], held-out rows [500, 3, L]) of
    seed 0, exactly as ``tiny_lm.run_seed`` builds them; ``init``: another state dict to load."""
    torch.set_num_threads(1)
    task = T.Task(2, SEED, 500, 256, 0)
    torch.manual_seed(SEED)
    model = T.make_model("gpt2", 12, 1, 2, 2)
    model.load_state_dict(torch.load(init or PRETRAINED, weights_only=True))
    model.eval()
    adapter = HFCausalLM(max_new_tokens=4, temperature=1.0)
    train_rows, _ = HFCausalLM().prepare_data({k: task.train[k] for k in KEYS})
    held_rows, _ = HFCausalLM().prepare_data({k: task.held[k] for k in KEYS})
    return task, model, adapter, train_rows, held_rows


@torch.no_grad()
def token_stats(model: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
    """On packed rows x [N, 3, L]: ``pstar`` = 100 * mean_x p(y*|x), the probability of the whole
    true answer (the expected temperature-1 exact match, without sampling noise); ``ent`` = mean
    entropy (nats) of the next-token distribution at the response positions of the data
    prefixes; ``nll`` = NLL per response token."""
    ids, labels, mask = unpack(x)
    z = model(ids, attention_mask=mask, position_ids=positions(mask)).logits.float()
    targets = shifted_targets(labels)
    keep = targets != -100
    lp = torch.log_softmax(z, -1)
    ent = -(lp.exp() * lp).sum(-1)
    tok = lp.gather(-1, targets.clamp_min(0)[..., None])[..., 0] * keep
    return {
        "pstar": float(tok.sum(1).exp().mean() * 100),
        "ent": float(ent[keep].mean()),
        "nll": float(-tok.sum() / keep.sum()),
    }
