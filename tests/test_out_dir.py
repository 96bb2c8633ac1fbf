"""train()'s folder and process group on its way out: a run that raises mid-run releases its
out_dir lock and destroys the process group it started (never the caller's); runs without
out_dir get folders of their own even when they start in the same second; under torchrun a run
on a held folder is refused on every rank, and no rank waits in a collective."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import train_script as ts  # tests/train_script.py: the models and adapters of these runs

import ddo_fast
from ddo_fast.training import checkpoint, fsdp

SCRIPT = Path(__file__).parent / "train_script.py"


@pytest.fixture
def group():
    """Ends a process group a test leaves behind (the caller's, or one a failing fix kept)."""
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def _cfg(out: Path | None, **kw) -> ddo_fast.TrainConfig:
    base = dict(alpha=1.0, beta=1.0, lr=1e-3, batch_size=8, steps_per_round=6, rounds=1)
    base |= dict(fake_samples_per_round=16, seed=0, device="cpu", log_every=2)
    base |= dict(eval_every=2, checkpoint_every=2, out_dir=None if out is None else str(out))
    return ddo_fast.TrainConfig(**(base | kw))


def _failing_eval(at: int):
    """An eval_fn that raises at its ``at``-th call (the round-start eval is the first)."""
    calls = {"n": 0}

    def eval_fn(model) -> float:
        calls["n"] += 1
        if calls["n"] == at:
            raise ArithmeticError("eval failed mid-run")
        return 0.0

    return eval_fn


def test_a_run_that_raises_mid_run_lets_go_of_its_out_dir(tmp_path, monkeypatch):
    """A run whose eval_fn raises at step 4 (after its step-2 checkpoint) leaves the folder free:
    a second train() in the same process resumes there from step 2 and finishes. CPython
    closes a lock file nothing refers to (which drops the flock) even when no code releases
    it, so the test keeps a reference to the file, as any other one would (a traceback kept for
    a debugger, a cycle awaiting the collector): only an explicit release on the raise path
    passes."""
    kept = []
    take = checkpoint._take_lock

    def keep(out: Path):
        held, refused = take(out)
        kept.append(held)
        return held, refused

    monkeypatch.setattr(checkpoint, "_take_lock", keep)
    model, data, adapter = ts.model_and_data("mlp", None)
    with pytest.raises(ArithmeticError, match="mid-run"):
        ddo_fast.train(
            model, data, adapter=adapter, config=_cfg(tmp_path), eval_fn=_failing_eval(3)
        )
    assert kept[0] is not None  # it held the lock
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000002"]
    cfg = _cfg(tmp_path, resume=True)
    res = ddo_fast.train(model, data, adapter=adapter, config=cfg, eval_fn=lambda m: 0.0)
    assert [row["step"] for row in res.history] == [3, 4, 5, 6]  # resumed at step 2


@pytest.mark.parametrize("callers", [False, True], ids=["train-started", "caller-started"])
def test_a_run_that_raises_ends_only_the_group_it_started(tmp_path, group, callers):
    """distributed="fsdp" in one process: train() starts a 1-rank group unless one is up. When
    train() raises mid-run, the group it started is destroyed (left to the interpreter's exit,
    gloo may abort); a group the caller started stays up, the same object."""
    if callers:
        fsdp.single_process_group(torch.device("cpu"))
        mine = dist.group.WORLD
    model, data, adapter = ts.model_and_data("mlp", None)
    cfg = _cfg(tmp_path, distributed="fsdp")
    with pytest.raises(ArithmeticError, match="mid-run"):
        ddo_fast.train(model, data, adapter=adapter, config=cfg, eval_fn=_failing_eval(2))
    assert dist.is_initialized() == callers
    if callers:
        assert dist.group.WORLD is mine


def test_runs_without_out_dir_get_folders_of_their_own(tmp_path, monkeypatch):
    """out_dir=None: two runs started in the same second (the clock frozen) get two folders in
    the working directory, ddo-train-STAMP and ddo-train-STAMP-2, each with only its own run;
    a name already taken (an earlier run's folder) is never reused."""
    real = time.strftime
    monkeypatch.setattr(time, "strftime", lambda fmt, t=None: real(fmt, time.gmtime(0)))
    monkeypatch.chdir(tmp_path)
    model, data, adapter = ts.model_and_data("mlp", None)
    cfg = _cfg(None, steps_per_round=2)
    a = ddo_fast.train(model, data, adapter=adapter, config=cfg).out_dir
    b = ddo_fast.train(model, data, adapter=adapter, config=cfg).out_dir
    stamp = real("%Y%m%d-%H%M%S", time.gmtime(0))
    assert (a, b) == (tmp_path / f"ddo-train-{stamp}", tmp_path / f"ddo-train-{stamp}-2")
    for out in (a, b):  # a header and the 2 steps: the other run wrote nothing here
        assert len((out / "metrics.csv").read_text().splitlines()) == 3
    (tmp_path / f"ddo-train-{stamp}-3").mkdir()
    assert checkpoint.new_out_dir(tmp_path) == tmp_path / f"ddo-train-{stamp}-4"


def _children(pid: int) -> list[int]:
    tasks = Path(f"/proc/{pid}/task")
    return [int(k) for t in tasks.iterdir() for k in (t / "children").read_text().split()]


def _torchrun(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    """train_script.py under torchrun (2 ranks, gloo, CPU); a rank that hangs fails the test at
    the time limit (the launcher and every rank are then killed: torchrun puts each rank in a
    session of its own)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    run = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.Popen(
        [sys.executable, *run, str(SCRIPT), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env | {"OMP_NUM_THREADS": "1"},
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in _children(proc.pid):
            os.kill(pid, signal.SIGKILL)
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"a rank hung:\n{stdout[-2000:]}{stderr[-4000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.mark.slow
def test_two_ranks_both_refuse_a_held_out_dir(tmp_path):
    """torchrun, 2 ranks (gloo, CPU), on a folder this process holds: each rank raises the
    "in use" RuntimeError itself (rank 0's verdict is broadcast, so rank 1 neither trains nor
    waits in a collective) with the group train() started already destroyed, and nothing is
    written into the folder. A rank that hangs fails the test at the time limit (the launcher
    and every rank are then killed: torchrun puts each rank in a session of its own)."""
    out = tmp_path / "held"
    with checkpoint.out_dir_lock(out, 0, 1):
        done = _torchrun([str(out), "--expect-refused"])
    stdout, stderr = done.stdout, done.stderr
    assert done.returncode == 0, stdout[-2000:] + stderr[-4000:]
    for rank in (0, 1):
        said = f"rank {rank} refused, group up: False: ddo_fast.train: out_dir {out} is in use"
        assert said in stdout, stdout[-2000:] + stderr[-4000:]
    assert list(out.iterdir()) == [out / checkpoint.LOCK]


@pytest.mark.slow
def test_two_ranks_retry_after_a_refusal_and_run_again(tmp_path):
    """torchrun, 2 ranks: a train() refused on a held folder (its group destroyed), then three
    train() calls one after another in the same processes, each starting and destroying its own
    group. Each group gets a fresh key prefix in torchrun's store: under the same keys a new
    group could read the previous one's stale gloo addresses (hung or failed about half the
    time per retry before)."""
    done = _torchrun([str(tmp_path / "run"), "--retries", "3", "--steps", "2"], timeout=180)
    stdout, stderr = done.stdout, done.stderr
    assert done.returncode == 0, stdout[-2000:] + stderr[-4000:]
    for rank in (0, 1):
        assert f"rank {rank} refused, group up: False" in stdout, stdout[-2000:]
        for k in (1, 2, 3):
            assert f"rank {rank} retry {k} ok, group up: False" in stdout, stdout[-2000:]
