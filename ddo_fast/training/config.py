"""TrainConfig: every setting of a DDO fine-tuning run, validated when it is made."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class TrainConfig:
    """Settings of :func:`ddo_fast.train`. Invalid values raise ``ValueError`` saying how to fix.

    Loss (Zheng et al. 2025, Eq. 13)
        alpha: weight of the fake (reference-sample) term.
        beta: scale of the log-ratio inside the sigmoids. It acts through saturation: sums over
            thousands of dimensions want ~0.02 (the paper's), 2-D toys ~1.
    Optimisation
        lr, batch_size (global, real + fake pairs: B real and B fake samples per step),
        steps_per_round, rounds (self-play rounds; the best model of a round becomes the next
        reference), warmup_steps (linear, restarted every round), grad_clip (max grad norm;
        None = off), ema (EMA decay per step; None = off; when on, the EMA weights are evaluated
        and carried into the next round), weight_decay (Adam's L2 term).
    Fake samples
        fake_samples_per_round: generated from the reference at the start of each round and
            cached in out_dir (0 = generate a fresh fake batch from the reference every step).
        ref_logprob_cache: with offline fakes (a pool: ``fake_samples_per_round`` > 0 or
            ``fake_data``), score log p_ref of the round's real samples and pooled fakes once at
            the start of the round (no_grad, batched) and feed the values to the loss instead of
            running the reference every step; cached beside the fakes, keyed by the reference
            weights, round, adapter, seed, schedule and the data's fingerprint. Same losses as
            without it. Applies where the adapter's ``ref_logprob`` gives values
            (:class:`~ddo_fast.adapters.CausalAR`); diffusion adapters and online fakes always
            run the reference per step.
    Bookkeeping
        seed, out_dir (None = a new folder ``ddo-train-STAMP[-N]`` in rank 0's working directory),
        resume (continue from the newest complete checkpoint in out_dir; with out_dir None there is
        nothing to resume: a new folder), checkpoint_every / eval_every (steps; 0 = only at the end
        of a round), select_best_by ("last", or "min:KEY" / "max:KEY" of eval_fn's result; a float
        result is KEY "eval"), nonfinite (a non-finite loss or gradient norm: "raise" applies no
        update from that step on and raises at the next metrics flush, so the weights are those from
        before the step; "skip" skips that step and counts it; both decide on the device, without a
        host sync), device (None = cuda if available, else cpu; under torchrun cuda:LOCAL_RANK),
        log_every (steps between metrics flushes: the one host sync that moves the pending steps'
        metrics - every step keeps its row in metrics.csv - to the CSV, TensorBoard and the progress
        bar).
    Scale-out (under ``torchrun``; see :mod:`ddo_fast.training.fsdp`)
        distributed: "ddp" (theta replicated on every rank, gradients all-reduced: the model
            must fit one device) or "fsdp" (FSDP2 ``fully_shard``: theta, the frozen reference,
            the EMA, Adam's moments and the round's best copy are all sharded over the ranks,
            one block at a time gathered for compute; checkpoints are written with
            ``torch.distributed.checkpoint`` and resume on any number of ranks). "fsdp" also
            runs in a single process (a 1-rank group), e.g. to resume a sharded checkpoint.
    """

    alpha: float = 1.0
    beta: float = 0.02
    lr: float = 1e-4
    batch_size: int = 64
    steps_per_round: int = 1000
    rounds: int = 1
    fake_samples_per_round: int = 10_000
    ref_logprob_cache: bool = True
    ema: float | None = None
    grad_clip: float | None = None
    warmup_steps: int = 0
    weight_decay: float = 0.0
    seed: int = 0
    out_dir: str | None = None
    resume: bool = False
    checkpoint_every: int = 0
    eval_every: int = 0
    select_best_by: str = "last"
    nonfinite: str = "raise"
    device: str | None = None
    log_every: int = 10
    distributed: str = "ddp"

    def __post_init__(self) -> None:
        def bad(name: str, fix: str) -> None:
            raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r}: {fix}")

        for name in ("alpha", "beta", "lr"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                bad(name, "must be a finite number > 0")
        for name in ("batch_size", "steps_per_round", "rounds"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                bad(name, "must be an integer >= 1")
        for name in ("fake_samples_per_round", "warmup_steps", "checkpoint_every", "eval_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                bad(name, "must be an integer >= 0 (0 turns it off)")
        if not isinstance(self.ref_logprob_cache, bool):
            bad("ref_logprob_cache", "must be True (score the reference once per round) or False")
        if self.log_every < 1:
            bad("log_every", "must be >= 1")
        if 0 < self.fake_samples_per_round < self.batch_size:
            bad(
                "fake_samples_per_round",
                f"must be 0 (online fakes) or >= batch_size "
                f"({self.batch_size}) so that every step has a full fake batch",
            )
        if self.ema is not None and not (0.0 < self.ema < 1.0):
            bad("ema", "must be None (off) or a decay in (0, 1), e.g. 0.99")
        if self.grad_clip is not None and not self.grad_clip > 0:
            bad("grad_clip", "must be None (off) or a max norm > 0")
        if self.weight_decay < 0:
            bad("weight_decay", "must be >= 0")
        if self.nonfinite not in ("raise", "skip"):
            bad("nonfinite", "must be 'raise' (stop with an error) or 'skip' (skip the step)")
        if self.select_best_by != "last":
            mode, _, key = self.select_best_by.partition(":")
            if mode not in ("min", "max") or not key:
                bad("select_best_by", "must be 'last', 'min:KEY' or 'max:KEY' (KEY from eval_fn)")
        if self.distributed not in ("ddp", "fsdp"):
            bad("distributed", "must be 'ddp' (replicated theta) or 'fsdp' (sharded with FSDP2)")
        if self.device is not None and self.device.split(":")[0] not in ("cpu", "cuda"):
            bad("device", "must be None, 'cpu' or 'cuda[:N]'")

    def replace(self, **changes: Any) -> TrainConfig:
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise ValueError(
                f"TrainConfig has no field(s) {sorted(unknown)}; valid fields: "
                f"{sorted(self.field_types())}"
            )
        return dataclasses.replace(self, **changes)

    @classmethod
    def field_types(cls) -> dict[str, Any]:
        return {f.name: f.type for f in fields(cls)}
