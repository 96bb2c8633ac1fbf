"""Compile every Triton kernel ahead of time for sm_80 and sm_90 without a GPU.

Run as a script (``python tests/aot_compile.py``) in a process where TRITON_INTERPRET is unset:
``triton.compile`` needs real JIT functions. Prints one JSON line per (kernel, variant, dtype,
arch) with the resources ptxas reports (registers per thread, spill stores/loads in bytes);
exits non-zero if any compile fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from ddo_fast.kernels import (  # noqa: E402, F401
    ar_ddo,
    ddo_loss,
    diffusion_ddo,
    loss_head,
    token_logprobs,
)
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from ddo_fast._reduction import Reduction  # noqa: E402

DTYPES = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}
HEAD = {"alpha": "fp32", "beta": "fp32"}


def _coef_sig(on: bool) -> tuple[dict, dict]:
    """Signature/constexprs of the loss_head_coef pointer group, enabled or all None."""
    names = ["r_ptr", "real_ptr", "sw_ptr", "group_scale_ptr", "gout_ptr", "gr_ptr"]
    types = ["*fp32", "*u8", "*fp32", "*fp32", "*fp32", "*fp32"]
    if on:
        sig = dict(zip(names, types, strict=True)) | {"gout_stride": "i32"} | HEAD
        return sig, {"HAS_GOUT": True, "HAS_SW": True, "HAS_GR": True}
    sig = {n: "constexpr" for n in names} | {"gout_stride": "i32"} | HEAD
    return sig, {n: None for n in names} | {"HAS_GOUT": False, "HAS_SW": False, "HAS_GR": False}


def cases():
    # each tensor in its own dtype: bf16 pred, fp16 pred_ref, fp32 target; uint8 targets
    yield (
        "diffusion_ddo.partial_kernel",
        "bf16/fp16/fp32",
        diffusion_ddo.partial_kernel,
        {
            "pred_ptr": "*bf16",
            "ref_ptr": "*fp16",
            "tgt_ptr": "*fp32",
            "part_ptr": "*fp32",
            "D": "i64",
            "stride_p": "i64",
            "stride_q": "i64",
            "stride_t": "i64",
            "chunk": "i64",
            "n_parts": "i32",
        },
        {"BLOCK": diffusion_ddo.BLOCK_GPU},
        diffusion_ddo.WARPS_GPU,
    )
    yield (
        "token_logprobs.stats_kernel[targets=u8]",
        "bf16",
        token_logprobs.stats_kernel,
        {
            "x_ptr": "*bf16",
            "y_ptr": "*u8",
            "logp_ptr": "*fp32",
            "stats_ptr": "*fp32",
            "n_rows": "i32",
            "L": "i32",
            "V": "i32",
            "stride_b": "i64",
            "stride_l": "i64",
            "ignore_index": "i32",
        },
        {"BLOCK_V": 4096, "SINGLE": True},
        token_logprobs._warps(4096),
    )
    for dt, ptr in DTYPES.items():
        yield (
            "diffusion_ddo.partial_kernel",
            dt,
            diffusion_ddo.partial_kernel,
            {
                "pred_ptr": ptr,
                "ref_ptr": ptr,
                "tgt_ptr": ptr,
                "part_ptr": "*fp32",
                "D": "i64",
                "stride_p": "i64",
                "stride_q": "i64",
                "stride_t": "i64",
                "chunk": "i64",
                "n_parts": "i32",
            },
            {"BLOCK": diffusion_ddo.BLOCK_GPU},
            diffusion_ddo.WARPS_GPU,
        )
        sig, const = _coef_sig(True)
        yield (
            "diffusion_ddo.grad_kernel",
            dt,
            diffusion_ddo.grad_kernel,
            {
                "pred_ptr": ptr,
                "tgt_ptr": ptr,
                "grad_ptr": ptr,
                "weight_ptr": "*fp32",
                "D": "i64",
                "stride_p": "i64",
                "stride_t": "i64",
                "chunk": "i64",
            }
            | sig,
            const | {"BLOCK": diffusion_ddo.BLOCK_GPU},
            diffusion_ddo.WARPS_GPU,
        )
        # the single-tile path at VAR's V=4096 and at its largest tile (MAX_SINGLE = 8192: the
        # whole row in registers, the case most likely to spill), and the blocked path
        variants = (
            (True, 4096),
            (True, token_logprobs.MAX_SINGLE),
            (False, token_logprobs.BLOCK_LOOP),
        )
        for single, block in variants:
            yield (
                f"token_logprobs.stats_kernel[single={single},V={block}]",
                dt,
                token_logprobs.stats_kernel,
                {
                    "x_ptr": ptr,
                    "y_ptr": "*i64",
                    "logp_ptr": "*fp32",
                    "stats_ptr": "*fp32",
                    "n_rows": "i32",
                    "L": "i32",
                    "V": "i32",
                    "stride_b": "i64",
                    "stride_l": "i64",
                    "ignore_index": "i32",
                },
                {"BLOCK_V": block, "SINGLE": single},
                token_logprobs._warps(block),
            )
        for per_token in (True, False):
            sig, const = _coef_sig(not per_token)
            tok = (
                {"tok_ptr": "*fp32", "tok_stride_b": "i32", "tok_stride_l": "i32"}
                if per_token
                else {"tok_ptr": "constexpr", "tok_stride_b": "i32", "tok_stride_l": "i32"}
            )
            yield (
                f"token_logprobs.grad_kernel[per_token={per_token}]",
                dt,
                token_logprobs.grad_kernel,
                {
                    "x_ptr": ptr,
                    "y_ptr": "*i64",
                    "stats_ptr": "*fp32",
                    "grad_ptr": ptr,
                    "n_rows": "i32",
                    "L": "i32",
                    "V": "i32",
                    "stride_b": "i64",
                    "stride_l": "i64",
                    "ignore_index": "i32",
                }
                | tok
                | sig,
                const
                | ({} if per_token else {"tok_ptr": None})
                | {"PER_TOKEN": per_token, "BLOCK_V": 4096},
                token_logprobs._warps(4096),
            )
    for reduction in Reduction:
        yield (
            f"loss_head.loss_head_kernel[reduction={reduction.name.lower()}]",
            "fp32",
            loss_head.loss_head_kernel,
            {
                "part_ptr": "*fp32",
                "n_parts": "i32",
                "scale_ptr": "*fp32",
                "offset_ptr": "*fp32",
                "real_ptr": "*u8",
                "sw_ptr": "*fp32",
                "r_ptr": "*fp32",
                "out_ptr": "*fp32",
                "group_scale_ptr": "*fp32",
                "ok_ptr": "*i32",
                "B": "i32",
            }
            | HEAD,
            {
                "NEG_SCALE": True,
                "HAS_OFFSET": True,
                "HAS_LOSS": True,
                "HAS_SW": True,
                "REDUCTION": int(reduction),
                "CHECK": True,
                "BLOCK_B": 8,
                "BLOCK_P": 1024,
            },
            4,
        )
    yield (
        "ddo_loss.coef_kernel",
        "fp32",
        ddo_loss.coef_kernel,
        {
            "coef_ptr": "*fp32",
            "B": "i32",
            "r_ptr": "*fp32",
            "real_ptr": "*u8",
            "sw_ptr": "*fp32",
            "group_scale_ptr": "*fp32",
            "gout_ptr": "*fp32",
            "gout_stride": "i32",
        }
        | HEAD,
        {"HAS_SW": True, "BLOCK": 1024},
        4,
    )


def _ptxas() -> str | None:
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return bundled if os.path.exists(bundled) else shutil.which("ptxas")


def _ptxas_info(ptx: str, cc: int) -> dict:
    """Registers per thread and spill stores/loads (bytes) as ptxas reports them (-v) for this
    PTX; None values when ptxas is absent or its report cannot be read."""
    tool = _ptxas()
    if tool is None:
        return {"registers": None, "spill_stores": None, "spill_loads": None}
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        arch = "sm_90a" if cc == 90 else f"sm_{cc}"  # triton emits sm_90a PTX for Hopper
        out = subprocess.run(
            [tool, f"-arch={arch}", "-v", src, "-o", os.path.join(tmp, "k.o")],
            capture_output=True,
            text=True,
        )
    text = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return {
        "registers": int(regs.group(1)) if regs else None,
        "spill_stores": int(spills.group(1)) if spills else None,
        "spill_loads": int(spills.group(2)) if spills else None,
    }


def main() -> int:
    failures = 0
    for name, dt, fn, signature, constexprs, warps in cases():
        for cc in (80, 90):
            full_sig = dict(signature)
            for key in constexprs:
                full_sig[key] = "constexpr"
            ordered = {arg: full_sig[arg] for arg in fn.arg_names}
            row = {"kernel": name, "dtype": dt, "arch": f"sm_{cc}"}
            try:
                src = ASTSource(fn=fn, signature=ordered, constexprs=constexprs)
                compiled = triton.compile(
                    src, target=GPUTarget("cuda", cc, 32), options={"num_warps": warps}
                )
                row |= {
                    "ok": True,
                    "shared": compiled.metadata.shared,
                    "num_warps": compiled.metadata.num_warps,
                } | _ptxas_info(compiled.asm["ptx"], cc)
            except Exception as exc:  # report every failure, not only the first
                failures += 1
                row |= {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
            print(json.dumps(row), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
