"""The reference's log-probs of a round's samples, scored once (``TrainConfig.ref_logprob_cache``).

With offline fakes, r = log p_theta - log p_ref (Eq. 13) has a constant second term for every
sample a round can draw: the reference is frozen for the round, the pool is fixed, and the real
samples of the round are known in advance (the stream is a function of the seed and the step).
Where the adapter can score a sample without the step's random draws
(:meth:`~ddo_fast.adapters.Adapter.ref_logprob`, [N, K]: one column per conditioning the loss
may pick, e.g. the sample's label and the null label), the round starts with one no_grad pass
over the round's distinct real samples and the whole pool, and every step indexes the result on
the host (as it indexes the data) instead of running the reference: one forward of 2B rows less
per step.

The values are cached beside the fakes in ``out/fakes/ref_logprob/round-RRR-KEY.pt``, KEY from
(reference weights, round, adapter settings, seed, batch size, steps per round, real data
fingerprint, pool digest, device type): rank 0 scores and writes atomically (tmp file +
``os.replace``), every rank loads after a barrier, and a resumed run finds the same file.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..adapters import Batch
from . import checkpoint
from .data import tensor_digest

if TYPE_CHECKING:
    from .loop import Run
    from .state import TrainState


@dataclass
class RefLogprobs:
    """log p_ref of a round's samples on the host (fp32): ``real`` [M, K] of the real samples
    ``real_index`` [M] (sorted data indices), ``fake`` [P, K] of the pool's rows."""

    real_index: torch.Tensor
    real: torch.Tensor
    fake: torch.Tensor

    def rows(self, real_idx: torch.Tensor, fake_idx: torch.Tensor) -> torch.Tensor:
        """[real; fake] rows [b_real + b_fake, K] of the given data indices and pool rows."""
        pos = torch.searchsorted(self.real_index, real_idx).clamp_max(len(self.real_index) - 1)
        if not torch.equal(self.real_index[pos], real_idx):  # host tensors: no device sync
            raise RuntimeError("ref-logprob cache: a real sample outside the round's was drawn")
        return torch.cat([self.real[pos], self.fake[fake_idx]])


def round_real_index(run: Run, state: TrainState) -> torch.Tensor:
    """The distinct data indices (sorted) that the steps of the current round draw."""
    cfg = run.cfg
    start = (state.global_step - state.step_in_round) * cfg.batch_size
    return run.data.indices(cfg.seed, start, cfg.steps_per_round * cfg.batch_size).unique()


def ref_logprobs(run: Run, state: TrainState, pool: Batch | None, ref_id: str):
    """This round's :class:`RefLogprobs`, or None: no pool (online fakes), the cache turned off,
    or an adapter whose ``ref_logprob`` gives None (asked on one sample). ``ref_id`` is the
    reference's weights digest."""
    cfg, adapter, ref = run.cfg, run.adapter, state.ref
    if not cfg.ref_logprob_cache or pool is None:
        return None
    if adapter.ref_logprob(ref, *_rows(pool, run.device, slice(0, 1))) is None:
        return None
    real_index = round_real_index(run, state)
    ident = (ref_id, state.round, repr(adapter), cfg.seed, cfg.batch_size, cfg.steps_per_round)
    ident += (run.data.fingerprint(), tensor_digest(*pool), run.device.type)
    key = hashlib.sha256(repr(ident).encode()).hexdigest()[:16]
    path = run.out / "fakes" / "ref_logprob" / f"round-{state.round:03d}-{key}.pt"

    def build() -> dict:
        t0 = time.time()
        chunk = max(1, 2 * cfg.batch_size // run.world)  # the rows of one step's forward
        total = len(real_index) + len(pool[0])
        bar = _bar(total, f"round {state.round}: scoring with the reference", run.rank)
        on = run.device
        sources = {  # name: (rows, the chunk of rows from s on, on the device)
            "real": (len(real_index), lambda s: _rows(run.data.get(real_index[s : s + chunk]), on)),
            "fake": (len(pool[0]), lambda s: _rows(pool, on, slice(s, s + chunk))),
        }
        blob = {"real_index": real_index}
        for name, (n, batch_at) in sources.items():
            parts = []
            for s in range(0, n, chunk):
                x, labels = batch_at(s)
                parts.append(adapter.ref_logprob(ref, x, labels))
                if bar is not None:
                    bar.update(len(x))
            blob[name] = torch.cat(parts).float().cpu()
        if bar is not None:
            bar.close()
        secs = time.time() - t0
        if run.rank == 0:
            print(f"round {state.round}: reference log-probs of {total} samples in {secs:.1f}s")
        return blob

    blob = checkpoint.build_once(path, build, run.rank, run.world)
    return RefLogprobs(blob["real_index"], blob["real"], blob["fake"])


def _rows(batch: Batch, device: torch.device, rows: slice = slice(None)) -> Batch:
    x, labels = batch
    return x[rows].to(device), None if labels is None else labels[rows].to(device)


def _bar(total: int, desc: str, rank: int = 0):
    if rank != 0:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=total, disable=None, desc=desc, leave=False)
