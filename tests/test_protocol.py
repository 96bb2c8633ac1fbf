"""The efficacy protocol's parts: the stratified split, the results files, the fair MLE control
(MLEControl / Adapter.mle_loss) and the digits metrics (KID, precision/recall, memorisation)."""

import json

import numpy as np
import pytest
import torch

from ddo_fast.adapters import Adapter, CausalAR, EDMDenoiser, MLEControl
from ddo_fast.examples import digits
from ddo_fast.examples.protocol import stratified_split, write_results
from ddo_fast.models import CausalTransformer, EDMPrecond, MLPDenoiser


# ------------------------------------------------------------------------------------ split
def test_stratified_split_is_disjoint_complete_stratified_and_seeded():
    y = torch.tensor([0] * 50 + [1] * 30 + [2] * 21 + [3] * 9)[torch.randperm(110)]
    tr, ho = stratified_split(y, seed=3, frac=0.8)
    assert set(tr.tolist()).isdisjoint(ho.tolist())
    assert sorted(tr.tolist() + ho.tolist()) == list(range(110))
    for c, n in {0: 50, 1: 30, 2: 21, 3: 9}.items():
        assert int((y[tr] == c).sum()) == round(0.8 * n)
        assert int((y[ho] == c).sum()) == n - round(0.8 * n)
    again, _ = stratified_split(y, seed=3, frac=0.8)
    other, _ = stratified_split(y, seed=4, frac=0.8)
    assert torch.equal(tr, again) and not torch.equal(tr, other)


def test_stratified_split_rejects_bad_input():
    with pytest.raises(ValueError, match="frac"):
        stratified_split(torch.arange(10), frac=1.0)
    with pytest.raises(ValueError, match="y must be"):
        stratified_split(torch.rand(10))


# ---------------------------------------------------------------------------------- results
def test_write_results_summary_matches_numpy(tmp_path):
    rng = np.random.default_rng(0)
    runs = [
        {
            "seed": s,
            "data_floor": {"fd": float(rng.random())},
            "baseline": {"fd": float(rng.random()), "recall": float(rng.random())},
            "ddo": {"fd": float(rng.random()), "recall": float(rng.random()), "note": "x"},
            "config": {"lr": 1e-4},
            "seconds": 1.0,
        }
        for s in (1, 2, 3)
    ]
    res = write_results(tmp_path, "t", runs, {"why": "test"})
    disk = json.loads((tmp_path / "results.json").read_text())
    assert disk == res and set(disk) == {"title", "runs", "summary", "notes"}
    assert set(disk["summary"]) == {"data_floor", "baseline", "ddo"}  # config is no stage
    for stage in ("baseline", "ddo"):
        for key in ("fd", "recall"):
            vals = np.array([r[stage][key] for r in runs])
            s = disk["summary"][stage][key]
            assert s["mean"] == pytest.approx(vals.mean(), rel=1e-12)
            assert s["std"] == pytest.approx(vals.std(ddof=1), rel=1e-12) and s["n"] == 3
    assert "note" not in disk["summary"]["ddo"]
    md = (tmp_path / "results.md").read_text()
    assert "## ddo, per seed" in md and f"{runs[1]['ddo']['fd']:.4f}" in md


def test_write_results_single_run_has_zero_std(tmp_path):
    res = write_results(tmp_path, "t", [{"seed": 0, "ddo": {"fd": 2.0}}])
    assert res["summary"]["ddo"]["fd"] == {"mean": 2.0, "std": 0.0, "n": 1}
    with pytest.raises(ValueError, match="runs"):
        write_results(tmp_path, "t", {"seed": 0})


# ------------------------------------------------------------------------------ MLE control
class _NoRef(torch.nn.Module):
    def forward(self, *args):
        raise AssertionError("the MLE control must not run the reference")


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("cfg_rows", [False, True])
def test_mle_control_gradient_is_the_ar_pretraining_gradient(cfg_rows):
    """MLEControl(CausalAR).loss = next-token CE of the real rows (fake rows ignored), with the
    step's null-label draw on the real rows; oracle: float64 log-softmax written out here."""
    torch.manual_seed(0)
    model = CausalTransformer(5, 7, 3, dim=16, layers=1).double()
    adapter = CausalAR(null_label=3 if cfg_rows else None, uncond_ratio=0.5 if cfg_rows else 0)
    real = (torch.randint(5, (6, 7)), torch.randint(3, (6,)))
    fake = (torch.randint(5, (6, 7)), torch.randint(3, (6,)))
    noise = adapter.draw(6, (7,), torch.Generator().manual_seed(1))
    out = MLEControl(adapter).loss(model, _NoRef(), real, fake, noise, alpha=1.0, beta=0.1)
    assert out.logratio.shape == (12,) and not out.logratio.any()
    got = _grads(model, out.loss)

    labels = real[1].clone()
    if cfg_rows:
        assert noise["uncond"].any() and not noise["uncond"].all()
        labels[noise["uncond"]] = 3
    logp = model(real[0], labels).double().log_softmax(-1)
    oracle = -logp.gather(-1, real[0][..., None]).mean()
    assert out.loss.item() == pytest.approx(oracle.item(), rel=1e-6)
    want = _grads(model, oracle)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-7)


def test_mle_control_gradient_is_the_edm_pretraining_gradient():
    """Oracle: mean lambda(sigma) |D(x + sigma eps; sigma) - x|^2 (Karras et al. 2022 Eq. 2)."""
    torch.manual_seed(0)
    model = EDMPrecond(MLPDenoiser(4, hidden=16, layers=2, num_classes=3), sigma_data=0.5)
    model = model.double()
    adapter = EDMDenoiser(sigma_data=0.5)
    real = (torch.randn(5, 4, dtype=torch.float64), torch.randint(3, (5,)))
    fake = (torch.randn(5, 4, dtype=torch.float64), torch.randint(3, (5,)))
    noise = adapter.draw(5, (4,), torch.Generator().manual_seed(2))
    out = MLEControl(adapter).loss(model, _NoRef(), real, fake, noise, alpha=2.0, beta=0.1)
    got = _grads(model, out.loss)
    sigma = noise["sigma"].double()
    x = real[0]
    denoised = model(x + sigma[:, None] * noise["eps"].double(), sigma, real[1])
    weight = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    oracle = (weight[:, None] * (denoised - x) ** 2).mean()
    assert out.loss.item() == pytest.approx(oracle.item(), rel=1e-5)
    for g, w in zip(got, _grads(model, oracle), strict=True):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-7)


def test_mle_control_delegates_and_the_default_mle_loss_names_the_class():
    adapter = CausalAR(seq_len=7, temperature=0.5)
    control = MLEControl(adapter)
    g = torch.Generator().manual_seed(0)
    assert control.sampler_config() == adapter.sampler_config()
    assert control.ref_logprob(_NoRef(), torch.zeros(2, 7), None) is None
    assert control.draw(4, (7,), g).keys() == adapter.draw(4, (7,), g).keys()
    model = CausalTransformer(5, 7, 3, dim=16, layers=1)
    a = control.sample(
        model,
        3,
        torch.tensor([0, 1, 2]),
        torch.Generator().manual_seed(1),
        torch.device("cpu"),
        (7,),
    )
    b = adapter.sample(
        model,
        3,
        torch.tensor([0, 1, 2]),
        torch.Generator().manual_seed(1),
        torch.device("cpu"),
        (7,),
    )
    assert torch.equal(a, b)

    class Bare(Adapter):
        pass

    with pytest.raises(NotImplementedError, match="Bare.mle_loss"):
        MLEControl(Bare()).loss(model, model, (a, None), (a, None), {}, alpha=1.0, beta=1.0)
    with pytest.raises(TypeError, match="adapter"):
        MLEControl(model)


# ---------------------------------------------------------------------------------- metrics
def test_kid_matches_a_brute_force_float64_oracle():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(7, 3)), rng.normal(0.5, 1.0, size=(7, 3))

    def k(u, v):
        return (u @ v / 3 + 1) ** 3

    m = 7
    xx = sum(k(a[i], a[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(b[i], b[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(a[i], b[j]) for i in range(m) for j in range(m)) / m**2
    # one subset of all rows = the full unbiased estimate
    got = digits.kernel_inception_distance(a, b, subsets=1, size=7)
    assert got == pytest.approx(xx + yy - 2 * xy, rel=1e-10)
    same = rng.normal(size=(4000, 3))
    assert abs(digits.kernel_inception_distance(same[:2000], same[2000:], 10, 500)) < 0.05
    assert digits.kernel_inception_distance(a, b + 2.0, 1, 7) > 1.0


def test_precision_recall_on_a_hand_worked_example():
    """1-D reals at 0..9 (k = 3: radius 2 inside, 3 at the ends); fakes at 0, 1, 50, 51:
    precision 2/4; the fake manifold (radii 51, 50, 50, 51) covers every real, recall 1.
    Fakes 0..9 and 100: precision 10/11. Fakes 0, .1, .2, .3 (radii <= .3): recall 1/10."""
    real = np.arange(10.0)[:, None]
    fake = np.array([[0.0], [1.0], [50.0], [51.0]])
    p, r = digits.precision_recall(real, fake, k=3)
    assert p == pytest.approx(0.5) and r == pytest.approx(1.0)
    fake2 = np.concatenate([np.arange(10.0), [100.0]])[:, None]
    p2, r2 = digits.precision_recall(real, fake2, k=3)
    assert p2 == pytest.approx(10 / 11) and r2 == pytest.approx(1.0)
    narrow = np.array([[0.0], [0.1], [0.2], [0.3]])  # fake radii 0.3: covers reals 0 only
    assert digits.precision_recall(real, narrow, k=3)[1] == pytest.approx(0.1)


@pytest.mark.slow
def test_memorisation_share_counts_copies_of_train_images():
    """Samples that are train images are all memorised; the held-out images' own share is the
    quantile used (5 %)."""
    split = digits.split_for(0)
    clf = digits.DigitClassifier().eval().requires_grad_(False)
    m = digits.DigitsMetrics(split, clf, seed=0)
    floor = m.floor()
    assert floor["memorised"] == pytest.approx(0.05, abs=0.01)
    labels = split.y_train[:400]
    copies = m(split.x_train[:400], labels)
    assert copies["memorised"] == 1.0
    fresh = m(torch.rand(400, 64) * 2 - 1, labels)
    assert fresh["memorised"] == 0.0 and np.isfinite(fresh["kid"])
