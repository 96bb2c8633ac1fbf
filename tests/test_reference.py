"""The reference itself, against hand-derived closed forms and finite differences."""

import math

import pytest
import torch

from ddo_fast import reference as R

LOG2 = math.log(2.0)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 50.0])
def test_zero_logratio_gives_one_plus_alpha_log2(alpha):
    r = torch.zeros(6, dtype=torch.float64)
    is_real = torch.tensor([True, False, True, False, False, True])
    assert R.ddo_loss_ref(r, is_real, alpha=alpha, beta=0.02).item() == pytest.approx(
        (1 + alpha) * LOG2, rel=1e-12
    )


def test_sign_and_alpha_beta_placement():
    """One real sample with r=2 and one fake with r=-1, alpha=3, beta=0.5, by hand."""
    r = torch.tensor([2.0, -1.0], dtype=torch.float64)
    is_real = torch.tensor([True, False])
    per = R.ddo_loss_ref(r, is_real, alpha=3.0, beta=0.5, reduction="none")
    sig = lambda z: 1.0 / (1.0 + math.exp(-z))  # noqa: E731
    assert per[0].item() == pytest.approx(-math.log(sig(0.5 * 2.0)), rel=1e-12)
    assert per[1].item() == pytest.approx(-3.0 * math.log(1.0 - sig(0.5 * -1.0)), rel=1e-12)
    assert R.ddo_loss_ref(r, is_real, alpha=3.0, beta=0.5, reduction="sum").item() == pytest.approx(
        per.sum().item(), rel=1e-12
    )


def test_mean_is_per_group():
    r = torch.tensor([1.0, 2.0, 3.0, -1.0], dtype=torch.float64)
    is_real = torch.tensor([True, True, True, False])
    per = R.ddo_loss_ref(r, is_real, reduction="none")
    mean = R.ddo_loss_ref(r, is_real, reduction="mean")
    assert mean.item() == pytest.approx(per[:3].mean().item() + per[3].item(), rel=1e-12)


def test_diffusion_logratio_closed_form():
    """pred one unit closer to the target than pred_ref in one coordinate: r = w * (1 - 4)."""
    target = torch.zeros(2, 3, dtype=torch.float64)
    pred_ref = target.clone()
    pred_ref[:, 0] = 2.0
    pred = target.clone()
    pred[:, 0] = 1.0
    weight = torch.tensor([1.0, 0.25], dtype=torch.float64)
    r = R.diffusion_logratio_ref(pred, pred_ref, target, weight)
    torch.testing.assert_close(r, torch.tensor([3.0, 0.75], dtype=torch.float64))


def test_edm_weighting_example():
    """lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2 at sigma = sigma_d = 0.5 is 8."""
    sigma, sigma_d = 0.5, 0.5
    assert (sigma**2 + sigma_d**2) / (sigma * sigma_d) ** 2 == pytest.approx(8.0)


def test_token_logprobs_closed_form():
    logits = torch.tensor([[[0.0, math.log(3.0)]]], dtype=torch.float64)  # p = [1/4, 3/4]
    out = R.token_logprobs_ref(logits, torch.tensor([[1]]))
    assert out.item() == pytest.approx(math.log(0.75), rel=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck(reduction):
    torch.manual_seed(0)
    is_real = torch.tensor([True, False, True, False])
    sw = torch.rand(4, dtype=torch.float64)
    pred = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    pred_ref, target, weight = (
        torch.randn(4, 3, dtype=torch.float64),
        torch.randn(4, 3, dtype=torch.float64),
        torch.rand(4, dtype=torch.float64),
    )
    torch.autograd.gradcheck(
        lambda p: R.diffusion_ddo_loss_ref(
            p,
            pred_ref,
            target,
            weight,
            is_real,
            alpha=2.0,
            beta=0.3,
            sample_weight=sw,
            reduction=reduction,
        ),
        (pred,),
    )
    logits = torch.randn(4, 2, 5, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([[0, 4], [1, -100], [2, 3], [4, 4]])
    ref = torch.randn(4, dtype=torch.float64)
    torch.autograd.gradcheck(
        lambda x: R.ar_ddo_loss_ref(
            x, targets, ref, is_real, alpha=5.0, beta=0.1, reduction=reduction
        ),
        (logits,),
    )
