"""A small DDO run driven from tests in child processes (resume-after-kill, torchrun DDP/FSDP).

python tests/train_script.py OUT [--resume] [--kill-at-eval N] [--steps S] [--batch B] ...
Writes OUT/final.pt (the trained weights, gathered when sharded) when it finishes; with
--all-ranks every rank writes OUT/final-rank{R}.pt and OUT/metrics-rank{R}.json. Prints
"training" (flushed) when train() starts. Test hooks: --step-sleep (seconds per loss call),
--ckpt-sleep (seconds after the first file of every checkpoint write), --rank-eval (an eval_fn
whose score depends on the rank), --distributed ddp|fsdp, --model mlp (EDM MLP, no blocks) |
blocks (CausalTransformer + CausalAR: FSDP units per block, KV-cache sampler) | fused (the
same with the fused-linear loss on hidden states and the head weight, and LossOutput.stats),
--chunk (the fused loss's chunk_size), --count-gathers (FSDP all-gathers per step into
OUT/gathers-rank{R}.json, with the head weights the loss saw), --expect-refused (a RuntimeError
from train() is printed as "rank R refused, group up: BOOL: MESSAGE" and the rank exits 0),
--retries K (rank 0 holds OUT's lock in this process during a first train(), which every rank must
see refused; then K more train() calls in the same processes, each into OUT/retry-K, each printing
"rank R retry K ok": groups that train() starts and destroys one after another).
"""

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import torch.distributed as dist  # noqa: E402

import ddo_fast  # noqa: E402
from ddo_fast import adapters as A  # noqa: E402
from ddo_fast.adapters.base import LossOutput, cat_labels, pair_mask  # noqa: E402
from ddo_fast.examples.toy2d import EDMMLP, sample_data  # noqa: E402
from ddo_fast.models import CausalTransformer  # noqa: E402
from ddo_fast.ops.fused_linear_ar_ddo import fused_linear_ar_ddo_loss  # noqa: E402
from ddo_fast.training import checkpoint, fsdp  # noqa: E402
from ddo_fast.training.data import generator  # noqa: E402

VOCAB, SEQ, CLASSES = 7, 6, 3


class HiddenTransformer(CausalTransformer):
    """CausalTransformer whose forward can stop before the head (hidden=True: the final
    normed hidden states [B, L, dim]), for the fused-linear loss. No qkv bias: the key bias's
    gradient is 0 in exact arithmetic (softmax ignores a shift shared by all keys), and Adam
    turns its rounding noise into lr-sized steps that differ between 1 and 2 ranks."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for block in self.blocks:
            block.qkv = torch.nn.Linear(block.qkv.in_features, block.qkv.out_features, bias=False)

    def forward(self, tokens, labels=None, hidden=False):
        b, n = tokens.shape
        if labels is None:
            labels = torch.full((b,), self.num_classes, device=tokens.device, dtype=torch.long)
        x = torch.cat([self.cls(labels)[:, None], self.tok(tokens[:, : n - 1])], 1)
        x = x + self.pos[:n]
        for block in self.blocks:
            x = block(x)
        x = self.ln(x)
        return x if hidden else self.head(x)


class FusedHeadAR(A.CausalAR):
    """CausalAR with r from the fused-linear loss: hidden states from theta's forward, then the
    head weight read from the model (under FSDP: the root unit's full weight, gathered once by
    that forward). Records the weights it was given; reports a LossOutput.stats entry."""

    def __init__(self, chunk_size: int | None = None) -> None:
        super().__init__(seq_len=SEQ)
        self.chunk_size = chunk_size
        self.seen: list[tuple[str, tuple[int, ...]]] = []

    def loss(self, model, ref, real, fake, noise, *, alpha, beta, ref_logprob=None):
        tokens = torch.cat([real[0], fake[0]]).long()
        labels = cat_labels(real[1], fake[1])
        if ref_logprob is None:
            ref_lp = self.ref_sequence_logprob(ref, tokens, labels)
        else:
            ref_lp = ref_logprob[:, 0]
        h = model(tokens, labels, hidden=True)
        head = model.head  # after the forward: full tensors under FSDP
        self.seen.append((type(head.weight).__name__, tuple(head.weight.shape)))
        loss, r = fused_linear_ar_ddo_loss(
            h,
            head.weight,
            tokens,
            ref_lp,
            pair_mask(len(real[0]), tokens.device),
            bias=head.bias,
            alpha=alpha,
            beta=beta,
            chunk_size=self.chunk_size,
            return_logratio=True,
        )
        return LossOutput(loss, r.detach(), stats={"h_rms": h.detach().square().mean().sqrt()})


def model_and_data(kind: str, chunk: int | None):
    """(model, real data, adapter) of a kind; the same on every rank (seeded)."""
    torch.manual_seed(0)
    if kind == "mlp":
        data = sample_data(256, generator(0, "data"))
        return EDMMLP(hidden=16), data, A.EDMDenoiser(sigma_data=1.0, steps=4)
    g = generator(0, "tokens")
    data = (torch.randint(VOCAB, (128, SEQ), generator=g), torch.arange(128) % CLASSES)
    if kind == "blocks":
        model = HiddenTransformer(VOCAB, SEQ, CLASSES, dim=8, layers=2, heads=2)
        return model, data, A.CausalAR(seq_len=SEQ)  # logits from forward, model.sample
    model = HiddenTransformer(VOCAB, SEQ, CLASSES, dim=8, layers=2, heads=2)
    return model, data, FusedHeadAR(chunk)


def count_gathers(calls: dict):
    """Counts in calls["n"] the FSDP parameter gathers (an FSDP unit going from sharded to
    gathered: one all-gather on several ranks, a copy on one); returns the undo function."""
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

    orig = FSDPParamGroup.unshard

    def counted(self, *a, **kw):
        calls["n"] += self._all_gather_result is None and not self.is_unsharded
        return orig(self, *a, **kw)

    FSDPParamGroup.unshard = counted
    return lambda: setattr(FSDPParamGroup, "unshard", orig)


def refuse_then_retry(model, data, adapter, cfg, rank: int, retries: int) -> None:
    """--retries: a refused train() (the folder held by rank 0 of this job), then ``retries``
    train() calls one after another in the same processes."""
    out = Path(cfg.out_dir)
    hold = checkpoint.out_dir_lock(out, 0, 1) if rank == 0 else contextlib.nullcontext()
    with hold:
        try:
            ddo_fast.train(model, data, adapter=adapter, config=cfg)
            raise AssertionError("train() ran on a held out_dir")
        except RuntimeError as e:
            print(f"rank {rank} refused, group up: {dist.is_initialized()}: {e}", flush=True)
    for k in range(1, retries + 1):
        again = cfg.replace(out_dir=str(out / f"retry-{k}"))
        ddo_fast.train(model, data, adapter=adapter, config=again)
        print(f"rank {rank} retry {k} ok, group up: {dist.is_initialized()}", flush=True)


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
    p.add_argument("--distributed", default="ddp")
    p.add_argument("--model", default="mlp", choices=["mlp", "blocks", "fused"])
    p.add_argument("--chunk", type=int, default=None)
    p.add_argument("--online", action="store_true", help="fresh fakes every step")
    p.add_argument("--count-gathers", action="store_true")
    p.add_argument("--expect-refused", action="store_true")
    p.add_argument("--retries", type=int, default=0)
    args = p.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    torch.set_num_threads(1)
    model, data, adapter = model_and_data(args.model, args.chunk)
    calls = {"n": 0}
    gathers = {"n": 0}
    if args.count_gathers:
        count_gathers(gathers)

    def eval_fn(m):
        calls["n"] += 1
        if calls["n"] == args.kill_at_eval:
            os._exit(17)  # a hard kill: no cleanup, no flush beyond what was written
        # under FSDP the loop gathers the model for eval_fn: plain full parameters here
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
        fake_samples_per_round=0 if args.online else args.fakes,
        ema=0.9,
        seed=3,
        out_dir=args.out,
        resume=args.resume,
        checkpoint_every=5,
        eval_every=4,
        device="cpu",
        log_every=args.log_every,
        select_best_by="max:score" if args.rank_eval else "last",
        distributed=args.distributed,
    )
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
    if args.retries:
        return refuse_then_retry(model, data, adapter, cfg, rank, args.retries)
    try:
        result = ddo_fast.train(model, data, adapter=adapter, config=cfg, eval_fn=eval_fn)
    except RuntimeError as e:
        if not args.expect_refused:
            raise
        # each rank reports for itself: torchrun's agent would stop the others at a failure
        print(f"rank {rank} refused, group up: {dist.is_initialized()}: {e}", flush=True)
        return
    out = Path(args.out)
    weights = fsdp.full_state_dict(result.model)  # gathered on rank 0 when sharded
    if args.all_ranks:
        torch.save(result.model.state_dict(), out / f"final-rank{rank}.pt")
        (out / f"metrics-rank{rank}.json").write_text(json.dumps(result.metrics))
    if args.count_gathers:
        seen = getattr(adapter, "seen", [])
        blob = {"gathers": gathers["n"], "steps": len(result.history), "seen": seen}
        (out / f"gathers-rank{rank}.json").write_text(json.dumps(blob))
    if rank == 0:
        torch.save(weights, out / "final.pt")
    if dist.is_initialized():  # a sharded run leaves its process group to the caller
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
