"""HFCausalLM: transformers causal LMs through ddo_fast.train, checked against float64 oracles."""

from __future__ import annotations

import pytest
import torch

import ddo_fast
from ddo_fast.adapters import HFCausalLM, MLEControl
from ddo_fast.adapters.hf_causal_lm import pack, prompts_of, right_pad, shifted_targets
from ddo_fast.ops import sequence_logprob

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

V, BOS, EOS, PAD = 12, 0, 1, 2


def gpt2(dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=V,
        n_embd=16,
        n_layer=2,
        n_head=2,
        n_positions=32,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    return transformers.GPT2LMHeadModel(cfg).to(dtype).eval()


def llama(dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


def rows(prompt_lens, resp_lens, seed=0):
    """Unpadded (prompt, response) token lists with random tokens in [3, V)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for p, r in zip(prompt_lens, resp_lens, strict=True):
        out.append((torch.randint(3, V, (p,), generator=g), torch.randint(3, V, (r,), generator=g)))
    return out


def batch(pairs, side: str) -> dict[str, torch.Tensor]:
    """HF-convention dict, each row padded on ``side`` to the longest."""
    width = max(len(p) + len(r) for p, r in pairs)
    ids = torch.full((len(pairs), width), PAD)
    labels = torch.full((len(pairs), width), -100)
    mask = torch.zeros(len(pairs), width, dtype=torch.long)
    for i, (p, r) in enumerate(pairs):
        n = len(p) + len(r)
        s = 0 if side == "right" else width - n
        ids[i, s : s + n] = torch.cat([p, r])
        labels[i, s + len(p) : s + n] = r
        mask[i, s : s + n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def oracle_logprob(model, pairs) -> torch.Tensor:
    """float64: sum over response tokens of log softmax(logits) of each row run ALONE, unpadded
    (HF logits at i predict token i + 1)."""
    out = []
    with torch.no_grad():
        for p, r in pairs:
            seq = torch.cat([p, r])[None]
            logits = model.double()(seq).logits[0].double()
            lp = logits.log_softmax(-1)
            pos = torch.arange(len(p) - 1, len(seq[0]) - 1)
            out.append(lp[pos, seq[0, pos + 1]].sum())
    return torch.stack(out)


PAIRS = rows([3, 5, 2, 4], [4, 2, 3, 1])


@pytest.mark.parametrize("make", [gpt2, llama])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("fused", [True, False])
def test_response_logprob_matches_float64_oracle(make, side, fused):
    model = make(torch.float64)
    a = HFCausalLM(fused=fused)
    x, _ = a.prepare_data(batch(PAIRS, side))
    got = a.ref_logprob(model, x, None)[:, 0].double()
    # the adapter returns fp32 sums (|value| ~ 10: fp32 rounding ~ 1e-6); a wrong position,
    # shift or padding treatment changes a row by O(1)
    torch.testing.assert_close(got, oracle_logprob(model, PAIRS), rtol=0, atol=2e-6)


def test_fused_and_logits_paths_agree_with_gradients():
    model = gpt2()
    real, _ = HFCausalLM().prepare_data(batch(PAIRS[:2], "right"))
    fake, _ = HFCausalLM().prepare_data(batch(PAIRS[2:], "left"))
    ref = gpt2()
    with torch.no_grad():
        ref.transformer.h[0].mlp.c_fc.weight.mul_(1.1)  # so r != 0
    outs = []
    for fused in (True, False):
        model.zero_grad()
        res = HFCausalLM(fused=fused).loss(
            model, ref, (real, None), (fake, None), {}, alpha=1.5, beta=0.7
        )
        res.loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        outs.append((res.loss.detach(), res.logratio, grads))
    assert HFCausalLM().use_fused(model)
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-5, atol=1e-5)
    assert outs[0][1].abs().max() > 1e-3
    for g1, g2 in zip(outs[0][2], outs[1][2], strict=True):
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("make", [gpt2, llama])
def test_r_is_exactly_zero_at_reference_and_ref_gets_no_grad(make):
    model, ref = make(), make()
    ref.requires_grad_(False)
    a = HFCausalLM()
    real, _ = a.prepare_data(batch(PAIRS[:2], "right"))
    fake, _ = a.prepare_data(batch(PAIRS[2:], "left"))
    res = a.loss(model, ref, (real, None), (fake, None), {}, alpha=1.0, beta=1.0)
    assert torch.equal(res.logratio, torch.zeros(4))
    res.loss.backward()
    assert all(p.grad is None for p in ref.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    # cached reference log-probs (scored apart from the batch) give the same loss and r
    both = torch.cat([real, right_pad(fake, real.shape[-1])])
    cached = a.ref_logprob(ref, both, None)
    again = a.loss(
        model, ref, (real, None), (fake, None), {}, alpha=1.0, beta=1.0, ref_logprob=cached
    )
    torch.testing.assert_close(again.loss, res.loss, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="ref_logprob"):
        a.loss(
            model, ref, (real, None), (fake, None), {}, alpha=1.0, beta=1.0, ref_logprob=cached[:3]
        )


def test_prompt_tokens_never_contribute():
    """d r / d logits is non-zero exactly at the positions that predict response tokens."""
    model = gpt2()
    x, _ = HFCausalLM().prepare_data(batch(PAIRS, "right"))
    logits = model(x[:, 0], attention_mask=x[:, 2]).logits.detach().requires_grad_(True)
    sequence_logprob(logits, shifted_targets(x[:, 1])).sum().backward()
    scored = logits.grad.abs().sum(-1) > 0
    expected = torch.zeros_like(scored)
    for i, (p, r) in enumerate(PAIRS):
        expected[i, len(p) - 1 : len(p) + len(r) - 1] = True
    assert torch.equal(scored, expected)


def test_generate_fakes_keep_prompt_and_are_labelled():
    model = gpt2()
    a = HFCausalLM(max_new_tokens=5, temperature=1.0)
    data = batch(PAIRS, "right")
    x, index = a.prepare_data(data)
    g = torch.Generator().manual_seed(0)
    fakes = a.sample(model, 8, index.repeat(2), g, torch.device("cpu"), tuple(x.shape[1:]))
    again = a.sample(model, 8, index.repeat(2), torch.Generator().manual_seed(0), "cpu", ())
    assert torch.equal(fakes, again)  # seeded by the generator, not the global RNG
    ids, labels, mask = fakes[:, 0], fakes[:, 1], fakes[:, 2]
    order = torch.argsort(index)  # prompt index k is data row order[k]
    prompts, pmask = prompts_of(x)
    width = prompts.shape[1]
    for row, k in enumerate(index.repeat(2).tolist()):
        p = PAIRS[int(order[k])][0]
        # the prompt: left-padded, unlabelled, attended
        assert torch.equal(ids[row, width - len(p) : width], p)
        assert mask[row, :width].sum() == len(p)
        assert (labels[row, :width] == -100).all()
        # the response: labelled = ids up to and including the first EOS, nothing after
        resp, lab, m = ids[row, width:], labels[row, width:], mask[row, width:]
        eos = (resp == EOS).nonzero()
        end = int(eos[0]) + 1 if len(eos) else len(resp)
        assert torch.equal(lab[:end], resp[:end]) and (lab[end:] == -100).all()
        assert (m[:end] == 1).all() and (m[end:] == 0).all()
    # greedy continuation == HF generate of the unpadded prompt
    greedy = a.generate(model, prompts[:1], pmask[:1], g, temperature=0.0)
    p = prompts[0][pmask[0].bool()][None]
    hf = model.generate(p, max_new_tokens=5, do_sample=False, pad_token_id=PAD)
    n = hf.shape[1] - p.shape[1]
    assert torch.equal(greedy[0, 0, width : width + n], hf[0, p.shape[1] :])


def test_bad_data_raises():
    good = batch(PAIRS, "right")
    with pytest.raises(KeyError, match="labels"):
        pack({"input_ids": good["input_ids"]})
    with pytest.raises(ValueError, match="shape"):
        pack({"input_ids": good["input_ids"], "labels": good["labels"][:, :-1]})
    with pytest.raises(ValueError, match="response token"):
        pack({"input_ids": good["input_ids"], "labels": torch.full_like(good["labels"], -100)})
    with pytest.raises(ValueError, match="equal input_ids"):
        pack({"input_ids": good["input_ids"], "labels": good["input_ids"].roll(1, 1)})
    with pytest.raises(TypeError, match="dict"):
        HFCausalLM().prepare_data([1, 2, 3])
    # a list of dicts of varying lengths is collated (right-padded)
    items = [
        {"input_ids": torch.cat([p, r]), "labels": torch.cat([p * 0 - 100, r])} for p, r in PAIRS
    ]
    x, _ = HFCausalLM().prepare_data(items)
    assert x.shape == (4, 3, 7)
    assert x[:, 2].sum(1).tolist() == [len(p) + len(r) for p, r in PAIRS]  # padding masked
    padded = HFCausalLM().prepare_data(batch(PAIRS, "right"))[0]
    assert torch.equal(x[:, 1:], padded[:, 1:])  # same labels and mask as the padded dict


@pytest.mark.slow
@pytest.mark.parametrize("make", [gpt2, llama])
def test_trains_through_ddo_fast_train(make, tmp_path):
    model = make()
    pairs = rows([3, 4] * 16, [3, 2] * 16, seed=1)
    data = batch(pairs, "right")
    a = HFCausalLM(max_new_tokens=4)
    cfg = ddo_fast.TrainConfig(
        batch_size=8,
        steps_per_round=4,
        fake_samples_per_round=32,
        rounds=2,
        lr=1e-3,
        beta=0.5,
        device="cpu",
        log_every=2,
        out_dir=str(tmp_path / "ddo"),
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = ddo_fast.train(model, data, adapter=a, config=cfg)
    assert len(res.history) == 8 and all(
        torch.isfinite(torch.tensor(h["loss"])) for h in res.history
    )
    assert any(not torch.equal(before[k], v) for k, v in res.model.state_dict().items())
    ctl = ddo_fast.train(
        make(),
        data,
        adapter=MLEControl(a),
        config=cfg.replace(out_dir=str(tmp_path / "mle"), rounds=1),
    )
    assert ctl.history[-1]["r_real"] == 0.0
