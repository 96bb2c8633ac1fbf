"""FSDP2 for :func:`ddo_fast.train` (``TrainConfig(distributed="fsdp")``).

What is sharded: theta, the frozen reference and the EMA are each ``fully_shard``-ed over a 1-D
device mesh of all ranks, per block (see :func:`blocks`) and then as a whole (the root unit: the
parameters outside the blocks, e.g. embeddings, final norm and output head). Every parameter
[d0, ...] is split along dim 0: a rank stores ceil(d0 / world) rows of it. The reference and the
EMA are frozen (requires_grad False): no gradients, no optimizer state. Adam's moments live
beside theta's shards, and the round's best copy is a clone of the EMA's (or theta's) shards.

Memory per rank, in model copies P (parameters of the whole model): during a step
(3 + 2 [Adam] + 1 [grads] + 1 [best]) P / world, plus one block's full parameters at a time
(FSDP2 gathers a block for its forward, frees it after, gathers it again for the backward) and
the root unit's full parameters (kept from theta's forward to its backward; the reference's are
freed after the loss). While sampling fakes (round start, or every step with online fakes) and
while ``eval_fn`` runs, the whole reference (EMA) is gathered on every rank (:func:`gathered`):
+1 P for that time, because samplers and eval code may call methods other than ``forward``
(``model.sample`` with a KV cache, ``block.step``) that FSDP's hooks do not see.

Why the EMA is sharded like theta (not gathered): ema <- ema + (1 - decay) (theta - ema) is
elementwise, so on matching shards it is exact, needs no communication, and costs 1/world of a
copy; a gathered EMA would cost a whole copy per rank.

The root unit and the output head: the root's parameters are gathered in theta's forward and,
FSDP2's rule for the root, kept until the backward has used them; so after ``model(...)``
returns, ``model.get_output_embeddings().weight`` (or any root parameter) is the full, plain
tensor, gathered ONCE for the step, whose gradient FSDP reduce-scatters into theta's shard. A
fused-linear loss (``fused_linear_ar_ddo_loss(hidden, head_weight, ...)``) therefore gets the
whole head weight once per step and slices it per chunk without communication. Adapters must
read root parameters after a forward call of the model (before it, they are sharded DTensors),
and keep the head in the root unit (not among :func:`blocks`).

Collectives: a sharded model's forward is one (every rank runs it in step with the same
shapes): the loss, and ``eval_fn`` (called on every rank, as always). Inside
:func:`gathered` the forwards need no communication, so rank 0 samples the fake pool alone.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

BLOCK_ATTRS = (
    "blocks",
    "layers",
    "h",
    "transformer.h",
    "transformer.blocks",
    "transformer.layers",
    "model.layers",
    "model.decoder.layers",
    "gpt_neox.layers",
    "decoder.layers",
)
"""Attribute paths searched (in order) for a ModuleList/Sequential of blocks."""


def blocks(model: nn.Module) -> list[nn.Module]:
    """The submodules that become their own FSDP units (each gathered only around its forward).

    In order of precedence:

    1. ``model.fsdp_blocks()``, when the model defines it: an iterable of submodules (declare
       them to control the units exactly; return ``[]`` for one unit of the whole model).
    2. Hugging Face's ``model._no_split_modules``: every submodule whose class name is listed
       (e.g. ``GPT2Block``, ``LlamaDecoderLayer``).
    3. The first of :data:`BLOCK_ATTRS` (``blocks``, ``layers``, ``h``, ``transformer.h``,
       ``model.layers``, ...) that is a ``ModuleList``/``Sequential``: its children.
    4. None: the whole model is one unit.

    The output head and any parameter shared with a block must stay outside the blocks (in the
    root unit): FSDP2 refuses a parameter managed by two units.
    """
    own = getattr(model, "fsdp_blocks", None)
    if callable(own):
        found = list(own())
        for m in found:
            if not isinstance(m, nn.Module):
                raise TypeError(
                    f"{type(model).__name__}.fsdp_blocks() must return nn.Modules, got "
                    f"{type(m).__name__}"
                )
        return found
    names = getattr(model, "_no_split_modules", None)
    if names:
        found = [m for m in model.modules() if m is not model and type(m).__name__ in set(names)]
        if found:
            return found
    for path in BLOCK_ATTRS:
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, (nn.ModuleList, nn.Sequential)) and len(obj) > 0:
            return list(obj.children())
    return []


def mesh(device: torch.device, world: int):
    """A 1-D device mesh over all ranks (FSDP2 shards over it)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (world,))


def shard(model: nn.Module, device_mesh) -> nn.Module:
    """``fully_shard`` each of :func:`blocks` (innermost first), then the whole model (the
    root unit). In place: the model's class becomes FSDP's subclass of it and its parameters
    become DTensor shards on the mesh's device. A frozen module (the reference, the EMA) is
    sharded the same way; it never gets gradients or optimizer state."""
    from torch.distributed.fsdp import fully_shard

    units = blocks(model)
    order = {id(m): i for i, m in enumerate(model.modules())}
    for unit in sorted(units, key=lambda m: -order.get(id(m), -1)):  # children before parents
        fully_shard(unit, mesh=device_mesh)
    fully_shard(model, mesh=device_mesh)
    # FSDP2 initialises a root at its first forward; do it now, so that the first use may be
    # an unshard (gathered) or a forward on one rank only (no collective is involved)
    model._get_fsdp_state()._lazy_init()
    return model


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def release(module: nn.Module) -> None:
    """After a forward-only use of a sharded module: free every unit's gathered parameters (the
    root keeps its own after a forward, and a frozen module has no backward that would free
    them) and clear FSDP's per-iteration records (a forward appends to them; a backward clears
    them, and the reference and the EMA never run one). No-op on an unsharded module."""
    if is_sharded(module):
        module.reset_iter_state()


@contextmanager
def gathered(module: nn.Module) -> Iterator[None]:
    """Every FSDP unit of ``module`` gathered (full parameters on every rank) for the duration,
    then released. A collective: every rank enters it.

    Used where arbitrary user code runs the model - samplers and ``eval_fn`` may call methods
    other than ``forward`` (a KV-cache ``model.sample``, ``block.step``), which FSDP's hooks
    do not see. Costs one whole copy of the module's parameters per rank while inside; the
    forwards inside need no communication, so rank 0 may run them alone."""
    if not is_sharded(module):
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    module.set_reshard_after_forward(False)  # forwards inside keep the full parameters
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:  # FSDP2's defaults: blocks free after forward, the root does not
            unit.set_reshard_after_forward(unit is not module, recurse=False)
        release(module)


def local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (for elementwise updates of matching shards), else ``t``."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered into the full tensor on every rank (a collective), else ``t``."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict of a sharded model, on the CPU of rank 0 ({} on the other
    ranks); ``model.state_dict()`` for an unsharded one. A collective: call it on every rank,
    e.g. ``full_state_dict(train(...).model)`` before ``dist.destroy_process_group()``."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def single_process_group(device: torch.device) -> None:
    """A 1-rank process group for FSDP outside torchrun (an in-memory store, no ports)."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    os.environ.setdefault("LOCAL_RANK", "0")
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def named(model: nn.Module, params: Iterable[nn.Parameter]) -> dict[int, str]:
    """id(param) -> its name in ``model`` (to key optimizer state by name in checkpoints)."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for p in params:
        if id(p) not in names:
            raise ValueError("an optimizer parameter is not a parameter of the model")
        out[id(p)] = names[id(p)]
    return out
