"""The VAR adapter and the next-scale transformer: block-causality, the samplers, CFG, the labels
theta and ref see, per-scale log-ratios and the null-row weights (float64 oracles)."""

import copy

import pytest
import torch
import torch.nn.functional as F

from ddo_fast.adapters import VAR
from ddo_fast.models import MultiScaleQuantizer, VARTransformer
from ddo_fast.models.var import block_causal_mask, cfg_ramp, guide

PNS = (1, 2, 4)  # L = 21
V, NULL = 16, 10


def make_model(seed: int = 0, dropout: float = 0.0) -> VARTransformer:
    g = torch.Generator().manual_seed(seed)
    q = MultiScaleQuantizer(torch.randn(V, 1, generator=g), patch_nums=PNS)
    torch.manual_seed(seed)
    return VARTransformer(q, 10, dim=32, layers=2, heads=2, label_dropout=dropout)


def batch(b: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (b, 21), generator=g), torch.randint(0, 10, (b,), generator=g)


def perturbed(model: VARTransformer, seed: int = 1) -> VARTransformer:
    """A copy with every weight moved a little (theta != ref)."""
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return out


def test_block_causal_mask_and_logits():
    mask = block_causal_mask(PNS)
    assert mask.shape == (21, 21)
    assert mask[0, 0] and not mask[0, 1]  # scale 0 sees only itself (the class token)
    assert mask[5, 1] and mask[5, 20] and not mask[4, 5]  # own scale's inputs: scales < k
    model = make_model().eval()
    tokens, labels = batch(4, 0)
    ref = model(tokens, labels)
    starts = [0, 1, 5, 21]
    for k in range(len(PNS)):
        lo, hi = starts[k], starts[k + 1]
        changed = tokens.clone()
        changed[:, lo:] = (changed[:, lo:] + 3) % V  # scale k and every later one
        out = model(changed, labels)
        torch.testing.assert_close(out[:, lo:hi], ref[:, lo:hi], rtol=0, atol=1e-6)
        if hi < 21:  # the next scale does see scale k (the test can fail)
            assert (out[:, hi:] - ref[:, hi:]).abs().max() > 1e-3


@pytest.mark.parametrize("cfg", [0.0, 1.5])
def test_kv_cached_sampling_equals_uncached(cfg):
    model = make_model().eval()
    adapter = VAR(patch_nums=PNS, null_label=NULL, cfg=cfg)
    labels = torch.arange(12) % 10
    cached = model.sample(12, labels, torch.Generator().manual_seed(3), cfg=cfg)
    plain = adapter.sample_uncached(
        model, 12, labels, torch.Generator().manual_seed(3), torch.device("cpu")
    )
    assert torch.equal(cached, plain)
    via = adapter.sample(model, 12, labels, torch.Generator().manual_seed(3), "cpu", (21,))
    assert torch.equal(via, cached)


def test_cfg_ramp_and_guide():
    assert cfg_ramp(1.5, 4) == [0.0, 0.5, 1.0, 1.5]
    assert cfg_ramp(0.3, 1) == [0.3]
    c, u = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    torch.testing.assert_close(guide(torch.cat([c, u]), 0.5), 1.5 * c - 0.5 * u)
    # guided sampling really mixes: cfg changes the samples, cfg = 0 equals no guidance rows
    model = make_model().eval()
    labels = torch.arange(40) % 10
    a = model.sample(40, labels, torch.Generator().manual_seed(0), cfg=0.0)
    b = model.sample(40, labels, torch.Generator().manual_seed(0), cfg=3.0)
    assert not torch.equal(a, b) and torch.equal(a[:, 0], b[:, 0])  # t_0 = 0: scale 0 unguided


class Spy(torch.nn.Module):
    """Records the labels every call sees."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.seen = inner, []

    def forward(self, tokens, labels):
        self.seen.append(labels.clone())
        return self.inner(tokens, labels)


def test_theta_and_ref_see_the_same_labels():
    model = make_model()
    theta, ref = Spy(model), Spy(perturbed(model))
    adapter = VAR(patch_nums=PNS, null_label=NULL, uncond_ratio=0.5)
    real, fake = batch(8, 0), batch(8, 1)
    noise = adapter.draw(8, (21,), torch.Generator().manual_seed(0))
    assert noise["uncond"].any() and not noise["uncond"].all()
    adapter.loss(theta, ref, real, fake, noise, alpha=1.0, beta=0.1)
    (lt,), (lr,) = theta.seen, ref.seen
    assert torch.equal(lt, lr)
    un = noise["uncond"].repeat(2)
    assert (lt[un] == NULL).all()  # a pair's real and fake rows both get the null label
    assert torch.equal(lt[~un], torch.cat([real[1], fake[1]])[~un])


def test_label_dropout_inside_forward_is_detected():
    model = make_model(dropout=0.5).train()
    ref = copy.deepcopy(model).eval()
    adapter = VAR(patch_nums=PNS, null_label=NULL)
    noise = adapter.draw(16, (21,), torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="label_dropout = 0"):
        adapter.loss(model, ref, batch(16, 0), batch(16, 1), noise, alpha=1.0, beta=0.1)
    model.label_dropout = 0.0
    fresh = VAR(patch_nums=PNS, null_label=NULL)
    out = fresh.loss(model, ref, batch(16, 0), batch(16, 1), noise, alpha=1.0, beta=0.1)
    assert out.logratio.abs().max() < 1e-4


def oracle(model, ref, tokens, labels):
    """Per-scale log-probs of theta and ref [N, S] in float64."""

    def per_scale(m):
        lp = F.log_softmax(m(tokens, labels).double(), -1).gather(-1, tokens[..., None])[..., 0]
        return torch.stack([p.sum(1) for p in lp.split([1, 4, 16], 1)], 1)

    with torch.no_grad():
        return per_scale(model), per_scale(ref)


@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_per_scale_r_and_null_row_weights(alpha):
    model = make_model()
    ref = perturbed(model)
    beta = 0.3
    adapter = VAR(patch_nums=PNS, null_label=NULL, uncond_ratio=0.4)
    real, fake = batch(10, 0), batch(10, 1)
    noise = adapter.draw(10, (21,), torch.Generator().manual_seed(2))
    out = adapter.loss(model, ref, real, fake, noise, alpha=alpha, beta=beta)
    un = noise["uncond"].repeat(2)
    tokens = torch.cat([real[0], fake[0]])
    labels = torch.where(un, NULL, torch.cat([real[1], fake[1]]))
    th, rf = oracle(model, ref, tokens, labels)
    r_s = th - rf
    r = r_s.sum(1)
    torch.testing.assert_close(out.logratio.double(), r, rtol=1e-5, atol=1e-4)
    for k in range(3):
        torch.testing.assert_close(
            out.stats[f"r_real_s{k}"].double(), r_s[:10, k].mean(), rtol=1e-5, atol=1e-4
        )
        torch.testing.assert_close(
            out.stats[f"r_fake_s{k}"].double(), r_s[10:, k].mean(), rtol=1e-5, atol=1e-4
        )
    # VAR recipe: real rows weight 1 (null: max(alpha, 1)), fake rows alpha (null: 0), / max(a, 1)
    w_real = torch.where(un[:10], max(alpha, 1.0), 1.0).double()
    w_fake = torch.where(un[10:], 0.0, alpha).double()
    want = (-w_real * F.logsigmoid(beta * r[:10])).mean()
    want = want + (-w_fake * F.logsigmoid(-beta * r[10:])).mean()
    want = want / max(alpha, 1.0)
    torch.testing.assert_close(out.loss.double(), want, rtol=1e-5, atol=1e-6)
    # the fused path (no per-scale stats) computes the same loss and r
    fused = VAR(patch_nums=PNS, null_label=NULL, uncond_ratio=0.4, scale_stats=False)
    f_out = fused.loss(model, ref, real, fake, noise, alpha=alpha, beta=beta)
    assert f_out.stats is None
    torch.testing.assert_close(f_out.loss, out.loss, rtol=1e-5, atol=1e-6)


def test_ref_logprob_cache_matches_per_step():
    model = make_model()
    ref = perturbed(model).eval()
    adapter = VAR(patch_nums=PNS, null_label=NULL, uncond_ratio=0.4)
    real, fake = batch(6, 0), batch(6, 1)
    noise = adapter.draw(6, (21,), torch.Generator().manual_seed(1))
    cached = torch.cat([adapter.ref_logprob(ref, *real), adapter.ref_logprob(ref, *fake)])
    assert cached.shape == (12, 6)  # [own label per scale; null label per scale]
    a = adapter.loss(model, ref, real, fake, noise, alpha=1.0, beta=0.2)
    b = adapter.loss(model, ref, real, fake, noise, alpha=1.0, beta=0.2, ref_logprob=cached)
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(b.logratio, a.logratio, rtol=1e-6, atol=1e-5)
    with pytest.raises(ValueError, match="ref_logprob"):
        adapter.loss(model, ref, real, fake, noise, alpha=1.0, beta=0.2, ref_logprob=cached[:, :3])


def test_mle_loss_and_bad_input():
    model = make_model()
    adapter = VAR(patch_nums=PNS, null_label=NULL)
    real = batch(8, 0)
    noise = adapter.draw(8, (21,), torch.Generator().manual_seed(0))
    loss = adapter.mle_loss(model, real, noise)
    labels = torch.where(noise["uncond"], NULL, real[1])
    want = F.cross_entropy(model(real[0], labels).reshape(-1, V), real[0].reshape(-1))
    torch.testing.assert_close(loss, want)
    with pytest.raises(ValueError, match="patch_nums"):
        VAR(patch_nums=())
    with pytest.raises(ValueError, match="cfg"):
        VAR(patch_nums=PNS, null_label=NULL, cfg=-1.0)
    with pytest.raises(ValueError, match="tokens"):
        short = (torch.zeros(2, 5, dtype=torch.long), real[1][:2])
        adapter.loss(model, model, short, short, noise, alpha=1.0, beta=1.0)


def test_reencode_fakes():
    """reencode=True returns encode(decode(tokens)) of the sampled tokens (DDO's VAR recipe)."""
    model = make_model().eval()
    labels = torch.arange(10)
    plain = VAR(patch_nums=PNS, null_label=NULL)
    again = VAR(patch_nums=PNS, null_label=NULL, reencode=True)
    a = plain.sample(model, 10, labels, torch.Generator().manual_seed(0), "cpu", (21,))
    b = again.sample(model, 10, labels, torch.Generator().manual_seed(0), "cpu", (21,))
    q = model.quantizer
    assert torch.equal(b, q.encode(q.decode(a)))
    assert again.sampler_config()["reencode"] and not plain.sampler_config()["reencode"]


@pytest.mark.slow
def test_digits_var_preset_smoke(tmp_path):
    """The digits-var preset end to end at toy budgets: every stage, results.json with
    baseline_cfg and its scale, the three-panel picture."""
    pytest.importorskip("sklearn")
    from ddo_fast.examples import digits_var

    res = digits_var.run(
        tmp_path,
        pretrain_steps=5,
        steps_per_round=2,
        batch_size=16,
        fakes=32,
        eval_every=0,
        seeds=[1],
        selection_seed=0,
        cfg_scales=[0.5],
        vocab=16,
        dim=16,
        log_every=1,
    )
    run = res["runs"][0]
    assert {"baseline", "baseline_cfg", "ddo", "mle_control", "data_floor"} <= set(run)
    assert run["baseline_cfg"]["cfg"] == 0.5 and "fd_excess" in run["ddo"]
    assert (tmp_path / "results.json").exists() and (tmp_path / "results.md").exists()
    cols = (tmp_path / "ddo" / "seed-1" / "ddo" / "metrics.csv").read_text().splitlines()[0]
    assert "r_real_s3" in cols and "r_fake_s0" in cols


def test_cfg_sweep_cache_is_per_model(tmp_path):
    """The selection-seed CFG sweep is cached per pre-trained model: a model of another size
    (same seed, same scales) runs its own sweep instead of reusing the first model's."""
    from types import SimpleNamespace

    from ddo_fast.examples.digits_var import choose_cfg

    def fake_seed(tag: str, fds: dict[float, float]):
        calls = []

        def select(model, cfg=0.0):
            calls.append(cfg)
            return {"fd": fds[cfg]}

        return SimpleNamespace(seed=0, start="raw", model_tag=tag, model=None, select=select), calls

    small, small_calls = fake_seed("var-64-1_2_4_8-0-48", {0.0: 9.0, 0.5: 7.0, 1.0: 8.0})
    wide, wide_calls = fake_seed("var-64-1_2_4_8-0-96", {0.0: 5.0, 0.5: 6.0, 1.0: 4.0})
    assert choose_cfg(small, [0.5, 1.0], tmp_path)[0] == 0.5 and len(small_calls) == 3
    assert choose_cfg(wide, [0.5, 1.0], tmp_path)[0] == 1.0 and len(wide_calls) == 3
    again, again_calls = fake_seed("var-64-1_2_4_8-0-48", {})
    assert choose_cfg(again, [0.5, 1.0], tmp_path)[0] == 0.5 and not again_calls  # cached


def test_model_tag_covers_every_model_option():
    """Every option that changes the pre-trained weights changes the tag that names them (and
    keys the CFG-sweep cache); options that do not (re-encoding the fakes) leave it alone."""
    from ddo_fast.examples.digits_var import model_tag
    from ddo_fast.examples.presets import PRESETS

    opts = dict(PRESETS["digits-var"].options)
    base = model_tag(opts, 0)
    changes = {
        "dim": opts["dim"] * 2,
        "layers": opts["layers"] + 1,
        "heads": opts["heads"] * 2,
        "vocab": opts["vocab"] * 2,
        "patch_nums": [*opts["patch_nums"], 16],
        "pretrain_steps": opts["pretrain_steps"] + 1,
        "pretrain_lr": opts["pretrain_lr"] * 3,
    }
    tags = {base}
    for key, value in changes.items():
        tag = model_tag({**opts, key: value}, 0)
        assert tag != base, key
        tags.add(tag)
    assert len(tags) == len(changes) + 1  # pairwise distinct
    assert model_tag(opts, 1) != base  # the seed too
    assert model_tag({**opts, "reencode": not opts["reencode"]}, 0) == base
