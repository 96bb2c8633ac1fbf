"""The multi-scale residual quantiser (ddo_fast.models.quantizer): shapes, determinism, the round
trip, and VAR's teacher-forcing inputs."""

import pytest
import torch
import torch.nn.functional as F

from ddo_fast.models import MultiScaleQuantizer


def smooth_images(n: int, size: int = 8, seed: int = 0) -> torch.Tensor:
    """Blurred random images [n, 1, size, size] in about [-1, 1] (digit-like spatial structure)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, size, size, generator=g) * 2 - 1
    x = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return x + 0.3 * torch.randn(n, 1, 1, 1, generator=g)


@pytest.fixture(scope="module")
def fitted():
    x = smooth_images(300)
    q = MultiScaleQuantizer.fit(x, vocab=32, iters=10, max_points=4000, seed=0)
    return q, x


def test_shapes_and_range(fitted):
    q, x = fitted
    assert q.patch_nums == (1, 2, 4, 8) and q.seq_len == 85 and q.vocab == 32
    t = q.encode(x)
    assert t.shape == (300, 85) and t.dtype == torch.int64
    assert int(t.min()) >= 0 and int(t.max()) < 32
    assert q.decode(t).shape == x.shape
    assert [s.shape[1] for s in q.split(t)] == [1, 4, 16, 64]


def test_fit_is_deterministic(fitted):
    q, x = fitted
    again = MultiScaleQuantizer.fit(x, vocab=32, iters=10, max_points=4000, seed=0)
    assert torch.equal(q.codebook, again.codebook)
    other = MultiScaleQuantizer.fit(x, vocab=32, iters=10, max_points=4000, seed=1)
    assert not torch.equal(q.codebook, other.codebook)
    assert torch.equal(q.encode(x), q.encode(x.clone()))


def test_round_trip_error_falls_with_scales(fitted):
    q, x = fitted
    t = q.encode(x)
    errs = [(q.decode(t, scales=k) - x).square().mean().item() for k in range(1, 5)]
    assert all(a > b for a, b in zip(errs[:-1], errs[1:], strict=True)), errs
    # the last scale quantises per-pixel residuals: near-lossless with 32 scalar codes
    assert errs[-1] < 0.02 * errs[0], errs


def test_single_scale_round_trip_is_exact():
    """With one scale, decode is a codebook lookup and encode the nearest entry: encode(decode(t))
    == t for any t (distinct codebook entries)."""
    q = MultiScaleQuantizer(torch.linspace(-1, 1, 16)[:, None], patch_nums=(4,))
    t = torch.randint(0, 16, (50, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(q.encode(q.decode(t)), t)


def test_multi_scale_reencode_is_not_identity():
    """The documented limit (VAR's scheme too): the finer scales' residuals have non-zero area
    means at a coarser scale, so re-encoding can change the coarse code. Coarse code 0 (value
    0) plus a finer map of +0.75 everywhere decodes to a constant 0.75 image, which re-encodes
    as coarse code 2 (value 0.75) and a zero finer map."""
    q = MultiScaleQuantizer(torch.tensor([[0.0], [1.0], [0.75], [-0.25]]), patch_nums=(1, 2))
    t = torch.tensor([[0, 2, 2, 2, 2]])
    again = q.encode(q.decode(t))
    assert torch.allclose(q.decode(t), torch.full((1, 1, 2, 2), 0.75))
    assert again.tolist() == [[2, 0, 0, 0, 0]]
    assert torch.allclose(q.decode(again), torch.full((1, 1, 2, 2), 0.75))


def test_next_scale_inputs_match_partial_decodes(fitted):
    q, x = fitted
    t = q.encode(x[:20])
    got = q.next_scale_inputs(t)
    want = []
    for k, pn in enumerate(q.patch_nums[1:], start=1):
        f_hat = q.decode(t, scales=k)
        want.append(F.interpolate(f_hat, size=(pn, pn), mode="area").flatten(2).transpose(1, 2))
    assert got.shape == (20, 84, 1)
    torch.testing.assert_close(got, torch.cat(want, 1))
    # the last scale's tokens never enter the inputs; an earlier scale's do
    last = t.clone()
    last[:, 21:] = (last[:, 21:] + 1) % q.vocab
    assert torch.equal(q.next_scale_inputs(last), got)
    first = t.clone()
    first[:, 0] = (first[:, 0] + 1) % q.vocab
    assert not torch.equal(q.next_scale_inputs(first), got)


def test_bad_input_raises(fitted):
    q, _ = fitted
    with pytest.raises(ValueError, match="images"):
        q.encode(torch.zeros(2, 64))
    with pytest.raises(ValueError, match="tokens"):
        q.decode(torch.zeros(2, 84, dtype=torch.long))
    with pytest.raises(ValueError, match="patch_nums"):
        MultiScaleQuantizer(torch.zeros(4, 1), patch_nums=(2, 1))
    with pytest.raises(ValueError, match="codebook"):
        MultiScaleQuantizer(torch.zeros(4))
