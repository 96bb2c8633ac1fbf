"""Adapter checks on seed 0 (no code defect found): are the fakes what r assumes?

    OMP_NUM_THREADS=1 python checks.py FAKES.pt OUT.json

1. ``generate`` on left-padded prompt batches vs the scorer (``HFCausalLM.forward``, position_ids
   = cumsum(mask) - 1): first-step logits of 400 train prompts, max |difference|; the same
   logits without position_ids (what a missing position fix would give); greedy answers of the
   400 prompts in one left-padded batch vs one unpadded prompt at a time (mismatch count).
2. Reals vs fakes (the preset's 8000-fake pool): mean labelled response length, fraction with
   EOS, fraction that hit the 4-token budget without EOS, fraction equal to the true answer.
3. Full-pool gradient at theta = ref: |mean over the 8000 fakes of grad log p| against its
   noise (half the norm of the difference of the two 4000-fake halves), and the cosine
   between the full-pool DDO gradient (alpha = beta = 1) and grad NLL_seq (the first-order claim
   of results/tiny_lm.md: at the reference the expected DDO gradient is (beta/2) grad NLL_seq).
"""

from __future__ import annotations

import copy
import json
import sys

import torch
from common import setup

from ddo_fast.adapters.hf_causal_lm import positions, prompts_of
from ddo_fast.examples import tiny_lm as T


def main(fakes_path: str, out_path: str) -> None:
    task, model, adapter, train_rows, _ = setup()
    adapter.prepare_data({k: task.train[k] for k in ("input_ids", "labels", "attention_mask")})
    fakes = torch.load(fakes_path, weights_only=False)["x"].long()
    out: dict = {}
    prompt, mask = prompts_of(train_rows)
    n = 400
    g = torch.Generator().manual_seed(0)
    pad, eos = adapter.token_ids(model)
    with torch.no_grad():
        gen = model.generate(
            input_ids=prompt[:n],
            attention_mask=mask[:n],
            generation_config=adapter.generation_config(pad, eos, 1.0),
            output_scores=True,
            return_dict_in_generate=True,
        )
        kw = dict(attention_mask=mask[:n])
        z = model(prompt[:n], position_ids=positions(mask[:n]), **kw).logits[:, -1]
        z_nopos = model(prompt[:n], **kw).logits[:, -1]
    out["first_step_max_abs_diff"] = float((gen.scores[0] - z).abs().max())
    out["first_step_max_abs_diff_without_position_ids"] = float(
        (gen.scores[0] - z_nopos).abs().max()
    )
    batch = adapter.generate(model, prompt[:n], mask[:n], g, temperature=0.0)
    mismatch = 0
    for i in range(n):
        keep = mask[i].bool()
        one = adapter.generate(
            model, prompt[i : i + 1, keep], mask[i : i + 1, keep], g, temperature=0.0
        )
        mismatch += int(
            not torch.equal(batch[i, 0, prompt.shape[1] :], one[0, 0, int(keep.sum()) :])
        )
    out["greedy_batch_vs_single_mismatches"] = f"{mismatch}/{n}"

    def describe(x: torch.Tensor) -> dict[str, float]:
        labels = x[:, 1]
        resp = labels != -100
        has_eos = (labels == T.EOS).any(1)
        return {
            "mean_len": float(resp.sum(1).float().mean()),
            "frac_eos": float(has_eos.float().mean()),
            "frac_budget_no_eos": float((~has_eos & (resp.sum(1) == 4)).float().mean()),
        }

    out["real"], out["fake"] = describe(train_rows), describe(fakes)
    right = 0
    prompt_ids, prompt_mask = prompts_of(fakes)
    for x, p, m in zip(fakes, prompt_ids, prompt_mask, strict=True):
        response = x[0][x[1] != -100]
        tokens = [t for t in p[m == 1].tolist() if t != T.BOS]
        text = "".join("+" if t == T.PLUS else "=" if t == T.EQUALS else str(t) for t in tokens)
        a, b = text.rstrip("=").split("+")
        right += int(T.decode_answer(response[None])[0] == int(a) + int(b))
    out["fake"]["frac_correct"] = right / len(fakes)

    def flat_grad(loss: torch.Tensor) -> torch.Tensor:
        model.zero_grad()
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()]).clone()

    k = min(len(train_rows), len(fakes))
    half = k // 2
    g_nll = flat_grad(-adapter.sequence_logprob(model, train_rows[:k]).mean())
    g_fake = flat_grad(adapter.sequence_logprob(model, fakes[:k]).mean())
    g_a = flat_grad(adapter.sequence_logprob(model, fakes[:half]).mean())
    g_b = flat_grad(adapter.sequence_logprob(model, fakes[half:k]).mean())
    ref = copy.deepcopy(model)
    ddo = adapter.loss(
        model, ref, (train_rows[:k], None), (fakes[:k], None), None, alpha=1.0, beta=1.0
    )
    g_ddo = flat_grad(ddo.loss)
    out["fake_score_mean_norm"] = float(g_fake.norm())
    out["fake_score_noise_norm"] = float((g_a - g_b).norm() / 2)
    out["cos_ddo_grad_vs_nll_seq_grad"] = float(g_ddo @ g_nll / g_ddo.norm() / g_nll.norm())
    print(json.dumps(out, indent=1))
    with open(out_path, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
