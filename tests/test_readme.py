"""The README's "Use with your framework" section runs as written.

Every ```python block of that section is executed on CPU in a fresh namespace, in a temporary
working directory (the blocks write their runs under ./runs), with one thread (small models run
faster uncontended). A block may be skipped only when it needs a GPU or the network, marked by
the HTML comment ``<!-- readme-test: skip (gpu) -->`` or ``<!-- readme-test: skip (network) -->``
on the line right before it; a GPU block still runs where CUDA is present, a network block when
``DDO_FAST_README_NETWORK=1``. The README's other python blocks are fragments (the "Train"
block uses the reader's own model and data), so they are only compiled.
"""

import contextlib
import inspect
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Use with your framework"
SUBSECTIONS = ("### transformers", "### diffusers", "### k-diffusion and EDM2", "### TRL")
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\s*\((gpu|network)\)\s*-->")
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _section(text: str) -> str:
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return text[start : None if end == -1 else end]


def _blocks() -> list[tuple[str, str, str | None]]:
    """(id, code, skip reason or None) of each python block of the section, in order."""
    section = _section(README.read_text())
    out, counts = [], {}
    for m in FENCE.finditer(section):
        before = section[: m.start()]
        heads = re.findall(r"^### (.+)$", before, re.M)
        slug = re.sub(r"[^a-z0-9]+", "-", heads[-1].lower()).strip("-") if heads else "intro"
        counts[slug] = counts.get(slug, 0) + 1
        prev_line = before.rstrip("\n").rsplit("\n", 1)[-1]
        skip = SKIP.search(prev_line)
        out.append((f"{slug}-{counts[slug]}", m.group(1), skip.group(1) if skip else None))
    return out


BLOCKS = _blocks()


def test_section_is_after_the_api_and_every_subsection_has_a_runnable_block():
    text = README.read_text()
    assert text.index("## API") < text.index(SECTION) < text.index("## Backends")
    section = _section(text)
    parts = re.split(r"^(?=### )", section, flags=re.M)
    for name in SUBSECTIONS:
        part = [p for p in parts if p.startswith(name)]
        assert len(part) == 1, f"README {SECTION!r} has no single {name!r} subsection"
        assert "```python" in part[0], f"README {name!r} has no python block"
    assert "hf fills" not in section  # the placeholder of the unwritten subsection is gone
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("block_id,code,skip", BLOCKS, ids=[b[0] for b in BLOCKS])
def test_block_runs_as_written(block_id, code, skip, tmp_path, monkeypatch):
    if skip == "gpu" and not torch.cuda.is_available():
        pytest.skip(f"{block_id} needs a GPU (marked in the README)")
    if skip == "network" and os.environ.get("DDO_FAST_README_NETWORK") != "1":
        pytest.skip(f"{block_id} needs the network (marked in the README)")
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        exec(compile(code, f"README.md:{block_id}", "exec"), {"__name__": "__readme__"})
    finally:
        torch.set_num_threads(threads)


def test_every_python_block_of_the_readme_compiles():
    blocks = FENCE.findall(README.read_text())
    assert blocks
    for i, code in enumerate(blocks):
        compile(code, f"README.md:block{i}", "exec")


def _run_block(prefix: str) -> dict:
    """Execute the first block whose id starts with ``prefix``; its namespace."""
    block_id, code, _ = next(b for b in BLOCKS if b[0].startswith(prefix))
    namespace = {"__name__": "__readme__"}
    exec(compile(code, f"README.md:{block_id}", "exec"), namespace)
    return namespace


def test_trl_trainer_divides_the_ddo_loss_by_accumulation_steps(monkeypatch):
    """The README's DDOTrainer under the installed transformers' own ``Trainer.training_step``:
    the gradient of one micro-batch is that of loss / gradient_accumulation_steps (the DDO
    loss is a mean over rows, not normalised by num_items_in_batch). The Trainer's
    constructor needs ``accelerate`` (not installed), so it is replaced by its model
    introspection (``Trainer.__init__``: accepts_loss_kwargs = forward takes **kwargs); the
    rest of the Trainer that training_step touches is stubbed. Without the README's
    ``model_accepts_loss_kwargs = False`` the gradient is GA times too large."""
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    ns = _run_block("trl")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(
        vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    ))  # fmt: skip
    params = inspect.signature(model.forward).parameters.values()
    accepts = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params)
    assert accepts  # the premise: the Trainer would take the loss as normalised

    def introspecting_init(self, model=None, **kwargs):
        self.model, self.model_accepts_loss_kwargs = model, accepts

    monkeypatch.setattr(transformers.Trainer, "__init__", introspecting_init)
    # training_step compares with accelerate's DistributedType, imported only with accelerate.
    deepspeed = SimpleNamespace(DEEPSPEED="DEEPSPEED")
    monkeypatch.setattr(transformers.trainer, "DistributedType", deepspeed, raising=False)
    trainer = ns["DDOTrainer"](model=model)
    ga = 4
    trainer.compute_loss_func, trainer.current_gradient_accumulation_steps = None, ga
    trainer.optimizer, trainer.state = None, SimpleNamespace(global_step=0)
    trainer.args = SimpleNamespace(n_gpu=1, optim="adamw_torch", torch_empty_cache_steps=None)
    trainer.accelerator = SimpleNamespace(
        distributed_type=None, backward=lambda loss, **kw: loss.backward()
    )
    trainer._prepare_context_parallel_inputs = lambda m, inputs: (contextlib.nullcontext, inputs)
    trainer._prepare_inputs = lambda inputs: inputs
    trainer.compute_loss_context_manager = contextlib.nullcontext

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (8, 10), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
              "is_real": torch.arange(8) < 4}  # fmt: skip
    inputs["ref_logprob"] = ns["ref_logprobs"](model, inputs) - 0.5  # r != 0
    (ns["ddo_lm_loss"](model, inputs) / ga).backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    trainer.training_step(model, dict(inputs), num_items_in_batch=torch.tensor(56))
    for w, p in zip(want, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, w, rtol=1e-5, atol=1e-7)
    assert max(w.abs().max() for w in want) > 0
    # Evaluation: prediction_step takes outputs[1:] of a non-dict; a dict gives no logits.
    loss, outputs = trainer.compute_loss(model, inputs, return_outputs=True)
    assert loss.dim() == 0 and isinstance(outputs, dict)
