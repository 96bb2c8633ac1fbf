"""TrainState: everything a DDO run carries from step to step, saved and restored as one object.

Checkpoint format 2 (``state_dict()``): ``weights`` = {model, ref[, ema][, best]} state dicts and
``meta`` = {format, global_step, round, step_in_round, skipped, optimizer, round_metrics, best}
where ``best`` is ``{"score", "step"}`` or None. Format 1 (before TrainState) kept ``best_score``
and ``best_step`` at the top level and had no ``format`` key; :func:`upgrade` converts it.

Sharded (FSDP) runs save the same content as one flat dict of (DTensor) tensors for
``torch.distributed.checkpoint`` (:meth:`TrainState.sharded_state_dict`): ``model/NAME``,
``ref/NAME``, ``ema/NAME``, ``best/NAME`` and Adam's state as ``optim/PARAM_NAME/KEY``, with the
optimizer's param groups (hyper-parameters) in ``meta``; meta's ``sharded`` is True.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import fsdp
from .config import TrainConfig

FORMAT = 2


@dataclass
class Best:
    """The round's best candidate so far: its eval score, a copy of its weights, its position."""

    score: dict[str, float]
    state: dict[str, torch.Tensor]
    step: int  # step_in_round


def clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def adam(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """Fused Adam: it honours ``optimizer.found_inf`` (1 = leave weights, moments and the step
    count bit-for-bit unchanged) on the device, which the non-finite guard relies on."""
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)


@torch.no_grad()
def update_ema(
    ema: nn.Module, model: nn.Module, decay: float, apply: torch.Tensor | None = None
) -> None:
    """ema <- ema + (1 - decay) * apply * (model - ema) for parameters; buffers are copied.

    ``apply`` (a 0-d bool tensor, default true) keeps a skipped step's EMA unchanged without a
    host sync: lerp by an exact 0 returns ema bit for bit. Sharded (FSDP) modules update their
    matching local shards: elementwise, so exact, with no communication.
    """
    weights: dict[torch.dtype, torch.Tensor | float] = {}
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e, p = fsdp.local(e), fsdp.local(p)
        if apply is None:
            e.lerp_(p, 1.0 - decay)
            continue
        if e.dtype not in weights:
            weights[e.dtype] = apply.to(e.dtype) * (1.0 - decay)
        e.lerp_(p, weights[e.dtype])
    for e, b in zip(ema.buffers(), model.buffers(), strict=True):
        e.copy_(b)


@dataclass
class TrainState:
    """theta, the frozen reference, the EMA, the optimizer, the counters, the round's best."""

    model: nn.Module
    ref: nn.Module
    ema: nn.Module | None
    optimizer: torch.optim.Optimizer
    global_step: int = 0
    round: int = 0
    step_in_round: int = 0
    skipped: int = 0  # non-finite steps skipped so far (as of the last metrics flush)
    best: Best | None = None
    round_metrics: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def create(
        cls,
        model: nn.Module,
        cfg: TrainConfig,
        shard: Callable[[nn.Module], nn.Module] | None = None,
    ) -> TrainState:
        """The state at the start of a run: ref (and EMA) are frozen copies of ``model``.

        DDO needs theta and ref to compute the same function at theta = ref: dropout off (eval
        mode) for both; gradients still flow in eval mode. ``shard`` (FSDP): applied in place to
        theta, ref and EMA after copying (a sharded module cannot be copied) and before Adam is
        made (it must hold the sharded parameters).
        """
        model.eval()
        ref = copy.deepcopy(model).eval().requires_grad_(False)
        ema = copy.deepcopy(model).eval().requires_grad_(False) if cfg.ema else None
        if shard is not None:
            for m in (model, ref, ema):
                if m is not None:
                    shard(m)
        return cls(model, ref, ema, adam(trainable(model), cfg))

    @property
    def eval_model(self) -> nn.Module:
        """What eval_fn scores and the round's selection copies: the EMA when there is one."""
        return self.ema if self.ema is not None else self.model

    def modules(self) -> list[nn.Module]:
        return [self.model, self.ref] + ([self.ema] if self.ema is not None else [])

    def next_round(self, optimizer: torch.optim.Optimizer) -> None:
        """A fresh optimizer every round, as in the paper; the round's best is forgotten."""
        self.round += 1
        self.step_in_round = 0
        self.best = None
        self.optimizer = optimizer

    def weights(self) -> dict[str, dict[str, torch.Tensor]]:
        """{model, ref[, ema][, best]} state dicts (DTensor shards in a sharded run)."""
        weights = {"model": self.model.state_dict(), "ref": self.ref.state_dict()}
        if self.ema is not None:
            weights["ema"] = self.ema.state_dict()
        if self.best is not None:
            weights["best"] = self.best.state
        return weights

    def meta(self) -> dict[str, Any]:
        """Counters, metrics and the best's score; the caller adds the optimizer."""
        return {
            "format": FORMAT,
            "global_step": self.global_step,
            "round": self.round,
            "step_in_round": self.step_in_round,
            "skipped": self.skipped,
            "round_metrics": self.round_metrics,
            "best": None
            if self.best is None
            else {"score": self.best.score, "step": self.best.step},
        }

    def state_dict(self) -> dict[str, dict[str, Any]]:
        meta = self.meta() | {"optimizer": self.optimizer.state_dict()}
        return {"weights": self.weights(), "meta": meta}

    # ------------------------------------------------------------- sharded (FSDP) checkpoints
    def _param_names(self) -> list[str]:
        """Names of the optimizer's parameters, in its state-dict index order."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        names = fsdp.named(self.model, params)
        return [names[id(p)] for p in params]

    def sharded_state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, meta) for ``torch.distributed.checkpoint``: every rank's shards under flat
        keys ``model/NAME`` ... ``best/NAME``, ``optim/PARAM_NAME/KEY`` (Adam's step, moments),
        and meta with the optimizer's param groups and ``sharded: True``."""
        tensors = {f"{m}/{k}": v for m, sd in self.weights().items() for k, v in sd.items()}
        opt = self.optimizer.state_dict()
        names = self._param_names()
        for i, st in opt["state"].items():
            for k, v in st.items():
                if not torch.is_tensor(v):
                    raise TypeError(f"optimizer state {names[i]}/{k} is not a tensor")
                tensors[f"optim/{names[i]}/{k}"] = v
        meta = self.meta() | {"optimizer": {"param_groups": opt["param_groups"]}, "sharded": True}
        return tensors, meta

    def sharded_template(self, keys: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
        """Tensors to load a sharded checkpoint into, sharded like this run's (any number of
        ranks): the modules' own state dicts, a fresh copy of the EMA's (theta's) for the best,
        and for each saved Adam entry ``keys[optim/NAME/KEY]`` (DCP metadata: ``.size``,
        ``.properties.dtype``) zeros shaped like the parameter, or a plain tensor (the step)."""
        template = {}
        for name, sd in self.weights().items():
            if name != "best":
                template |= {f"{name}/{k}": v for k, v in sd.items()}
        if meta["best"] is not None:
            template |= {f"best/{k}": v for k, v in clone_state(self.eval_model).items()}
        params = dict(self.model.named_parameters())
        for key, md in keys.items():
            if not key.startswith("optim/"):
                continue
            name, k = key[len("optim/") :].rsplit("/", 1)
            p = params[name].detach()
            if k != "step" and tuple(md.size) == tuple(p.shape):
                template[key] = torch.zeros_like(p)
            else:
                device = fsdp.local(p).device
                template[key] = torch.zeros(md.size, dtype=md.properties.dtype, device=device)
        return template

    def load_sharded_state_dict(self, tensors: dict[str, Any], meta: dict[str, Any]) -> None:
        """Restore from a :meth:`sharded_template` filled by ``torch.distributed.checkpoint``."""
        for name, m in zip(("model", "ref", "ema"), self.modules(), strict=False):
            m.load_state_dict({k: tensors[f"{name}/{k}"] for k in m.state_dict()})
        index = {n: i for i, n in enumerate(self._param_names())}
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, v in tensors.items():
            if key.startswith("optim/"):
                name, k = key[len("optim/") :].rsplit("/", 1)
                state.setdefault(index[name], {})[k] = v
        self._load_meta(meta, {"state": state, "param_groups": meta["optimizer"]["param_groups"]})
        if meta["best"] is not None:
            best = {k[len("best/") :]: v for k, v in tensors.items() if k.startswith("best/")}
            self.best = Best(meta["best"]["score"], best, meta["best"]["step"])

    def load_state_dict(self, state: dict[str, dict[str, Any]]) -> None:
        weights, meta = state["weights"], upgrade(state["meta"], state["weights"])
        self.model.load_state_dict(weights["model"])
        self.ref.load_state_dict(weights["ref"])
        if self.ema is not None:
            if "ema" not in weights:
                raise ValueError("the checkpoint has no EMA weights but TrainConfig.ema is set")
            self.ema.load_state_dict(weights["ema"])
        self._load_meta(meta, meta["optimizer"])
        if meta["best"] is not None:
            device = next(self.model.parameters()).device
            best_state = {k: v.to(device) for k, v in weights["best"].items()}
            self.best = Best(meta["best"]["score"], best_state, meta["best"]["step"])

    def _load_meta(self, meta: dict[str, Any], opt: dict[str, Any]) -> None:
        """Counters, metrics and the optimizer ``opt`` (a state dict); the best is cleared."""
        # saved groups decide where Adam's step counters go: always ours (fused, on the device)
        groups = [g | {"fused": True, "foreach": None} for g in opt["param_groups"]]
        self.optimizer.load_state_dict(opt | {"param_groups": groups})
        self.global_step, self.round = meta["global_step"], meta["round"]
        self.step_in_round, self.skipped = meta["step_in_round"], meta["skipped"]
        self.round_metrics = list(meta["round_metrics"])
        self.best = None


def trainable(model: nn.Module) -> list[nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            "ddo_fast.train: the model has no parameter with requires_grad=True; "
            "call model.requires_grad_(True) on the parts to fine-tune"
        )
    return params


def upgrade(meta: dict[str, Any], weights: dict[str, Any]) -> dict[str, Any]:
    """``meta`` in the current format; format 1 (no ``format`` key) is converted."""
    version = meta.get("format", 1)
    if version == FORMAT:
        return meta
    if version != 1:
        raise ValueError(
            f"checkpoint format {version} is newer than this ddo_fast reads (1 to {FORMAT}): "
            "upgrade ddo_fast to resume it"
        )
    best = None
    if "best" in weights:  # format 1 wrote these two keys exactly when it saved best weights
        best = {"score": meta["best_score"], "step": meta["best_step"]}
    rest = {k: v for k, v in meta.items() if k not in ("best_score", "best_step")}
    return rest | {"format": FORMAT, "best": best, "upgraded_from": 1}
