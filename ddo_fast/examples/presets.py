"""The presets: ONE table, name -> (builder, TrainConfig overrides, builder options).

In the manner of NVlabs/edm2's ``config_presets``: a preset is a named set of settings, and any
setting given on the command line (``ddo-fast train --preset NAME --lr 1e-5``), to the sweep tool
(``python -m ddo_fast.examples.sweep --preset NAME lr=1e-5,3e-5``) or to :func:`run_preset`
overrides it. A setting is a :class:`~ddo_fast.TrainConfig` field or one of the builder's
options; ``run_name`` (default ``ddo``) names the run's folder ``OUT/run_name``.
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..training import TrainConfig


@dataclass(frozen=True)
class Preset:
    """``build(out, TrainConfig(**config), **options) -> dict``; ``build`` is "module:function",
    imported when the preset runs (the builders import this table for their ``run``)."""

    build: str
    summary: str
    config: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    "toy2d": Preset(
        "ddo_fast.examples.toy2d:build",
        "the 2-D demo: a ring of 8 Gaussians, EDM MLP (~1 minute on 2 CPU cores)",
        config=dict(
            alpha=1.0,
            beta=2.0,
            lr=3e-4,
            batch_size=512,
            steps_per_round=900,
            rounds=3,
            fake_samples_per_round=20_000,
            ema=0.99,
            eval_every=100,
            select_best_by="max:logp",
            device="cpu",
            log_every=50,
        ),
        options=dict(pretrain_steps=15_000, eval_samples=20_000, plot=True),
    ),
    "digits-diffusion": Preset(
        "ddo_fast.examples.digits_diffusion:build",
        "class-conditional EDM MLP on scikit-learn's 8x8 digits; held-out protocol, 3 seeds",
        config=dict(
            alpha=1.0,
            beta=0.05,  # alpha, beta: chosen on selection seed 0 (results/digits.md)
            lr=3e-5,
            batch_size=128,
            steps_per_round=600,
            rounds=1,
            fake_samples_per_round=4000,
            ema=0.99,
            eval_every=100,
            select_best_by="min:fd",
            device="cpu",
            log_every=50,
        ),
        options=dict(
            pretrain_steps=20_000,
            sample_steps=18,
            seeds=[1, 2, 3],
            control=True,
            plot=True,
            eval_samples=1800,
            classifier_steps=3000,
        ),
    ),
    "digits-ar": Preset(
        "ddo_fast.examples.digits_ar:build",
        "class-conditional causal transformer on quantised 8x8 digits; held-out protocol, 3 seeds",
        config=dict(
            alpha=1.0,
            beta=1.0,  # beta, lr, dim, pretrain_steps: chosen on selection seed 0
            lr=3e-5,
            batch_size=64,
            steps_per_round=400,
            rounds=1,
            fake_samples_per_round=2000,
            ema=0.99,
            eval_every=50,
            select_best_by="min:fd",
            device="cpu",
            log_every=25,
        ),
        options=dict(
            levels=8,
            pretrain_steps=12_000,  # 6,000 failed the converged-baseline check
            pretrain_lr=1e-3,
            dim=24,
            layers=1,
            seeds=[1, 2, 3],
            control=True,
            plot=True,
            eval_samples=1800,
            classifier_steps=3000,
        ),
    ),
    "digits-var": Preset(
        "ddo_fast.examples.digits_var:build",
        "next-scale (VAR) transformer on 8x8 digits: guidance-free DDO vs CFG baseline, 3 seeds",
        config=dict(
            alpha=1.0,
            beta=0.03,  # beta, lr, rounds, fakes, reencode: chosen on selection seed 0
            lr=1e-4,  # (results/digits_var_sweeps/README.md)
            batch_size=64,
            steps_per_round=400,
            rounds=2,
            # a fresh pool per round, drawn with replacement (loop.py): ≈ 63 % of it drawn,
            # ≈ 1.6 draws per drawn fake, vs ≈ 12.8 per fake (400 × 64 / 2,000) for the 2,000
            # pool that was memorised
            fake_samples_per_round=25_600,
            ema=0.99,
            eval_every=50,
            select_best_by="min:fd",
            device="cpu",
            log_every=25,
        ),
        options=dict(
            vocab=64,
            patch_nums=[1, 2, 4, 8],
            pretrain_steps=4000,
            pretrain_lr=1e-3,
            dim=48,
            layers=1,
            heads=4,
            start="raw",
            reencode=True,  # un-re-encoded fakes are told apart by their tokens alone
            cfg_scales=[0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0],
            selection_seed=0,
            seeds=[1, 2, 3],
            control=True,
            plot=True,
        ),
    ),
    "tiny-lm": Preset(
        "ddo_fast.examples.tiny_lm:build",
        "transformers GPT-2 from a config (12-d, 1 layer), 2-digit addition as text; held-out "
        "greedy and sampled exact match, 3 seeds",
        config=dict(
            alpha=1.0,
            beta=1.0,  # lr, beta, steps: chosen on selection seed 0 (results/tiny_lm_sweeps)
            lr=1e-3,
            batch_size=64,
            steps_per_round=1000,
            rounds=1,
            fake_samples_per_round=8000,
            warmup_steps=50,
            ema=0.99,
            eval_every=100,
            select_best_by="max:exact",
            device="cpu",
            log_every=25,
        ),
        options=dict(
            digits=2,
            pairs=0,
            arch="gpt2",
            # 12-d 1-layer: temperature-1 samples are dispersed (seed 0: greedy 80.6 %, sampled
            # 45.4 %); the spread across seeds is the per-seed pre-training outcome, not capacity
            # (seed 3, same architecture: 87.0 / 78.8). The 64-d 2-layer model of the first
            # report samples 87-97 % correct and leaves no headroom
            dim=12,
            layers=1,
            heads=2,
            pretrain_steps=10_000,
            pretrain_lr=3e-3,
            pretrain_batch=128,
            eval_prompts=500,
            eval_samples=2,
            select_prompts=256,
            seeds=[1, 2, 3],
            control=True,
        ),
    ),
}

ALIASES = {"fakes": "fake_samples_per_round"}  # short names the CLI has always accepted


def parse_value(raw: str) -> Any:
    """A setting typed on a command line: a Python literal where it is one, else the string."""
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def settings(name: str, **overrides: Any) -> tuple[TrainConfig, dict[str, Any]]:
    """(TrainConfig, builder options) of preset ``name`` with ``overrides`` applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    preset = PRESETS[name]
    overrides = {ALIASES.get(k, k): v for k, v in overrides.items()}
    fields = set(TrainConfig.field_types())
    unknown = set(overrides) - fields - set(preset.options)
    if unknown:
        raise ValueError(
            f"preset {name}: unknown setting(s) {sorted(unknown)}; settings are TrainConfig "
            f"fields or the preset's options {sorted(preset.options)}"
        )
    config = {**preset.config, **{k: v for k, v in overrides.items() if k in fields}}
    options = {**preset.options, **{k: v for k, v in overrides.items() if k not in fields}}
    return TrainConfig(**config), options


def run_preset(name: str, out: Path, *, run_name: str = "ddo", **overrides: Any) -> dict:
    """Run preset ``name`` into ``out`` (created; the DDO run in ``out/run_name`` unless
    ``out_dir`` is given); returns the builder's result dict."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    overrides.setdefault("out_dir", str(out / run_name))
    config, options = settings(name, **overrides)
    module, _, function = PRESETS[name].build.partition(":")
    return getattr(importlib.import_module(module), function)(out, config, **options)


def preset_runner(name: str) -> Callable[..., dict]:
    """``run(out, **overrides)``: :func:`run_preset` of preset ``name`` (each builder module's
    ``run``)."""

    def run(out: Path, **overrides: Any) -> dict:
        return run_preset(name, out, **overrides)

    run.__doc__ = f"Run the {name!r} preset (:data:`PRESETS`) into ``out`` with ``overrides``."
    return run
