"""The handwritten-digits protocol shared by the digits presets (issue 11).

Data: scikit-learn's ``load_digits`` (1,797 8x8 grey-scale digits, 10 classes, shipped inside
the wheel; ``pip install ddo_fast[examples]``), pixels scaled to [-1, 1].

Per seed s: a stratified 80/20 split (:func:`~ddo_fast.examples.protocol.stratified_split`,
seed s) into a train part (1,438) and a held-out part (359). Pre-training, DDO and the MLE
control see the whole train part. The feature classifier sees only its *fit slice*: a second
stratified split of the train part (seed s, 80 %: 1,151 images); the rest of the train part is
the *unseen slice* (287 real images that neither the classifier nor the held-out part contains).
Every reported metric compares 1,800 class-balanced samples (180 per class, the *report* noise
seed) with the **held-out** part (:class:`DigitsMetrics`). Checkpoint selection inside the runs
(``eval_fn``) uses the feature FD of *selection*-seed samples against the **train part**, never
the held-out part. The stages of a seed:

* ``data_floor``: the unseen slice scored as if it were samples: two sets of real images the
  classifier never saw (n_u = 287 vs 359), i.e. what a perfect model would score at that size.
  The FD excess of a stage is ``fd_matched - floor fd``, where ``fd_matched`` is the mean FD of
  the stage's samples cut into consecutive chunks of n_u against the held-out part, so both
  terms carry the same finite-sample bias (FD's bias grows like 1/n of each set);
  ``kid_excess = kid - floor kid``, KID computed the same way on both (a class-balanced set of
  n_u against random n_u-subsets of held-out: such sets score below 0, so 0 is not the mark);
* ``baseline`` (the pre-trained EMA weights) and ``baseline_raw`` (its raw weights, the
  one-time raw-vs-EMA comparison);
* ``mle_control_final``: the control's last-step EMA (not its selected checkpoint, which may be
  step 0), the stricter converged-baseline check;
* ``ddo``: :func:`ddo_fast.train` with the preset's TrainConfig;
* ``mle_control``: the same call with :class:`~ddo_fast.adapters.MLEControl` and the exact same
  TrainConfig (steps, batch, optimizer, lr, EMA, selection); it is also the converged-baseline
  check (continuing MLE for the DDO budget must change held-out FD by < 5 %);
* ``gain``: DDO's relative change of FD excess against the baseline, the control and the
  better of the two, and its recall change.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .._backend import resolve_backend
from ..adapters import Adapter, MLEControl
from ..training import TrainConfig
from ..training.data import generator
from .protocol import LastEvaluated, stratified_split, write_results

EVAL_SAMPLES = 1800  # 180 per class: the class balance the paper stresses
CLASSIFIER_FIT_FRAC = 0.8  # share of the train part the feature classifier trains on
KID_SUBSETS = 100
PR_K = 3  # Kynkaanniemi et al. 2019
MEMORISED_QUANTILE = 0.05


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels in [0, 16] as float [1797, 64], labels int64 [1797]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise SystemExit(
            "the digits presets need scikit-learn: pip install 'ddo_fast[examples]'"
        ) from exc
    d = load_digits()
    return torch.tensor(d.data, dtype=torch.float32), torch.tensor(d.target, dtype=torch.long)


def load_scaled() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pixels in [0, 16], the same scaled to [-1, 1], labels)."""
    pixels, y = load_digits_tensors()
    return pixels, pixels / 8.0 - 1.0, y


# ---------------------------------------------------------------------------------- metrics
def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FD between Gaussians fitted to rows of a and b:
    |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), in float64 via eigh."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return gaussian_frechet(mu_a, s_a, mu_b, s_b)


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def gaussian_frechet(mu_a, s_a, mu_b, s_b) -> float:
    root_a = _psd_sqrt(s_a)
    cross = _psd_sqrt(root_a @ s_b @ root_a)
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(cross))


def kernel_inception_distance(
    a: np.ndarray, b: np.ndarray, subsets: int = KID_SUBSETS, size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """KID (Binkowski et al. 2018, Sec. 3): the unbiased MMD^2 with the polynomial kernel
    k(x, y) = (x.y / d + 1)^3, averaged over ``subsets`` random subsets of m = min(size, |a|,
    |b|) rows of each set:

        MMD^2_u = sum_{i!=j} k(a_i, a_j) / (m(m-1)) + sum_{i!=j} k(b_i, b_j) / (m(m-1))
                  - 2 sum_{i,j} k(a_i, b_j) / m^2

    float64. Returns (mean, std over the subsets). Unbiased for i.i.d. draws only: sets that
    are class-stratified or class-balanced (less class-count variance than i.i.d.) score below
    zero, so compare a KID with the data floor's (``kid_excess``), not with 0."""
    v = np.asarray(kid_values(a, b, subsets, size, np.random.default_rng(seed)))
    return float(v.mean()), float(v.std(ddof=1)) if subsets > 1 else 0.0


def kid_values(
    a: np.ndarray, b: np.ndarray, subsets: int, size: int, rng: np.random.Generator
) -> list[float]:
    """The ``subsets`` per-subset MMD^2_u values of :func:`kernel_inception_distance`."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d, m = a.shape[1], min(size, len(a), len(b))
    if m < 2:
        raise ValueError("kernel_inception_distance: need at least 2 rows in each set")
    values = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx, kyy, kxy = ((p @ q.T / d + 1) ** 3 for p, q in ((x, x), (y, y), (x, y)))
        off = m * (m - 1)
        within = (kxx.sum() - np.trace(kxx)) / off + (kyy.sum() - np.trace(kyy)) / off
        values.append(float(within - 2 * kxy.mean()))
    return values


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = PR_K) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019, Eq. 1-2): each set's manifold is
    the union of balls around its points with radius the distance to the point's k-th nearest
    neighbour in the same set; precision = share of fakes inside the real manifold, recall =
    share of reals inside the fake manifold. float64 Euclidean distances."""
    real_t = torch.as_tensor(np.asarray(real, np.float64))
    fake_t = torch.as_tensor(np.asarray(fake, np.float64))
    if min(len(real_t), len(fake_t)) <= k:
        raise ValueError(f"precision_recall: each set needs more than k={k} rows")

    def radii(x: torch.Tensor) -> torch.Tensor:
        # k+1-th smallest: the point itself is its own nearest neighbour at distance 0
        return torch.cdist(x, x).kthvalue(k + 1, dim=1).values

    cross = torch.cdist(fake_t, real_t)  # [fake, real]
    precision = (cross <= radii(real_t)[None, :]).any(1).double().mean().item()
    recall = (cross <= radii(fake_t)[:, None]).any(0).double().mean().item()
    return precision, recall


def nearest_distance(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """[len(x)] float64 Euclidean distance of each row of ``x`` to its nearest row of ``ref``."""
    return torch.cdist(x.double().flatten(1), ref.double().flatten(1)).min(1).values


class DigitClassifier(nn.Module):
    """64 -> 256 -> 128 (features) -> 10, on pixels scaled to [-1, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU())
        self.head = nn.Linear(128, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.reshape(len(x), 64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_classifier(
    x: torch.Tensor, y: torch.Tensor, path: Path, seed: int, steps: int = 3000
) -> DigitClassifier:
    """The feature classifier, trained on ``x``, ``y`` only (the split's train part) with a
    fixed seed; cached at ``path``."""
    with torch.random.fork_rng():  # the same weights whatever ran before, no side effects
        torch.manual_seed(seed)
        net = DigitClassifier()
    if path.exists():
        net.load_state_dict(torch.load(path, weights_only=True))
    else:
        g = generator(seed, "classifier")
        opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-4)
        for _ in range(steps):
            idx = torch.randint(len(x), (128,), generator=g)
            noisy = x[idx] + 0.05 * torch.randn(len(idx), 64, generator=g)  # mild robustness
            loss = nn.functional.cross_entropy(net(noisy), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(net.state_dict(), path)
    return net.eval().requires_grad_(False)


@dataclass
class Split:
    """One seed's data: the train part (what every model sees) and the held-out part;
    ``fit_idx`` / ``unseen_idx`` index the train part: the classifier's fit slice and the rest
    (the unseen slice of the data floor)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_held: torch.Tensor
    y_held: torch.Tensor
    train_idx: torch.Tensor
    fit_idx: torch.Tensor
    unseen_idx: torch.Tensor


class DigitsMetrics:
    """Every reported metric of samples against the held-out part (``__call__``), the data
    floor (:meth:`floor`: the unseen slice against the held-out part), and the selection score
    against the train part (:meth:`select`). ``clf`` must not have trained on the unseen slice
    (:func:`run_seed` fits it on ``split.fit_idx`` only)."""

    def __init__(
        self, split: Split, clf: DigitClassifier, seed: int, samples: int = EVAL_SAMPLES
    ) -> None:
        self.split, self.clf, self.seed = split, clf, seed
        self.x_unseen = split.x_train[split.unseen_idx]
        with torch.no_grad():
            self.train_feats = clf.features(split.x_train).double().numpy()
            self.held_feats = clf.features(split.x_held).double().numpy()
            self.unseen_feats = clf.features(self.x_unseen).double().numpy()
        self.n_unseen = len(self.unseen_feats)  # the floor's sample size, n_u
        # memorisation threshold: 5th percentile of held-out -> train nearest-neighbour distances
        held_nn = nearest_distance(split.x_held, split.x_train)
        self.memo_threshold = float(torch.quantile(held_nn, MEMORISED_QUANTILE))
        self.labels = torch.arange(samples) % 10  # class-balanced

    @torch.no_grad()
    def __call__(self, samples: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """fd (all samples vs held-out), fd_matched (mean FD of the consecutive chunks of
        n_u samples vs held-out: the floor's set sizes), kid and kid_std (each chunk - class-
        balanced, like the class-proportional unseen slice - against random n_u-subsets of
        held-out, KID_SUBSETS in all: the floor's construction), pixel_fd, precision, recall
        (classifier features, k = 3, the first |held-out| samples - class-balanced - against
        the held-out part, equal set sizes as the paper's), class_acc (mean over classes of
        the classifier's accuracy on the samples of that class), min_class_acc, memorised
        (share of samples closer to their nearest train image, in pixels, than the
        threshold)."""
        samples = samples.reshape(len(samples), 64).clamp(-1, 1)
        feats = self.clf.features(samples).double().numpy()
        pred = self.clf(samples).argmax(1)
        per_class = [(pred[labels == c] == c).float().mean().item() for c in range(10)]
        n = len(self.held_feats)
        precision, recall = precision_recall(self.held_feats, feats[:n])
        memorised = nearest_distance(samples, self.split.x_train) < self.memo_threshold
        k = self.n_unseen
        if len(feats) < k:
            raise ValueError(f"DigitsMetrics: need at least {k} samples (the floor's size)")
        chunks = [feats[i : i + k] for i in range(0, len(feats) - k + 1, k)]
        rng, per_chunk = np.random.default_rng(self.seed), -(-KID_SUBSETS // len(chunks))
        kids = np.concatenate([kid_values(c, self.held_feats, per_chunk, k, rng) for c in chunks])
        kid, kid_std = float(kids.mean()), float(kids.std(ddof=1))
        return {
            "fd": frechet_distance(feats, self.held_feats),
            "fd_matched": float(np.mean([frechet_distance(c, self.held_feats) for c in chunks])),
            "kid": kid,
            "kid_std": kid_std,
            "pixel_fd": frechet_distance(samples.numpy(), self.split.x_held.numpy()),
            "precision": precision,
            "recall": recall,
            "class_acc": float(np.mean(per_class)),
            "min_class_acc": float(np.min(per_class)),
            "memorised": memorised.double().mean().item(),
        }

    def floor(self) -> dict[str, float]:
        """The unseen slice (n_u real images, never seen by the classifier) scored as samples
        against the held-out part: fd = FD(unseen, held-out) in classifier features (compare
        with a stage's ``fd_matched``: n_u vs held-out too), kid / kid_std: the whole unseen
        slice against KID_SUBSETS random n_u-subsets of held-out (as a stage's chunks);
        pixel_fd = FD(unseen, held-out) in pixels; memorised: the held-out images' own share
        (the reference, ~5 % by construction)."""
        s = self.split
        kid, kid_std = kernel_inception_distance(
            self.unseen_feats, self.held_feats, size=self.n_unseen, seed=self.seed
        )
        floor = {
            "fd": frechet_distance(self.unseen_feats, self.held_feats),
            "pixel_fd": frechet_distance(self.x_unseen.numpy(), s.x_held.numpy()),
            "kid": kid,
            "kid_std": kid_std,
        }
        held_nn = nearest_distance(s.x_held, s.x_train)
        floor["memorised"] = (held_nn < self.memo_threshold).double().mean().item()
        return floor

    @torch.no_grad()
    def select(self, samples: torch.Tensor) -> dict[str, float]:
        """Selection score: feature FD of (selection-seed) samples against the TRAIN part."""
        feats = self.clf.features(samples.reshape(len(samples), 64).clamp(-1, 1)).numpy()
        return {"fd": frechet_distance(feats, self.train_feats)}


# --------------------------------------------------------------------------------- protocol
Generate = Callable[[nn.Module, torch.Tensor, torch.Generator], torch.Tensor]


@dataclass
class SeedSetup:
    """What a preset gives the protocol for one seed: the pre-trained EMA and raw models, the
    adapter, the training data (the train part in the model's format) and ``generate(model,
    labels, generator) -> pixels [n, 64] in [-1, 1]``."""

    model: nn.Module
    raw: nn.Module
    adapter: Adapter
    data: tuple[torch.Tensor, torch.Tensor]
    generate: Generate
    info: dict


def split_for(seed: int) -> Split:
    _, x, y = load_scaled()
    tr, ho = stratified_split(y, seed, 0.8)
    fit, unseen = stratified_split(y[tr], seed, CLASSIFIER_FIT_FRAC)
    return Split(x[tr], y[tr], x[ho], y[ho], tr, fit, unseen)


EMA_BASELINE_NOTES = {  # results.json notes of the presets whose baseline is the pre-training EMA
    "selection metric": "feature FD of selection-seed samples vs the seed's train part",
    "baseline": "EMA (0.999) of the pre-training; baseline_raw: its raw weights",
}


def run_protocol(
    out: Path,
    title: str,
    cfg: TrainConfig,
    seeds: list[int],
    setup: Callable[[Split, int, Path], SeedSetup],
    *,
    plot: bool = False,
    control: bool = True,
    notes: dict | None = None,
    eval_samples: int = EVAL_SAMPLES,
    classifier_steps: int = 3000,
) -> dict:
    """The issue-11 protocol for each seed in ``seeds`` (caches in ``out/cache``, runs in
    ``cfg.out_dir/seed-S/{ddo,control}``); writes results.json / results.md (in ``out`` for the
    default run folder ``out/ddo``, else in ``cfg.out_dir``), prints the table, returns the
    results dict."""
    if not seeds or not all(isinstance(s, int) for s in seeds):
        raise ValueError(f"seeds={seeds!r}: must be a non-empty list of integers")
    out = Path(out)
    run_root = Path(cfg.out_dir or out / "ddo")
    dest = out if run_root == out / "ddo" else run_root
    runs = []
    for seed in seeds:
        seed_cfg = cfg.replace(seed=seed)
        sizes = (eval_samples, classifier_steps)
        runs.append(run_seed(out, run_root, title, seed_cfg, setup, plot, control, sizes))
        plot = False  # one picture, of the first seed
    results = write_results(dest, title, runs, notes)
    print((dest / "results.md").read_text())
    return results


def _evaluate(metrics: DigitsMetrics, generate: Generate, model: nn.Module, seed: int, floor):
    labels = metrics.labels
    samples = generate(model, labels, generator(seed, "report")).reshape(len(labels), 64)
    m = metrics(samples, labels)
    m["fd_excess"] = m["fd_matched"] - floor["fd"]
    m["kid_excess"] = m["kid"] - floor["kid"]
    return m, samples


def run_seed(
    out: Path,
    run_root: Path,
    title: str,
    cfg: TrainConfig,
    setup: Callable[[Split, int, Path], SeedSetup],
    plot: bool,
    control: bool,
    sizes: tuple[int, int] = (EVAL_SAMPLES, 3000),
) -> dict:
    """One seed of :func:`run_protocol`: split, classifier, pre-training (cached), DDO, the MLE
    control, every metric on the held-out part."""
    from ..training import train

    t0, seed = time.time(), cfg.seed
    split = split_for(seed)
    cache = out / "cache"
    samples, steps = sizes  # eval samples, classifier steps
    fit = split.fit_idx  # the classifier never sees the unseen slice (the data floor's)
    clf_path = cache / f"classifier-{seed}-{steps}-fit{CLASSIFIER_FIT_FRAC}.pt"
    clf = train_classifier(split.x_train[fit], split.y_train[fit], clf_path, seed, steps)
    with torch.no_grad():
        acc = (clf(split.x_held).argmax(1) == split.y_held).float().mean().item()
    print(f"seed {seed}: classifier held-out accuracy {100 * acc:.1f}% ({len(split.y_held)})")
    metrics = DigitsMetrics(split, clf, seed, samples)
    s = setup(split, seed, cache)
    floor = metrics.floor()

    def select(model: nn.Module) -> dict[str, float]:
        return metrics.select(s.generate(model, metrics.labels, generator(seed, "select")))

    run: dict = {"seed": seed, "data_floor": floor}
    run["baseline"], base_x = _evaluate(metrics, s.generate, s.model, seed, floor)
    run["baseline_raw"], _ = _evaluate(metrics, s.generate, s.raw, seed, floor)
    print(f"seed {seed}: floor {_line(floor)}\n  baseline {_line(run['baseline'])}")
    t1 = time.time()
    dirs = {k: str(run_root / f"seed-{seed}" / k) for k in ("ddo", "control")}
    res = train(
        copy.deepcopy(s.model),
        s.data,
        adapter=s.adapter,
        config=cfg.replace(out_dir=dirs["ddo"]),
        eval_fn=select,
    )
    ddo_seconds = time.time() - t1
    run["ddo"], ddo_x = _evaluate(metrics, s.generate, res.model, seed, floor)
    run["ddo"]["best_step"] = res.metrics[-1]["best_step_in_round"]
    print(f"  ddo {_line(run['ddo'])}")
    if control:
        select_control = LastEvaluated(select)  # .model: the control's final-step EMA
        ctrl = train(
            copy.deepcopy(s.model),
            s.data,
            adapter=MLEControl(s.adapter),
            config=cfg.replace(out_dir=dirs["control"]),
            eval_fn=select_control,
        )
        run["mle_control"], _ = _evaluate(metrics, s.generate, ctrl.model, seed, floor)
        run["mle_control"]["best_step"] = ctrl.metrics[-1]["best_step_in_round"]
        run["mle_control_final"], _ = _evaluate(
            metrics, s.generate, select_control.model, seed, floor
        )
        print(f"  mle_control {_line(run['mle_control'])}")
        run["gain"] = gains(run)
        for key, what in (("control_fd_change", "selected"), ("control_final_fd_change", "final")):
            change = 100 * run["gain"][key]
            verdict = "PASS" if abs(change) < 5 else "FAIL: the baseline is not converged"
            print(
                f"  converged-baseline check ({what} control checkpoint): more MLE changes "
                f"held-out FD by {change:+.1f}% (< 5 %: {verdict})"
            )
    run["config"] = {
        **asdict(cfg),
        **s.info,
        "backend": resolve_backend(None, torch.device("cpu")),
        "torch": torch.__version__,
        "adapter": repr(s.adapter),
        "classifier": {
            "layers": "64-256-128-10 (features: the 128-d ReLU layer)",
            "steps": steps,
            "optimizer": "Adam lr 1e-3, weight decay 1e-4, batch 128, input noise 0.05",
            "fit_frac": CLASSIFIER_FIT_FRAC,
            "fit_images": len(split.fit_idx),
            "unseen_images": len(split.unseen_idx),
            "held_out_accuracy": acc,
        },
        "eval_samples": samples,
        "ddo_out_dir": dirs["ddo"],
        "control_out_dir": dirs["control"],
    }
    run["seconds"] = round(time.time() - t0, 1)
    run["ddo_seconds"] = round(ddo_seconds, 1)
    if plot:
        save_grid(out / "samples.png", base_x, ddo_x)
    return run


def gains(run: dict) -> dict[str, float]:
    """DDO's relative change of FD excess (negative = better) against the baseline, the
    control, and the better (lower excess) of the two; recall change against the baseline;
    the control's relative change of held-out FD against the baseline (the converged-baseline
    check), for its selected checkpoint and, when the run has ``mle_control_final``, for its
    final-step EMA."""
    b, c, d = run["baseline"], run["mle_control"], run["ddo"]
    better = min(b["fd_excess"], c["fd_excess"])
    out = {
        "excess_vs_baseline": d["fd_excess"] / b["fd_excess"] - 1,
        "excess_vs_control": d["fd_excess"] / c["fd_excess"] - 1,
        "excess_vs_better": d["fd_excess"] / better - 1,
        "recall_vs_baseline": d["recall"] - b["recall"],
        "control_fd_change": c["fd"] / b["fd"] - 1,
    }
    if "mle_control_final" in run:
        out["control_final_fd_change"] = run["mle_control_final"]["fd"] / b["fd"] - 1
    return out


def _line(m: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in m.items() if isinstance(v, float))


def save_grid(path: Path, before: torch.Tensor, after: torch.Tensor, per_class: int = 8) -> None:
    """PNG: per class, `per_class` samples before (left block) and after (right block)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no picture")
        return
    labels = torch.arange(len(before)) % 10

    def block(s: torch.Tensor) -> np.ndarray:
        rows = []
        for c in range(10):
            imgs = s[labels == c][:per_class].reshape(-1, 8, 8)
            rows.append(np.concatenate([np.pad(i.numpy(), 1, constant_values=-1) for i in imgs], 1))
        return np.concatenate(rows, 0)

    fig, axes = plt.subplots(1, 2, figsize=(9, 6))
    for ax, (title, s) in zip(axes, [("pretrained", before), ("after DDO", after)], strict=True):
        ax.imshow(block(s.clamp(-1, 1)), cmap="gray_r", vmin=-1, vmax=1)
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")
