"""``ddo-fast train --preset tiny-lm``: DDO on a ``transformers`` causal LM, offline, with an
answer that can be checked exactly.

Task: addition of two numbers below 10^digits written as text, one character per token:
prompt ``<bos>a+b=``, response ``str(a + b)<eos>``. All (a, b) pairs are split per seed by
:func:`~ddo_fast.examples.protocol.stratified_split` (stratified by the number of carries: hard
and easy sums in both parts) into train prompts and held-out prompts. A small GPT-2 (or Llama)
built from a config is pre-trained from scratch on the train part by next-token likelihood on the
response (:meth:`~ddo_fast.adapters.HFCausalLM.mle_loss`), then fine-tuned with DDO
(:class:`~ddo_fast.adapters.HFCausalLM`: real = the data's answer, fake = the reference's own
continuation of a train prompt), and, as the fair control, with
:class:`~ddo_fast.adapters.MLEControl` under the same TrainConfig.

Metrics on the held-out prompts: ``exact_greedy`` (greedy answer == the sum) and
``exact_sampled`` (temperature-1 ancestral samples, ``eval_samples`` per prompt), in percent;
``nll`` (nats per response token). Checkpoint selection inside the runs (``eval_fn``) uses the
sampled exact match on a fixed set of TRAIN prompts (never the held-out ones); hyper-parameters
were chosen on the selection seed 0 only (the report seeds are 1, 2, 3). Settings: the
``tiny-lm`` row of :data:`ddo_fast.examples.presets.PRESETS`.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from ..adapters import HFCausalLM, MLEControl
from ..adapters.hf_causal_lm import prompts_of
from ..training import TrainConfig, train
from ..training.data import generator
from .presets import preset_runner
from .pretrain import cached_pretrain, cosine_decay, fit
from .protocol import LastEvaluated, stratified_split, write_results

PLUS, EQUALS, EOS, PAD, BOS = 10, 11, 12, 13, 14
VOCAB = 15


def encode(text: str) -> list[int]:
    """'12+7=' -> token ids (digits are themselves, then + = )."""
    table = {"+": PLUS, "=": EQUALS}
    return [table[c] if c in table else int(c) for c in text]


def decode_answer(tokens: torch.Tensor) -> list[int | None]:
    """Response token rows [n, T] -> the integers they spell up to EOS (None: not a number)."""
    out: list[int | None] = []
    for row in tokens.tolist():
        digits = []
        for t in row:
            if t == EOS:
                break
            digits.append(t)
        ok = 0 < len(digits) and all(t < 10 for t in digits)
        out.append(int("".join(map(str, digits))) if ok else None)
    return out


def carries(a: torch.Tensor, b: torch.Tensor, digits: int) -> torch.Tensor:
    """Number of carries of a + b (the difficulty stratum)."""
    count = torch.zeros_like(a)
    carry = torch.zeros_like(a)
    for k in range(digits):
        s = (a // 10**k) % 10 + (b // 10**k) % 10 + carry
        carry = (s >= 10).long()
        count += carry
    return count


def make_rows(a: torch.Tensor, b: torch.Tensor, digits: int) -> dict[str, torch.Tensor]:
    """HF-convention rows (right-padded): input_ids, labels (-100 on prompt and padding),
    attention_mask, plus ``answer`` [N]."""
    width = 1 + 2 * digits + 2 + (digits + 1) + 1
    n = len(a)
    ids = torch.full((n, width), PAD, dtype=torch.long)
    labels = torch.full((n, width), -100, dtype=torch.long)
    mask = torch.zeros(n, width, dtype=torch.long)
    for i, (x, y) in enumerate(zip(a.tolist(), b.tolist(), strict=True)):
        prompt = [BOS] + encode(f"{x}+{y}=")
        resp = encode(str(x + y)) + [EOS]
        row = prompt + resp
        ids[i, : len(row)] = torch.tensor(row)
        labels[i, len(prompt) : len(row)] = torch.tensor(resp)
        mask[i, : len(row)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "answer": a + b}


def make_model(arch: str, dim: int, layers: int, heads: int, digits: int) -> nn.Module:
    """A small GPT-2 or Llama built from a config (from scratch: no download)."""
    import transformers

    positions = 4 * digits + 8
    ids = dict(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=VOCAB,
            n_positions=positions,
            n_embd=dim,
            n_layer=layers,
            n_head=heads,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **ids,
        )
        return transformers.GPT2LMHeadModel(cfg)
    if arch == "llama":
        cfg = transformers.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=dim,
            intermediate_size=4 * dim,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=positions,
            **ids,
        )
        return transformers.LlamaForCausalLM(cfg)
    raise ValueError(f"tiny-lm: arch={arch!r} must be 'gpt2' or 'llama'")


class Task:
    """One seed's data: ``pairs`` distinct (a, b) (0: all 10^(2 digits)), split by
    :func:`stratified_split` on the carry count into train rows (HF dict) and held-out rows;
    ``eval_prompts`` held-out rows for the metrics, ``select_prompts`` TRAIN rows for the
    checkpoint selection."""

    def __init__(
        self, digits: int, seed: int, eval_prompts: int, select_prompts: int, pairs: int = 0
    ) -> None:
        n = 10**digits
        g = generator(seed, "tiny-lm", "pairs")
        pick = torch.randperm(n * n, generator=g)[:pairs] if pairs else torch.arange(n * n)
        a, b = pick // n, pick % n
        train_idx, held_idx = stratified_split(carries(a, b, digits), seed=seed)
        rows = make_rows(a, b, digits)
        g = generator(seed, "tiny-lm", "eval")
        held = held_idx[torch.randperm(len(held_idx), generator=g)[:eval_prompts]]
        chosen = train_idx[torch.randperm(len(train_idx), generator=g)[:select_prompts]]
        self.train = {k: v[train_idx] for k, v in rows.items() if k != "answer"}
        self.held = {k: v[held] for k, v in rows.items()}
        self.select = {k: v[chosen] for k, v in rows.items()}


def exact_match(
    adapter: HFCausalLM,
    model: nn.Module,
    rows: dict[str, torch.Tensor],
    g: torch.Generator,
    temperature: float,
    repeats: int = 1,
) -> float:
    """Percent of answers (``repeats`` per prompt) equal to the sum."""
    packed, _ = HFCausalLM(max_new_tokens=adapter.max_new_tokens).prepare_data(
        {k: rows[k] for k in ("input_ids", "labels", "attention_mask")}
    )
    prompt, mask = prompts_of(packed)
    answer = rows["answer"].repeat(repeats)
    prompt, mask = prompt.repeat(repeats, 1), mask.repeat(repeats, 1)
    right = 0
    for s in range(0, len(prompt), 1024):
        out = adapter.generate(
            model, prompt[s : s + 1024], mask[s : s + 1024], g, temperature=temperature
        )
        got = decode_answer(out[:, 0, prompt.shape[1] :])
        right += sum(int(x == y) for x, y in zip(got, answer[s : s + 1024].tolist(), strict=True))
    return 100.0 * right / len(prompt)


def metrics(adapter, model, task: Task, seed: int, samples: int) -> dict[str, float]:
    """Held-out exact match (greedy, sampled at temperature 1) and NLL per response token."""
    packed, _ = HFCausalLM().prepare_data(
        {k: task.held[k] for k in ("input_ids", "labels", "attention_mask")}
    )
    with torch.no_grad():
        nll = float(adapter.mle_loss(model, (packed, None), {}))
    return {
        "exact_greedy": exact_match(adapter, model, task.held, generator(seed, "greedy"), 0.0),
        "exact_sampled": exact_match(
            adapter, model, task.held, generator(seed, "sampled"), 1.0, samples
        ),
        "nll": nll,
    }


def pretrain(model, adapter, rows, steps: int, lr: float, batch: int, seed: int) -> nn.Module:
    """Response-token cross-entropy from scratch, AdamW, cosine lr to 1% (raw weights)."""
    packed, _ = HFCausalLM().prepare_data(rows)
    g = generator(seed, "pretrain")

    def loss_at(step: int) -> torch.Tensor:
        idx = torch.randint(len(packed), (batch,), generator=g)
        return adapter.mle_loss(model, (packed[idx], None), {})

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    return fit(model, opt, steps, cosine_decay(lr, 0.01, steps), loss_at, log_every=steps // 4)


def run_seed(
    out: Path, cfg: TrainConfig, seed: int, opts: dict, control: bool
) -> dict[str, object]:
    """One seed: pre-train (cached in ``out``), then DDO and the MLE control from it."""
    t0 = time.time()
    digits, arch = opts["digits"], opts["arch"]
    task = Task(digits, seed, opts["eval_prompts"], opts["select_prompts"], opts["pairs"])
    adapter = HFCausalLM(max_new_tokens=digits + 2, temperature=1.0)
    steps, lr = opts["pretrain_steps"], opts["pretrain_lr"]
    name = (
        f"pretrained-{arch}-{digits}-{opts['pairs']}-{opts['dim']}-{opts['layers']}-"
        f"{opts['heads']}-{steps}-{lr}-{opts['pretrain_batch']}-{seed}.pt"
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # the initial weights
        model = make_model(arch, opts["dim"], opts["layers"], opts["heads"], digits)
        model = cached_pretrain(
            out / name,
            model,
            lambda m: pretrain(m, adapter, task.train, steps, lr, opts["pretrain_batch"], seed),
        )

    def select(m: nn.Module) -> dict[str, float]:
        return {"exact": exact_match(adapter, m, task.select, generator(seed, "select"), 1.0)}

    samples = opts["eval_samples"]
    result: dict[str, object] = {"seed": seed}
    result["baseline"] = metrics(adapter, model, task, seed, samples)
    print(f"seed {seed} baseline: {result['baseline']}")
    base_dir = Path(cfg.out_dir or out / "ddo")
    select_control = LastEvaluated(select)  # .model: the control's final-step EMA
    stages = [("ddo", adapter, select)]
    stages += [("mle_control", MLEControl(adapter), select_control)] if control else []
    for stage, a, eval_fn in stages:
        run_cfg = cfg.replace(seed=seed, out_dir=str(base_dir / f"seed{seed}-{stage}"))
        res = train(copy.deepcopy(model), task.train, adapter=a, config=run_cfg, eval_fn=eval_fn)
        result[stage] = metrics(adapter, res.model, task, seed, samples)
        # the last round's selected step (0: the round's reference was kept)
        result[stage]["best_step"] = res.metrics[-1]["best_step_in_round"]
        print(f"seed {seed} {stage}: {result[stage]}")
    if control:
        result["mle_control_final"] = metrics(adapter, select_control.model, task, seed, samples)
        print(f"seed {seed} mle_control_final: {result['mle_control_final']}")
        result["gain"] = gains(result)
        result["converged"] = converged(result)
        for key, what in (("control_change", "selected"), ("control_final_change", "final")):
            change = 100 * result["converged"][key]
            verdict = "PASS" if abs(change) < 100 * CONVERGED_TOL else "FAIL"
            print(
                f"seed {seed} converged-baseline check ({what} control checkpoint): more MLE "
                f"changes held-out sampled exact match by {change:+.1f}% (< 5 %: {verdict})"
            )
    result["config"] = {"train": asdict(cfg) | {"seed": seed}} | opts
    result["seconds"] = round(time.time() - t0, 1)
    return result


CONVERGED_TOL = 0.05  # issue 11: more MLE for DDO's budget moves the metric by < 5 % relative


def converged(run: dict) -> dict[str, float | bool]:
    """The converged-baseline check of issue 11 on the MLE control (likelihood training
    continued for DDO's budget, same TrainConfig), at its SELECTED checkpoint (``mle_control``)
    and at its FINAL-step EMA (``mle_control_final``): the selection may keep step 0, which
    alone would make the check vacuous. Relative change of held-out ``exact_sampled``
    ``c / b - 1`` (``control_change``, ``control_final_change``) and the absolute change of the
    held-out NLL in nats/token (``control_nll_change``, ``control_final_nll_change``, reported,
    not tested); ``passed`` when both exact-match changes are below 0.05 in magnitude."""
    b = run["baseline"]["exact_sampled"]

    def rel(c: float) -> float:
        return c / b - 1 if b > 0 else (0.0 if c == 0 else float("inf"))

    sel, fin = run["mle_control"], run["mle_control_final"]
    out: dict[str, float | bool] = {
        "control_change": rel(sel["exact_sampled"]),
        "control_final_change": rel(fin["exact_sampled"]),
        "control_nll_change": sel["nll"] - run["baseline"]["nll"],
        "control_final_nll_change": fin["nll"] - run["baseline"]["nll"],
    }
    out["passed"] = all(
        abs(out[k]) < CONVERGED_TOL for k in ("control_change", "control_final_change")
    )
    return out


def gains(run: dict) -> dict[str, float]:
    """DDO's held-out ``exact_sampled`` minus the baseline's, the control's, and the better of
    the two (percentage points; issue 14's target is >= 10 over the better)."""
    b, c, d = (run[k]["exact_sampled"] for k in ("baseline", "mle_control", "ddo"))
    return {
        "sampled_vs_baseline": d - b,
        "sampled_vs_control": d - c,
        "sampled_vs_better": d - max(b, c),
    }


run = preset_runner("tiny-lm")


def build(out: Path, cfg: TrainConfig, *, seeds: list[int], control: bool, **opts) -> dict:
    """The ``tiny-lm`` preset: :func:`run_seed` per seed, then
    :func:`~ddo_fast.examples.protocol.write_results` (results.json / results.md in ``out``).
    ``opts``: digits, pairs, arch, dim, layers, heads, pretrain_steps, pretrain_lr,
    pretrain_batch, eval_prompts, eval_samples, select_prompts (the preset row's options)."""
    runs = [run_seed(Path(out), cfg, seed, opts, control) for seed in seeds]
    notes = {
        "task": f"{opts['digits']}-digit addition as text, char tokens; {opts['eval_prompts']} "
        f"held-out prompts per seed, {opts['eval_samples']} temperature-1 sample(s) each",
        "model": f"{opts['arch']} from a config, {opts['dim']}-d, {opts['layers']} layer(s), "
        f"{opts['heads']} heads; pre-trained {opts['pretrain_steps']} steps (AdamW, lr "
        f"{opts['pretrain_lr']} cosine to 1 %, batch {opts['pretrain_batch']})",
        "selection": "eval_fn = sampled exact match on train prompts; hyper-parameters and "
        "model size chosen on seed 0 only",
        "metrics": "exact_greedy / exact_sampled in percent; nll in nats per response token",
    }
    return write_results(out, "tiny-lm: DDO on a transformers causal LM (addition)", runs, notes)
