"""Shared parts of the handwritten-digits presets: data, feature classifier, Frechet distance.

Data: scikit-learn's ``load_digits`` (1,797 8x8 grey-scale digits, 10 classes, shipped inside
the wheel; ``pip install ddo_fast[examples]``). Metric, computed the same way before and after
DDO: the Frechet distance between 1,800 class-balanced generated samples and the data, in the
128-d feature space of a small digit classifier trained here with a fixed seed (its held-out
accuracy is printed), plus the FD in raw pixel space and the classifier's accuracy on the
generated samples of each class.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..training.data import generator

EVAL_SAMPLES = 1800  # 180 per class: the class balance the paper stresses


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
    x: torch.Tensor, y: torch.Tensor, out: Path, seed: int = 0, steps: int = 3000
) -> DigitClassifier:
    """Trained once with a fixed seed on 80 % of the data (cached in ``out``); prints its
    accuracy on the other 20 %."""
    with torch.random.fork_rng():  # the same weights whatever ran before, no side effects
        torch.manual_seed(seed)
        net = DigitClassifier()
    path = out / f"classifier-v2-{seed}-{steps}.pt"
    g = generator(seed, "classifier")
    perm = torch.randperm(len(x), generator=g)
    cut = int(0.8 * len(x))
    tr, te = perm[:cut], perm[cut:]
    if path.exists():
        net.load_state_dict(torch.load(path, weights_only=True))
    else:
        opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-4)
        for _ in range(steps):
            idx = tr[torch.randint(len(tr), (128,), generator=g)]
            noisy = x[idx] + 0.05 * torch.randn(len(idx), 64, generator=g)  # mild robustness
            loss = nn.functional.cross_entropy(net(noisy), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        out.mkdir(parents=True, exist_ok=True)
        torch.save(net.state_dict(), path)
    net.eval().requires_grad_(False)
    acc = (net(x[te]).argmax(1) == y[te]).float().mean().item()
    print(f"feature classifier: held-out accuracy {100 * acc:.1f}% ({len(te)} digits)")
    return net


class Evaluator:
    """Feature FD, pixel FD and class accuracy of class-balanced samples from a model."""

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        classifier: DigitClassifier,
        generate: Callable[[nn.Module, torch.Tensor, torch.Generator], torch.Tensor],
        seed: int,
    ) -> None:
        self.x, self.y, self.clf, self.generate, self.seed = x, y, classifier, generate, seed
        with torch.no_grad():
            self.data_feats = classifier.features(x).numpy()
        self.labels = torch.arange(EVAL_SAMPLES) % 10

    @torch.no_grad()
    def __call__(self, model: nn.Module, purpose: str = "select") -> dict[str, float]:
        t0 = time.time()
        samples = self.generate(model, self.labels, generator(self.seed, purpose)).clamp(-1, 1)
        feats = self.clf.features(samples).numpy()
        pred = self.clf(samples).argmax(1)
        per_class = [(pred[self.labels == c] == c).float().mean().item() for c in range(10)]
        return {
            "fd": frechet_distance(feats, self.data_feats),
            "pixel_fd": frechet_distance(samples.reshape(len(samples), 64).numpy(), self.x.numpy()),
            "class_acc": float(np.mean(per_class)),
            "min_class_acc": float(np.min(per_class)),
            "eval_seconds": time.time() - t0,
        }

    def samples(self, model: nn.Module, purpose: str = "report") -> torch.Tensor:
        return self.generate(model, self.labels, generator(self.seed, purpose)).clamp(-1, 1)


def write_report(
    out: Path, title: str, before: dict, rounds: list[dict], after: dict, extra: dict
) -> str:
    """Results table (markdown) per round; returns the text."""
    head = (
        "| stage | feature FD | pixel FD | class acc | min class acc | wall s |\n"
        "|---|---|---|---|---|---|"
    )
    rows = [
        f"| pretrained (report seed) | {before['fd']:.3f} | {before['pixel_fd']:.3f} | "
        f"{100 * before['class_acc']:.1f}% | {100 * before['min_class_acc']:.1f}% | |"
    ]
    for r in rounds:
        rows.append(
            f"| round {r['round'] + 1}, best step {r['best_step_in_round']} (selection "
            f"seed) | {r['fd']:.3f} | {r['pixel_fd']:.3f} | {100 * r['class_acc']:.1f}% | "
            f"{100 * r['min_class_acc']:.1f}% | {r['seconds']:.0f} |"
        )
    rows.append(
        f"| after DDO (report seed) | {after['fd']:.3f} | {after['pixel_fd']:.3f} | "
        f"{100 * after['class_acc']:.1f}% | {100 * after['min_class_acc']:.1f}% | |"
    )
    change = 100 * (after["fd"] - before["fd"]) / before["fd"]
    lines = [
        f"# {title}",
        "",
        head,
        *rows,
        "",
        f"Feature FD change (report seed): {change:+.1f}%",
        "",
    ]
    lines += [f"- {k}: {v}" for k, v in extra.items()]
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    print(text)
    return text


def run_ddo(
    out: Path,
    title: str,
    model: nn.Module,
    data,
    adapter,
    cfg,
    evaluate: Evaluator,
    t0: float,
    plot: bool,
    extra: dict | None = None,
) -> dict:
    """The part both presets share: evaluate the pre-trained model, run DDO, evaluate again
    (on report-seed samples the selection never saw), write results.md and samples.png into
    ``cfg.out_dir``."""
    from ..training import train

    run_dir = Path(cfg.out_dir)
    before_x = evaluate.samples(model)
    before = evaluate(model, "report")
    print("pretrained: " + ", ".join(f"{k}={v:.4f}" for k, v in before.items()))
    t1 = time.time()
    result = train(model, data, adapter=adapter, config=cfg, eval_fn=evaluate)
    after_x = evaluate.samples(result.model)
    after = evaluate(result.model, "report")
    keys = (
        "alpha",
        "beta",
        "lr",
        "batch_size",
        "steps_per_round",
        "rounds",
        "fake_samples_per_round",
        "ema",
    )
    info = {
        "config": {k: getattr(cfg, k) for k in keys},
        **(extra or {}),
        "DDO seconds": round(time.time() - t1),
        "total seconds": round(time.time() - t0),
    }
    write_report(run_dir, title, before, result.metrics, after, info)
    if plot:
        save_grid(run_dir / "samples.png", before_x, after_x)
    return {"before": before, "after": after, "rounds": result.metrics, "out": run_dir}


def mle_control(
    model: nn.Module,
    cfg,
    evaluate: Evaluator,
    fit_more: Callable[[nn.Module, int, int, int, float], nn.Module],
) -> dict[str, float]:
    """The control run: the DDO run's budget (steps_per_round * rounds steps of 2 * batch_size
    samples, its real + fake rows) spent on more likelihood training at the DDO lr, constant,
    with seed + 1. ``fit_more(model, steps, seed, batch, lr)`` trains a copy of ``model``."""
    ctrl = fit_more(
        copy.deepcopy(model).train(),
        cfg.steps_per_round * cfg.rounds,
        cfg.seed + 1,
        2 * cfg.batch_size,
        cfg.lr,
    )
    return {"MLE control feature FD (report seed)": round(evaluate(ctrl, "report")["fd"], 3)}


def save_grid(path: Path, before: torch.Tensor, after: torch.Tensor, per_class: int = 8) -> None:
    """PNG: per class, `per_class` samples before (left block) and after (right block)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no picture")
        return
    labels = torch.arange(EVAL_SAMPLES) % 10

    def block(s: torch.Tensor) -> np.ndarray:
        rows = []
        for c in range(10):
            imgs = s[labels == c][:per_class].reshape(-1, 8, 8)
            rows.append(np.concatenate([np.pad(i.numpy(), 1, constant_values=-1) for i in imgs], 1))
        return np.concatenate(rows, 0)

    fig, axes = plt.subplots(1, 2, figsize=(9, 6))
    for ax, (title, s) in zip(axes, [("pretrained", before), ("after DDO", after)], strict=True):
        ax.imshow(block(s), cmap="gray_r", vmin=-1, vmax=1)
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")
