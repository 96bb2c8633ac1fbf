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
        "class-conditional EDM MLP on scikit-learn's 8x8 digits, feature-FD evaluation",
        config=dict(
            alpha=2.0,
            beta=0.1,
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
        options=dict(pretrain_steps=20_000, sample_steps=18, plot=True, control_mle=False),
    ),
    "digits-ar": Preset(
        "ddo_fast.examples.digits_ar:build",
        "class-conditional causal transformer on quantised 8x8 digits, feature-FD evaluation",
        config=dict(
            alpha=1.0,
            beta=1.0,
            lr=1e-5,
            batch_size=64,
            steps_per_round=300,
            rounds=1,
            fake_samples_per_round=2000,
            eval_every=50,
            select_best_by="min:fd",
            device="cpu",
            log_every=25,
        ),
        options=dict(levels=8, pretrain_steps=3000, dim=64, layers=2, plot=True, control_mle=False),
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
