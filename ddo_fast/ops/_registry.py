"""One registration path for every operator pair ``ddo_fast::<stem>_fwd`` / ``<stem>_bwd``.

torch.library dispatches by device: the schemas are declared once (``ddo_fast/_library.py``),
the C++ kernels register themselves for CPU when the C++ library loads, and
:func:`register_op` adds the rest in one call: fake (meta) impls of both ops, autograd of the
forward, the Triton launchers for CUDA, and any Python kernels of ops defined in Python. The
public functions then run
``SPEC.run(route, *args)`` with the route from :func:`ddo_fast._backend.resolve_backend`.

CPU tensors do not take this Python autograd: the C++ library registers, for the AutogradCPU key
(which takes precedence over the alias key ``register_autograd`` uses), a C++ autograd Function
per forward operator that saves the same tensors and calls the same backward operator
(``csrc/cpu/autograd.h``, ``csrc/cpu/<stem>.cpp``), so a CPU call makes no Python hop inside
autograd (27-60 us less per fused forward+backward here). CUDA tensors keep the Python autograd.

The one route torch.library cannot express is Triton on CPU tensors (``backend="triton"`` under
``TRITON_INTERPRET=1``, which the tests run in the same process as the C++ kernels, so the CPU
dispatch key is taken). For it, each spec builds once an ``autograd.Function`` from the same
launchers and the same ``setup_context``/``backward`` as the registered operator, so the
interpreter tests exercise the gradient code the CUDA path runs.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .._backend import INTERPRETER

# backward(bwd, ctx, *grads): `bwd` is the backward operator (or its Triton launcher on the
# interpreter route), called with the schema's arguments.
Backward = Callable[..., tuple]
Kernels = tuple[Callable[..., Any], Callable[..., Any]]


@dataclasses.dataclass(frozen=True, eq=False)
class OpSpec:
    """A registered forward/backward operator pair; ``run`` is the only way the public functions
    call it."""

    stem: str
    fwd: torch._ops.OpOverload  # torch.ops.ddo_fast.<stem>_fwd.default
    setup_context: Callable[[Any, tuple, Any], None]
    backward: Backward
    triton: Any  # kernels/<stem>.py (forward/backward launchers) or None

    def run(self, route: str, *args: Any) -> Any:
        """The forward on ``route`` (``DISPATCH`` or ``INTERPRETER``), args as in the schema."""
        if route == INTERPRETER:
            return _interpreter_function(self).apply(*args)
        return self.fwd(*args)


def register_op(
    stem: str,
    *,
    fake_fwd: Callable[..., Any],
    fake_bwd: Callable[..., Any],
    setup_context: Callable[[Any, tuple, Any], None],
    backward: Backward,
    triton: Any = None,
    kernels: Mapping[str | None, Kernels] | None = None,
) -> OpSpec:
    """Register everything Python provides for ``ddo_fast::<stem>_fwd`` and ``<stem>_bwd``.

    Both ops must already be defined (in ``ddo_fast/_library.py``, or by the op's own module
    with ``torch.library.Library("ddo_fast", "FRAGMENT")``).

    Args:
        fake_fwd, fake_bwd: meta impls (shapes, dtypes, strides of the real outputs).
        setup_context: ``(ctx, inputs, output)`` of the forward; saves what ``backward`` needs.
        backward: ``backward(bwd, ctx, *grads)`` returning one gradient per forward input;
            ``bwd`` is the backward op (the registered one, or the Triton launcher on the
            interpreter route).
        triton: the op's Triton launchers, an object with ``forward``/``backward`` matching the
            schemas (``ddo_fast.ops._triton.<stem>``); registered for CUDA and run on CPU tensors
            by the interpreter route. None: the op has no Triton kernels.
        kernels: further ``{device_type: (fwd, bwd)}`` impls (``None`` = every device), e.g.
            the Python kernels of an op defined in Python.
    """
    fwd_name, bwd_name = f"ddo_fast::{stem}_fwd", f"ddo_fast::{stem}_bwd"
    torch.library.register_fake(fwd_name, fake_fwd)
    torch.library.register_fake(bwd_name, fake_bwd)
    impls = dict(kernels or {})
    if triton is not None:
        impls.setdefault("cuda", (triton.forward, triton.backward))
    for device_type, (fwd_impl, bwd_impl) in impls.items():
        torch.library.register_kernel(fwd_name, device_type, fwd_impl)
        torch.library.register_kernel(bwd_name, device_type, bwd_impl)
    ops = getattr(torch.ops.ddo_fast, f"{stem}_fwd"), getattr(torch.ops.ddo_fast, f"{stem}_bwd")
    # Built once here: the dispatcher calls it, nothing is created per call.
    torch.library.register_autograd(
        fwd_name, functools.partial(backward, ops[1].default), setup_context=setup_context
    )
    return OpSpec(stem, ops[0].default, setup_context, backward, triton)


@functools.cache  # one Function class per op and process, built on first use
def _interpreter_function(spec: OpSpec) -> type[torch.autograd.Function]:
    """The registered operator's autograd, with the Triton launchers as its kernels.

    Built like torch.library's own autograd of a registered op (``make_autograd_impl``): a
    ``forward(ctx, *args)`` that runs the kernel then ``setup_context``. Not the newer
    ``setup_context`` staticmethod form: its ``apply`` binds the arguments with ``inspect`` on
    every call (~40 us here), a cost the CUDA route does not pay and timings should not see.
    """
    if spec.triton is None:
        raise RuntimeError(f"ddo_fast: `{spec.stem}` has no Triton kernels; use backend='cpp'")
    launch_fwd, setup_context = spec.triton.forward, spec.setup_context

    def forward(ctx: Any, *args: Any) -> Any:
        output = launch_fwd(*args)
        setup_context(ctx, args, output)
        return output

    return type(
        f"{spec.stem}_interpreter",
        (torch.autograd.Function,),
        {
            "forward": staticmethod(forward),
            "backward": staticmethod(functools.partial(spec.backward, spec.triton.backward)),
        },
    )
