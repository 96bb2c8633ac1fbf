"""TrainConfig.ref_logprob_cache: the reference's log-probs of a round's samples, scored once.

The cached run must follow the per-step run's loss trajectory (the values are the same numbers,
computed in other batches), the cache file must be keyed by what determines it and be reused on
resume, online fakes and diffusion adapters keep the per-step path, and the steps stay free of
host syncs."""

import collections
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from test_train_loop import SYNC_METHODS
from test_training import _cfg, _rows
from torch.utils.data import TensorDataset

import ddo_fast
from ddo_fast import adapters as A
from ddo_fast.examples.toy2d import EDMMLP, sample_data
from ddo_fast.models import CausalTransformer
from ddo_fast.training.data import generator
from ddo_fast.training.ref_cache import RefLogprobs

VOCAB, LENGTH, CLASSES = 5, 6, 3


@dataclass
class Counting(A.CausalAR):
    """CausalAR that records, per loss call, whether cached values came in, and the row
    counts of its reference scoring calls (repr=False: not part of the cache key)."""

    cached: list = field(default_factory=list, repr=False)
    scored: list = field(default_factory=list, repr=False)

    def loss(self, *args, ref_logprob=None, **kw):
        self.cached.append(ref_logprob is not None)
        return super().loss(*args, ref_logprob=ref_logprob, **kw)

    def ref_logprob(self, ref, x, labels):
        self.scored.append(len(x))
        return super().ref_logprob(ref, x, labels)


def _adapter(null: bool) -> Counting:
    if null:
        return Counting(seq_len=LENGTH, null_label=CLASSES, uncond_ratio=0.4, normalize_alpha=True)
    return Counting(seq_len=LENGTH)


def _model() -> CausalTransformer:
    torch.manual_seed(0)
    return CausalTransformer(VOCAB, LENGTH, CLASSES, dim=16, layers=1, heads=2)


def _data(kind: str = "tensor"):
    g = generator(0, "tokens")
    tokens = torch.randint(0, VOCAB, (40, LENGTH), generator=g)
    labels = torch.randint(0, CLASSES, (40,), generator=g)
    return TensorDataset(tokens, labels) if kind == "dataset" else (tokens, labels)


def _ar_cfg(tmp_path, **kw):
    base = dict(alpha=2.0, beta=0.5, lr=3e-3, steps_per_round=5, rounds=2, log_every=3)
    return _cfg(tmp_path, **(base | kw))


def _train(tmp_path, adapter, data, **kw):
    return ddo_fast.train(_model(), data, adapter=adapter, config=_ar_cfg(tmp_path, **kw))


def _cache_files(out):
    return sorted((out / "fakes" / "ref_logprob").glob("round-*.pt"))


# ------------------------------------------------------------------------- same trajectory
@pytest.mark.parametrize("null", [False, True], ids=["cond", "cfg_rows"])
@pytest.mark.parametrize("kind", ["tensor", "dataset"])
def test_cached_run_follows_the_per_step_trajectory(tmp_path, null, kind):
    """2 rounds x 5 steps (the reference swaps once): every step's loss and the final weights
    agree with the per-step run; the cached run passed values at every step and the other
    never."""
    on, off = _adapter(null), _adapter(null)
    a = _train(tmp_path / "on", on, _data(kind))
    model_on = a.model.state_dict()
    b = _train(tmp_path / "off", off, _data(kind), ref_logprob_cache=False)
    assert on.cached == [True] * 10 and off.cached == [False] * 10
    assert off.scored == [] and len(_cache_files(tmp_path / "off")) == 0
    la = torch.tensor([r["loss"] for r in a.history], dtype=torch.float64)
    lb = torch.tensor([r["loss"] for r in b.history], dtype=torch.float64)
    diff = (la - lb).abs().max().item()
    print(f"max |loss(cached) - loss(per step)| over {len(la)} steps: {diff:.3g}")
    assert len(la) == 10 and diff <= 1e-6
    # theta moved after each round's first step: r is not trivially 0
    assert all(r["r_real"] != 0 for r in a.history if r["step_in_round"] > 1)
    wdiff = max((v - b.model.state_dict()[k]).abs().max().item() for k, v in model_on.items())
    print(f"max |weight difference| after 10 steps: {wdiff:.3g}")
    assert wdiff <= 1e-6


def test_adapter_loss_with_cached_values_equals_the_per_step_loss():
    """CausalAR.loss given ref_logprob rows (column per row by the null mask) gives the same
    loss and r as running the reference, bit for bit on this row-independent model."""
    adapter = A.CausalAR(seq_len=LENGTH, null_label=CLASSES, uncond_ratio=0.5)
    model, ref = _model(), _model().requires_grad_(False)
    with torch.no_grad():
        ref.head.bias.add_(0.3)  # ref != theta
    tokens, labels = _data()
    real, fake = (tokens[:8], labels[:8]), (tokens[8:16], labels[8:16])
    noise = adapter.draw(8, (LENGTH,), generator(0, "noise"))
    assert 0 < int(noise["uncond"].sum()) < 8
    table = adapter.ref_logprob(ref, tokens[:16], labels[:16])
    assert table.shape == (16, 2) and table.dtype == torch.float32
    want = adapter.loss(model, ref, real, fake, noise, alpha=2.0, beta=0.5)
    got = adapter.loss(model, ref, real, fake, noise, alpha=2.0, beta=0.5, ref_logprob=table)
    assert torch.equal(got.loss, want.loss) and torch.equal(got.logratio, want.logratio)
    with pytest.raises(ValueError, match=r"ref_logprob: expected \[16, 2\]"):
        adapter.loss(model, ref, real, fake, noise, alpha=2.0, beta=0.5, ref_logprob=table[:, :1])
    plain = A.CausalAR(seq_len=LENGTH)  # no CFG rows: one column
    assert plain.ref_logprob(ref, tokens[:4], labels[:4]).shape == (4, 1)


# ------------------------------------------------------------------------------ the cache file
def test_cache_is_keyed_by_the_reference_and_reused_on_resume(tmp_path):
    """One file per round (the reference changes between rounds, so the keys differ); a run
    interrupted mid-round and resumed loads the file instead of scoring again, and its
    trajectory equals the uninterrupted run's exactly."""

    def zero(model):
        return 0.0

    cfg = _ar_cfg(tmp_path / "full", checkpoint_every=3, eval_every=2)
    ddo_fast.train(_model(), _data(), adapter=_adapter(True), config=cfg, eval_fn=zero)
    files = _cache_files(tmp_path / "full")
    assert [f.name.split("-")[1] for f in files] == ["000", "001"]
    assert files[0].name.split("-")[2] != files[1].name.split("-")[2]
    blob = torch.load(files[0], weights_only=True)
    # the round's 5 x 8 draws over 40 samples: every distinct one is scored once
    assert blob["real_index"].tolist() == sorted(set(blob["real_index"].tolist()))
    assert blob["real"].shape == (len(blob["real_index"]), 2) and blob["fake"].shape == (16, 2)

    calls = {"n": 0}

    def dies_at_third_eval(model):
        calls["n"] += 1
        if calls["n"] == 3:  # round 0, step 4: after the checkpoint at step 3
            raise KeyboardInterrupt
        return 0.0

    out = tmp_path / "killed"
    cfg = cfg.replace(out_dir=str(out))
    with pytest.raises(KeyboardInterrupt):
        ddo_fast.train(
            _model(), _data(), adapter=_adapter(True), config=cfg, eval_fn=dies_at_third_eval
        )
    first = _cache_files(out)
    assert [f.name for f in first] == [files[0].name]  # same key as the full run's round 0
    stamp = first[0].stat().st_mtime_ns
    resumed = _adapter(True)
    ddo_fast.train(
        _model(), _data(), adapter=resumed, config=cfg.replace(resume=True), eval_fn=zero
    )
    assert first[0].stat().st_mtime_ns == stamp  # reloaded, not rewritten
    # round 0: only the one-sample probe; round 1: the probe and the scoring of a new file
    assert resumed.scored[0] == 1 and resumed.scored[1] == 1 and len(resumed.scored) > 2
    assert [f.name for f in _cache_files(out)] == [f.name for f in files]
    a, b = _rows(tmp_path / "full" / "metrics.csv"), _rows(out / "metrics.csv")
    assert [r["step"] for r in a] == [r["step"] for r in b] and len(a) == 10
    assert [r["loss"] for r in a] == [r["loss"] for r in b]


def test_cache_key_follows_the_data(tmp_path):
    """Other real data (same shape, same seed) gets another file; the same data the same."""
    tokens, labels = _data()
    _train(tmp_path, _adapter(False), (tokens, labels), rounds=1)
    _train(tmp_path, _adapter(False), (tokens, labels), rounds=1)
    assert len(_cache_files(tmp_path)) == 1
    _train(tmp_path, _adapter(False), ((tokens + 1) % VOCAB, labels), rounds=1)
    assert len(_cache_files(tmp_path)) == 2


def test_rows_refuse_a_sample_outside_the_round():
    refs = RefLogprobs(torch.tensor([1, 4, 7]), torch.arange(3.0)[:, None], torch.zeros(2, 1))
    assert refs.rows(torch.tensor([7, 1]), torch.tensor([1])).flatten().tolist() == [2, 0, 0]
    with pytest.raises(RuntimeError, match="outside the round"):
        refs.rows(torch.tensor([5]), torch.tensor([0]))
    with pytest.raises(RuntimeError, match="outside the round"):
        refs.rows(torch.tensor([9]), torch.tensor([0]))


# -------------------------------------------------------------------------- per-step paths
def test_online_fakes_keep_the_per_step_path(tmp_path):
    adapter = _adapter(True)
    res = _train(tmp_path, adapter, _data(), fake_samples_per_round=0, rounds=1)
    assert len(res.history) == 5 and adapter.cached == [False] * 5 and adapter.scored == []
    assert not (tmp_path / "fakes" / "ref_logprob").exists()


def test_diffusion_adapters_keep_the_per_step_path(tmp_path):
    data = sample_data(64, generator(0, "d"))
    adapter = A.EDMDenoiser(sigma_data=1.0, steps=3)
    assert adapter.ref_logprob(EDMMLP(hidden=8), data[:1], None) is None
    res = ddo_fast.train(EDMMLP(hidden=8), data, adapter=adapter, config=_cfg(tmp_path))
    assert len(res.history) == 2 and not (tmp_path / "fakes" / "ref_logprob").exists()


def test_config_field():
    assert ddo_fast.TrainConfig().ref_logprob_cache is True
    assert ddo_fast.TrainConfig(ref_logprob_cache=False).ref_logprob_cache is False
    with pytest.raises(ValueError, match=r"TrainConfig.ref_logprob_cache='yes': must be True"):
        ddo_fast.TrainConfig(ref_logprob_cache="yes")


# ------------------------------------------------------------------------------- host syncs
def test_cached_steps_do_not_sync(tmp_path, monkeypatch):
    """Runs of 40 and 80 steps (log_every=40) differ by one metrics flush: the cached steps
    (host-side row lookup, one copy to the device) read nothing back."""
    counts: collections.Counter = collections.Counter()

    def counting(name, orig):
        def wrapper(self, *a, **k):
            counts[name] += 1
            return orig(self, *a, **k)

        return wrapper

    def syncs(steps: int) -> int:
        counts.clear()
        adapter = _adapter(True)
        with monkeypatch.context() as m:
            for name in SYNC_METHODS:
                m.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
            _train(
                tmp_path / str(steps),
                adapter,
                _data(),
                steps_per_round=steps,
                rounds=1,
                log_every=40,
            )
        assert all(adapter.cached)
        return sum(counts.values())

    short, long = syncs(40), syncs(80)
    print(f"host syncs: {short} in 40 steps, {long} in 80 steps")
    assert long - short <= 1


# ------------------------------------------------------------------------------------- DDP
CHILD = """
import os
import sys
import torch
sys.path.insert(0, {tests!r})
import ddo_fast
from test_train_ref_cache import _adapter, _ar_cfg, _data, _model
torch.set_num_threads(1)
cfg = _ar_cfg({out!r}, ref_logprob_cache={cache})
res = ddo_fast.train(_model(), _data(), adapter=_adapter(True), config=cfg)
if os.environ["RANK"] == "0":
    torch.save(res.model.state_dict(), {out!r} + "/final.pt")
"""


def _two_ranks(out: Path, cache: bool) -> dict:
    script = out.parent / f"child-{cache}.py"
    script.write_text(CHILD.format(tests=str(Path(__file__).parent), out=str(out), cache=cache))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    cmd += ["--master_port=29541", str(script)]
    ddp = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    return torch.load(out / "final.pt", weights_only=True)


def test_two_ranks_share_rank_zeros_cache(tmp_path):
    """Under torchrun (2 gloo ranks, CFG rows) rank 0 scores, both ranks load after a barrier,
    and the weights equal the 2-rank per-step run's bit for bit. (Not compared with a 1-rank
    run: the gradient of the attention key bias is rounding noise, which Adam scales up to
    lr-sized steps, and DDP's gradient all-reduce rounds differently.)"""
    cached = _two_ranks(tmp_path / "cached", True)
    assert len(_cache_files(tmp_path / "cached")) == 2
    per_step = _two_ranks(tmp_path / "per_step", False)
    assert not (tmp_path / "per_step" / "fakes" / "ref_logprob").exists()
    for k, v in per_step.items():
        assert torch.equal(cached[k], v), k
