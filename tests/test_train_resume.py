"""Resuming: format-1 checkpoints, SIGKILL at random moments, rank-0 best selection on 2 ranks."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ddo_fast
from ddo_fast import adapters as A
from ddo_fast.examples.toy2d import EDMMLP, sample_data
from ddo_fast.training import checkpoint
from ddo_fast.training.data import generator

SCRIPT = Path(__file__).parent / "train_script.py"


def _same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------- format-1 checkpoints
def _to_format_1(folder: Path) -> None:
    """Rewrite a checkpoint's state.pt in the layout written before TrainState (format 1)."""
    meta = torch.load(folder / "state.pt", weights_only=True)
    best = meta.pop("best")
    del meta["format"]
    if best is not None:
        meta |= {"best_score": best["score"], "best_step": best["step"]}
    torch.save(meta, folder / "state.pt")


def test_format_1_checkpoint_resumes_to_the_same_result(tmp_path, capsys):
    data = sample_data(64, generator(0, "d"))
    adapter = A.EDMDenoiser(sigma_data=1.0, steps=3)

    def eval_fn(m):
        return {"norm": sum(p.square().sum() for p in m.parameters()).item()}

    def run(out: Path, resume: bool):
        cfg = ddo_fast.TrainConfig(
            **dict(alpha=1.0, beta=1.0, lr=1e-3, batch_size=8, steps_per_round=4, rounds=2),
            **dict(fake_samples_per_round=16, ema=0.9, checkpoint_every=3, eval_every=2),
            **dict(select_best_by="min:norm", out_dir=str(out), device="cpu", resume=resume),
        )
        torch.manual_seed(0)
        res = ddo_fast.train(EDMMLP(hidden=8), data, adapter=adapter, config=cfg, eval_fn=eval_fn)
        return res.model.state_dict()

    full = run(tmp_path / "full", False)
    for name in ("new", "old"):  # both stopped after the mid-round checkpoint at step 6
        shutil.copytree(tmp_path / "full", tmp_path / name)
        for later in ("step-00000007", "step-00000008"):
            shutil.rmtree(tmp_path / name / "checkpoints" / later, ignore_errors=True)
    mid = tmp_path / "old" / "checkpoints" / "step-00000006"
    assert torch.load(mid / "state.pt", weights_only=True)["best"] is not None
    _to_format_1(mid)
    assert "format" not in torch.load(mid / "state.pt", weights_only=True)
    capsys.readouterr()
    resumed_old = run(tmp_path / "old", True)
    assert "format-1 checkpoint, upgraded" in capsys.readouterr().out
    resumed_new = run(tmp_path / "new", True)
    _same_weights(resumed_old, full)
    _same_weights(resumed_new, full)
    for name in ("old", "new"):
        csv_text = (tmp_path / name / "metrics.csv").read_text()
        assert csv_text == (tmp_path / "full" / "metrics.csv").read_text()


# ------------------------------------------------------------------------- SIGKILL anywhere
def _start(out: Path, args: list[str]) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), str(out), "--resume", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    for line in proc.stdout:  # imports done, train() starting
        if line.startswith("training"):
            break
    return proc


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_is_bit_identical(tmp_path):
    """Five SIGKILLs at seeded random moments of a 2-round CPU run (the third while a checkpoint
    is half written), each followed by a resume; the final run's metrics.csv, evals.csv and
    weights equal an uninterrupted run's exactly, and every step-* folder is complete. A kill
    lands within the first quarter of train()'s time, so each one interrupts real work."""
    args = ["--steps", "10", "--log-every", "3", "--step-sleep", "0.02", "--ckpt-sleep", "0.15"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    proc = _start(full, args)
    t0 = time.monotonic()
    assert proc.wait(timeout=120) == 0
    span = time.monotonic() - t0  # train() plus saving final.pt
    rng = random.Random(2025)
    for i in range(5):
        proc = _start(killed, args)
        if i == 2:  # inside a checkpoint write (after its first file, before the rename),
            # once a complete checkpoint exists, so that the final run must resume from one
            deadline = time.monotonic() + 60
            ckpts = killed / "checkpoints"
            while not (
                list(ckpts.glob(f"step-*/{checkpoint.MARKER}"))
                and list(ckpts.glob(".tmp-step-*/model.safetensors"))
            ):
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.005)
        else:
            time.sleep(rng.uniform(0.0, span / 4))
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
        if i == 2:
            assert list((killed / "checkpoints").glob(".tmp-step-*"))
        for folder in (killed / "checkpoints").glob("step-*"):
            assert (folder / checkpoint.MARKER).exists(), folder
    proc = _start(killed, args)
    rest = proc.stdout.read()
    assert proc.wait(timeout=120) == 0
    assert "resumed from" in rest  # the final run continued from a checkpoint, not from scratch
    for name in ("metrics.csv", "evals.csv"):
        assert (killed / name).read_text() == (full / name).read_text(), name
    _same_weights(
        torch.load(killed / "final.pt", weights_only=True),
        torch.load(full / "final.pt", weights_only=True),
    )


# ------------------------------------------------------------------------------- 2 ranks
@pytest.mark.slow
def test_rank_dependent_eval_fn_selects_rank_0s_choice_on_every_rank(tmp_path):
    """eval_fn scores rise with time on rank 0 and fall on rank 1 (select max): every rank
    must take rank 0's pick (the round's last eval) and end with bit-identical weights."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    cmd += ["--master_port=29541", str(SCRIPT), str(tmp_path), "--steps", "4", "--batch", "8"]
    cmd += ["--rank-eval", "--all-ranks"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    w0 = torch.load(tmp_path / "final-rank0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "final-rank1.pt", weights_only=True)
    _same_weights(w0, w1)
    m0, m1 = (json.loads((tmp_path / f"metrics-rank{r}.json").read_text()) for r in (0, 1))
    for a, b in zip(m0, m1, strict=True):
        a.pop("seconds"), b.pop("seconds")
        assert a == b and a["best_step_in_round"] == 4
