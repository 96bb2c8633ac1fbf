"""A small DDO run driven from tests in child processes (resume-after-kill, torchrun DDP).

python tests/train_script.py OUT [--resume] [--kill-at-eval N] [--steps S] [--batch B]
Writes OUT/final.pt (the trained weights) when it finishes.
"""

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import ddo_fast  # noqa: E402
from ddo_fast.examples.toy2d import EDMMLP, sample_data  # noqa: E402
from ddo_fast.training.data import generator  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--kill-at-eval", type=int, default=0)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--fakes", type=int, default=64)
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = EDMMLP(hidden=16)
    data = sample_data(256, generator(0, "data"))
    calls = {"n": 0}

    def eval_fn(m):
        calls["n"] += 1
        if calls["n"] == args.kill_at_eval:
            os._exit(17)  # a hard kill: no cleanup, no flush beyond what was written
        return {"norm": sum(p.square().sum() for p in m.parameters()).item()}

    cfg = ddo_fast.TrainConfig(
        alpha=1.0,
        beta=1.0,
        lr=1e-3,
        batch_size=args.batch,
        steps_per_round=args.steps,
        rounds=2,
        fake_samples_per_round=args.fakes,
        ema=0.9,
        seed=3,
        out_dir=args.out,
        resume=args.resume,
        checkpoint_every=5,
        eval_every=4,
        device="cpu",
    )
    adapter = ddo_fast.adapters.EDMDenoiser(sigma_data=1.0, steps=4)
    result = ddo_fast.train(model, data, adapter=adapter, config=cfg, eval_fn=eval_fn)
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(result.model.state_dict(), Path(args.out) / "final.pt")


if __name__ == "__main__":
    main()
