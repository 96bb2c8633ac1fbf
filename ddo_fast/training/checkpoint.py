"""Atomic checkpoints: safetensors weights + a state file, renamed into place with a marker.

Layout: ``<out>/checkpoints/step-00001234/{model,ref,best[,ema]}.safetensors, state.pt, COMPLETE``.
A checkpoint is written to ``.tmp-step-*`` in the same folder (same file system), fsynced, renamed,
and only then marked COMPLETE; a folder without the marker is never loaded.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

MARKER = "COMPLETE"


def _tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage (tied weights): save independent contiguous copies
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def save(
    root: Path, step: int, weights: dict[str, dict[str, torch.Tensor]], state: dict[str, Any]
) -> Path:
    folder = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, sd in weights.items():
        save_file(_tensors(sd), str(tmp / f"{name}.safetensors"))
    torch.save(state, tmp / "state.pt")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(folder, ignore_errors=True)
    os.rename(tmp, folder)
    (folder / MARKER).write_text("ok\n")
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
    if not (folder / MARKER).exists():
        raise FileNotFoundError(f"{folder} is not a complete checkpoint (no {MARKER} marker)")
    weights = {p.stem: load_file(str(p)) for p in folder.glob("*.safetensors")}
    state = torch.load(folder / "state.pt", weights_only=True)
    return weights, state
