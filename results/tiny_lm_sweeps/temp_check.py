"""Seed-0 headroom check: held-out exact match of the pre-trained baseline sampled at lower
temperatures (same model class, only the logits scaled) - what sharpening alone would give."""

import json
import sys
from pathlib import Path

import torch

from ddo_fast.adapters import HFCausalLM
from ddo_fast.examples import tiny_lm as T
from ddo_fast.training.data import generator

torch.set_num_threads(1)
path = Path(sys.argv[1])
task = T.Task(2, 0, 500, 256, 0)
adapter = HFCausalLM(max_new_tokens=4, temperature=1.0)
torch.manual_seed(0)
model = T.make_model("gpt2", 12, 1, 2, 2)
model.load_state_dict(torch.load(path, weights_only=True))
rows = {}
for temp in (1.0, 0.7, 0.5, 0.3, 0.0):
    rows[temp] = T.exact_match(adapter, model, task.held, generator(0, "sampled"), temp, 2)
print(json.dumps({"checkpoint": path.name, "held_out_exact_by_temperature": rows}))
