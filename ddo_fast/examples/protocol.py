"""The evaluation protocol every example preset shares: a seeded stratified split of the data,
the MLE control's final-step model (:class:`LastEvaluated`), and the results files
(``results.json`` + ``results.md``) with per-seed runs and their summary.

A run dict (one seed) is ``{"seed", "data_floor": {...}, "baseline": {...}, "mle_control":
{...}, "ddo": {...}, "config": {...}, "seconds"}``; extra stages are allowed. Every dict-valued
entry other than ``config`` is a *stage*; its numeric entries are *metrics* (digits: fd,
fd_excess, kid, pixel_fd, precision, recall, class_acc, memorised; tiny-lm: exact_greedy, ...).
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

NOT_STAGES = ("config",)


def stratified_split(
    y: torch.Tensor, seed: int = 0, frac: float = 0.8
) -> tuple[torch.Tensor, torch.Tensor]:
    """(train idx, held-out idx), int64, sorted: per class c with n_c items, a seeded random
    round(frac * n_c) of them go to train and the rest to held-out, so both parts keep the class
    proportions. Disjoint, covering all of ``y`` [N] (integer class labels); the same ``seed``
    gives the same split on any machine (CPU generator)."""
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.is_floating_point():
        raise ValueError("stratified_split: y must be a 1-D integer tensor of class labels")
    if not isinstance(frac, (int, float)) or not 0.0 < frac < 1.0:
        raise ValueError(f"stratified_split: frac={frac!r} must be in (0, 1)")
    g = torch.Generator().manual_seed(int(seed))
    y = y.cpu()
    train, held = [], []
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        cut = int(round(frac * len(idx)))
        train.append(idx[:cut])
        held.append(idx[cut:])
    return torch.cat(train).sort().values, torch.cat(held).sort().values


class LastEvaluated:
    """An ``eval_fn`` for :func:`~ddo_fast.train` that scores with ``eval_fn`` and keeps a deep
    copy of the model it was last given in ``.model`` (None before the first call). train()
    evaluates at the last step of every round too, so after a run ``.model`` is the final-step
    model (its EMA when ``TrainConfig.ema`` is set), whichever checkpoint the selection kept:
    the presets' ``mle_control_final`` stage (the converged-baseline check at the control's
    last step, since its selection may keep step 0)."""

    def __init__(self, eval_fn: Callable[[nn.Module], Any]) -> None:
        self.eval_fn = eval_fn
        self.model: nn.Module | None = None

    def __call__(self, model: nn.Module) -> Any:
        self.model = copy.deepcopy(model)
        return self.eval_fn(model)


def _is_metric(v: Any) -> bool:
    return isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool)


def summarise(runs: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """{stage: {metric: {"mean", "std", "n"}}} over ``runs``; std is the sample standard
    deviation (ddof = 1; 0.0 for a single run). Non-finite values count in ``n`` and make the
    mean/std NaN rather than vanish."""
    values: dict[str, dict[str, list[float]]] = {}
    for run in runs:
        for stage, metrics in run.items():
            if stage in NOT_STAGES or not isinstance(metrics, dict):
                continue
            for key, v in metrics.items():
                if _is_metric(v):
                    values.setdefault(stage, {}).setdefault(key, []).append(float(v))
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for stage, metrics in values.items():
        summary[stage] = {}
        for key, vs in metrics.items():
            a = np.asarray(vs, np.float64)
            std = float(a.std(ddof=1)) if len(a) > 1 else 0.0
            summary[stage][key] = {"mean": float(a.mean()), "std": std, "n": len(a)}
    return summary


def _fmt(v: float) -> str:
    if not math.isfinite(v):
        return str(v)
    return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"


def render(results: dict) -> str:
    """results.md: one table metric x stage (mean ± std over seeds), then per stage one row per
    seed, then the notes."""
    summary, runs = results["summary"], results["runs"]
    stages = list(summary)
    metrics: list[str] = []
    for stage in stages:
        metrics += [m for m in summary[stage] if m not in metrics]
    n = max((s["n"] for st in summary.values() for s in st.values()), default=0)
    seeds = [r.get("seed") for r in runs]
    lines = [f"# {results['title']}", "", f"Seeds {seeds}; mean ± std over {n} run(s).", ""]
    lines += ["| metric | " + " | ".join(stages) + " |", "|---" * (len(stages) + 1) + "|"]
    for m in metrics:
        cells = []
        for stage in stages:
            s = summary[stage].get(m)
            cells.append("" if s is None else f"{_fmt(s['mean'])} ± {_fmt(s['std'])}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    for stage in stages:
        keys = list(summary[stage])
        lines += ["", f"## {stage}, per seed", ""]
        lines += ["| seed | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for run in runs:
            row = run.get(stage, {})
            cells = [_fmt(float(row[k])) if _is_metric(row.get(k)) else "" for k in keys]
            lines.append(f"| {run.get('seed')} | " + " | ".join(cells) + " |")
    if results.get("notes"):
        lines += ["", "## Notes", ""]
        lines += [f"- {k}: {v}" for k, v in results["notes"].items()]
    return "\n".join(lines) + "\n"


def _plain(v: Any) -> Any:
    """JSON-ready copy (numpy / torch scalars to Python numbers, paths to strings)."""
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return v.item()
    if isinstance(v, Path):
        return str(v)
    return v


def write_results(out: Path, title: str, runs: list[dict], notes: dict | None = None) -> dict:
    """Write ``out/results.json`` = {"title", "runs", "summary", "notes"} (summary: see
    :func:`summarise`) and ``out/results.md`` (:func:`render`); returns the dict."""
    if not isinstance(runs, list) or not all(isinstance(r, dict) for r in runs):
        raise ValueError("write_results: runs must be a list of dicts (one per seed)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = _plain(runs)
    notes = _plain(notes or {})
    results = {"title": title, "runs": runs, "summary": summarise(runs), "notes": notes}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(render(results))
    return results
