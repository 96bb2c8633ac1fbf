"""The training loop's structure: host syncs per step, the non-finite guard, best selection,
device placement under torchrun, and the checkpoint state (TrainState) round trip."""

import collections
import warnings

import pytest
import torch
from test_training import _cfg, _rows  # the shared tiny-run settings
from torch import nn

import ddo_fast
from ddo_fast import adapters as A
from ddo_fast.examples.toy2d import EDMMLP, sample_data
from ddo_fast.training import checkpoint, loop
from ddo_fast.training.data import generator
from ddo_fast.training.state import Best, TrainState

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# every Tensor method through which Python reads a value back to the host
SYNC_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "nonzero")


def _edm():
    return A.EDMDenoiser(sigma_data=1.0, steps=3)


class PoisonFrom(nn.Module):
    """A denoiser whose output is NaN in calls [start, stop) (0-based), finite otherwise."""

    def __init__(self, inner: nn.Module, start: int, stop: int = 1 << 30) -> None:
        super().__init__()
        self.inner, self.start, self.stop, self.calls = inner, start, stop, 0

    def forward(self, x, sigma, labels=None):
        self.calls += 1
        out = self.inner(x, sigma, labels)
        return out * float("nan") if self.start < self.calls <= self.stop else out


# ------------------------------------------------------------------------------ host syncs
@pytest.mark.parametrize(
    "kw", [dict(), dict(nonfinite="skip", ema=0.9, grad_clip=1.0, warmup_steps=10)]
)
def test_host_syncs_per_step_at_most_one(tmp_path, monkeypatch, kw):
    """With log_every=50, 100 steps cross to the host twice for metrics; everything else
    (setup, round start/end, checkpoint) adds a handful. Counted over the whole train() call."""
    steps = 100
    data = sample_data(64, generator(0, "d"))
    fakes = sample_data(32, generator(1, "d"))
    cfg = _cfg(tmp_path, steps_per_round=steps, log_every=50, **kw)
    counts: collections.Counter = collections.Counter()

    def counting(name, orig):
        def wrapper(self, *a, **k):
            counts[name] += 1
            return orig(self, *a, **k)

        return wrapper

    for name in SYNC_METHODS:
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    res = ddo_fast.train(EDMMLP(hidden=8), data, adapter=_edm(), config=cfg, fake_data=fakes)
    monkeypatch.undo()
    total = sum(counts.values())
    print(f"host syncs: {dict(counts)} = {total / steps:.2f} per step over {steps} steps")
    assert len(res.history) == steps
    assert total / steps <= 1.0
    assert counts["tolist"] >= 2  # the two metric flushes did happen
    assert total <= 10, counts  # not merely <= 1 per step: none per step at all


class WithStats(A.EDMDenoiser):
    """EDMDenoiser whose LossOutput.stats carries two device scalars: twice the loss (checkable
    against the loss column) and the fake rows' mean r (against r_fake); ``rename`` switches to
    other keys from the given step on (a contract violation)."""

    rename: int = 0

    def loss(self, *args, **kwargs):
        out = super().loss(*args, **kwargs)
        self.calls = getattr(self, "calls", 0) + 1
        fake_r = out.logratio.chunk(2)[1].mean()
        key = "other" if self.rename and self.calls >= self.rename else "fake_r"
        out.stats = {"twice_loss": 2 * out.loss.detach(), key: fake_r}
        return out


def test_loss_stats_become_metrics_columns_without_host_syncs(tmp_path, monkeypatch):
    """LossOutput.stats: extra metrics.csv / history columns after the standard ones, every
    step's value, read back in the same flush (the host reads of the run equal a run without
    stats: no sync per step); keys that change mid-run are refused by name."""
    data = sample_data(64, generator(0, "d"))
    fakes = sample_data(32, generator(1, "d"))
    counts: collections.Counter = collections.Counter()

    def counting(name, orig):
        def wrapper(self, *a, **k):
            counts[name] += 1
            return orig(self, *a, **k)

        return wrapper

    def run(adapter, out):
        counts.clear()
        for name in SYNC_METHODS:
            monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
        cfg = _cfg(out, steps_per_round=30, log_every=10)
        res = ddo_fast.train(EDMMLP(hidden=8), data, adapter=adapter, config=cfg, fake_data=fakes)
        monkeypatch.undo()
        return res, sum(counts.values())

    torch.manual_seed(0)
    plain, plain_reads = run(A.EDMDenoiser(sigma_data=1.0, steps=3), tmp_path / "a")
    torch.manual_seed(0)
    res, reads = run(WithStats(sigma_data=1.0, steps=3), tmp_path / "b")
    assert reads == plain_reads
    rows = _rows(tmp_path / "b" / "metrics.csv")
    assert list(rows[0])[-2:] == ["twice_loss", "fake_r"] and len(rows) == 30
    for row, h, p in zip(rows, res.history, plain.history, strict=True):
        assert float(row["twice_loss"]) == pytest.approx(2 * float(row["loss"]), rel=1e-6)
        assert float(row["fake_r"]) == pytest.approx(float(row["r_fake"]), rel=1e-5, abs=1e-7)
        assert h["loss"] == p["loss"]  # the stats change nothing else
    with pytest.raises(ValueError, match=r"stats keys changed.*'fake_r'.*'other'"):
        bad = WithStats(sigma_data=1.0, steps=3)
        bad.rename = 4
        cfg = _cfg(tmp_path / "c", steps_per_round=6)
        ddo_fast.train(EDMMLP(hidden=8), data, adapter=bad, config=cfg, fake_data=fakes)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_steps_do_not_synchronize(tmp_path):
    """CUDA's own detector (sync debug mode "warn") counts every synchronizing call; the runs
    of 150 and 50 steps differ by the syncs of 100 steady-state steps: 2 flushes at most."""

    def syncs(steps: int) -> int:
        cfg = _cfg(tmp_path / str(steps), steps_per_round=steps, log_every=50, device="cuda")
        cfg = cfg.replace(ema=0.9, nonfinite="skip", batch_size=64, fake_samples_per_round=256)
        data = sample_data(512, generator(0, "d"))
        fakes = sample_data(256, generator(1, "d"))
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                ddo_fast.train(EDMMLP(hidden=64), data, adapter=_edm(), config=cfg, fake_data=fakes)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        return sum("synchroniz" in str(w.message) for w in seen)

    syncs(50)  # warm-up: first-call syncs (allocator, cuBLAS, Triton compile) are not the loop's
    short, long = syncs(50), syncs(150)
    print(f"CUDA syncs: {short} in 50 steps, {long} in 150 steps: {(long - short) / 100} per step")
    assert (long - short) / 100 <= 0.05


# --------------------------------------------------------------------------- non-finite
@pytest.mark.parametrize("device", DEVICES)
def test_nonfinite_raise_leaves_the_weights_of_the_last_good_step(tmp_path, device):
    """Only the 4th step is non-finite; the error comes at the flush after step 8 (log_every=8),
    and the weights are bit-identical to a clean 3-step run's (steps 5-8 are finite but must not
    be applied either), the CSV has exactly rows 1-3."""
    data = sample_data(64, generator(0, "d"))
    fakes = sample_data(32, generator(1, "d"))  # given: the sampler would call the model too
    torch.manual_seed(0)
    start = EDMMLP(hidden=8).state_dict()
    clean = EDMMLP(hidden=8)
    clean.load_state_dict(start)
    cfg = _cfg(tmp_path / "a", steps_per_round=3, device=device)
    ddo_fast.train(clean, data, adapter=_edm(), config=cfg, fake_data=fakes)
    inner = EDMMLP(hidden=8)
    inner.load_state_dict(start)
    model = PoisonFrom(inner, start=3, stop=4)
    cfg = _cfg(tmp_path / "b", steps_per_round=8, log_every=8, device=device)
    with pytest.raises(FloatingPointError, match=r"round 0, step 3\b.*nonfinite='skip'"):
        ddo_fast.train(model, data, adapter=_edm(), config=cfg, fake_data=fakes)
    assert model.calls == 8  # the guard latched: steps 5-8 ran but applied nothing
    for k, v in clean.state_dict().items():
        assert torch.equal(inner.state_dict()[k], v), k
    assert v.device.type == device
    assert [r["step"] for r in _rows(tmp_path / "b" / "metrics.csv")] == ["1", "2", "3"]


@pytest.mark.parametrize("device", DEVICES)
def test_nonfinite_skip_keeps_weights_ema_and_counts(tmp_path, device):
    model = PoisonFrom(EDMMLP(hidden=8), start=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = sample_data(64, generator(0, "d"))
    cfg = _cfg(tmp_path, nonfinite="skip", steps_per_round=5, ema=0.5, log_every=2, device=device)
    res = ddo_fast.train(model, data, adapter=_edm(), config=cfg, fake_data=data[:16])
    assert [r["skipped"] for r in res.history] == [1, 2, 3, 4, 5]
    assert res.metrics[0]["skipped"] == 5
    for k, v in model.state_dict().items():  # the EMA became theta at the round's end
        assert torch.equal(v.cpu(), before[k]), k


# ------------------------------------------------------------------------------ selection
def test_select_best_modes():
    m = nn.Linear(2, 1)
    cfg = ddo_fast.TrainConfig(select_best_by="min:fd")
    first = loop.select_best(cfg, None, {"fd": 3.0}, m, 0)
    assert first.step == 0 and first.score == {"fd": 3.0}
    assert loop.select_best(cfg, first, {"fd": 4.0}, m, 2) is first
    assert loop.select_best(cfg, first, {"fd": 2.0}, m, 4).step == 4
    assert loop.select_best(cfg, first, None, m, 6) is first  # no eval_fn: nothing to compare
    assert loop.select_best(cfg.replace(select_best_by="last"), first, {}, m, 8).step == 8
    with pytest.raises(KeyError, match="min:fd"):
        loop.select_best(cfg, first, {"is": 1.0}, m, 2)
    with torch.no_grad():
        m.weight.add_(1.0)  # the copy is a snapshot, not a view
    assert not torch.equal(first.state["weight"], m.weight)


# ------------------------------------------------------------------------ torchrun placement
def test_torchrun_puts_each_rank_on_its_own_gpu(monkeypatch):
    """Under torchrun with CUDA, LOCAL_RANK's device is made current before the process group
    starts (NCCL and default allocations would otherwise all land on cuda:0)."""
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(loop.dist, "is_initialized", lambda: False)
    store = torch.distributed.HashStore()
    monkeypatch.setattr(loop.dist, "rendezvous", lambda url: iter([(store, 1, 2)]))

    def init_process_group(backend, *, store, rank, world_size):
        assert isinstance(store, torch.distributed.PrefixStore) and (rank, world_size) == (1, 2)
        calls.append(("init", backend))

    monkeypatch.setattr(loop.dist, "init_process_group", init_process_group)
    monkeypatch.setattr(loop.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(loop.dist, "get_world_size", lambda: 2)
    for requested in (None, "cuda"):
        calls.clear()
        rank, world, device, owns = loop.setup_distributed(requested)
        assert (rank, world, device, owns) == (1, 2, torch.device("cuda", 1), True)
        assert calls == [("set_device", torch.device("cuda", 1)), ("init", "nccl")]
    calls.clear()
    assert loop.setup_distributed("cpu")[2] == torch.device("cpu")
    assert calls == [("init", "gloo")]
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert loop.pick_device(None, 1, 0) == torch.device("cuda", 0)


# ---------------------------------------------------------------------- TrainState round trip
def test_train_state_round_trip(tmp_path):
    torch.manual_seed(0)
    cfg = ddo_fast.TrainConfig(ema=0.9)
    a = TrainState.create(EDMMLP(hidden=8), cfg)
    a.model(torch.randn(4, 2), torch.ones(4)).sum().backward()
    a.optimizer.step()
    a.global_step, a.round, a.step_in_round, a.skipped = 7, 1, 3, 2
    a.best = Best({"fd": 1.5}, {k: v + 1 for k, v in a.model.state_dict().items()}, 2)
    a.round_metrics = [{"round": 0, "best_step_in_round": 4}]
    checkpoint.save(tmp_path, a.global_step, **a.state_dict())
    b = TrainState.create(EDMMLP(hidden=8), cfg)
    weights, meta = checkpoint.load(tmp_path / "step-00000007")
    b.load_state_dict({"weights": weights, "meta": meta})
    assert (b.global_step, b.round, b.step_in_round, b.skipped) == (7, 1, 3, 2)
    assert b.round_metrics == a.round_metrics and b.best.score == {"fd": 1.5}
    assert b.best.step == 2
    for x, y in zip(a.modules(), b.modules(), strict=True):
        for k, v in x.state_dict().items():
            assert torch.equal(v, y.state_dict()[k])
    sa, sb = a.optimizer.state_dict(), b.optimizer.state_dict()
    for i, st in sa["state"].items():
        for k, v in st.items():
            assert torch.equal(v, sb["state"][i][k]), k


def test_future_checkpoint_format_is_refused_clearly(tmp_path):
    data = sample_data(64, generator(0, "d"))
    ddo_fast.train(EDMMLP(hidden=8), data, adapter=_edm(), config=_cfg(tmp_path))
    folder = checkpoint.latest(tmp_path / "checkpoints")
    meta = torch.load(folder / "state.pt", weights_only=True)
    torch.save(meta | {"format": 99}, folder / "state.pt")
    with pytest.raises(ValueError, match="format 99 is newer"):
        checkpoint.load(folder)


def test_extra_and_label_pool_are_gone():
    assert "extra" not in ddo_fast.TrainConfig.field_types()
    from ddo_fast.training.data import RealData

    assert not hasattr(RealData, "label_pool")
