"""Atomic checkpoints: safetensors weights + a state file, renamed into place with a marker.

Layout: ``<out>/checkpoints/step-00001234/{model,ref[,ema][,best]}.safetensors, state.pt,
COMPLETE`` (what :meth:`TrainState.state_dict` holds: the weights as safetensors, the rest in
state.pt). A checkpoint is written to ``.tmp-step-*`` in the same folder (same file system) with
its marker, fsynced, and renamed into place: the rename is the commit, so a kill at any moment
leaves either a complete ``step-*`` folder or debris that is ignored (and overwritten).

Sharded (FSDP) runs: ``step-*/{.metadata, __R_0.distcp (one per rank), state.pt, COMPLETE}``,
written by :func:`save_sharded` with ``torch.distributed.checkpoint`` (every rank writes its own
shards into the same ``.tmp-step-*`` folder; rank 0 then adds state.pt and the marker and
renames), so the same rule holds: a folder without the marker is debris. The folder must be on a
file system every rank sees (as the fake pool's already must). It resumes on any number of
ranks: DCP reshards on load.
"""

from __future__ import annotations

import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed
from safetensors.torch import load_file, save_file

from .state import upgrade

MARKER = "COMPLETE"
LOCK = ".lock"


def _tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage (tied weights): save independent contiguous copies
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def save(
    root: Path, step: int, weights: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any]
) -> Path:
    folder = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, sd in weights.items():
        save_file(_tensors(sd), str(tmp / f"{name}.safetensors"))
    torch.save(meta, tmp / "state.pt")
    (tmp / MARKER).write_text("ok\n")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(folder, ignore_errors=True)  # only ever an incomplete one (see latest())
    os.rename(tmp, folder)
    return folder


def save_sharded(
    root: Path, step: int, tensors: dict[str, Any], meta: dict[str, Any], rank: int, world: int
) -> Path:
    """The sharded counterpart of :func:`save` (a collective: every rank calls it with its
    shards ``tensors``; rank 0's ``meta`` is written)."""
    import torch.distributed.checkpoint as dcp

    folder = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if world > 1:
        torch.distributed.barrier()  # the folder is fresh before anyone writes into it
    # every rank writes (and fsyncs) its shards; returns on all ranks after rank 0 has written
    # the .metadata that indexes them
    dcp.save(tensors, checkpoint_id=str(tmp))
    if rank == 0:
        torch.save(meta, tmp / "state.pt")
        (tmp / MARKER).write_text("ok\n")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        shutil.rmtree(folder, ignore_errors=True)
        os.rename(tmp, folder)
    if world > 1:
        torch.distributed.barrier()
    return folder


def is_sharded(folder: Path) -> bool:
    return (folder / ".metadata").exists()


def load_sharded(folder: Path, state) -> dict[str, Any]:
    """Restores the sharded :class:`~ddo_fast.training.state.TrainState` ``state`` (a
    collective) from ``folder``, resharded to this run's ranks; returns the meta."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    if not (folder / MARKER).exists():
        raise FileNotFoundError(f"{folder} is not a complete checkpoint (no {MARKER} marker)")
    if not is_sharded(folder):
        raise ValueError(
            f"{folder} was written by a TrainConfig(distributed='ddp') run (safetensors); "
            "resume it with distributed='ddp'"
        )
    meta = upgrade(torch.load(folder / "state.pt", weights_only=True), {})
    keys = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    if state.ema is not None and not any(k.startswith("ema/") for k in keys):
        raise ValueError("the checkpoint has no EMA weights but TrainConfig.ema is set")
    template = state.sharded_template(keys, meta)
    dcp.load(template, checkpoint_id=str(folder))
    state.load_sharded_state_dict(template, meta)
    return meta


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint; incomplete ones are reported and skipped."""
    if not root.exists():
        return None
    complete, incomplete = [], []
    for p in sorted(root.iterdir()):
        if not p.is_dir():
            continue
        if p.name.startswith("step-") and (p / MARKER).exists():
            complete.append(p)
        elif p.name.startswith(("step-", ".tmp-step-")):
            incomplete.append(p)
    for p in incomplete:
        warnings.warn(
            f"ddo_fast.train: ignoring incomplete checkpoint {p} (no {MARKER} marker)", stacklevel=2
        )
    return complete[-1] if complete else None


def load(folder: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """(weights, meta) in the current format; a format-1 checkpoint (written before TrainState)
    is converted, and its meta says ``upgraded_from: 1``."""
    if not (folder / MARKER).exists():
        raise FileNotFoundError(f"{folder} is not a complete checkpoint (no {MARKER} marker)")
    if is_sharded(folder):
        raise ValueError(
            f"{folder} was written by a TrainConfig(distributed='fsdp') run (sharded, "
            "torch.distributed.checkpoint); resume it with distributed='fsdp' (any number of "
            "ranks, 1 included)"
        )
    weights = {p.stem: load_file(str(p)) for p in folder.glob("*.safetensors")}
    meta = torch.load(folder / "state.pt", weights_only=True)
    return weights, upgrade(meta, weights)


def new_out_dir(parent: Path, prefix: str = "ddo-train") -> Path:
    """Creates and returns a folder of its own under ``parent`` for a run without ``out_dir``:
    ``<prefix>-YYYYmmdd-HHMMSS``, or with ``-2``, ``-3``... appended when that name exists.
    ``mkdir`` without ``exist_ok`` is atomic, so two runs started in the same second (in one
    process or several) never get the same folder, and no earlier folder is reused."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder, n = parent / f"{prefix}-{stamp}", 1
    while True:
        try:
            folder.mkdir(parents=True)
            return folder
        except FileExistsError:  # taken, by a live run or an earlier one: the next suffix
            n += 1
            folder = parent / f"{prefix}-{stamp}-{n}"


def _take_lock(out: Path) -> tuple[Any, str]:
    """Rank 0's half of :func:`out_dir_lock`: takes the flock on the existing folder ``out``.
    Returns (the open lock file or None, the refusal message or "")."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): no guard
        return None, ""
    path = out / LOCK
    fh = open(path, "a+")  # noqa: SIM115 - kept open while the run holds the lock
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # EAGAIN / EWOULDBLOCK: another live process holds it
        fh.seek(0)
        holder = fh.read().strip() or "?"
        fh.close()
        return None, (
            f"ddo_fast.train: out_dir {out} is in use by another live run (pid {holder} "
            f"holds {path}); two runs writing one folder would interleave their "
            "checkpoints and logs. Wait for it to end or kill it - under torchrun kill "
            "every rank, not only the launcher (each rank is its own session)."
        )
    except OSError as e:  # flock unsupported here (some network / FUSE file systems)
        fh.close()
        warnings.warn(
            f"ddo_fast.train: no one-run-per-folder guard for {out}: flock on {path} failed "
            f"({e!r}) on this file system",
            stacklevel=4,
        )
        return None, ""
    fh.truncate(0)
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    return fh, ""


@contextmanager
def out_dir_lock(out: Path | None, rank: int, world: int) -> Iterator[Path]:
    """Creates the run's folder (rank 0: ``out``, or with ``out`` None a fresh one in the
    working directory, :func:`new_out_dir`) and holds ``<folder>/.lock`` (an exclusive,
    non-blocking ``flock`` taken by rank 0; the kernel drops it when the holder exits, SIGKILL
    included) for the duration; yields the folder, the same on every rank. Raises
    ``RuntimeError`` on every rank when another live process holds it or rank 0 cannot create
    or open the folder. A collective when ``world > 1``: rank 0 always reaches the broadcast of
    (folder, verdict), so that all ranks raise together instead of some waiting in it. The lock
    is released on every exit, a raise included. Where ``flock`` does not exist (Windows) or the
    file system refuses it (warned), there is no guard."""
    held, refused = None, ""
    if rank == 0:
        try:
            if out is None:
                out = new_out_dir(Path.cwd())
            else:
                out.mkdir(parents=True, exist_ok=True)
            held, refused = _take_lock(out)
        except Exception as e:  # read-only, permissions, quota, a bad path, a warning made an
            # error (-W error): whatever rank 0 meets becomes every rank's error, no rank hangs
            where = out if out is not None else "None (a new folder in the working directory)"
            refused = f"ddo_fast.train: cannot use out_dir {where}: {e!r}"
    if world > 1:
        box = [None if out is None else str(out), refused]
        torch.distributed.broadcast_object_list(box, src=0)
        out, refused = None if box[0] is None else Path(box[0]), box[1]
    if refused:
        raise RuntimeError(refused)
    assert out is not None  # rank 0 made it, or it came with the verdict
    try:
        yield out
    finally:
        if held is not None:
            held.close()  # closing the file releases the flock


def build_once(path: Path, build: Callable[[], dict[str, Any]], rank: int, world: int) -> dict:
    """The blob at ``path``: built by rank 0 when the file is missing and written atomically (a
    temporary file renamed into place, so a killed write leaves no file), then read by every rank
    after a barrier. Used for the per-round fake pool and reference log-prob cache."""
    if rank == 0 and not path.exists():
        blob = build()
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(blob, path.with_suffix(".tmp"))
        os.replace(path.with_suffix(".tmp"), path)
    if world > 1:
        torch.distributed.barrier()
    return torch.load(path, weights_only=True)
