"""FSDP2 (``TrainConfig(distributed="fsdp")``): 2 ranks under torchrun (gloo, CPU) give a 1-rank
run's numbers, for a model with blocks (each its own FSDP unit; fused-linear loss on the root's
head weight, a KV-cache sampler, LossOutput.stats) and one without (one unit); a SIGKILL-ed
sharded run resumes from its DCP checkpoint to the uninterrupted run's exact result; in one
process: the head weight reaches the loss whole and once per step, and no host syncs per step."""

import collections
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import train_script as ts  # tests/train_script.py: the models and adapters of these runs

import ddo_fast
from ddo_fast.training import checkpoint, fsdp
from ddo_fast.training.data import generator

SCRIPT = Path(__file__).parent / "train_script.py"
TOL = 1e-5
# not "acc" = mean 1[r_real > r_fake]: a step function of r; at theta = ref (step 1) every r is
# rounding noise around 0, and which side of 0 it lands on depends on the summation order
STAT_COLUMNS = ("loss", "margin", "r_real", "r_fake", "grad_norm")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    # faulthandler: a rank that aborts prints every Python thread's stack (see GLOO_ABORT)
    return env | {"OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}


def _cmd(out: Path, ranks: int, args: list[str]) -> list[str]:
    if ranks == 1:  # a plain process: the default distributed="ddp", i.e. no group at all
        return [sys.executable, str(SCRIPT), str(out), *args]
    run = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    return [sys.executable, *run, str(SCRIPT), str(out), *args]


# An intermittent abort of one gloo rank ("terminate called without an active exception",
# SIGABRT) was seen once in 4 fresh-clone CI runs, in the resumed 2-rank FSDP run. That run then
# shared its folder with the "killed" run's ranks, which the kill did not reach (see
# _killed_and_resumed; fixed, and train() now refuses a folder a live run holds); the abort was
# not reproduced, so until the CI record shows it gone such a run is retried once from the same
# folder and must then pass every check below; any other failure, or the abort twice, fails.
GLOO_ABORT = "terminate called without an active exception"


def _run(out: Path, ranks: int, args: list[str]) -> str:
    for attempt in (1, 2):
        proc = subprocess.run(  # 900 s: a loaded shared machine runs these at a few % of a core
            _cmd(out, ranks, args), capture_output=True, text=True, timeout=900, env=_env()
        )
        retry = attempt == 1 and proc.returncode != 0 and GLOO_ABORT in proc.stderr
        if not retry:
            break
        # a warning, so that CI's summary keeps the aborted run's stacks even when the retry passes
        warnings.warn(f"gloo abort in {out.name}, retried:\n{proc.stderr[-6000:]}", stacklevel=2)
        if "--resume" not in args:
            shutil.rmtree(out, ignore_errors=True)  # a fresh run starts from scratch again
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def _rows(out: Path) -> list[dict]:
    with open(out / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _close(a: Path, b: Path, columns: tuple[str, ...] = STAT_COLUMNS) -> None:
    """Same steps and per-step metrics to TOL, and final weights to TOL."""
    ra, rb = _rows(a), _rows(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] and len(ra) > 10
    for k in columns:
        worst = max(abs(float(x[k]) - float(y[k])) for x, y in zip(ra, rb, strict=True))
        assert worst < TOL, (k, worst)
    wa = torch.load(a / "final.pt", weights_only=True)
    wb = torch.load(b / "final.pt", weights_only=True)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert wa[k].shape == wb[k].shape, k
        assert torch.allclose(wa[k], wb[k], rtol=0, atol=TOL), (k, (wa[k] - wb[k]).abs().max())


@pytest.mark.slow
def test_two_ranks_with_blocks_equal_one_rank(tmp_path):
    """A transformer with 2 blocks (3 FSDP units per model), the fused-linear loss taking the
    head weight from the root unit after theta's forward, reference log-probs cached at round
    start and fakes from the model's own KV-cache sampler (non-forward methods: run inside
    ``fsdp.gathered``); 2 rounds, EMA, evals, checkpoints. Loss, margin, r, gradient norm,
    the adapter's extra stat and the final weights equal the 1-process run's to 1e-5; each rank
    saw the full [V, dim] head weight as a plain tensor at every step."""
    args = ["--model", "fused", "--log-every", "3"]
    _run(tmp_path / "one", 1, args)
    _run(tmp_path / "two", 2, [*args, "--distributed", "fsdp", "--count-gathers"])
    _close(tmp_path / "one", tmp_path / "two", STAT_COLUMNS + ("h_rms",))
    assert list(_rows(tmp_path / "two")[0])[-1] == "h_rms"  # LossOutput.stats as a column
    for rank in (0, 1):
        blob = json.loads((tmp_path / "two" / f"gathers-rank{rank}.json").read_text())
        assert blob["steps"] == 24 and len(blob["seen"]) == 24
        assert all(s == ["Parameter", [ts.VOCAB, 8]] for s in blob["seen"]), blob["seen"][:3]
    assert list((tmp_path / "two" / "checkpoints" / "step-00000024").glob("*.distcp"))


def _children(pid: int) -> list[int]:
    return [
        int(k)
        for task in Path(f"/proc/{pid}/task").iterdir()
        for k in (task / "children").read_text().split()
    ]


def _dead(pid: int) -> bool:
    """Gone, or a zombie (killed, not yet reaped by whoever adopted it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def _killed_and_resumed(out: Path, args: list[str]) -> tuple[str, Path]:
    """Start a 2-rank run, SIGKILL the launcher and both ranks once a complete checkpoint
    exists (mid-run), wait until no rank lives, then run again with --resume; returns the last
    run's output and the newest complete checkpoint at the kill. torchrun starts every rank in
    its own session, so killing the launcher's process group would leave the ranks running:
    they would go on writing checkpoints and logs into ``out`` beside the resumed run."""
    proc = subprocess.Popen(
        _cmd(out, 2, [*args, "--resume"]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=_env(),
        start_new_session=True,
    )
    deadline = time.monotonic() + 600
    while not list((out / "checkpoints").glob(f"step-*/{checkpoint.MARKER}")):
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    ranks = _children(proc.pid)  # the ranks exist: one of them wrote the checkpoint
    assert len(ranks) == 2, ranks
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in ranks:
        os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=60)
    deadline = time.monotonic() + 60
    while not all(_dead(pid) for pid in ranks):
        assert time.monotonic() < deadline, "a rank outlived its SIGKILL"
        time.sleep(0.01)
    assert not (out / "final.pt").exists()  # killed mid-run
    for folder in (out / "checkpoints").glob("step-*"):
        assert (folder / checkpoint.MARKER).exists(), folder
    at_kill = checkpoint.latest(out / "checkpoints")
    return _run(out, 2, [*args, "--resume"]), at_kill


@pytest.mark.slow
def test_two_ranks_without_blocks_equal_one_rank_and_resume_after_kill(tmp_path):
    """An EDM MLP (no blocks: the whole model is one FSDP unit) on 2 ranks equals the
    1-process run to 1e-5; a 2-rank run SIGKILL-ed after its first sharded checkpoint and
    resumed on 2 ranks ends with the uninterrupted 2-rank run's metrics.csv, evals.csv and
    weights exactly."""
    args = ["--model", "mlp", "--log-every", "3", "--distributed", "fsdp"]
    _run(tmp_path / "one", 1, ["--model", "mlp", "--log-every", "3"])
    _run(tmp_path / "full", 2, args)
    _close(tmp_path / "one", tmp_path / "full")
    rest, at_kill = _killed_and_resumed(tmp_path / "killed", [*args, "--step-sleep", "0.1"])
    assert f"resumed from {at_kill} " in rest and at_kill.name != "step-00000024"  # mid-run
    for name in ("metrics.csv", "evals.csv"):
        assert (tmp_path / "killed" / name).read_text() == (tmp_path / "full" / name).read_text()
    a = torch.load(tmp_path / "killed" / "final.pt", weights_only=True)
    b = torch.load(tmp_path / "full" / "final.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------- one process
@pytest.fixture
def group():
    """Ends the 1-rank process group a sharded train() leaves for its result."""
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def _cfg(tmp_path, **kw) -> ddo_fast.TrainConfig:
    base = dict(alpha=1.0, beta=1.0, lr=1e-3, batch_size=8, steps_per_round=4, rounds=2)
    base |= dict(fake_samples_per_round=16, ema=0.9, seed=0, device="cpu", log_every=2)
    return ddo_fast.TrainConfig(**(base | {"out_dir": str(tmp_path)} | kw))


def _fused_run(tmp_path, chunk: int | None, **kw):
    model, data, adapter = ts.model_and_data("fused", chunk)
    calls = {"n": 0}
    undo = ts.count_gathers(calls)
    try:
        res = ddo_fast.train(model, data, adapter=adapter, config=_cfg(tmp_path, **kw))
    finally:
        undo()
    return res, adapter.seen, calls["n"]


@pytest.mark.slow
def test_head_weight_reaches_the_loss_whole_once_per_step(tmp_path, group):
    """1-rank FSDP, fused-linear loss in 1-token chunks (48 per step) or one chunk: the same
    number of parameter all-gathers (the root unit, with the head, is gathered by theta's
    forward, not per chunk), the loss always got the whole [V, dim] weight as a plain
    parameter, and the losses equal the unsharded run's."""
    one, seen_one, gathers_one = _fused_run(tmp_path / "a", None, distributed="fsdp")
    many, seen_many, gathers_many = _fused_run(tmp_path / "b", 1, distributed="fsdp")
    assert gathers_one == gathers_many > 0
    assert seen_one == seen_many == [("Parameter", (ts.VOCAB, 8))] * 8
    plain, seen_plain, _ = _fused_run(tmp_path / "c", None)
    for a, b in zip(plain.history, one.history, strict=True):
        for k in STAT_COLUMNS + ("h_rms",):
            assert abs(a[k] - b[k]) < TOL, k
    assert fsdp.full_state_dict(one.model).keys() == plain.model.state_dict().keys()


@pytest.mark.slow
def test_online_fakes_and_mid_round_resume_on_one_rank(tmp_path, group):
    """Online fakes (the sampler runs on the gathered reference every step) on 1-rank FSDP give
    the unsharded run's numbers; the run cut back to its sharded checkpoint at step 6 (mid
    round 2: Adam's state, the EMA and the round's best are in it) and resumed ends with the
    uninterrupted run's metrics.csv and weights exactly."""
    kw = dict(fake_samples_per_round=0, checkpoint_every=3, eval_every=1)
    plain = _fused_run(tmp_path / "plain", None, **kw)[0]
    full = _fused_run(tmp_path / "full", None, distributed="fsdp", **kw)[0]
    for a, b in zip(plain.history, full.history, strict=True):
        assert abs(a["loss"] - b["loss"]) < TOL
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-00000008")
    cut = tmp_path / "cut" / "checkpoints" / "step-00000006"
    assert any(".exp_avg" in k or "/exp_avg" in k for k in _dcp_keys(cut))  # mid-round: Adam
    again = _fused_run(tmp_path / "cut", None, distributed="fsdp", resume=True, **kw)[0]
    assert [r["step"] for r in again.history] == [7, 8]
    text = (tmp_path / "cut" / "metrics.csv").read_text()
    assert text == (tmp_path / "full" / "metrics.csv").read_text()
    a, b = fsdp.full_state_dict(again.model), fsdp.full_state_dict(full.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _dcp_keys(folder: Path) -> list[str]:
    from torch.distributed.checkpoint import FileSystemReader

    return list(FileSystemReader(str(folder)).read_metadata().state_dict_metadata)


def test_sharded_and_replicated_checkpoints_are_not_mixed_up(tmp_path, group):
    model, data, adapter = ts.model_and_data("mlp", None)
    ddo_fast.train(model, data, adapter=adapter, config=_cfg(tmp_path, rounds=1))
    model, data, adapter = ts.model_and_data("mlp", None)
    with pytest.raises(ValueError, match="distributed='ddp'"):
        cfg = _cfg(tmp_path, rounds=2, resume=True, distributed="fsdp")
        ddo_fast.train(model, data, adapter=adapter, config=cfg)
    with pytest.raises(ValueError, match="TrainConfig.distributed='zero'"):
        ddo_fast.TrainConfig(distributed="zero")


def test_a_live_run_holds_its_out_dir(tmp_path, group):
    """A run on a folder that another live run holds is refused before it reads or writes
    anything there (resumed beside a run that still writes, the two would interleave their
    checkpoints and logs); train() lets go of the folder when it returns and when it raises
    (here the lock file is unreferenced, so CPython would close it anyway: the release on the
    raise path itself is tested in test_out_dir.py)."""
    model, data, adapter = ts.model_and_data("mlp", None)
    cfg = _cfg(tmp_path, rounds=1)
    with checkpoint.out_dir_lock(tmp_path, 0, 1):  # the other run (its own open file)
        with pytest.raises(RuntimeError, match=r"in use by another live run \(pid \d+"):
            ddo_fast.train(model, data, adapter=adapter, config=cfg)
    assert list(tmp_path.iterdir()) == [tmp_path / checkpoint.LOCK]
    ddo_fast.train(model, data, adapter=adapter, config=cfg)
    with pytest.raises(ValueError, match="distributed='ddp'"):  # raises while holding it
        ddo_fast.train(
            model, data, adapter=adapter, config=cfg.replace(resume=True, distributed="fsdp")
        )
    with checkpoint.out_dir_lock(tmp_path, 0, 1):  # free again
        pass


def test_out_dir_lock_without_flock_or_folder(tmp_path, monkeypatch):
    """A file system that refuses flock (ENOLCK, ENOSYS...) runs unguarded with a warning, not
    "in use"; a folder rank 0 cannot create is a RuntimeError naming it (raised after the
    verdict's broadcast point, so other ranks do not wait in it)."""
    import errno
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with pytest.warns(UserWarning, match="no one-run-per-folder guard"):
        with checkpoint.out_dir_lock(tmp_path / "nfs", 0, 1):
            pass
    monkeypatch.undo()
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    with pytest.raises(RuntimeError, match=r"cannot use out_dir .*file"):
        with checkpoint.out_dir_lock(blocked / "run", 0, 1):
            pass


SYNC_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "nonzero")


@pytest.mark.slow
def test_no_host_syncs_per_step_under_fsdp(tmp_path, monkeypatch, group):
    """As test_train_loop's count for DDP, as a difference: runs of 150 and 50 sharded steps
    (log_every=50) differ by the 2 metric flushes only. (Setup, the mesh, and every sharded
    checkpoint read a fixed number of values on the host: DCP's planning.)"""
    counts: collections.Counter = collections.Counter()

    def counting(name, orig):
        def wrapper(self, *a, **k):
            counts[name] += 1
            return orig(self, *a, **k)

        return wrapper

    def syncs(steps: int) -> int:
        cfg = _cfg(tmp_path / str(steps), steps_per_round=steps, rounds=1, log_every=50)
        cfg = cfg.replace(distributed="fsdp", nonfinite="skip", grad_clip=1.0)
        data = ts.sample_data(64, generator(0, "d"))
        fakes = ts.sample_data(32, generator(1, "d"))
        model = ts.EDMMLP(hidden=8)
        adapter = ddo_fast.adapters.EDMDenoiser(sigma_data=1.0, steps=3)
        counts.clear()
        for name in SYNC_METHODS:
            monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
        res = ddo_fast.train(model, data, adapter=adapter, config=cfg, fake_data=fakes)
        monkeypatch.undo()
        assert len(res.history) == steps
        return sum(counts.values())

    short, long = syncs(50), syncs(150)
    print(f"host reads under fsdp: {short} in 50 steps, {long} in 150 steps")
    assert long - short == 2  # the two extra flushes' .tolist()
