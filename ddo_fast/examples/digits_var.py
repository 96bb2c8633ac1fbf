"""``ddo-fast train --preset digits-var``: DDO on a small next-scale (VAR) digit model without
classifier-free guidance, against the same model with its best guidance scale (the DDO paper's
VAR claim, Zheng et al. 2025, Table 3: guidance-free DDO beats the guided base model).

Per seed (the protocol of :mod:`ddo_fast.examples.digits`: stratified 80/20 split, everything
trained on the train part, every reported metric against the held-out part):

1. a :class:`~ddo_fast.models.MultiScaleQuantizer` (scales ``patch_nums``, a k-means codebook of
   ``vocab`` scalar codes) is fitted on the train images; the digits become L = sum pn^2 tokens;
2. a :class:`~ddo_fast.models.VARTransformer` is pre-trained by cross-entropy with the adapter
   drawing the null label for 10 % of rows (VAR's label dropout;
   :meth:`~ddo_fast.adapters.CausalAR.mle_loss`), cached;
3. stages: ``baseline`` (EMA weights, no guidance), ``baseline_raw``, ``baseline_cfg`` (the same
   model sampled with VAR's CFG ramp at the scale ``cfg`` chosen once on the *selection* seed
   by feature FD against that seed's train part), ``ddo`` (guidance-free DDO with
   :class:`~ddo_fast.adapters.VAR`, sampled without guidance), ``mle_control``
   (:class:`~ddo_fast.adapters.MLEControl`, the DDO run's exact TrainConfig), ``gain``.

Settings: the ``digits-var`` row of :data:`ddo_fast.examples.presets.PRESETS`.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from .. import adapters as A
from ..models import MultiScaleQuantizer, VARTransformer
from ..training import TrainConfig, train
from ..training.data import generator
from .digits import DigitsMetrics, Split, gains, split_for, train_classifier
from .digits_ar import pretrain
from .presets import preset_runner
from .pretrain import cached_pretrain_pair
from .protocol import write_results

NULL = 10  # the null class of 10 digit classes

run = preset_runner("digits-var")


def quantizer_tag(opts: dict, seed: int) -> str:
    """Names a seed's quantiser: codebook size, pyramid and seed (the k-means fit's inputs)."""
    return f"{opts['vocab']}-{'_'.join(map(str, opts['patch_nums']))}-{seed}"


def model_tag(opts: dict, seed: int) -> str:
    """Names a seed's pre-trained weights: the quantiser, the model's size and the pre-training
    (steps, lr). Every cache that depends on the weights (the CFG sweep) keys on it, so any
    option that changes them must appear here (``test_model_tag_covers_every_model_option``)."""
    size = f"{opts['dim']}-{opts['layers']}-{opts['heads']}"
    return f"var-{quantizer_tag(opts, seed)}-{size}-{opts['pretrain_steps']}-{opts['pretrain_lr']}"


class Seed:
    """One seed's split, metrics, quantiser, tokens and pre-trained (EMA, raw) models."""

    def __init__(self, seed: int, cache: Path, opts: dict) -> None:
        self.seed, self.start = seed, opts["start"]
        self.split: Split = split_for(seed)
        s = self.split
        # the classifier never sees the unseen slice that the data floor is made of (digits.py)
        fit = s.fit_idx
        clf_path = cache / f"classifier-{seed}-fit0.8.pt"
        clf = train_classifier(s.x_train[fit], s.y_train[fit], clf_path, seed)
        self.metrics = DigitsMetrics(s, clf, seed)
        self.floor = self.metrics.floor()
        pns, vocab = tuple(opts["patch_nums"]), opts["vocab"]
        qpath = cache / f"quantizer-{quantizer_tag(opts, seed)}.pt"
        if qpath.exists():
            q = MultiScaleQuantizer(torch.load(qpath, weights_only=True), pns)
        else:
            q = MultiScaleQuantizer.fit(s.x_train.view(-1, 1, 8, 8), vocab, pns, seed=seed)
            qpath.parent.mkdir(parents=True, exist_ok=True)
            torch.save(q.codebook, qpath)
        self.tokens = q.encode(s.x_train.view(-1, 1, 8, 8))
        self.adapter = make_adapter(opts)
        dim, layers, heads = opts["dim"], opts["layers"], opts["heads"]
        steps, lr = opts["pretrain_steps"], opts["pretrain_lr"]

        def make() -> VARTransformer:
            return VARTransformer(q, 10, dim=dim, layers=layers, heads=heads, label_dropout=0.0)

        self.model_tag = model_tag(opts, seed)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.ema, self.raw = cached_pretrain_pair(
                cache / f"pretrained-{self.model_tag}.pt",
                make,
                lambda m: pretrain(m, self.adapter, self.tokens, s.y_train, steps, seed, lr=lr),
            )

        # the baseline every later stage starts from: the raw or the EMA pre-trained weights
        self.model = self.raw if opts["start"] == "raw" else self.ema
        self.other = self.ema if opts["start"] == "raw" else self.raw

    def pixels(self, model: VARTransformer, purpose: str, cfg: float = 0.0) -> torch.Tensor:
        """Class-balanced samples [1800, 64] in [-1, 1] with this purpose's noise seed."""
        labels = self.metrics.labels
        tokens = model.sample(len(labels), labels, generator(self.seed, purpose), cfg=cfg)
        return model.quantizer.decode(tokens).reshape(len(labels), 64).clamp(-1, 1)

    def select(self, model: VARTransformer, cfg: float = 0.0) -> dict[str, float]:
        """Selection score: FD of selection-seed samples against the train part."""
        return self.metrics.select(self.pixels(model, "select", cfg))

    def stage(self, model: VARTransformer, cfg: float = 0.0) -> tuple[dict, torch.Tensor]:
        """Every reported metric of report-seed samples against the held-out part."""
        x = self.pixels(model, "report", cfg)
        m = self.metrics(x, self.metrics.labels)
        m["fd_excess"] = m["fd_matched"] - self.floor["fd"]  # size-matched, as in digits.py
        return m, x


def make_adapter(opts: dict) -> A.VAR:
    return A.VAR(patch_nums=tuple(opts["patch_nums"]), null_label=NULL, reencode=opts["reencode"])


def choose_cfg(seed: Seed, scales: list[float], cache: Path) -> tuple[float, dict]:
    """The guidance scale > 0 with the lowest selection FD on the selection seed, and the
    sweep {scale: FD} (0 included, for reference); cached under the pre-trained model's tag
    (``seed.model_tag``: quantiser, seed, size, pre-training) and the weights used, so a sweep
    of another model is never reused."""
    tag = f"{seed.model_tag}-{seed.start}-{'_'.join(map(str, scales))}"
    path = cache / f"cfg-sweep-{tag}.json"
    if path.exists():
        sweep = {float(k): v for k, v in json.loads(path.read_text()).items()}
    else:
        sweep = {float(s): seed.select(seed.model, s)["fd"] for s in [0.0, *scales]}
        path.write_text(json.dumps(sweep))
    best = min((s for s in sweep if s > 0), key=lambda s: sweep[s])
    print(
        "CFG sweep (selection seed, FD vs train part): "
        + ", ".join(f"{s:g}: {v:.3f}" for s, v in sweep.items())
        + f" -> cfg {best:g}"
    )
    return best, sweep


def build(
    out: Path,
    cfg: TrainConfig,
    *,
    vocab: int,
    patch_nums: list[int],
    pretrain_steps: int,
    pretrain_lr: float,
    dim: int,
    layers: int,
    heads: int,
    start: str,
    reencode: bool,
    cfg_scales: list[float],
    selection_seed: int,
    seeds: list[int],
    control: bool,
    plot: bool,
) -> dict:
    opts = dict(
        vocab=vocab,
        patch_nums=patch_nums,
        pretrain_steps=pretrain_steps,
        pretrain_lr=pretrain_lr,
        dim=dim,
        layers=layers,
        heads=heads,
        start=start,
        reencode=reencode,
    )
    if start not in ("raw", "ema"):
        raise ValueError(f"start={start!r}: 'raw' or 'ema' (the pre-trained weights to start from)")
    out = Path(out)
    cache = out / "cache"
    run_root = Path(cfg.out_dir or out / "ddo")
    t0 = time.time()
    guidance, sweep = choose_cfg(Seed(selection_seed, cache, opts), cfg_scales, cache)
    notes = {
        "selection seed": selection_seed,
        "cfg sweep (selection seed, feature FD vs its train part)": sweep,
        "cfg": f"{guidance:g}, VAR's ramp t_k = cfg * k / (K - 1)",
        "baseline": f"the {start} pre-trained weights (EMA 0.999 or raw, chosen once on the "
        "selection seed); baseline_other: the other ones",
        "selection metric": "feature FD of selection-seed samples vs the seed's train part",
    }
    runs, pictures = [], None
    for seed in seeds:
        t1 = time.time()
        s = Seed(seed, cache, opts)
        r: dict = {"seed": seed, "data_floor": s.floor}
        r["baseline"], base_x = s.stage(s.model)
        r["baseline_other"], _ = s.stage(s.other)
        r["baseline_cfg"], cfg_x = s.stage(s.model, guidance)
        r["baseline_cfg"]["cfg"] = guidance
        print(
            f"seed {seed}: baseline fd {r['baseline']['fd']:.3f}, with cfg {guidance:g}: "
            f"{r['baseline_cfg']['fd']:.3f}, floor {s.floor['fd']:.3f}"
        )
        seed_cfg = cfg.replace(seed=seed)
        res = train(
            copy.deepcopy(s.model),
            (s.tokens, s.split.y_train),
            adapter=make_adapter(opts),
            config=seed_cfg.replace(out_dir=str(run_root / f"seed-{seed}" / "ddo")),
            eval_fn=s.select,
        )
        r["ddo"], ddo_x = s.stage(res.model)
        r["ddo"]["best_step"] = res.metrics[-1]["best_step_in_round"]
        print(f"seed {seed}: ddo fd {r['ddo']['fd']:.3f}")
        if control:
            ctrl = train(
                copy.deepcopy(s.model),
                (s.tokens, s.split.y_train),
                adapter=A.MLEControl(make_adapter(opts)),
                config=seed_cfg.replace(out_dir=str(run_root / f"seed-{seed}" / "control")),
                eval_fn=s.select,
            )
            r["mle_control"], _ = s.stage(ctrl.model)
            r["mle_control"]["best_step"] = ctrl.metrics[-1]["best_step_in_round"]
            r["gain"] = gains(r)
        b, d = r["baseline_cfg"], r["ddo"]
        r.setdefault("gain", {}).update(
            fd_vs_cfg=d["fd"] / b["fd"] - 1,
            recall_vs_cfg=d["recall"] - b["recall"],
            excess_vs_baseline=d["fd_excess"] / r["baseline"]["fd_excess"] - 1,
        )
        r["config"] = {**asdict(seed_cfg), **opts, "cfg": guidance}
        r["seconds"] = round(time.time() - t1, 1)
        runs.append(r)
        # after every seed, so that a run cut short keeps the seeds it finished
        write_results(out, "digits-var", runs, {**notes, "seconds so far": round(time.time() - t0)})
        if plot and pictures is None:
            pictures = [
                (f"baseline, no CFG (seed {seed})", base_x),
                (f"baseline, CFG {guidance:g}", cfg_x),
                ("DDO, no CFG", ddo_x),
            ]
            save_panels(out / "samples.png", pictures)
    notes["total seconds"] = round(time.time() - t0, 1)
    results = write_results(out, "digits-var", runs, notes)
    print((out / "results.md").read_text())
    return results


def save_panels(path: Path, panels: list[tuple[str, torch.Tensor]], per_class: int = 8) -> None:
    """PNG of side-by-side blocks, one per (title, samples [n, 64], labels i % 10)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no picture")
        return

    def block(s: torch.Tensor) -> np.ndarray:
        labels = torch.arange(len(s)) % 10
        rows = []
        for c in range(10):
            imgs = s[labels == c][:per_class].reshape(-1, 8, 8)
            rows.append(np.concatenate([np.pad(i.numpy(), 1, constant_values=-1) for i in imgs], 1))
        return np.concatenate(rows, 0)

    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 6))
    for ax, (title, s) in zip(axes, panels, strict=True):
        ax.imshow(block(s), cmap="gray_r", vmin=-1, vmax=1)
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")
