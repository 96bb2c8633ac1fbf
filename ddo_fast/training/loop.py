"""The DDO training loop: self-play rounds over a frozen reference (Zheng et al. 2025, Sec. 3.4).

Per round: the reference is the best model so far; fakes come from it (offline, cached, or online
every step); theta trains on B real + B fake pairs with the fused loss of Eq. 13,
L = -E_data log sigma(beta r) - alpha E_ref log sigma(-beta r), r = log p_theta - log p_ref;
the round's best checkpoint (by ``eval_fn``, else the last) becomes the next reference.

Reference log-probs: with an offline pool and an adapter that can score samples without the
step's draws (CausalAR), log p_ref of the round's real samples and fakes is scored once at the
start of the round and cached beside the fakes (:mod:`~ddo_fast.training.ref_cache`); steps then
run no reference forward. Online fakes and diffusion adapters run the reference every step.

Determinism: every random draw of step s comes from a generator seeded by (seed, s), and the real
data order by (seed, epoch); with the step counter as the only state, a resumed run, or a run on
2 ranks with the same global batch, replays the same numbers.

Host syncs: none per step in steady state. Metrics stay on the device until a flush (every
``log_every`` steps: one ``.tolist()``); the non-finite guard decides on the device
(:class:`~ddo_fast.training.metrics.NonFiniteGuard`).

Scale-out (``TrainConfig.distributed``): "ddp" replicates theta and all-reduces gradients;
"fsdp" shards theta, the reference, the EMA, Adam and the best copy with FSDP2 and writes
checkpoints with torch.distributed.checkpoint (:mod:`~ddo_fast.training.fsdp`). Both give the
numbers of a 1-rank run with the same global batch (up to float summation order).
"""

from __future__ import annotations

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

from ..adapters import Adapter, Batch
from . import checkpoint, fsdp
from .config import TrainConfig
from .data import RealData, balanced_labels, generator
from .metrics import CsvLog, NonFiniteGuard, StepLog, sample_stats, step_stats
from .ref_cache import RefLogprobs, ref_logprobs
from .state import Best, TrainState, adam, clone_state, trainable, update_ema

EvalFn = Callable[[nn.Module], "float | dict[str, float]"]
Sampler = Callable[..., torch.Tensor]


@dataclass
class TrainResult:
    """What :func:`train` returns: the selected model, per-round metrics, where files went."""

    model: nn.Module
    metrics: list[dict[str, Any]]
    out_dir: Path
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class Run:
    """What stays fixed during a run: settings, data, placement, logs."""

    cfg: TrainConfig
    adapter: Adapter
    sample: Sampler  # sample(model, n, labels, generator, device, shape)
    data: RealData
    shape: tuple[int, ...]
    device: torch.device
    rank: int
    world: int
    out: Path
    net: nn.Module  # theta, DDP-wrapped on several ranks (FSDP: theta itself, sharded)
    params: list[nn.Parameter]
    eval_fn: EvalFn | None
    guard: NonFiniteGuard
    log: StepLog
    evals: CsvLog
    sharded: bool = False  # TrainConfig.distributed == "fsdp": model forwards are collectives


# ------------------------------------------------------------------------------- placement
def pick_device(requested: str | None, world: int, local_rank: int) -> torch.device:
    """cfg.device, else cuda if available, else cpu; under torchrun a bare "cuda" (or None) is
    cuda:LOCAL_RANK, so that ranks do not all land on cuda:0."""
    device = torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None and (world > 1 or requested is None):
        device = torch.device("cuda", local_rank if world > 1 else 0)
    return device


_GROUPS_STARTED = 0  # process groups setup_distributed started in this process


def group_timeout(backend: str):
    """The store timeout ``init_process_group(backend)`` would set: NCCL's default (10 min;
    None in torch builds without NCCL), else the general one (30 min). Read when a group starts,
    not at import: torch builds without distributed support have no ``dist.constants``."""
    constants = dist.constants
    nccl = constants.default_pg_nccl_timeout if backend == "nccl" else None
    return nccl or constants.default_pg_timeout


def setup_distributed(
    requested: str | None, distributed: str = "ddp"
) -> tuple[int, int, torch.device, bool]:
    """(rank, world, device, we_initialised) under torchrun; (0, 1, device, False) otherwise,
    except that "fsdp" in a single process starts a 1-rank group (FSDP needs one).

    The rank's GPU becomes the current device BEFORE the process group starts: NCCL, DDP and
    every default-device allocation then use it.
    """
    initialised = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if initialised else int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(requested, world, int(os.environ.get("LOCAL_RANK", "0")))
    if world <= 1 and (distributed != "fsdp" or initialised):
        return 0, 1, device, False
    if world <= 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        fsdp.single_process_group(device)
        return 0, 1, device, True
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if initialised:
        return dist.get_rank(), world, device, False
    global _GROUPS_STARTED
    _GROUPS_STARTED += 1  # the same count on every rank: each rank runs the same train() calls
    # A fresh key prefix in torchrun's store per group this process starts: destroying a group
    # resets torch's group counter, and a second group under the same keys can read the first
    # one's stale gloo/NCCL addresses (a retry after a raise, or DDP runs back to back, hung or
    # failed about half the time). An elastic restart (torchrun --max-restarts) reuses the
    # agent's store with the counter back at 1: the restart count is part of the prefix.
    backend = "nccl" if device.type == "cuda" else "gloo"
    store, rank, size = next(dist.rendezvous("env://"))
    store.set_timeout(group_timeout(backend))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(
        backend,
        store=dist.PrefixStore(f"ddo_fast.train/{attempt}/{_GROUPS_STARTED}", store),
        rank=rank,
        world_size=size,
    )
    return dist.get_rank(), dist.get_world_size(), device, True


def weights_digest(model: nn.Module) -> str:
    """sha256 of the weights: the reference's identity in the fake-sample cache key. Sharded
    weights are gathered one tensor at a time (a collective: every rank calls it)."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(
            fsdp.full(v.detach())
            .to("cpu", torch.float64 if v.is_floating_point() else v.dtype)
            .contiguous()
            .numpy()
            .tobytes()
        )
    return h.hexdigest()


# --------------------------------------------------------------------------------- fakes
def fake_pool(
    run: Run, state: TrainState, fake_data: Any = None, ref_id: str | None = None
) -> Batch | None:
    """This round's fakes x ~ p_ref (Sec. 3.4: regenerated from each round's reference).

    Round 0 may use ``fake_data``; otherwise ``fake_samples_per_round`` class-balanced samples
    of the reference, cached under out/fakes by (ref weights, round, sampler, seed, n, shape).
    None = online fakes (a fresh batch every step). ``ref_id``: the reference's
    :func:`weights_digest` when the caller has it.
    """
    cfg = run.cfg
    if state.round == 0 and fake_data is not None:
        pool = fake_data if isinstance(fake_data, (tuple, list)) else (fake_data, None)
        return pool[0], pool[1]
    n = cfg.fake_samples_per_round
    if n == 0:
        return None
    ref_id = ref_id or weights_digest(state.ref)
    ident = (ref_id, state.round, run.adapter.sampler_config(), cfg.seed, n)
    key = hashlib.sha256(repr(ident + (run.shape,)).encode()).hexdigest()[:16]
    path = run.out / "fakes" / f"round-{state.round:03d}-{key}.pt"

    def build() -> dict:
        g = generator(cfg.seed, "fakes", state.round)
        labels = balanced_labels(run.data.num_classes(), n, g)
        t0 = time.time()
        x = run.sample(state.ref, n, labels, g, run.device, run.shape).cpu()
        secs = time.time() - t0
        if run.rank == 0:
            print(f"round {state.round}: {n} fakes from the reference in {secs:.1f}s -> {path}")
        return {"x": x, "labels": labels}

    blob = checkpoint.build_once(path, build, run.rank, run.world)
    return blob["x"], blob["labels"]


def draw_batch(
    run: Run, state: TrainState, pool: Batch | None, refs: RefLogprobs | None = None
) -> tuple[Batch, Batch, dict, torch.Tensor | None]:
    """This rank's share of step s's B real and B fake samples, the shared noise and, with a
    ref-logprob cache ``refs``, the samples' cached reference log-probs [2b, K] ([real; fake]),
    on the device (drawn on the CPU from step-seeded generators: the same on any device or
    rank)."""
    cfg, step = run.cfg, state.global_step
    local = cfg.batch_size // run.world
    mine = slice(run.rank * local, (run.rank + 1) * local)
    g = generator(cfg.seed, "step", step)
    noise = run.adapter.draw(cfg.batch_size, run.shape, g)
    idx = run.data.indices(cfg.seed, step * cfg.batch_size, cfg.batch_size)
    real = run.data.get(idx[mine])
    ref_lp = None
    if pool is not None:
        fidx = torch.randint(len(pool[0]), (cfg.batch_size,), generator=g)[mine]
        fake = (pool[0][fidx], None if pool[1] is None else pool[1][fidx])
        if refs is not None:
            ref_lp = refs.rows(idx[mine], fidx)
    else:  # online: a fresh global fake batch from the reference, real batch's labels
        all_y = run.data.get(idx)[1]
        g_online = generator(cfg.seed, "online", step)
        with fsdp.gathered(state.ref):  # sharded: the whole reference on every rank, then freed
            x = run.sample(state.ref, cfg.batch_size, all_y, g_online, run.device, run.shape)
        fake = (x[mine], None if all_y is None else all_y[mine])

    def put(t: torch.Tensor) -> torch.Tensor:
        if run.device.type != "cuda" or t.is_cuda:
            return t.to(run.device)
        # pinned + non_blocking: a pageable host-to-device copy would wait for the GPU's queue
        return t.pin_memory().to(run.device, non_blocking=True)

    def put_batch(b: Batch) -> Batch:
        return put(b[0]), None if b[1] is None else put(b[1])

    noise = {k: put(v[mine]) for k, v in noise.items()}
    return put_batch(real), put_batch(fake), noise, None if ref_lp is None else put(ref_lp)


# ------------------------------------------------------------------------------- selection
def select_best(
    cfg: TrainConfig, best: Best | None, score: dict[str, float] | None, model: nn.Module, step: int
) -> Best | None:
    """The better of ``best`` and (``score``, a copy of ``model``) by ``cfg.select_best_by``.

    Sec. 3.4 / the paper's practice: the next reference is the round's best checkpoint by the
    eval metric (FID there), not the last. ``score`` None (no eval_fn) keeps ``best``.
    """
    if score is None:
        return best
    if cfg.select_best_by != "last" and best is not None:
        mode, _, key = cfg.select_best_by.partition(":")
        if key not in score:
            raise KeyError(
                f"select_best_by={cfg.select_best_by!r} but eval_fn returned {list(score)}"
            )
        better = score[key] < best.score[key] if mode == "min" else score[key] > best.score[key]
        if not better:
            return best
    return Best(score, clone_state(model), step)


def evaluate(run: Run, state: TrainState) -> dict[str, float] | None:
    """eval_fn on the EMA (else theta) on every rank; rank 0's score counts on all of them, so
    a rank-dependent eval_fn cannot make the ranks select different checkpoints."""
    if run.eval_fn is None:
        return None
    with torch.no_grad(), fsdp.gathered(state.eval_model):  # sharded: whole, then freed
        result = run.eval_fn(state.eval_model)
    score = {"eval": float(result)} if isinstance(result, (int, float)) else dict(result)
    if run.world > 1:
        box = [score]
        dist.broadcast_object_list(box, src=0)
        score = box[0]
    where = {"round": state.round, "step": state.global_step, "step_in_round": state.step_in_round}
    run.evals.write([where | score])
    return score


def consider(run: Run, state: TrainState) -> None:
    """Evaluate the current model and keep it if it is the round's best so far."""
    flush(run, state)  # rows and the non-finite verdict come before an eval
    score = evaluate(run, state)
    state.best = select_best(run.cfg, state.best, score, state.eval_model, state.step_in_round)


# ---------------------------------------------------------------------- host-side bookkeeping
def flush(run: Run, state: TrainState) -> None:
    """Moves pending metrics to the host (one sync) and raises on a non-finite step in
    ``nonfinite="raise"`` mode (the guard has kept the weights from before it)."""
    bad = run.log.flush(stop_at_nonfinite=run.cfg.nonfinite == "raise")
    if run.log.history:
        state.skipped = run.log.history[-1]["skipped"]
    if bad is not None:
        raise FloatingPointError(
            f"ddo_fast.train: non-finite loss ({bad['loss']}) or gradient norm "
            f"({bad['grad_norm']}) at round {bad['round']}, step {bad['step'] - 1}; the optimizer "
            "step was not taken. Lower lr or beta, check the data, or set "
            "TrainConfig(nonfinite='skip') to skip such steps."
        )


def save_checkpoint(run: Run, state: TrainState) -> None:
    flush(run, state)  # metrics.csv holds every row up to the checkpoint's step
    if run.sharded:  # every rank writes its shards
        tensors, meta = state.sharded_state_dict()
        meta["config"] = asdict(run.cfg)
        root = run.out / "checkpoints"
        checkpoint.save_sharded(root, state.global_step, tensors, meta, run.rank, run.world)
        return
    if run.rank == 0:
        sd = state.state_dict()
        sd["meta"]["config"] = asdict(run.cfg)
        checkpoint.save(run.out / "checkpoints", state.global_step, **sd)
    if run.world > 1:
        dist.barrier()


# ----------------------------------------------------------------------------------- steps
def train_step(
    run: Run,
    state: TrainState,
    real: Batch,
    fake: Batch,
    noise: dict,
    ref_logprob: torch.Tensor | None = None,
) -> None:
    """One Adam step on the DDO loss (Eq. 13) of B real + B fake pairs; no host sync.
    ``ref_logprob``: the samples' cached reference log-probs (None: the adapter runs ref)."""
    cfg, opt = run.cfg, state.optimizer
    warm = min(1.0, (state.step_in_round + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    lr = cfg.lr * warm  # linear warmup, restarted every round
    for group in opt.param_groups:
        group["lr"] = lr
    cached = {} if ref_logprob is None else {"ref_logprob": ref_logprob}
    res = run.adapter.loss(
        run.net, state.ref, real, fake, noise, alpha=cfg.alpha, beta=cfg.beta, **cached
    )
    if run.sharded:  # the reference's root unit stays gathered after its forward: free it
        fsdp.release(state.ref)
    opt.zero_grad(set_to_none=True)
    res.loss.backward()
    max_norm = cfg.grad_clip if cfg.grad_clip else float("inf")
    # FSDP: the global norm as a replicated DTensor; its local value is the norm
    grad_norm = fsdp.local(torch.nn.utils.clip_grad_norm_(run.params, max_norm))
    extra = res.stats or {}
    values = sample_stats(res.loss, res.logratio, extra)
    apply, finite, values = run.guard(res.loss, grad_norm, values)  # values: mean over ranks
    opt.found_inf = (~apply).float()  # fused Adam: 1 = this update is not applied
    opt.step()
    if state.ema is not None:
        update_ema(state.ema, state.model, cfg.ema, apply)
    state.global_step += 1
    state.step_in_round += 1
    stats = step_stats(values, grad_norm, run.guard.skipped, finite)
    where = {"round": state.round, "step": state.global_step, "step_in_round": state.step_in_round}
    run.log.push(where | {"lr": lr}, stats, tuple(extra))


def run_round(
    run: Run, state: TrainState, pool: Batch | None, refs: RefLogprobs | None = None
) -> None:
    """The steps of one round from ``state.step_in_round`` on, with its evals and checkpoints
    (``refs``: the round's cached reference log-probs, if any)."""
    cfg = run.cfg
    while state.step_in_round < cfg.steps_per_round:
        train_step(run, state, *draw_batch(run, state, pool, refs))
        k = state.step_in_round
        last = k == cfg.steps_per_round
        if k % cfg.log_every == 0:
            flush(run, state)
        if (cfg.eval_every and k % cfg.eval_every == 0) or last:
            consider(run, state)
        if cfg.checkpoint_every and state.global_step % cfg.checkpoint_every == 0 and not last:
            save_checkpoint(run, state)


def end_round(run: Run, state: TrainState, seconds: float) -> None:
    """The round's best model becomes theta, the EMA and the next reference (Sec. 3.4)."""
    flush(run, state)
    chosen = state.best or Best({}, clone_state(state.eval_model), state.step_in_round)
    # rank 0's weights, bit for bit, on every rank (sharded: each shard exists once, and rank
    # 0's score made every rank's choice, so there is nothing to make equal)
    if run.world > 1 and not run.sharded:
        for t in chosen.state.values():
            dist.broadcast(t, src=0)
    for m in state.modules():
        m.load_state_dict(chosen.state)
    summary = {"round": state.round, "best_step_in_round": chosen.step, "skipped": state.skipped}
    summary |= {"seconds": round(seconds, 2)} | chosen.score
    state.round_metrics.append(summary)
    if run.rank == 0:
        text = (f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items())
        print("round " + ", ".join(text))
    state.next_round(adam(run.params, run.cfg))
    save_checkpoint(run, state)


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

    With ``config.distributed == "fsdp"`` the model is sharded in place with FSDP2
    (:mod:`~ddo_fast.training.fsdp`): ``result.model`` is then the sharded module, the process
    group is left up when train() returns so that it stays usable
    (``fsdp.full_state_dict(result.model)`` gathers its weights on rank 0), and the caller ends
    it (``dist.destroy_process_group()``).

    Args:
        model: the pretrained model; the frozen reference is a deep copy of it. Under "fsdp",
            pass it on the CPU: the reference and the EMA are copied there, then each FSDP unit
            moves to the device as it is sharded (no device ever holds a whole copy).
        real_data: tensor [N, ...], ``(tensor, labels)``, or a Dataset of ``x`` / ``(x, label)``.
        adapter: how the model computes log-likelihood gaps and samples
            (:mod:`ddo_fast.adapters`).
        config: :class:`TrainConfig`.
        sampler: ``sampler(model, n, labels, generator, device, shape)`` replacing the adapter's.
        fake_data: fakes for the first round (``tensor`` or ``(tensor, labels)``) instead of
            generating them.
        eval_fn: ``eval_fn(model) -> float | dict``; drives best-checkpoint selection.

    Raises ``RuntimeError`` when another live run holds ``out_dir``
    (:func:`~ddo_fast.training.checkpoint.out_dir_lock`; under torchrun on every rank). When it
    raises, at start or mid-run, the out_dir lock is released and a process group that train()
    started is destroyed (one the caller started is left up). ``out_dir`` None: a new folder
    in the working directory (:func:`~ddo_fast.training.checkpoint.new_out_dir`).
    """
    cfg = config
    # ---------------------------------------------------------------- placement and folders
    rank, world, device, owns_pg = setup_distributed(cfg.device, cfg.distributed)
    try:
        if cfg.batch_size % world:
            raise ValueError(
                f"TrainConfig.batch_size={cfg.batch_size} must divide evenly over {world} ranks"
            )
        asked = Path(cfg.out_dir) if cfg.out_dir else None  # None: a new folder (rank 0's)
        with checkpoint.out_dir_lock(asked, rank, world) as out:  # one live run per folder
            where = (out, rank, world, device, owns_pg)
            return _train(model, real_data, adapter, cfg, sampler, fake_data, eval_fn, *where)
    except BaseException:
        # the group train() started ends with it (left to the interpreter's exit, gloo may
        # abort); no barrier: the other ranks may not reach one. A caller's group is theirs.
        if owns_pg and dist.is_initialized():
            dist.destroy_process_group()
        raise


def _train(
    model: nn.Module,
    real_data: Any,
    adapter: Adapter,
    cfg: TrainConfig,
    sampler: Sampler | None,
    fake_data: Any,
    eval_fn: EvalFn | None,
    out: Path,
    rank: int,
    world: int,
    device: torch.device,
    owns_pg: bool,
) -> TrainResult:
    """:func:`train` once placed, in the folder ``out`` that it holds."""
    sharded = cfg.distributed == "fsdp"
    prepare = getattr(adapter, "prepare_data", None)  # e.g. HFCausalLM packs a dict
    data = RealData(prepare(real_data) if prepare is not None else real_data)

    # ------------------------------------------------ state: theta, ref, EMA, Adam; resume
    if sharded:  # copies made where the model is, then each unit sharded onto the device
        on = fsdp.mesh(device, world)
        state = TrainState.create(model, cfg, shard=lambda m: fsdp.shard(m, on))
    else:
        state = TrainState.create(model.to(device), cfg)
    params = trainable(model)
    net = model
    if world > 1 and not sharded:
        ids = [device.index] if device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    ckpt_root = out / "checkpoints"
    found = checkpoint.latest(ckpt_root) if cfg.resume else None
    if cfg.resume and found is None and rank == 0:
        warnings.warn(
            f"ddo_fast.train: resume=True but no complete checkpoint in {ckpt_root}; "
            "starting from the pretrained model",
            stacklevel=2,
        )
    if found is not None and sharded:
        meta = checkpoint.load_sharded(found, state)
    elif found is not None:
        weights, meta = checkpoint.load(found)
        state.load_state_dict({"weights": weights, "meta": meta})
    if found is not None:
        if rank == 0:
            old = " (a format-1 checkpoint, upgraded)" if meta.get("upgraded_from") else ""
            print(f"resumed from {found}{old} (round {state.round}, step {state.global_step})")

    # ------------------------------------------------------------------------------ logs
    at = state.global_step if found else None
    run = Run(
        cfg=cfg,
        adapter=adapter,
        sample=sampler or adapter.sample,
        data=data,
        shape=data.sample_shape(),
        device=device,
        rank=rank,
        world=world,
        out=out,
        net=net,
        params=params,
        eval_fn=eval_fn,
        guard=NonFiniteGuard(cfg.nonfinite, device, state.skipped, world),
        log=StepLog(out, rank == 0, resume_step=at),
        evals=CsvLog(out / "evals.csv", rank == 0, None if at is None else _evals_kept(state)),
        sharded=sharded,
    )

    # ----------------------------------------------------- self-play rounds (Sec. 3.4)
    while state.round < cfg.rounds:
        t_round = time.time()
        ref_id = weights_digest(state.ref)
        with fsdp.gathered(state.ref):  # sharded: the whole reference on every rank, then freed
            pool = fake_pool(run, state, fake_data, ref_id)
            refs = ref_logprobs(run, state, pool, ref_id)  # None: ref runs every step
        if state.step_in_round == 0:
            consider(run, state)  # the round's starting model is a candidate too
        run.log.start_round(
            cfg.steps_per_round, state.step_in_round, f"round {state.round + 1}/{cfg.rounds}"
        )
        run_round(run, state, pool, refs)
        run.log.end_round()
        end_round(run, state, time.time() - t_round)

    # -------------------------------------------------------------------------- teardown
    run.log.close()
    # theta holds the selected weights now (they were loaded into it at the end of each round)
    result = TrainResult(
        model=model, metrics=state.round_metrics, out_dir=out, history=run.log.history
    )
    if owns_pg and not sharded:  # a sharded result.model needs its group: the caller ends it
        # Tear down in this order, or gloo may abort at interpreter exit (seen 1 run in 7).
        del net, run
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
    return result


def _evals_kept(state: TrainState) -> Callable[[dict[str, str]], bool]:
    """evals.csv rows written before the checkpoint at (round R, step_in_round S): those before
    (R, S), and the one at (R, S) itself only mid-round (a round's first eval follows its
    round-start checkpoint)."""
    at = (state.round, state.step_in_round)

    def keep(row: dict[str, str]) -> bool:
        pos = (int(row["round"]), int(row["step_in_round"]))
        return pos < at or (pos == at and at[1] > 0)

    return keep


__all__ = [
    "TrainResult",
    "TrainState",
    "fake_pool",
    "run_round",
    "select_best",
    "train",
    "update_ema",
    "weights_digest",
]
