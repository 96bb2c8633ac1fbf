"""Seed-0 task/model-size exploration for tiny-lm: pre-train, then held-out metrics."""

import json
import sys
import time
from pathlib import Path

import torch

from ddo_fast.adapters import HFCausalLM
from ddo_fast.examples import tiny_lm as T
from ddo_fast.examples.pretrain import cached_pretrain

torch.set_num_threads(1)
out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
for spec in sys.argv[2:]:
    digits, pairs, dim, layers, heads, steps, lr, batch = spec.split(",")
    digits, pairs, dim, layers, heads, steps, batch = map(
        int, (digits, pairs, dim, layers, heads, steps, batch)
    )
    lr = float(lr)
    seed = 0
    t0 = time.time()
    task = T.Task(digits, seed, 500, 256, pairs)
    adapter = HFCausalLM(max_new_tokens=digits + 2, temperature=1.0)
    name = f"pretrained-gpt2-{digits}-{pairs}-{dim}-{layers}-{heads}-{steps}-{lr}-{batch}-{seed}.pt"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        args = (adapter, task.train, steps, lr, batch, seed)
        model = T.make_model("gpt2", dim, layers, heads, digits)
        model = cached_pretrain(out / name, model, lambda m, a=args: T.pretrain(m, *a))
    t1 = time.time()
    m = T.metrics(adapter, model, task, seed, 2)
    print(
        json.dumps(
            {
                "spec": spec,
                "seed": seed,
                "ntrain": len(task.train["input_ids"]),
                **m,
                "pretrain_s": round(t1 - t0, 1),
                "eval_s": round(time.time() - t1, 1),
            }
        ),
        flush=True,
    )
