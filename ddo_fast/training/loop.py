"""The DDO training loop: self-play rounds over a frozen reference (Zheng et al. 2025, Sec. 3.4).

One flat loop. Per round: the reference is the best model so far; fakes come from it (offline,
cached, or online every step); theta trains on B real + B fake pairs with the fused loss; the
round's best checkpoint (by ``eval_fn``, else the last) becomes the next reference.

Determinism: every random draw of step s comes from a generator seeded by (seed, s), and the real
data order by (seed, epoch); with the step counter as the only state, a resumed run, or a run on
2 ranks with the same global batch, replays the same numbers.
"""

from __future__ import annotations

import copy
import csv
import gc
import hashlib
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..adapters import Adapter
from . import checkpoint
from .config import TrainConfig
from .data import RealData, balanced_labels, generator

EvalFn = Callable[[nn.Module], "float | dict[str, float]"]
Sampler = Callable[..., torch.Tensor]


@dataclass
class TrainResult:
    """What :func:`train` returns: the selected model, per-round metrics, where files went."""

    model: nn.Module
    metrics: list[dict[str, Any]]
    out_dir: Path
    history: list[dict[str, float]] = field(default_factory=list)


# ------------------------------------------------------------------------------------ helpers
def _setup_distributed(device_hint: str | None) -> tuple[int, int, bool]:
    """(rank, world, we_initialised) under torchrun; (0, 1, False) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    use_cuda = torch.cuda.is_available() and (device_hint or "cuda").startswith("cuda")
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), True


def _device(cfg: TrainConfig, world: int) -> torch.device:
    if cfg.device:
        return torch.device(cfg.device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if world > 1 else 0)
    return torch.device("cpu")


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def weights_digest(model: nn.Module) -> str:
    """sha256 of the weights: the reference's identity in the fake-sample cache key."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(
            v.detach()
            .to("cpu", torch.float64 if v.is_floating_point() else v.dtype)
            .contiguous()
            .numpy()
            .tobytes()
        )
    return h.hexdigest()


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model for parameters; buffers are copied."""
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p, 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers(), strict=True):
        e.copy_(b)


def _score(result: float | dict[str, float]) -> dict[str, float]:
    return {"eval": float(result)} if isinstance(result, (int, float)) else dict(result)


def _better(cfg: TrainConfig, new: dict[str, float], old: dict[str, float] | None) -> bool:
    if cfg.select_best_by == "last" or old is None:
        return True
    mode, _, key = cfg.select_best_by.partition(":")
    if key not in new:
        raise KeyError(f"select_best_by={cfg.select_best_by!r} but eval_fn returned {list(new)}")
    return new[key] < old[key] if mode == "min" else new[key] > old[key]


class _CsvLog:
    """Appends rows to a CSV (rank 0); on resume keeps only rows up to the checkpoint step."""

    def __init__(self, path: Path, enabled: bool, keep_until: int | None = None) -> None:
        self.path, self.enabled, self.fields = path, enabled, None
        if enabled and keep_until is not None and path.exists():
            with open(path) as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= keep_until]
            self.fields = list(rows[0]) if rows else None
            with open(path, "w", newline="") as f:
                if rows:
                    w = csv.DictWriter(f, fieldnames=self.fields)
                    w.writeheader()
                    w.writerows(rows)
        elif enabled and path.exists():
            path.unlink()

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        new = self.fields is None
        if new:
            self.fields = list(row)
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)


def _tensorboard(out: Path, enabled: bool):
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(out / "tensorboard"))
    except Exception:  # tensorboard is optional
        return None


# --------------------------------------------------------------------------------------- train
def train(
    model: nn.Module,
    real_data: Any,
    *,
    adapter: Adapter,
    config: TrainConfig,
    sampler: Sampler | None = None,
    fake_data: Any = None,
    eval_fn: EvalFn | None = None,
) -> TrainResult:
    """Fine-tune ``model`` with DDO; it is modified in place and returned in the result.

    Args:
        model: the pretrained model; the frozen reference is a deep copy of it.
        real_data: tensor [N, ...], ``(tensor, labels)``, or a Dataset of ``x`` / ``(x, label)``.
        adapter: how the model computes log-likelihood gaps and samples
            (:mod:`ddo_fast.adapters`).
        config: :class:`TrainConfig`.
        sampler: ``sampler(model, n, labels, generator, device, shape)`` replacing the adapter's.
        fake_data: fakes for the first round (``tensor`` or ``(tensor, labels)``) instead of
            generating them.
        eval_fn: ``eval_fn(model) -> float | dict``; drives best-checkpoint selection.
    """
    cfg = config
    rank, world, owns_pg = _setup_distributed(cfg.device)
    if cfg.batch_size % world:
        raise ValueError(
            f"TrainConfig.batch_size={cfg.batch_size} must divide evenly over {world} ranks"
        )
    device = _device(cfg, world)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(cfg.out_dir) if cfg.out_dir else Path.cwd() / f"ddo-train-{stamp}"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    data = RealData(real_data)
    shape = data.sample_shape()
    num_classes = data.num_classes()
    local_batch = cfg.batch_size // world
    sample = sampler or (lambda m, n, lab, g, dev, shp: adapter.sample(m, n, lab, g, dev, shp))

    # DDO needs theta and ref to compute the same function at theta = ref: dropout off (eval
    # mode) for both; gradients still flow in eval mode.
    model.to(device).eval()
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    ema = copy.deepcopy(model).eval().requires_grad_(False) if cfg.ema else None
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            "ddo_fast.train: the model has no parameter with requires_grad=True; "
            "call model.requires_grad_(True) on the parts to fine-tune"
        )
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    def new_optimizer() -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    opt = new_optimizer()
    global_step = round_idx = step_in_round = skipped = 0
    best: dict[str, Any] | None = None  # {"score", "state", "step"} of the round
    round_metrics: list[dict[str, Any]] = []
    ckpt_root = out / "checkpoints"

    found = checkpoint.latest(ckpt_root) if cfg.resume else None
    if cfg.resume and found is None and rank == 0:
        warnings.warn(
            f"ddo_fast.train: resume=True but no complete checkpoint in {ckpt_root}; "
            "starting from the pretrained model",
            stacklevel=2,
        )
    if found is not None:
        weights, st = checkpoint.load(found)
        model.load_state_dict(weights["model"])
        ref.load_state_dict(weights["ref"])
        if ema is not None:
            ema.load_state_dict(weights["ema"])
        opt.load_state_dict(st["optimizer"])
        global_step, round_idx = st["global_step"], st["round"]
        step_in_round, skipped = st["step_in_round"], st["skipped"]
        round_metrics = st["round_metrics"]
        if "best" in weights:
            best = {"score": st["best_score"], "state": weights["best"], "step": st["best_step"]}
        if rank == 0:
            print(f"resumed from {found} (round {round_idx}, step {global_step})")

    log = _CsvLog(out / "metrics.csv", rank == 0, keep_until=global_step if found else None)
    eval_log = _CsvLog(out / "evals.csv", rank == 0, keep_until=global_step if found else None)
    tb = _tensorboard(out, rank == 0)
    history: list[dict[str, float]] = []

    def eval_model() -> nn.Module:
        return ema if ema is not None else model

    def evaluate(step_in: int) -> dict[str, float] | None:
        if eval_fn is None:
            return None
        with torch.no_grad():
            score = _score(eval_fn(eval_model()))
        eval_log.write({"round": round_idx, "step": global_step, "step_in_round": step_in} | score)
        return score

    def consider(score: dict[str, float] | None, step_in: int) -> None:
        nonlocal best
        if score is not None and _better(cfg, score, best and best["score"]):
            best = {"score": score, "state": _state(eval_model()), "step": step_in}

    def save_checkpoint() -> None:
        weights = {"model": model.state_dict(), "ref": ref.state_dict()}
        if ema is not None:
            weights["ema"] = ema.state_dict()
        st = {
            "global_step": global_step,
            "round": round_idx,
            "step_in_round": step_in_round,
            "skipped": skipped,
            "optimizer": opt.state_dict(),
            "round_metrics": round_metrics,
            "config": {k: v for k, v in asdict(cfg).items() if k != "extra"},
        }
        if best is not None:
            weights["best"] = best["state"]
            st |= {"best_score": best["score"], "best_step": best["step"]}
        if rank == 0:
            checkpoint.save(ckpt_root, global_step, weights, st)
        if world > 1:
            dist.barrier()

    def fake_pool() -> tuple[torch.Tensor, torch.Tensor | None] | None:
        if round_idx == 0 and fake_data is not None:
            pool = fake_data if isinstance(fake_data, (tuple, list)) else (fake_data, None)
            return pool[0], pool[1]
        n = cfg.fake_samples_per_round
        if n == 0:
            return None
        key = hashlib.sha256(
            repr(
                (weights_digest(ref), round_idx, adapter.sampler_config(), cfg.seed, n, shape)
            ).encode()
        ).hexdigest()[:16]
        path = out / "fakes" / f"round-{round_idx:03d}-{key}.pt"
        if rank == 0 and not path.exists():
            g = generator(cfg.seed, "fakes", round_idx)
            labels = balanced_labels(num_classes, n, g)
            t0 = time.time()
            x = sample(ref, n, labels, g, device, shape).cpu()
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"x": x, "labels": labels}, path.with_suffix(".tmp"))
            os.replace(path.with_suffix(".tmp"), path)
            print(
                f"round {round_idx}: {n} fakes from the reference in {time.time() - t0:.1f}s "
                f"-> {path}"
            )
        if world > 1:
            dist.barrier()
        blob = torch.load(path, weights_only=True)
        return blob["x"], blob["labels"]

    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        tqdm = None

    while round_idx < cfg.rounds:
        t_round = time.time()
        pool = fake_pool()
        if step_in_round == 0:
            best = None
            consider(evaluate(0), 0)  # the round's starting model is a candidate too
        bar = None
        if tqdm is not None and rank == 0:
            bar = tqdm(
                total=cfg.steps_per_round,
                initial=step_in_round,
                disable=None,
                desc=f"round {round_idx + 1}/{cfg.rounds}",
                leave=False,
            )
        while step_in_round < cfg.steps_per_round:
            g = generator(cfg.seed, "step", global_step)
            noise = adapter.draw(cfg.batch_size, shape, g)
            idx = data.indices(cfg.seed, global_step * cfg.batch_size, cfg.batch_size)
            mine = slice(rank * local_batch, (rank + 1) * local_batch)
            real_x, real_y = data.get(idx[mine])
            if pool is not None:
                fidx = torch.randint(len(pool[0]), (cfg.batch_size,), generator=g)[mine]
                fake_x = pool[0][fidx]
                fake_y = None if pool[1] is None else pool[1][fidx]
            else:  # online: a fresh global fake batch from the reference, real batch's labels
                all_y = data.get(idx)[1]
                fake_x = sample(
                    ref,
                    cfg.batch_size,
                    all_y,
                    generator(cfg.seed, "online", global_step),
                    device,
                    shape,
                )[mine]
                fake_y = None if all_y is None else all_y[mine]
            real = (real_x.to(device), None if real_y is None else real_y.to(device))
            fake = (fake_x.to(device), None if fake_y is None else fake_y.to(device))
            noise = {k: v[mine] for k, v in noise.items()}

            lr = (
                cfg.lr * min(1.0, (step_in_round + 1) / cfg.warmup_steps)
                if cfg.warmup_steps
                else cfg.lr
            )
            for group in opt.param_groups:
                group["lr"] = lr
            res = adapter.loss(net, ref, real, fake, noise, alpha=cfg.alpha, beta=cfg.beta)
            opt.zero_grad(set_to_none=True)
            res.loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(
                params, cfg.grad_clip if cfg.grad_clip else float("inf")
            )
            finite = (torch.isfinite(res.loss.detach()) & torch.isfinite(grad_norm)).int()
            if world > 1:
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)  # all ranks decide together
            if not bool(finite):
                if cfg.nonfinite == "raise":
                    raise FloatingPointError(
                        f"ddo_fast.train: non-finite loss ({res.loss.item()}) or gradient norm "
                        f"({grad_norm.item()}) at round {round_idx}, step {global_step}; the "
                        "optimizer step was not taken. Lower lr or beta, check the data, or set "
                        "TrainConfig(nonfinite='skip') to skip such steps."
                    )
                skipped += 1
                opt.zero_grad(set_to_none=True)
            else:
                opt.step()
                if ema is not None:
                    update_ema(ema, model, cfg.ema)
            global_step += 1
            step_in_round += 1
            r = res.logratio.float()
            r_real, r_fake = r[:local_batch], r[local_batch:]
            row = {
                "round": round_idx,
                "step": global_step,
                "step_in_round": step_in_round,
                "loss": res.loss.item(),
                "acc": (r_real > r_fake).float().mean().item(),
                "margin": (r_real - r_fake).mean().item(),
                "r_real": r_real.mean().item(),
                "r_fake": r_fake.mean().item(),
                "lr": lr,
                "grad_norm": grad_norm.item(),
                "skipped": skipped,
            }
            history.append(row)
            log.write(row)
            if tb is not None:
                for k in ("loss", "acc", "margin", "r_real", "r_fake", "lr", "grad_norm"):
                    tb.add_scalar(f"train/{k}", row[k], global_step)
            if bar is not None:
                bar.update(1)
                if step_in_round % cfg.log_every == 0:
                    bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['acc']:.2f}")
            last = step_in_round == cfg.steps_per_round
            if (cfg.eval_every and step_in_round % cfg.eval_every == 0) or last:
                consider(evaluate(step_in_round), step_in_round)
            if eval_fn is None and last:
                best = {"score": {}, "state": _state(eval_model()), "step": step_in_round}
            if cfg.checkpoint_every and global_step % cfg.checkpoint_every == 0 and not last:
                save_checkpoint()
        if bar is not None:
            bar.close()

        # End of round: the best model becomes theta, the EMA and the next reference.
        chosen = (
            best
            if best is not None
            else {"score": {}, "state": _state(eval_model()), "step": step_in_round}
        )
        for m in (model, ref) + ((ema,) if ema is not None else ()):
            m.load_state_dict(chosen["state"])
        summary = {
            "round": round_idx,
            "best_step_in_round": chosen["step"],
            "skipped": skipped,
            "seconds": round(time.time() - t_round, 2),
        }
        summary |= {k: v for k, v in chosen["score"].items()}
        round_metrics.append(summary)
        if rank == 0:
            print(
                "round "
                + ", ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in summary.items()
                )
            )
        round_idx += 1
        step_in_round = 0
        best = None
        opt = new_optimizer()  # a fresh optimizer every round, as in the paper
        save_checkpoint()

    if tb is not None:
        tb.close()
    # theta holds the selected weights now (they were loaded into it at the end of each round)
    result = TrainResult(model=model, metrics=round_metrics, out_dir=out, history=history)
    if owns_pg:
        # Tear down in this order, or gloo may abort at interpreter exit (seen 1 run in 7).
        del net
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
    return result


__all__ = ["TrainResult", "train", "update_ema", "weights_digest"]
