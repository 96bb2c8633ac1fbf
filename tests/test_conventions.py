"""Diffusion models as other libraries write them: diffusers UNets and schedulers with each
prediction type (epsilon / v / x0), conditioning keywords, k-diffusion- and EDM2-convention
denoisers, and the adapters' MLE losses.

Oracles are float64 and written from the definitions (Ho et al. 2020; Salimans & Ho 2022,
Appendix D; Karras et al. 2022, Eq. 2 and 8), not taken from the adapters. The central check:
one eps-prediction model expressed as eps, v and x0 gives the same r (the ELBO-consistent
weighting) and the same gradients, up to float32 rounding (which the x0 form amplifies by
sqrt(SNR) ~ 155 at t = 0). The DDIM sampler is checked against diffusers' DDIMScheduler.
"""

import copy
import math

import pytest
import torch
from diffusers import (  # the test extra
    DDIMScheduler,
    DDPMScheduler,
    EulerDiscreteScheduler,
    UNet2DConditionModel,
    UNet2DModel,
)
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import nn

from ddo_fast import TrainConfig, train
from ddo_fast.adapters import EDMDenoiser, EpsilonDiffusion, MLEControl
from ddo_fast.models import EDMPrecond, MLPDenoiser

B, ALPHA, BETA, T = 4, 1.5, 0.7, 1000
TYPES = ["epsilon", "v_prediction", "sample"]


@pytest.fixture(autouse=True)
def _one_thread():
    """Small convolutions run far faster on one thread than contended on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _abar64(num: int = T) -> torch.Tensor:
    """DDPM's linear schedule, float64, from its definition."""
    return torch.cumprod(1 - torch.linspace(1e-4, 0.02, num, dtype=torch.float64), 0)


def _perturbed(model: nn.Module, seed: int = 1, scale: float = 0.1) -> nn.Module:
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return other


class EpsNet(nn.Module):
    """eps-prediction net for flat 3-D data: model(x_t, t) (no labels)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))

    def forward(self, x, t):
        return self.net(torch.cat([x, t.to(x.dtype)[:, None] / T], 1))


class Expressed(nn.Module):
    """An eps-prediction net's output as ``kind`` (converted in float64):
    v = (eps - s x_t) / a, x0 = (x_t - s eps) / a. Returned as a diffusers output object,
    a tuple or a tensor (``wrap``) to exercise the unwrapping."""

    def __init__(self, net: nn.Module, kind: str, abar: torch.Tensor, wrap: str) -> None:
        super().__init__()
        self.net, self.kind, self.abar, self.wrap = net, kind, abar, wrap

    def forward(self, x, t):
        eps = self.net(x, t).double()
        a, s = self.abar[t].sqrt()[:, None], (1 - self.abar[t]).sqrt()[:, None]
        x64 = x.double()
        out = {"epsilon": eps, "v_prediction": (eps - s * x64) / a, "sample": (x64 - s * eps) / a}
        out = out[self.kind].to(x.dtype)
        if self.wrap == "output":
            return UNet2DOutput(sample=out)
        return (out,) if self.wrap == "tuple" else out


def _pairs(seed: int = 0, dim: int = 3):
    g = torch.Generator().manual_seed(seed)
    real = (torch.randn(B, dim, generator=g), None)
    fake = (torch.randn(B, dim, generator=g), None)
    # t at both ends of the schedule and two in the middle: the weights span ~1e-5 .. 1e4.
    noise = {"t": torch.tensor([0, 1, 500, T - 1]), "eps": torch.randn(B, dim, generator=g)}
    return real, fake, noise


# ------------------------------------------------------------ targets, weights, equivalence
@pytest.mark.parametrize("kind", TYPES)
def test_target_and_weight_per_type_against_float64_oracle(kind):
    """x_t = a x + s eps; target eps / a eps - s x / x; weight 1 / abar / abar / (1 - abar);
    r = -sum w [(pred - target)^2 - (pred_ref - target)^2] (DDO Eq. 14-15)."""
    theta, ref = _perturbed(EpsNet()), EpsNet()
    adapter = EpsilonDiffusion(prediction_type=kind)
    real, fake, noise = _pairs()
    out = adapter.loss(theta, ref, real, fake, noise, alpha=ALPHA, beta=BETA)

    x = torch.cat([real[0], fake[0]]).double()
    t, eps = noise["t"].repeat(2), noise["eps"].repeat(2, 1).double()
    abar = _abar64()[t]
    a, s = abar.sqrt()[:, None], (1 - abar).sqrt()[:, None]
    x_t = a * x + s * eps
    target = {"epsilon": eps, "v_prediction": a * eps - s * x, "sample": x}[kind]
    weight = {"epsilon": torch.ones_like(abar), "v_prediction": abar, "sample": abar / (1 - abar)}
    theta64, ref64 = copy.deepcopy(theta).double(), copy.deepcopy(ref).double()
    with torch.no_grad():
        p, p_ref = theta64(x_t, t), ref64(x_t, t)
    r = -(weight[kind][:, None] * ((p - target) ** 2 - (p_ref - target) ** 2)).sum(1)
    torch.testing.assert_close(out.logratio.double(), r, rtol=2e-4, atol=1e-5)
    loss = -torch.nn.functional.logsigmoid(BETA * r[:B]).mean() - ALPHA * (
        torch.nn.functional.logsigmoid(-BETA * r[B:]).mean()
    )
    torch.testing.assert_close(out.loss.double(), loss, rtol=1e-4, atol=1e-6)

    xt, tgt, w = adapter.corrupt(x, t, eps)
    torch.testing.assert_close(xt, x_t, rtol=0, atol=1e-12)
    torch.testing.assert_close(tgt, target, rtol=0, atol=1e-12)
    torch.testing.assert_close(w.double(), weight[kind], rtol=1e-6, atol=0)


def test_one_model_in_three_parameterisations_gives_the_same_r_and_gradients():
    """The eps-net theta (and ref) expressed as eps, v and x0: r and dL/dtheta agree across
    types (the weights make the squared errors the same number), and r equals the float64
    eps-space oracle -sum[(eps_theta - eps)^2 - (eps_ref - eps)^2]. Fails for any other
    weighting: at t = 0 the x0 weight is ~1e4 and the v weight ~1."""
    theta, ref = _perturbed(EpsNet(), scale=0.3), EpsNet()
    abar = _abar64()
    real, fake, noise = _pairs(seed=2)
    rs, grads = {}, {}
    for kind, wrap in zip(TYPES, ["tensor", "output", "tuple"], strict=True):
        theta.zero_grad(set_to_none=True)
        adapter = EpsilonDiffusion(prediction_type=kind)
        out = adapter.loss(
            Expressed(theta, kind, abar, wrap), Expressed(ref, kind, abar, wrap), real, fake,
            noise, alpha=ALPHA, beta=BETA,
        )  # fmt: skip
        out.loss.backward()
        rs[kind] = out.logratio.double()
        grads[kind] = torch.cat([p.grad.flatten() for p in theta.parameters()]).double()
    for kind in TYPES[1:]:
        torch.testing.assert_close(rs[kind], rs["epsilon"], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(grads[kind], grads["epsilon"], rtol=1e-3, atol=1e-5)
    x = torch.cat([real[0], fake[0]]).double()
    t, eps = noise["t"].repeat(2), noise["eps"].repeat(2, 1).double()
    x_t = abar[t].sqrt()[:, None] * x + (1 - abar[t]).sqrt()[:, None] * eps
    with torch.no_grad():
        e, e_ref = copy.deepcopy(theta).double()(x_t, t), copy.deepcopy(ref).double()(x_t, t)
    r = -((e - eps) ** 2 - (e_ref - eps) ** 2).sum(1)
    torch.testing.assert_close(rs["epsilon"], r, rtol=1e-4, atol=1e-5)
    assert r.abs().min() > 1e-3  # theta != ref: the comparison is not of zeros


@pytest.mark.parametrize("kind", TYPES)
def test_sampler_converts_each_type(kind):
    """DDIM with the eps-net expressed as ``kind`` gives the eps-type samples (to fp32)."""
    net, abar = EpsNet(), _abar64()
    cpu = torch.device("cpu")

    def run(k):
        adapter = EpsilonDiffusion(prediction_type=k, steps=5)
        model = Expressed(net, k, abar, "tensor")
        return adapter.sample(model, 6, None, torch.Generator().manual_seed(0), cpu, (3,))

    torch.testing.assert_close(run(kind), run("epsilon"), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", TYPES)
def test_clipped_ddim_is_diffusers_ddim_with_clipped_model_output(kind):
    """The sampler with clip_sample against diffusers' DDIMScheduler.step(eta=0,
    use_clipped_model_output=True) on the same noise and model: 4 steps on the timesteps
    999, 666, 333, 0, which diffusers steps through as t -> t - 1000 // 3 (and abar = 1
    after t = 0). Clipping is active (x0_hat at t = 999 is ~1e2): the test checks that
    diffusers without clipping, and diffusers keeping the unclipped eps_hat (its default),
    both give other samples, so removing the clip or the eps_hat recompute fails it."""
    sched = DDIMScheduler(prediction_type=kind, clip_sample=True)
    adapter = EpsilonDiffusion.from_scheduler(sched, steps=4)
    assert adapter.clip_sample
    model = Expressed(EpsNet(), kind, sched.alphas_cumprod.double(), "tensor")
    got = adapter.sample(model, 6, None, torch.Generator().manual_seed(0), "cpu", (3,))

    def diffusers_ddim(scheduler, use_clipped_model_output):
        scheduler.set_timesteps(3)
        x = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            for t in (999, 666, 333, 0):
                pred = model(x, torch.full((6,), t))
                x = scheduler.step(
                    pred, t, x, eta=0.0, use_clipped_model_output=use_clipped_model_output
                ).prev_sample
        return x

    torch.testing.assert_close(got, diffusers_ddim(sched, True), rtol=1e-4, atol=1e-4)
    assert (got - diffusers_ddim(sched, False)).abs().max() > 1e-2
    unclipped = DDIMScheduler(prediction_type=kind, clip_sample=False)
    assert (got - diffusers_ddim(unclipped, True)).abs().max() > 1e-2


class KeywordNet(nn.Module):
    """An eps-net that needs a keyword: model(x_t, t, *, scale) = scale * EpsNet(x_t, t)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = EpsNet()

    def forward(self, x, t, *, scale):
        return scale * self.inner(x, t)


def test_model_kwargs_reach_every_call():
    """``model_kwargs`` go to theta and ref in the loss, to mle_loss and to the sampler: r
    equals the float64 oracle with scale = 3 (a dropped keyword fails the call, a wrong
    value the comparison)."""
    theta, ref = KwRecorder(_perturbed(KeywordNet())), KwRecorder(KeywordNet())
    adapter = EpsilonDiffusion(model_kwargs={"scale": 3.0}, steps=2)
    real, fake, noise = _pairs(seed=6)
    out = adapter.loss(theta, ref, real, fake, noise, alpha=ALPHA, beta=BETA)
    assert theta.calls[0][1] == {"scale": 3.0} == ref.calls[0][1]
    x = torch.cat([real[0], fake[0]]).double()
    t, eps = noise["t"].repeat(2), noise["eps"].repeat(2, 1).double()
    abar = _abar64()[t]
    x_t = abar.sqrt()[:, None] * x + (1 - abar).sqrt()[:, None] * eps
    with torch.no_grad():
        e = 3.0 * copy.deepcopy(theta.inner.inner).double()(x_t, t)
        e_ref = 3.0 * copy.deepcopy(ref.inner.inner).double()(x_t, t)
    r = -((e - eps) ** 2 - (e_ref - eps) ** 2).sum(1)
    torch.testing.assert_close(out.logratio.double(), r, rtol=1e-4, atol=1e-5)
    assert r.abs().min() > 1e-3
    loss = adapter.mle_loss(theta, real, noise)
    assert torch.isfinite(loss) and theta.calls[-1][1] == {"scale": 3.0}
    adapter.sample(theta, 3, None, torch.Generator().manual_seed(0), "cpu", (3,))
    assert len(theta.calls) == 4 and all(c[1] == {"scale": 3.0} for c in theta.calls)


# ------------------------------------------------------------------------------ mle_loss
@pytest.mark.parametrize("kind", TYPES)
def test_epsilon_mle_loss_against_float64(kind):
    """mean (pred - target)^2 over rows and elements, the real rows only, fp32."""
    model = EpsNet()
    adapter = EpsilonDiffusion(prediction_type=kind)
    real, _, noise = _pairs(seed=3)
    loss = adapter.mle_loss(model, real, noise)
    assert loss.dtype == torch.float32 and loss.dim() == 0 and loss.requires_grad
    x, t, eps = real[0].double(), noise["t"], noise["eps"].double()
    abar = _abar64()[t]
    a, s = abar.sqrt()[:, None], (1 - abar).sqrt()[:, None]
    target = {"epsilon": eps, "v_prediction": a * eps - s * x, "sample": x}[kind]
    with torch.no_grad():
        pred = copy.deepcopy(model).double()(a * x + s * eps, t)
    torch.testing.assert_close(loss.double(), ((pred - target) ** 2).mean(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("call", ["ddo", "k-diffusion", "edm2"])
def test_edm_mle_loss_against_float64(call):
    """mean lambda(sigma) (D(x + sigma eps; sigma) - x)^2, lambda = (s^2 + sd^2) / (s sd)^2."""
    inner = _edm_inner(labels=True)
    adapter = EDMDenoiser(sigma_data=0.5, call=call, label_dim=3)
    model = _as(call, inner)
    g = torch.Generator().manual_seed(4)
    real = (torch.randn(B, 2, generator=g), torch.tensor([0, 1, 2, 1]))
    noise = adapter.draw(B, (2,), g)
    loss = adapter.mle_loss(model, real, noise)
    assert loss.dtype == torch.float32 and loss.dim() == 0 and loss.requires_grad
    x, s = real[0].double(), noise["sigma"].double()
    with torch.no_grad():
        d = copy.deepcopy(inner).double()(x + s[:, None] * noise["eps"].double(), s, real[1])
    lam = (s**2 + 0.25) / (s * 0.5) ** 2
    expected = (lam[:, None] * (d - x) ** 2).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=0)


# -------------------------------------------------------------------------- schedulers
def test_from_scheduler_reads_schedule_prediction_type_and_clipping():
    sched = DDPMScheduler(
        num_train_timesteps=200, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"
    )
    a = EpsilonDiffusion.from_scheduler(sched, steps=7)
    assert torch.equal(a.alphas_cumprod, sched.alphas_cumprod.double())
    assert a.alphas_cumprod.dtype == torch.float64 and len(a.alphas_cumprod) == 200
    assert (a.prediction_type, a.steps, a.clip_sample, a.clip_sample_range) == (
        "v_prediction", 7, True, 1.0
    )  # fmt: skip
    assert a.sampler_config()["clip_sample"] == 1.0  # the key earlier fake caches were written with

    ddim = DDIMScheduler(prediction_type="sample", clip_sample=False)
    b = EpsilonDiffusion.from_scheduler(ddim)
    assert (b.prediction_type, b.clip_sample) == ("sample", False)
    assert "clip_sample" not in b.sampler_config()
    c = EpsilonDiffusion.from_scheduler(DDIMScheduler(clip_sample_range=2.5))
    assert (c.clip_sample, c.clip_sample_range) == (True, 2.5)
    assert torch.equal(b.alphas_cumprod, ddim.alphas_cumprod.double())
    # The default schedule is DDPM's linear one: same numbers as the scheduler's fp32 cumprod.
    torch.testing.assert_close(
        b.alphas_cumprod, EpsilonDiffusion().alphas_cumprod, rtol=1e-6, atol=0
    )
    assert b.sampler_config() != EpsilonDiffusion().sampler_config()  # prediction type in key
    euler = EulerDiscreteScheduler(prediction_type="epsilon")
    assert torch.equal(EpsilonDiffusion.from_scheduler(euler).alphas_cumprod,
                       euler.alphas_cumprod.double())  # fmt: skip

    with pytest.raises(ValueError, match="prediction_type"):
        EpsilonDiffusion.from_scheduler(sched, prediction_type="epsilon")
    with pytest.raises(TypeError, match="scheduler"):
        EpsilonDiffusion.from_scheduler(object())


def test_zero_terminal_snr_schedule_is_clamped_like_diffusers_euler():
    """rescale_betas_zero_snr=True gives abar_{T-1} = 0: clamped to 2**-24 (diffusers'
    EulerDiscreteScheduler's value), the rest as is; loss and DDIM sampling stay finite."""
    ddim = DDIMScheduler(rescale_betas_zero_snr=True, prediction_type="v_prediction")
    assert ddim.alphas_cumprod[-1] == 0
    a = EpsilonDiffusion.from_scheduler(ddim, steps=3)
    euler = EulerDiscreteScheduler(rescale_betas_zero_snr=True)
    assert a.alphas_cumprod[-1] == 2.0**-24 == euler.alphas_cumprod[-1]
    assert torch.equal(a.alphas_cumprod[:-1], ddim.alphas_cumprod[:-1].double())
    for kind in TYPES:
        adapter = EpsilonDiffusion(alphas_cumprod=ddim.alphas_cumprod, prediction_type=kind)
        theta, ref = _perturbed(EpsNet()), EpsNet()
        real, fake, noise = _pairs()  # t = T - 1 included
        out = adapter.loss(theta, ref, real, fake, noise, alpha=ALPHA, beta=BETA)
        assert torch.isfinite(out.loss) and torch.isfinite(out.logratio).all()
        x = adapter.sample(EpsNet(), 4, None, torch.Generator().manual_seed(0), "cpu", (3,))
        assert torch.isfinite(x).all()


def test_thresholding_scheduler_is_refused():
    with pytest.raises(ValueError, match="thresholding is not supported"):
        EpsilonDiffusion.from_scheduler(DDIMScheduler(thresholding=True))
    with pytest.raises(ValueError, match="thresholding is not supported"):
        EpsilonDiffusion.from_scheduler(DDPMScheduler(thresholding=True))


def test_timesteps_outside_the_schedule_raise():
    """corrupt (hence loss and mle_loss) checks t on the CPU; t = -1 would silently index
    abar_{T-1} and t = T fail with a bare IndexError."""
    adapter, model = EpsilonDiffusion(), EpsNet()
    real, fake, noise = _pairs()
    for bad in (torch.tensor([0, 1, 2, T]), torch.tensor([0, -1, 2, 3])):
        with pytest.raises(ValueError, match=r"t: timesteps must lie in \[0, 1000\)"):
            adapter.loss(model, model, real, fake, {**noise, "t": bad}, alpha=1.0, beta=1.0)
        with pytest.raises(ValueError, match="t: timesteps"):
            adapter.mle_loss(model, real, {**noise, "t": bad})
    with pytest.raises(TypeError, match="t must be integer"):
        adapter.corrupt(real[0], torch.full((B,), 3.0), noise["eps"])


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="prediction_type"):
        EpsilonDiffusion(prediction_type="v")
    with pytest.raises(ValueError, match="alphas_cumprod"):
        EpsilonDiffusion(alphas_cumprod=torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match="alphas_cumprod must be strictly decreasing"):
        EpsilonDiffusion(alphas_cumprod=torch.tensor([0.9, 0.5, 0.5, 0.1]))
    with pytest.raises(ValueError, match="alphas_cumprod must be strictly decreasing"):
        EpsilonDiffusion(alphas_cumprod=torch.tensor([0.1, 0.5, 0.9]))
    with pytest.raises(ValueError, match="label_key"):
        EpsilonDiffusion(label_key=3)
    with pytest.raises(ValueError, match="label_key"):
        EpsilonDiffusion(label_key="class labels")
    for bad in (1.0, 1, "yes", None):
        with pytest.raises(TypeError, match="clip_sample must be a bool"):
            EpsilonDiffusion(clip_sample=bad)
    for bad in (0.0, -1.0, True, "1"):
        with pytest.raises(ValueError, match="clip_sample_range"):
            EpsilonDiffusion(clip_sample=True, clip_sample_range=bad)
    for cls in (EpsilonDiffusion, EDMDenoiser):
        for name in ("steps", "sample_batch"):
            for bad in (0, -2, 2.0, True):
                with pytest.raises(ValueError, match=name):
                    cls(**{name: bad})
    for bad in ("3", 2.5, 0, True):
        with pytest.raises(ValueError, match="label_dim"):
            EDMDenoiser(call="edm2", label_dim=bad)
    with pytest.raises(ValueError, match="label_key and condition"):
        EpsilonDiffusion(label_key="class_labels", condition=lambda y: {})
    with pytest.raises(ValueError, match="call"):
        EDMDenoiser(call="karras")
    with pytest.raises(ValueError, match="label_key"):
        EDMDenoiser(call="k-diffusion", label_key="class cond")
    with pytest.raises(ValueError, match="label_dim"):  # integer labels, no label_dim anywhere
        EDMDenoiser(call="edm2").denoise(
            lambda x, s, c: x, torch.zeros(2, 2), torch.ones(2), torch.tensor([0, 1])
        )
    with pytest.raises(TypeError, match="model output"):
        EpsilonDiffusion().denoise(lambda x, t: {"x": x}, torch.zeros(2, 2), torch.ones(2), None)


# ---------------------------------------------------------------------- diffusers UNets
def _unet(classes: int | None = 3):
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=(8, 16), norm_num_groups=4, num_class_embeds=classes,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    )  # fmt: skip


class KwRecorder(nn.Module):
    """Wraps a model; keeps detached copies of every call's positional and keyword tensors."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, []

    def forward(self, *args, **kwargs):
        def snap(v):
            return v.detach().clone() if torch.is_tensor(v) else v

        self.calls.append(([snap(a) for a in args], {k: snap(v) for k, v in kwargs.items()}))
        return self.inner(*args, **kwargs)


def _same_call(a, b) -> bool:
    (args_a, kw_a), (args_b, kw_b) = a, b
    same = len(args_a) == len(args_b) and kw_a.keys() == kw_b.keys()
    pairs = list(zip(args_a, args_b, strict=False)) + [(kw_a[k], kw_b[k]) for k in kw_a]
    return same and all(torch.equal(x, y) if torch.is_tensor(x) else x == y for x, y in pairs)


@pytest.mark.parametrize("kind", TYPES)
def test_unet_class_labels_keyword_same_inputs_and_only_theta_gets_gradients(kind):
    """A diffusers UNet2DModel with class labels as the keyword ``class_labels``: theta and ref
    get identical inputs, r = 0 exactly at theta = ref, the reference gets no gradient."""
    adapter = EpsilonDiffusion.from_scheduler(
        DDPMScheduler(num_train_timesteps=100, prediction_type=kind), label_key="class_labels"
    )
    g = torch.Generator().manual_seed(0)
    real = (torch.randn(B, 1, 8, 8, generator=g), torch.tensor([0, 1, 2, 0]))
    fake = (torch.randn(B, 1, 8, 8, generator=g), torch.tensor([2, 1, 0, 0]))
    noise = adapter.draw(B, (1, 8, 8), g)
    model = _unet()
    out = adapter.loss(model, copy.deepcopy(model), real, fake, noise, alpha=ALPHA, beta=BETA)
    assert torch.equal(out.logratio, torch.zeros(2 * B))
    assert out.loss.item() == pytest.approx((1 + ALPHA) * math.log(2), rel=1e-6)

    theta, ref = KwRecorder(_perturbed(model, scale=0.02)), KwRecorder(model)
    out = adapter.loss(theta, ref, real, fake, noise, alpha=ALPHA, beta=BETA)
    out.loss.backward()
    assert len(theta.calls) == len(ref.calls) == 1 and _same_call(theta.calls[0], ref.calls[0])
    assert torch.equal(theta.calls[0][1]["class_labels"], torch.cat([real[1], fake[1]]))
    assert all(p.grad is None for p in ref.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in theta.parameters())
    assert out.logratio.abs().min() > 0


def test_condition_passes_encoder_hidden_states_to_a_conditional_unet():
    """``condition`` maps integer prompt ids to UNet2DConditionModel's encoder_hidden_states."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=8,
        attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )  # fmt: skip
    table = torch.randn(3, 5, 8)  # 3 prompts, 5 tokens, width 8
    adapter = EpsilonDiffusion(condition=lambda y: {"encoder_hidden_states": table[y]})
    g = torch.Generator().manual_seed(1)
    real = (torch.randn(B, 1, 8, 8, generator=g), torch.tensor([0, 1, 2, 0]))
    fake = (torch.randn(B, 1, 8, 8, generator=g), torch.tensor([1, 1, 2, 0]))
    noise = adapter.draw(B, (1, 8, 8), g)
    theta, ref = KwRecorder(_perturbed(unet, scale=0.02)), KwRecorder(unet)
    out = adapter.loss(theta, ref, real, fake, noise, alpha=ALPHA, beta=BETA)
    assert _same_call(theta.calls[0], ref.calls[0])
    ehs = theta.calls[0][1]["encoder_hidden_states"]
    assert torch.equal(ehs, table[torch.cat([real[1], fake[1]])])
    assert torch.isfinite(out.loss) and out.logratio.abs().min() > 0


@pytest.mark.parametrize("kind", TYPES)
def test_diffusers_unet_trains_through_train_with_each_prediction_type(kind, tmp_path):
    """``ddo_fast.train`` with a UNet2DModel and the adapter of a DDPMScheduler of each
    prediction type: first step at theta = ref has r = 0 exactly and loss (1 + alpha) log 2,
    every loss finite, the weights move."""
    adapter = EpsilonDiffusion.from_scheduler(
        DDPMScheduler(num_train_timesteps=100, prediction_type=kind), steps=2
    )
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(16, 1, 8, 8, generator=g).clamp(-1, 1), torch.arange(16) % 3)
    model = _unet()
    before = copy.deepcopy(model.state_dict())
    cfg = TrainConfig(
        alpha=ALPHA, beta=0.1, lr=1e-3, batch_size=4, steps_per_round=3,
        fake_samples_per_round=0, log_every=1, out_dir=str(tmp_path), device="cpu",
    )  # fmt: skip
    result = train(model, data, adapter=adapter, config=cfg)
    first = result.history[0]
    assert first["r_real"] == 0.0 and first["r_fake"] == 0.0
    assert first["loss"] == pytest.approx((1 + ALPHA) * math.log(2), rel=1e-6)
    assert len(result.history) == 3 and all(math.isfinite(h["loss"]) for h in result.history)
    assert result.history[-1]["r_real"] != 0.0
    after = result.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


# --------------------------------------------------------------- k-diffusion and EDM2 calls
def _edm_inner(labels: bool) -> nn.Module:
    torch.manual_seed(0)
    return EDMPrecond(MLPDenoiser(2, hidden=16, layers=2, num_classes=3 if labels else None), 0.5)


class KDiffusionStyle(nn.Module):
    """k-diffusion convention: model(input, sigma, **extra_args), labels as ``class_cond``
    (or ``key``)."""

    def __init__(self, inner: nn.Module, key: str = "class_cond") -> None:
        super().__init__()
        self.inner, self.key = inner, key

    def forward(self, input, sigma, **extra_args):
        assert set(extra_args) <= {self.key}, extra_args
        return self.inner(input, sigma, extra_args.get(self.key))


class EDM2Style(nn.Module):
    """EDM2 ``Precond`` convention: model(x, sigma, class_labels one-hot [N, label_dim] float,
    force_fp32=False, return_logvar=False) -> D or (D, logvar)."""

    label_dim = 3

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x, sigma, class_labels=None, force_fp32=False, return_logvar=False):
        labels = None
        if class_labels is not None:
            assert class_labels.dtype == torch.float32 and class_labels.shape[1] == 3
            assert torch.equal(class_labels.sum(1), torch.ones(len(x)))  # one-hot
            labels = class_labels.argmax(1)
        d = self.inner(x, sigma, labels)
        return (d, torch.zeros(len(x), 1)) if return_logvar else d


def _as(call: str, inner: nn.Module) -> nn.Module:
    return {"ddo": inner, "k-diffusion": KDiffusionStyle(inner), "edm2": EDM2Style(inner)}[call]


@pytest.mark.parametrize(
    "call,kw",
    [
        ("k-diffusion", {}),
        ("k-diffusion", {"label_key": "y"}),
        ("edm2", {}),
        ("edm2", {"model_kwargs": {"return_logvar": True}}),
    ],
)
def test_edm_conventions_give_the_ddo_conventions_loss(call, kw):
    """The same denoiser behind each calling convention: identical loss and r."""
    inner = _edm_inner(labels=True)
    theta_inner = _perturbed(inner)
    model = _as(call, theta_inner)
    ref = _as(call, inner)
    if "label_key" in kw:
        model.key = ref.key = kw["label_key"]
    g = torch.Generator().manual_seed(5)
    real = (torch.randn(B, 2, generator=g), torch.tensor([0, 1, 2, 1]))
    fake = (torch.randn(B, 2, generator=g), torch.tensor([2, 2, 0, 1]))
    base = EDMDenoiser(sigma_data=0.5)
    noise = base.draw(B, (2,), g)
    want = base.loss(theta_inner, inner, real, fake, noise, alpha=ALPHA, beta=BETA)
    got = EDMDenoiser(sigma_data=0.5, call=call, **kw).loss(
        model, ref, real, fake, noise, alpha=ALPHA, beta=BETA
    )
    assert torch.equal(got.logratio, want.logratio) and torch.equal(got.loss, want.loss)
    assert want.logratio.abs().min() > 0


@pytest.mark.parametrize("call", ["k-diffusion", "edm2"])
def test_edm_convention_denoisers_train_through_train(call, tmp_path):
    """A k-diffusion- / EDM2-convention denoiser, class-conditional, through ``train`` with
    an offline fake pool from the EDM Heun sampler: r = 0 at the first step, finite losses."""
    adapter = EDMDenoiser(sigma_data=0.5, call=call, steps=3)
    model = _as(call, _edm_inner(labels=True))
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(32, 2, generator=g) * 0.5, torch.arange(32) % 3)
    cfg = TrainConfig(
        alpha=1.0, beta=1.0, lr=1e-3, batch_size=8, steps_per_round=4,
        fake_samples_per_round=16, log_every=1, out_dir=str(tmp_path), device="cpu",
    )  # fmt: skip
    result = train(model, data, adapter=adapter, config=cfg)
    assert result.history[0]["r_real"] == 0.0 and result.history[0]["r_fake"] == 0.0
    assert len(result.history) == 4 and all(math.isfinite(h["loss"]) for h in result.history)
    assert result.history[-1]["r_real"] != 0.0


@pytest.mark.parametrize("kind", ["v_prediction", "edm2"])
def test_mle_control_trains_a_convention_model(kind, tmp_path):
    """MLEControl runs each adapter's mle_loss through ``train`` (the fair control's path)."""
    if kind == "edm2":
        adapter, model = (
            EDMDenoiser(sigma_data=0.5, call="edm2", steps=2),
            EDM2Style(_edm_inner(True)),
        )
        data = (torch.randn(16, 2), torch.arange(16) % 3)
    else:
        adapter, model = EpsilonDiffusion(prediction_type=kind, steps=2), _unet(None)
        data = torch.randn(16, 1, 8, 8)
    before = copy.deepcopy(model.state_dict())
    cfg = TrainConfig(
        lr=1e-3, batch_size=4, steps_per_round=2, fake_samples_per_round=0, log_every=1,
        out_dir=str(tmp_path), device="cpu",
    )  # fmt: skip
    result = train(model, data, adapter=MLEControl(adapter), config=cfg)
    assert all(math.isfinite(h["loss"]) and h["loss"] > 0 for h in result.history)
    after = result.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
