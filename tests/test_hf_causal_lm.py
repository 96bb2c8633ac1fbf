"""HFCausalLM: transformers causal LMs through ddo_fast.train, checked against float64 oracles."""

from __future__ import annotations

import pytest
import torch

import ddo_fast
from ddo_fast.adapters import HFCausalLM, MLEControl
from ddo_fast.adapters import hf_causal_lm as hf
from ddo_fast.adapters.hf_causal_lm import pack, prompts_of, right_pad

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


def phi(dtype=torch.float32) -> torch.nn.Module:
    """A biased head (lm_head.bias): the fused path must add it."""
    torch.manual_seed(0)
    cfg = transformers.PhiConfig(
        vocab_size=V,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=32,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    model = transformers.PhiForCausalLM(cfg).to(dtype).eval()
    with torch.no_grad():
        model.lm_head.bias.normal_(0, 1)  # init is 0: make the bias matter
    return model


def transformed(name: str, dtype=torch.float64) -> torch.nn.Module:
    """Models whose logits are not head(hidden): soft-capping, logit scales, multipliers."""
    torch.manual_seed(0)
    base = dict(
        vocab_size=V,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    t = transformers
    make = {
        "gemma2_softcap": lambda: t.Gemma2ForCausalLM(
            t.Gemma2Config(head_dim=8, final_logit_softcapping=2.0, **base)
        ),
        "cohere_logit_scale": lambda: t.CohereForCausalLM(t.CohereConfig(logit_scale=0.5, **base)),
        "granite_logits_scaling": lambda: t.GraniteForCausalLM(
            t.GraniteConfig(logits_scaling=4.0, **base)
        ),
        "falcon_h1_lm_head_multiplier": lambda: t.FalconH1ForCausalLM(
            t.FalconH1Config(lm_head_multiplier=3.0, **base)
        ),
    }[name]
    return make().to(dtype).eval()


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


@pytest.mark.parametrize("make", [gpt2, llama, phi])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("fused", [True, False])
def test_response_logprob_matches_float64_oracle(make, side, fused):
    model = make(torch.float64)
    a = HFCausalLM(fused=fused)
    x, _ = a.prepare_data(batch(PAIRS, side))
    got = a.ref_logprob(model, x, None)[:, 0].double()
    # the adapter returns fp32 sums (|value| ~ 10: fp32 rounding ~ 1e-6); a wrong position,
    # shift, padding or (phi) missing head bias changes a row by O(1)
    torch.testing.assert_close(got, oracle_logprob(model, PAIRS), rtol=0, atol=2e-6)
    assert HFCausalLM().use_fused(model)  # auto takes the fused path on these


@pytest.mark.parametrize(
    ("name", "names_known"),
    [
        (name, known)
        for name in ("gemma2_softcap", "cohere_logit_scale", "granite_logits_scaling")
        for known in (True, False)
    ]
    # FalconH1's CPU mamba path is slow (~10-60 s on a loaded CPU): the numeric check only
    + [pytest.param("falcon_h1_lm_head_multiplier", False, marks=pytest.mark.slow)],
)
def test_logit_transforms_fall_back_to_logits(name, names_known, monkeypatch):
    """Auto mode must not score head(hidden) for a model that transforms its logits; without
    the known-names list (a transform under a new name) the numeric check alone catches it."""
    if not names_known:
        monkeypatch.setattr(hf, "_LOGIT_TRANSFORMS", ())
    model = transformed(name)
    a = HFCausalLM()
    # right-padded: eager gemma2 turns whole left-padded rows into NaN (a transformers matter)
    x, _ = a.prepare_data(batch(PAIRS, "right"))
    got = a.ref_logprob(model, x, None)[:, 0].double()
    torch.testing.assert_close(got, oracle_logprob(model, PAIRS), rtol=0, atol=2e-6)
    assert not a.use_fused(model)
    with pytest.raises(ValueError, match="fused=True"):
        HFCausalLM(fused=True).ref_logprob(model, x, None)


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


@pytest.mark.parametrize("loss", ["ddo", "mle"])
def test_prompt_tokens_never_contribute(loss):
    """d loss / d logits (the adapter's own loss, logits path) is non-zero exactly at the
    positions that predict response tokens, for real (right-padded) and fake (left-padded)
    rows."""
    model, ref = gpt2(), gpt2()
    with torch.no_grad():
        ref.transformer.h[0].mlp.c_fc.weight.mul_(1.1)  # r != 0: the fake rows' weights != 0
    a = HFCausalLM(fused=False)
    real, _ = a.prepare_data(batch(PAIRS[:2], "right"))
    fake, _ = a.prepare_data(batch(PAIRS[2:], "left"))
    seen = []

    def keep(module, inputs, out):
        out.retain_grad()
        seen.append(out)

    hook = model.lm_head.register_forward_hook(keep)
    if loss == "ddo":
        a.loss(model, ref, (real, None), (fake, None), {}, alpha=1.0, beta=1.0).loss.backward()
        pairs, sides = PAIRS, ["right"] * 2 + ["left"] * 2
    else:
        a.mle_loss(model, (real, None), {}).backward()
        pairs, sides = PAIRS[:2], ["right"] * 2
    hook.remove()
    (logits,) = seen
    scored = logits.grad.abs().sum(-1) > 0
    expected = torch.zeros_like(scored)
    for i, ((p, r), side) in enumerate(zip(pairs, sides, strict=True)):
        width = max(len(q) + len(s) for q, s in (pairs[:2] if i < 2 else pairs[2:]))
        start = 0 if side == "right" else width - len(p) - len(r)
        expected[i, start + len(p) - 1 : start + len(p) + len(r) - 1] = True
    assert torch.equal(scored, expected)


def test_generate_fakes_keep_prompt_and_are_labelled():
    model = gpt2()
    data = batch(PAIRS, "right")
    # a token the model emits often, declared a second EOS, so fakes stop mid-continuation
    probe = HFCausalLM(max_new_tokens=5, temperature=1.0)
    _, index = probe.prepare_data(data)
    draws = probe.sample(model, 8, index.repeat(2), torch.Generator().manual_seed(0), "cpu", ())
    eos_ids = [EOS, int(draws[:, 0, -5:-1].flatten().mode().values)]
    a = HFCausalLM(max_new_tokens=5, temperature=1.0, eos_token_id=eos_ids)
    x, index = a.prepare_data(data)
    g = torch.Generator().manual_seed(0)
    fakes = a.sample(model, 8, index.repeat(2), g, torch.device("cpu"), tuple(x.shape[1:]))
    again = a.sample(model, 8, index.repeat(2), torch.Generator().manual_seed(0), "cpu", ())
    assert torch.equal(fakes, again)  # seeded by the generator, not the global RNG
    ids, labels, mask = fakes[:, 0], fakes[:, 1], fakes[:, 2]
    order = torch.argsort(index)  # prompt index k is data row order[k]
    prompts, pmask = prompts_of(x)
    width = prompts.shape[1]
    stopped = 0
    for row, k in enumerate(index.repeat(2).tolist()):
        p = PAIRS[int(order[k])][0]
        # the prompt: left-padded, unlabelled, attended
        assert torch.equal(ids[row, width - len(p) : width], p)
        assert mask[row, :width].sum() == len(p)
        assert (labels[row, :width] == -100).all()
        # the response: labelled = ids up to and including the first EOS; after it nothing
        # is labelled or attended, and the ids are the pad id
        resp, lab, m = ids[row, width:], labels[row, width:], mask[row, width:]
        eos = torch.isin(resp, torch.tensor(eos_ids)).nonzero()
        end = int(eos[0]) + 1 if len(eos) else len(resp)
        assert torch.equal(lab[:end], resp[:end]) and (lab[end:] == -100).all()
        assert (m[:end] == 1).all() and (m[end:] == 0).all() and (resp[end:] == PAD).all()
        stopped += end < len(resp)
    assert stopped >= 2  # EOS mid-continuation happened (else the checks above are vacuous)
    # greedy continuation == HF generate of the unpadded prompt
    greedy = a.generate(model, prompts[:1], pmask[:1], g, temperature=0.0)
    p = prompts[0][pmask[0].bool()][None]
    hf = model.generate(
        p, max_new_tokens=5, do_sample=False, pad_token_id=PAD, eos_token_id=eos_ids
    )
    n = hf.shape[1] - p.shape[1]
    assert torch.equal(greedy[0, 0, width : width + n], hf[0, p.shape[1] :])


def test_generation_ignores_checkpoint_processors_and_budget_follows_data():
    """The fakes sample p_ref itself: a checkpoint's generation_config penalties (which change
    HF's default generate) are not inherited; the default budget is per prepare_data call."""
    model = gpt2()
    a = HFCausalLM()
    x, _ = a.prepare_data(batch(PAIRS, "right"))
    assert a.budget == 4 and a.sampler_config()["max_new_tokens"] == 4
    prompts, pmask = a.prompts
    g = torch.Generator()
    plain = a.generate(model, prompts, pmask, g, temperature=0.0)
    model.generation_config.repetition_penalty = 10.0
    model.generation_config.no_repeat_ngram_size = 1
    ours = a.generate(model, prompts, pmask, g, temperature=0.0)
    assert torch.equal(ours, plain)
    width = prompts.shape[1]
    hf_default = model.generate(
        prompts, attention_mask=pmask, max_new_tokens=4, do_sample=False, pad_token_id=PAD
    )
    assert not torch.equal(hf_default[:, width:], ours[:, 0, width:])  # the penalty would bite
    # reused on data with shorter responses: no stale budget
    a.prepare_data(batch(rows([3, 2], [2, 1], seed=4), "right"))
    assert a.budget == 2 and a.generate(model, *a.prompts, g).shape[-1] == a.prompts[0].shape[1] + 2


def test_mle_loss_is_hf_causal_lm_loss():
    """The control's objective equals HF's own ``model(..., labels=).loss`` (mean token NLL)."""
    model = gpt2()
    data = batch(PAIRS, "right")
    x, _ = HFCausalLM().prepare_data(data)
    for fused in (None, False):
        got = HFCausalLM(fused=fused).mle_loss(model, (x, None), {})
        want = model(**data).loss
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert float(got.detach()) > 1.0  # ~log V at init: a wrong shift or count would show


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
    # a left-padded row with no prompt token: its first response token would be predicted
    # from a pad position
    with pytest.raises(ValueError, match="after at least one prompt token"):
        pack(
            {
                "input_ids": torch.tensor([[5, 6, 7, 8], [PAD, PAD, 7, 8]]),
                "labels": torch.tensor([[-100, 6, 7, 8], [-100, -100, 7, 8]]),
                "attention_mask": torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]]),
            }
        )
    # multi-turn: two labelled spans in a row (the fakes would continue the first prompt only)
    with pytest.raises(ValueError, match="contiguous"):
        pack(
            {
                "input_ids": torch.tensor([[5, 6, 7, 8, 9, 10, 11]]),
                "labels": torch.tensor([[-100, 6, 7, -100, -100, 10, 11]]),
            }
        )
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
    # the control: same loop, HF's causal-LM loss; its first step's loss (one batch = all 32
    # rows) is HF's model(..., labels=).loss of the initial model
    ctl = ddo_fast.train(
        make(),
        data,
        adapter=MLEControl(a),
        config=cfg.replace(out_dir=str(tmp_path / "mle"), rounds=1, batch_size=32, log_every=1),
    )
    with torch.no_grad():
        want = make()(**data).loss
    assert abs(ctl.history[0]["loss"] - float(want)) < 1e-5
