"""The adapters (ddo_fast.adapters): the pairing of noise and labels, the paired-diffusion helper,
the EDM weighting, the VAR-recipe null-label weights, and the one ``sample`` signature.

Oracles are written out here in float64 from the definitions (DDO Eq. 13-16), not taken from
the adapters."""

import copy
import inspect
import math

import pytest
import torch
from training_models import Recorder, TinyAR, TinyEps

from ddo_fast.adapters import (
    Adapter,
    CausalAR,
    EDMDenoiser,
    EpsilonDiffusion,
    LossOutput,
    edm_weight,
    null_label_weights,
    paired_diffusion_loss,
)
from ddo_fast.models import CausalTransformer, edm_mlp

B, ALPHA, BETA = 4, 1.5, 0.7


def _perturbed(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """A copy of ``model`` with every parameter moved a little (theta != ref)."""
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return other


def _case(kind: str):
    """(adapter, theta, real batch, fake batch, noise) of one adapter family."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    if kind == "edm":
        adapter, model = EDMDenoiser(sigma_data=1.0), edm_mlp(hidden=8)
        real = (torch.randn(B, 2, generator=g), None)
        fake = (torch.randn(B, 2, generator=g), None)
        shape: tuple[int, ...] = (2,)
    elif kind == "epsilon":
        adapter, model = EpsilonDiffusion(), TinyEps()
        real = (torch.randn(B, 2, generator=g), None)
        fake = (torch.randn(B, 2, generator=g), None)
        shape = (2,)
    else:
        null = kind == "ar-null"
        adapter = CausalAR(null_label=3 if null else None, uncond_ratio=0.5 if null else 0.0)
        model = TinyAR(vocab=5, classes=3)
        labels = torch.randint(0, 3, (B,), generator=g)
        real = (torch.randint(0, 5, (B, 6), generator=g), labels)
        fake = (torch.randint(0, 5, (B, 6), generator=g), labels.flip(0))
        shape = (6,)
    noise = adapter.draw(B, shape, g)
    if kind == "ar-null":
        noise = {"uncond": torch.tensor([True, False, True, False])}
    return adapter, model, real, fake, noise


KINDS = ["edm", "epsilon", "ar", "ar-null"]


# ---------------------------------------------------------------------------- theta = ref
@pytest.mark.parametrize("kind", KINDS)
def test_theta_equal_ref_gives_zero_logratio_and_log2_loss(kind):
    """At theta = ref, r = 0 exactly (theta and ref see the same noise and labels) and the loss
    is (1 + alpha) log 2 (DDO Eq. 13 at r = 0); with null labels the VAR weights apply:
    [sum_real w log 2 / B + alpha sum_fake w log 2 / B] / max(alpha, 1)."""
    adapter, model, real, fake, noise = _case(kind)
    ref = copy.deepcopy(model).requires_grad_(False)
    out = adapter.loss(model, ref, real, fake, noise, alpha=ALPHA, beta=BETA)
    assert isinstance(out, LossOutput) and out.logratio.shape == (2 * B,)
    assert torch.equal(out.logratio, torch.zeros_like(out.logratio)), (
        f"r != 0 at theta = ref (max |r| = {out.logratio.abs().max().item():.3g}): theta's and "
        "ref's terms are not computed the same way"
    )
    expected = (1 + ALPHA) * math.log(2)
    if kind == "ar-null":  # uncond pairs 0 and 2: real weight max(alpha, 1), fake weight 0
        real_w, fake_w = [ALPHA, 1, ALPHA, 1], [0, 1, 0, 1]
        expected = math.log(2) * (sum(real_w) / B + ALPHA * sum(fake_w) / B)
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_theta_and_ref_get_identical_inputs_and_ref_gets_no_gradient(kind):
    adapter, model, real, fake, noise = _case(kind)
    theta, ref = Recorder(_perturbed(model)), Recorder(model)  # ref left requires_grad=True
    out = adapter.loss(theta, ref, real, fake, noise, alpha=ALPHA, beta=BETA)
    out.loss.backward()
    assert len(theta.calls) == len(ref.calls) == 1
    for a, b in zip(theta.calls[0], ref.calls[0], strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    assert all(p.grad is None for p in ref.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in theta.parameters())


@pytest.mark.parametrize("kind", ["edm", "epsilon"])
def test_real_and_fake_rows_of_a_pair_share_noise(kind):
    """With fake = real, row i and row B + i see the same sigma/t and noise, so r is the same
    to the last bit (theta != ref)."""
    adapter, model, real, _, noise = _case(kind)
    out = adapter.loss(_perturbed(model), model, real, real, noise, alpha=ALPHA, beta=BETA)
    assert torch.equal(out.logratio[:B], out.logratio[B:])
    assert out.logratio.abs().min() > 0


# ------------------------------------------------------------------------- float64 oracles
def _loss_oracle(r: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """DDO Eq. 13, mean over each group: sum_real -w log sig(beta r) / B + alpha sum_fake
    -w log sig(-beta r) / B."""
    w = torch.ones_like(r) if weight is None else weight.double()
    real = -(w[:B] * torch.nn.functional.logsigmoid(BETA * r[:B])).sum() / B
    fake = -(w[B:] * torch.nn.functional.logsigmoid(-BETA * r[B:])).sum() / B
    return real + ALPHA * fake


def test_edm_adapter_matches_the_definition():
    """r = -sum lambda(sigma) [(D_theta(x + sigma eps) - x)^2 - (D_ref(...) - x)^2], one
    (sigma, eps) per pair."""
    adapter, ref, real, fake, noise = _case("edm")
    theta = _perturbed(ref)
    out = adapter.loss(theta, ref, real, fake, noise, alpha=ALPHA, beta=BETA)
    x = torch.cat([real[0], fake[0]])
    sigma, eps = noise["sigma"].repeat(2), noise["eps"].repeat(2, 1)
    x_noisy = x + sigma[:, None] * eps
    with torch.no_grad():
        d, d_ref = theta(x_noisy, sigma).double(), ref(x_noisy, sigma).double()
    s = sigma.double()
    lam = (s**2 + 1.0) / s**2  # sigma_data = 1
    r = -(lam[:, None] * ((d - x.double()) ** 2 - (d_ref - x.double()) ** 2)).sum(1)
    torch.testing.assert_close(out.logratio.double(), r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss.double(), _loss_oracle(r), rtol=1e-5, atol=1e-6)


def test_epsilon_adapter_matches_the_definition():
    """x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps; r = -sum[(eps_theta - eps)^2 -
    (eps_ref - eps)^2], one (t, eps) per pair."""
    adapter, ref, real, fake, noise = _case("epsilon")
    theta = _perturbed(ref)
    out = adapter.loss(theta, ref, real, fake, noise, alpha=ALPHA, beta=BETA)
    x = torch.cat([real[0], fake[0]]).double()
    t, eps = noise["t"].repeat(2), noise["eps"].repeat(2, 1).double()
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)[t]
    x_t = (abar.sqrt()[:, None] * x + (1 - abar).sqrt()[:, None] * eps).float()
    with torch.no_grad():
        e, e_ref = theta(x_t, t).double(), ref(x_t, t).double()
    r = -((e - eps) ** 2 - (e_ref - eps) ** 2).sum(1)
    torch.testing.assert_close(out.logratio.double(), r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss.double(), _loss_oracle(r), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("normalize", [False, True])
def test_causal_ar_null_labels_match_the_var_recipe(normalize):
    """Uncond pairs get the null label on both rows; r = sum log softmax(z_theta)[y] -
    sum log softmax(z_ref)[y]; weights real 1 / max(alpha,1), fake 1 / 0; loss / max(alpha,1)
    with normalize_alpha."""
    adapter, ref, real, fake, noise = _case("ar-null")
    adapter.normalize_alpha = normalize
    theta = Recorder(_perturbed(ref))
    out = adapter.loss(theta, ref, real, fake, noise, alpha=ALPHA, beta=BETA)
    uncond = torch.tensor([True, False, True, False]).repeat(2)
    labels = torch.cat([real[1], fake[1]])
    expected_labels = torch.where(uncond, torch.full_like(labels, 3), labels)
    assert torch.equal(theta.calls[0][1], expected_labels)
    tokens = torch.cat([real[0], fake[0]])

    def seq_lp(m):
        with torch.no_grad():
            lp = m(tokens, expected_labels).double().log_softmax(-1)
        return lp.gather(-1, tokens[..., None])[..., 0].sum(1)

    r = seq_lp(theta.inner) - seq_lp(ref)
    weight = torch.tensor([ALPHA, 1, ALPHA, 1, 0, 1, 0, 1], dtype=torch.float64)
    loss = _loss_oracle(r, weight) / (max(ALPHA, 1.0) if normalize else 1.0)
    torch.testing.assert_close(out.logratio.double(), r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss.double(), loss, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- pieces
def test_edm_weight_against_hand_computed_values():
    """lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2 (Karras et al. 2022)."""
    sigma = torch.tensor([0.3, 2.0, 80.0], dtype=torch.float64)
    # (0.09 + 0.25) / 0.0225 = 136/9; (4 + 0.25) / 1 = 4.25; (6400 + 0.25) / 1600
    expected = torch.tensor([136 / 9, 4.25, 6400.25 / 1600], dtype=torch.float64)
    torch.testing.assert_close(edm_weight(sigma, 0.5), expected, rtol=1e-15, atol=0)
    assert EDMDenoiser(sigma_data=0.5).weight(sigma).tolist() == edm_weight(sigma, 0.5).tolist()


@pytest.mark.parametrize(
    "alpha, expected",
    [
        (3.0, [3.0, 1.0, 3.0, 1.0, 0.0, 1.0, 0.0, 1.0]),
        (0.5, [1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0]),
        (1.0, [1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0]),
    ],
)
def test_null_label_weights_exact(alpha, expected):
    """Real rows: cond 1, uncond max(alpha, 1); fake rows: cond 1 (alpha comes from the loss),
    uncond 0 (DDO_trainer.py::train_step, ddo_spec.md section 3)."""
    w = null_label_weights(torch.tensor([True, False, True, False]), alpha)
    assert w.tolist() == expected


class _Family:
    """A diffusion family for the helper's test: x_noisy = x + eps, target x, weight level + 1;
    it records what the helper hands it."""

    backend = None

    def __init__(self) -> None:
        self.seen: dict = {"labels": []}

    def corrupt(self, x, level, e):
        self.seen["corrupt"] = (x, level, e)
        return x + e, x, level.double() + 1

    def denoise(self, net, x_noisy, level, labels):
        self.seen["labels"].append(labels)
        return net(x_noisy)


def test_paired_diffusion_helper():
    """The helper repeats level and eps over the pair, casts a float level to the data dtype
    (an integer one stays), calls corrupt once and denoise for theta then ref with the same
    labels, and feeds (pred, pred_ref, target, weight, is_real) to the fused loss."""
    g = torch.Generator().manual_seed(3)
    real = (torch.randn(B, 3, generator=g, dtype=torch.float64), torch.arange(B))
    fake = (torch.randn(B, 3, generator=g, dtype=torch.float64), torch.arange(B) + 10)
    eps = torch.randn(B, 3, generator=g)
    theta, ref = torch.nn.Linear(3, 3).double(), torch.nn.Linear(3, 3).double()
    for level in (torch.tensor([0.5, 1.0, 2.0, 4.0]), torch.tensor([1, 2, 3, 4])):
        fam = _Family()
        out = paired_diffusion_loss(fam, theta, ref, real, fake, level, eps, alpha=ALPHA, beta=BETA)
        x, lv, e = fam.seen["corrupt"]
        assert torch.equal(x, torch.cat([real[0], fake[0]]))
        assert torch.equal(e, eps.double().repeat(2, 1))
        assert lv.dtype == (torch.float64 if level.is_floating_point() else torch.int64)
        assert torch.equal(lv, level.to(lv.dtype).repeat(2))
        labels = torch.cat([real[1], fake[1]])
        assert len(fam.seen["labels"]) == 2
        assert all(torch.equal(lab, labels) for lab in fam.seen["labels"])
        xn = x + e
        with torch.no_grad():
            d, d_ref = theta(xn), ref(xn)
        r = -((lv.double() + 1)[:, None] * ((d - x) ** 2 - (d_ref - x) ** 2)).sum(1)
        # The fused loss computes in fp32 (the project's rule for losses).
        torch.testing.assert_close(out.logratio.double(), r, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.loss.double(), _loss_oracle(r), rtol=1e-5, atol=1e-6)
        assert not out.logratio.requires_grad and out.loss.requires_grad


def test_paired_diffusion_helper_rejects_labels_on_one_side_only():
    x, lab = torch.randn(B, 2), torch.zeros(B, dtype=torch.long)
    with pytest.raises(ValueError, match="both have labels"):
        paired_diffusion_loss(
            EpsilonDiffusion(), TinyEps(), TinyEps(), (x, lab), (x, None), lab, x,
            alpha=1.0, beta=1.0,
        )  # fmt: skip


# -------------------------------------------------------------------------------- sample
def test_one_sample_signature():
    """Every adapter's sample is sample(model, n, labels, generator, device, shape), shape
    required, like the protocol's; the base class says what is missing."""
    names = ["self", "model", "n", "labels", "generator", "device", "shape"]
    for cls in (Adapter, EDMDenoiser, EpsilonDiffusion, CausalAR):
        params = inspect.signature(cls.sample).parameters
        assert list(params) == names, cls
        assert params["shape"].default is inspect.Parameter.empty, cls
    with pytest.raises(NotImplementedError, match="Adapter.sample"):
        Adapter().sample(TinyEps(), 1, None, torch.Generator(), torch.device("cpu"), (2,))


@pytest.mark.parametrize("kind", ["edm", "epsilon", "ar"])
def test_sample_shapes_labels_and_seed(kind):
    """Positional call with the unified signature, in chunks of sample_batch; the same seed gives
    the same samples and another seed others."""
    adapter, model, _, _, _ = _case(kind)
    adapter.sample_batch = 3
    if kind == "edm":
        adapter.steps = 3
    if kind == "epsilon":
        adapter.steps = 4
    shape = (6,) if kind == "ar" else (2,)
    labels = torch.tensor([0, 1, 2, 0, 1]) if kind == "ar" else None
    cpu = torch.device("cpu")

    def run(seed):
        return adapter.sample(model, 5, labels, torch.Generator().manual_seed(seed), cpu, shape)

    a, b, c = run(0), run(0), run(1)
    assert a.shape == (5, *shape) and torch.isfinite(a.double()).all()
    assert torch.equal(a, b) and not torch.equal(a, c)
    if kind == "ar":  # seq_len 0: the length comes from the sample shape
        assert a.dtype == torch.long and 0 <= int(a.min()) and int(a.max()) < 5


def test_causal_ar_uses_the_models_own_sampler():
    torch.manual_seed(0)
    m = CausalTransformer(8, 5, 10, dim=16, layers=1).eval()
    labels = torch.arange(4) % 10
    got = CausalAR().sample(m, 4, labels, torch.Generator().manual_seed(7), "cpu", (5,))
    assert torch.equal(got, m.sample(4, labels, torch.Generator().manual_seed(7)))


# -------------------------------------------------------------------- mixed precision (autocast)
class _LinearDenoiser(torch.nn.Module):
    """A denoiser whose last op is a Linear, so under CPU autocast its output is bf16 while the
    data x (the target) stays fp32: the mix a trainer under autocast feeds the loss."""

    def __init__(self, dim: int = 6) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(dim + 1, dim)
        self.outputs: list[torch.Tensor] = []

    def forward(self, x, sigma, labels):
        out = self.lin(torch.cat([x, sigma.log()[:, None]], dim=1))
        self.outputs.append(out.detach())
        return out


@pytest.mark.parametrize("backend", ["cpp", "triton", "torch"])
def test_edm_under_bf16_autocast_gives_r_of_the_bf16_outputs(backend):
    """r under torch.autocast(bf16) equals float64 math on the very bf16 predictions and the fp32
    data: no input is cast to another's dtype (a cast of the target to bf16 is ~1e-2 off)."""
    torch.manual_seed(0)
    adapter = EDMDenoiser(sigma_data=0.5, backend=backend)
    model = _LinearDenoiser()
    ref = _perturbed(model)
    g = torch.Generator().manual_seed(3)
    real = (torch.randn(B, 6, generator=g), None)
    fake = (torch.randn(B, 6, generator=g), None)
    noise = adapter.draw(B, (6,), g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = adapter.loss(model, ref, real, fake, noise, alpha=ALPHA, beta=BETA)
    (pred,), (pred_ref,) = model.outputs, ref.outputs
    assert pred.dtype == pred_ref.dtype == torch.bfloat16
    x = torch.cat([real[0], fake[0]]).double()
    sigma = noise["sigma"].double().repeat(2)
    w = (sigma**2 + 0.5**2) / (sigma * 0.5) ** 2
    terms = (pred.double() - x) ** 2 - (pred_ref.double() - x) ** 2
    r64 = -w * terms.sum(1)
    scale = (w[:, None] * ((pred.double() - x) ** 2 + (pred_ref.double() - x) ** 2)).sum(1)
    assert out.logratio.dtype == torch.float32
    err = (out.logratio.double() - r64).abs()
    assert torch.all(err <= 1e-6 * scale + 1e-7), (err / scale).max()
