"""The efficacy protocol's parts: the stratified split, the results files, the fair MLE control
(MLEControl / Adapter.mle_loss), the digits metrics (KID, precision/recall, memorisation, the
data floor, the selection score), gains() and what run_seed hands to ddo_fast.train."""

import copy
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from ddo_fast.adapters import Adapter, CausalAR, EDMDenoiser, MLEControl
from ddo_fast.examples import digits, digits_diffusion
from ddo_fast.examples.protocol import LastEvaluated, stratified_split, write_results
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


def test_last_evaluated_keeps_the_final_step_ema_whatever_is_selected(tmp_path):
    """LastEvaluated (the presets' mle_control_final stage): in a run whose selection keeps the
    round's step 0, the wrapper passes the scores through and its .model is the final-step EMA,
    the weights a run with select_best_by="last" returns, not the selected model."""
    from ddo_fast import TrainConfig, train
    from ddo_fast.examples.toy2d import EDMMLP, sample_data

    torch.manual_seed(0)
    model, data = EDMMLP(hidden=16), sample_data(64, torch.Generator().manual_seed(0))
    base = dict(alpha=1.0, beta=1.0, lr=1e-2, batch_size=8, steps_per_round=4, rounds=1)
    cfg = TrainConfig(**base, fake_samples_per_round=8, ema=0.5, eval_every=2, device="cpu")
    scores: list[float] = []

    def falling(m: torch.nn.Module) -> dict[str, float]:  # the first eval (step 0) is the best
        scores.append(-len(scores))
        return {"score": scores[-1]}

    kept = LastEvaluated(falling)
    assert kept.model is None
    control = MLEControl(EDMDenoiser(sigma_data=1.0, steps=4))
    sel_cfg = cfg.replace(out_dir=str(tmp_path / "sel"), select_best_by="max:score")
    sel = train(copy.deepcopy(model), data, adapter=control, config=sel_cfg, eval_fn=kept)
    last_cfg = cfg.replace(out_dir=str(tmp_path / "last"), select_best_by="last")
    last = train(copy.deepcopy(model), data, adapter=control, config=last_cfg, eval_fn=falling)
    assert sel.metrics[-1]["best_step_in_round"] == 0 and sel.metrics[-1]["score"] == 0
    final, picked, want = (m.state_dict() for m in (kept.model, sel.model, last.model))
    assert final.keys() == want.keys() and all(torch.equal(final[k], want[k]) for k in want)
    assert not all(torch.equal(picked[k], want[k]) for k in want)


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
    got, std = digits.kernel_inception_distance(a, b, subsets=1, size=7)
    assert got == pytest.approx(xx + yy - 2 * xy, rel=1e-10) and std == 0.0
    same = rng.normal(size=(4000, 3))
    mean, std = digits.kernel_inception_distance(same[:2000], same[2000:], 10, 500)
    assert abs(mean) < 0.05 and 0.0 < std < 0.1
    assert digits.kernel_inception_distance(a, b + 2.0, 1, 7)[0] > 1.0


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
    """Samples that are train images are all memorised, uniform noise never; the threshold is
    the 5th percentile of the held-out images' nearest-train distances (numpy brute force)."""
    split = digits.split_for(0)
    clf = digits.DigitClassifier().eval().requires_grad_(False)
    m = digits.DigitsMetrics(split, clf, seed=0)
    held, train = split.x_held.double().numpy(), split.x_train.double().numpy()
    sq = (held**2).sum(1)[:, None] + (train**2).sum(1)[None, :] - 2 * held @ train.T
    nn_dist = np.sqrt(np.clip(sq, 0, None)).min(1)
    assert m.memo_threshold == pytest.approx(np.quantile(nn_dist, 0.05), rel=1e-9)
    labels = split.y_train[:400]
    copies = m(split.x_train[:400], labels)
    assert copies["memorised"] == 1.0
    fresh = m(torch.rand(400, 64) * 2 - 1, labels)
    assert fresh["memorised"] == 0.0 and np.isfinite(fresh["kid"])


# ------------------------------------------------------------- floor, selection and gains
def test_floor_and_selection_use_the_right_images():
    """Floor = the unseen slice (disjoint from the classifier's fit slice) against held-out;
    selection = FD against the train part (train images score ~0 there, held-out ones do not);
    a stage's fd_matched uses chunks of the floor's size."""
    split = digits.split_for(1)
    fit, unseen = set(split.fit_idx.tolist()), set(split.unseen_idx.tolist())
    assert not fit & unseen and fit | unseen == set(range(len(split.x_train)))
    assert len(unseen) == pytest.approx(0.2 * len(split.x_train), abs=10)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        clf = digits.DigitClassifier().eval().requires_grad_(False)
    m = digits.DigitsMetrics(split, clf, seed=1)
    with torch.no_grad():
        f_unseen = clf.features(split.x_train[split.unseen_idx]).double().numpy()
        f_held = clf.features(split.x_held).double().numpy()
    assert m.floor()["fd"] == pytest.approx(digits.frechet_distance(f_unseen, f_held), rel=1e-9)
    assert m.select(split.x_train)["fd"] < 1e-6
    assert m.select(split.x_held)["fd"] > 1e-3
    k = len(unseen)
    x = split.x_train[: 2 * k + 5]
    got = m(x, split.y_train[: 2 * k + 5])
    with torch.no_grad():
        f = clf.features(x).double().numpy()
    want = [digits.frechet_distance(f[i * k : (i + 1) * k], f_held) for i in range(2)]
    assert got["fd_matched"] == pytest.approx(np.mean(want), rel=1e-9)
    with pytest.raises(ValueError, match="floor"):
        m(x[: k - 1], split.y_train[: k - 1])


def test_gains_on_hand_numbers():
    run = {
        "baseline": {"fd_excess": 2.0, "recall": 0.80, "fd": 4.0},
        "mle_control": {"fd_excess": 1.6, "recall": 0.82, "fd": 3.6},
        "ddo": {"fd_excess": 0.8, "recall": 0.77, "fd": 2.8},
    }
    g = digits.gains(run)
    assert g["excess_vs_baseline"] == pytest.approx(-0.6)
    assert g["excess_vs_control"] == pytest.approx(-0.5)
    assert g["excess_vs_better"] == pytest.approx(-0.5)
    assert g["recall_vs_baseline"] == pytest.approx(-0.03)
    assert g["control_fd_change"] == pytest.approx(-0.1)
    assert "control_final_fd_change" not in g
    run["mle_control_final"] = {"fd": 5.0}
    run["baseline"]["fd_excess"] = 1.0  # now the baseline is the better one
    g = digits.gains(run)
    assert g["control_final_fd_change"] == pytest.approx(0.25)
    assert g["excess_vs_better"] == pytest.approx(-0.2)


@pytest.mark.slow
def test_run_seed_trains_on_the_train_part_with_identical_configs(tmp_path, monkeypatch):
    """ddo_fast.train (as digits.py calls it) replaced by a recorder in a tiny 1-seed
    digits-diffusion run: both calls get rows of the train part only, DDO's and the control's
    TrainConfigs differ only in out_dir, the control's adapter wraps DDO's, eval_fn scores
    with the train-part selection (never the held-out metrics), and the classifier is fit on
    its fit slice only."""
    import ddo_fast.training as training
    from ddo_fast.training.loop import TrainResult

    calls, spy = [], {"select": 0, "held": 0}
    real_select, real_call = digits.DigitsMetrics.select, digits.DigitsMetrics.__call__
    real_clf = digits.train_classifier

    def select(self, samples):
        spy["select"] += 1
        return real_select(self, samples)

    def held(self, samples, labels):
        spy["held"] += 1
        return real_call(self, samples, labels)

    def classifier(x, y, path, seed, steps=3000):
        spy["clf_x"] = x.clone()
        return real_clf(x, y, path, seed, steps)

    def fake_train(model, data, *, adapter, config, eval_fn):
        before = dict(spy)
        score = eval_fn(model)
        assert spy["select"] == before["select"] + 1 and spy["held"] == before["held"]
        calls.append({"data": data, "config": config, "adapter": adapter, "score": score})
        return TrainResult(model, [{"best_step_in_round": 0}], Path(config.out_dir))

    monkeypatch.setattr(training, "train", fake_train)
    monkeypatch.setattr(digits.DigitsMetrics, "select", select)
    monkeypatch.setattr(digits.DigitsMetrics, "__call__", held)
    monkeypatch.setattr(digits, "train_classifier", classifier)
    res = digits_diffusion.run(
        tmp_path,
        pretrain_steps=5,
        sample_steps=2,
        seeds=[2],
        eval_every=0,
        eval_samples=300,
        classifier_steps=20,
        plot=False,
    )
    split = digits.split_for(2)
    train_rows = {tuple(r) for r in split.x_train.tolist()}
    assert len(calls) == 2
    for c in calls:
        x, y = c["data"]
        assert len(x) == len(y) <= len(split.x_train)
        assert {tuple(r) for r in x.tolist()} <= train_rows
    assert torch.equal(spy["clf_x"], split.x_train[split.fit_idx])
    ddo, ctrl = (asdict(c["config"]) for c in calls)
    assert ddo.pop("out_dir") != ctrl.pop("out_dir") and ddo == ctrl
    assert isinstance(calls[1]["adapter"], MLEControl) and not isinstance(
        calls[0]["adapter"], MLEControl
    )
    assert calls[1]["adapter"].adapter is calls[0]["adapter"]
    run = res["runs"][0]
    assert run["config"]["ddo_out_dir"] == calls[0]["config"].out_dir
    assert set(run["gain"]) >= {"control_fd_change", "control_final_fd_change"}
