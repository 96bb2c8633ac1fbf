"""A small DDO run driven from tests in child processes (resume-after-kill, torchrun DDP).

python tests/train_script.py OUT [--resume] [--kill-at-eval N] [--steps S] [--batch B] ...
Writes OUT/final.pt (the trained weights) when it finishes; with --all-ranks every rank writes
OUT/final-rank{R}.pt and OUT/metrics-rank{R}.json. Prints "training" (flushed) when train()
starts. Test hooks: --step-sleep (seconds per loss call), --ckpt-sleep (seconds after the first
file of every checkpoint write), --rank-eval (an eval_fn whose score depends on the rank).
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import ddo_fast  # noqa: E402
from ddo_fast.examples.toy2d import EDMMLP, sample_data  # noqa: E402
from ddo_fast.training import checkpoint  # noqa: E402
from ddo_fast.training.data import generator  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--kill-at-eval", type=int, default=0)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--fakes", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--ckpt-sleep", type=float, default=0.0)
    p.add_argument("--rank-eval", action="store_true")
    p.add_argument("--all-ranks", action="store_true")
    args = p.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = EDMMLP(hidden=16)
    data = sample_data(256, generator(0, "data"))
    calls = {"n": 0}

    def eval_fn(m):
        calls["n"] += 1
        if calls["n"] == args.kill_at_eval:
            os._exit(17)  # a hard kill: no cleanup, no flush beyond what was written
        score = {"norm": sum(p.square().sum() for p in m.parameters()).item()}
        if args.rank_eval:  # rank 0 prefers the latest eval, rank 1 the earliest
            score["score"] = calls["n"] if rank == 0 else -calls["n"]
        return score

    cfg = ddo_fast.TrainConfig(
        alpha=1.0,
        beta=1.0,
        lr=1e-3,
        batch_size=args.batch,
        steps_per_round=args.steps,
        rounds=args.rounds,
        fake_samples_per_round=args.fakes,
        ema=0.9,
        seed=3,
        out_dir=args.out,
        resume=args.resume,
        checkpoint_every=5,
        eval_every=4,
        device="cpu",
        log_every=args.log_every,
        select_best_by="max:score" if args.rank_eval else "last",
    )
    adapter = ddo_fast.adapters.EDMDenoiser(sigma_data=1.0, steps=4)
    if args.step_sleep:
        loss = adapter.loss

        def slow_loss(*a, **kw):
            time.sleep(args.step_sleep)
            return loss(*a, **kw)

        adapter.loss = slow_loss
    if args.ckpt_sleep:
        save_file = checkpoint.save_file

        def slow_save_file(tensors, path):
            save_file(tensors, path)
            if path.endswith("model.safetensors"):
                time.sleep(args.ckpt_sleep)  # a window for a kill inside the checkpoint write

        checkpoint.save_file = slow_save_file
    print("training", flush=True)
    result = ddo_fast.train(model, data, adapter=adapter, config=cfg, eval_fn=eval_fn)
    out = Path(args.out)
    if args.all_ranks:
        torch.save(result.model.state_dict(), out / f"final-rank{rank}.pt")
        (out / f"metrics-rank{rank}.json").write_text(json.dumps(result.metrics))
    if rank == 0:
        torch.save(result.model.state_dict(), out / "final.pt")


if __name__ == "__main__":
    main()
