"""Per-step metrics without per-step host syncs, and the non-finite guard that feeds them.

Each step leaves one float64 vector on the device (:data:`STATS`, then the adapter's extra
``LossOutput.stats`` in their order); :meth:`StepLog.flush` stacks the pending vectors and moves
them to the host with ONE ``.tolist()`` - the loop's only host sync in steady state. The loop
flushes every ``log_every`` steps and before every eval, checkpoint and round end, so
metrics.csv has every step's row whenever anything is saved.

On several ranks the per-sample statistics (loss, acc, margin, r_real, r_fake and the extra
stats) are the mean over ranks of each rank's value, reduced in the same all_reduce that the
non-finite guard needs anyway: with equal shares of the batch, the global batch's value for a
mean over rows, and the objective that data-parallel gradients (their mean) descend.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

# device-side statistics of a step, in this order; "finite" is the guard's verdict (1/0)
STATS = ("loss", "acc", "margin", "r_real", "r_fake", "grad_norm", "skipped", "finite")
# the ones computed from this rank's samples (averaged over ranks), in the order of sample_stats
SAMPLE_STATS = ("loss", "acc", "margin", "r_real", "r_fake")


class NonFiniteGuard:
    """Decides on the device, without a host sync, whether a step's update is applied.

    finite_t = isfinite(loss_t) and isfinite(grad_norm_t), AND-ed over ranks (one all_reduce).
    The optimizer receives ``found_inf = 1 - apply_t`` (fused Adam then leaves weights, moments
    and step count bit-for-bit unchanged, as under GradScaler) and the EMA moves by
    ``(1 - decay) * apply_t``.

    * ``"skip"``: apply_t = finite_t; the skip counter grows by 1 - finite_t.
    * ``"raise"``: apply_t = finite_t and no earlier step was non-finite (a latch). From the
      first bad step on no update is applied, so when the loop raises at the next flush (at most
      ``log_every - 1`` steps later, and always before an eval, a checkpoint or a round end) the
      weights, EMA and optimizer are exactly those from before the bad step.
    """

    def __init__(self, mode: str, device: torch.device, skipped: int, world: int) -> None:
        self.latch = mode == "raise"
        self.world = world
        self.skipped = torch.tensor(float(skipped), dtype=torch.float64, device=device)
        self.halted = torch.zeros((), dtype=torch.bool, device=device)

    def __call__(
        self, loss: torch.Tensor, grad_norm: torch.Tensor, values: torch.Tensor | None = None
    ):
        """(apply, finite, values): apply and finite are 0-d bool tensors on the device;
        ``values`` (this rank's :func:`sample_stats`, float64) comes back averaged over ranks.

        All ranks decide together with ONE all_reduce (sum) of [1 - finite_local, values]:
        finite = no rank saw a non-finite value (grad_norm is already global)."""
        finite = torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)
        if self.world > 1:
            bad = (~finite).double().reshape(1)
            vec = bad if values is None else torch.cat([bad, values])
            dist.all_reduce(vec)
            finite = vec[0] == 0
            values = None if values is None else vec[1:] / self.world
        if self.latch:
            apply = finite & ~self.halted
            self.halted = self.halted | ~finite
        else:
            apply = finite
            self.skipped = self.skipped + (~finite).double()
        return apply, finite, values


def sample_stats(
    loss: torch.Tensor, logratio: torch.Tensor, extra: dict[str, torch.Tensor] | None = None
) -> torch.Tensor:
    """This rank's :data:`SAMPLE_STATS` and then the ``extra`` scalars (``LossOutput.stats``),
    float64 [5 + len(extra)] on the device: loss; acc = mean 1[r_real > r_fake] over pairs;
    margin = mean (r_real - r_fake); the means of r_real and r_fake (r = [r_real; r_fake])."""
    r = logratio.detach().float()
    r_real, r_fake = r.chunk(2)
    parts = [
        loss.detach().float(),
        (r_real > r_fake).float().mean(),
        (r_real - r_fake).mean(),
        r_real.mean(),
        r_fake.mean(),
    ]
    for k, v in (extra or {}).items():
        if not torch.is_tensor(v) or v.numel() != 1:
            raise ValueError(f"LossOutput.stats[{k!r}] must be a one-element tensor")
        parts.append(v.detach().reshape(()))
    return torch.stack([t.double() for t in parts])


def step_stats(
    values: torch.Tensor, grad_norm: torch.Tensor, skipped: torch.Tensor, finite: torch.Tensor
) -> torch.Tensor:
    """The step's logged vector: :data:`STATS` in order (``values`` = :func:`sample_stats`,
    averaged over ranks), then the extra stats."""
    n = len(SAMPLE_STATS)
    guard = torch.stack([grad_norm.detach().double(), skipped.double(), finite.double()])
    return torch.cat([values[:n], guard, values[n:]])


class CsvLog:
    """Appends rows to a CSV (rank 0). On resume keeps the complete rows for which ``keep``
    holds (a line cut short by a kill has no newline and is dropped); otherwise starts afresh."""

    def __init__(
        self, path: Path, enabled: bool, keep: Callable[[dict[str, str]], bool] | None = None
    ) -> None:
        self.path, self.enabled, self.fields = path, enabled, None
        if not enabled or not path.exists():
            return
        if keep is None:
            path.unlink()
            return
        lines = path.read_text().splitlines(keepends=True)
        if lines and not lines[-1].endswith("\n"):
            lines.pop()
        reader = csv.DictReader(io.StringIO("".join(lines)))
        rows = [r for r in reader if None not in r.values() and keep(r)]
        self.fields = list(reader.fieldnames) if rows else None
        with open(path, "w", newline="") as f:
            if rows:
                w = csv.DictWriter(f, fieldnames=self.fields)
                w.writeheader()
                w.writerows(rows)

    def write(self, rows: list[dict[str, Any]]) -> None:
        if not self.enabled or not rows:
            return
        new = self.fields is None
        if new:
            self.fields = list(rows[0])
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerows(rows)


class StepLog:
    """metrics.csv, TrainResult.history, TensorBoard and the progress bar, fed by flushes."""

    def __init__(self, out: Path, enabled: bool, resume_step: int | None) -> None:
        keep = None if resume_step is None else (lambda r: int(r["step"]) <= resume_step)
        self.csv = CsvLog(out / "metrics.csv", enabled, keep)
        self.tb = _tensorboard(out) if enabled else None
        self.history: list[dict[str, Any]] = []
        self.bar = None
        self._host: list[dict[str, Any]] = []
        self._dev: list[torch.Tensor] = []
        self.extra: tuple[str, ...] | None = None  # LossOutput.stats keys, fixed by step 1

    def start_round(self, total: int, initial: int, desc: str) -> None:
        if self.csv.enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:  # pragma: no cover - tqdm is a dependency
                return
            self.bar = tqdm(total=total, initial=initial, disable=None, desc=desc, leave=False)

    def end_round(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def push(self, host: dict[str, Any], stats: torch.Tensor, extra: tuple[str, ...] = ()) -> None:
        """One step: ``host`` = {round, step, step_in_round, lr}, ``stats`` = STATS and then
        the values of the ``extra`` keys, on the device. The extra keys are the same every
        step (they are the CSV's last columns)."""
        if self.extra is None:
            clash = set(extra) & (set(STATS) | {"round", "step", "step_in_round", "lr"})
            if clash:
                raise ValueError(f"LossOutput.stats keys {sorted(clash)} clash with columns")
            self.extra = tuple(extra)
        elif tuple(extra) != self.extra:
            raise ValueError(
                f"LossOutput.stats keys changed from {list(self.extra)} to {list(extra)}: "
                "give the same keys every step"
            )
        self._host.append(host)
        self._dev.append(stats)
        if self.bar is not None:
            self.bar.update(1)

    def flush(self, stop_at_nonfinite: bool) -> dict[str, Any] | None:
        """Writes the pending rows; with ``stop_at_nonfinite``, only those before the first
        non-finite step, which it returns (None when all were finite)."""
        if not self._dev:
            return None
        values = torch.stack(self._dev).tolist()  # the one host sync
        rows, bad = [], None
        for host, vals in zip(self._host, values, strict=True):
            stats = dict(zip(STATS + self.extra, vals, strict=True))
            row = {k: host[k] for k in ("round", "step", "step_in_round")}
            row |= {k: stats[k] for k in ("loss", "acc", "margin", "r_real", "r_fake")}
            row |= {"lr": host["lr"], "grad_norm": stats["grad_norm"]}
            row["skipped"] = int(stats["skipped"])
            row |= {k: stats[k] for k in self.extra}
            if stop_at_nonfinite and not stats["finite"]:
                bad = row
                break
            rows.append(row)
        self._host, self._dev = [], []
        self.history += rows
        self.csv.write(rows)
        if self.tb is not None:
            keys = ("loss", "acc", "margin", "r_real", "r_fake", "lr", "grad_norm", *self.extra)
            for row in rows:
                for k in keys:
                    self.tb.add_scalar(f"train/{k}", row[k], row["step"])
        if self.bar is not None and rows:
            self.bar.set_postfix(loss=f"{rows[-1]['loss']:.4f}", acc=f"{rows[-1]['acc']:.2f}")
        return bad

    def close(self) -> None:
        self.end_round()
        if self.tb is not None:
            self.tb.close()


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(out / "tensorboard"))
    except Exception:  # tensorboard is optional
        return None
