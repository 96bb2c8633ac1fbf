"""Atomic checkpoints: safetensors weights + a state file, renamed into place with a marker.

Layout: ``<out>/checkpoints/step-00001234/{model,ref[,ema][,best]}.safetensors, state.pt,
COMPLETE`` (what :meth:`TrainState.state_dict` holds: the weights as safetensors, the rest in
state.pt). A checkpoint is written to ``.tmp-step-*`` in the same folder (same file system) with
its marker, fsynced, and renamed into place: the rename is the commit, so a kill at any moment
leaves either a complete ``step-*`` folder or debris that is ignored (and overwritten).
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed
from safetensors.torch import load_file, save_file

from .state import upgrade

MARKER = "COMPLETE"


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
    weights = {p.stem: load_file(str(p)) for p in folder.glob("*.safetensors")}
    meta = torch.load(folder / "state.pt", weights_only=True)
    return weights, upgrade(meta, weights)


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
