"""The CPU large-buffer allocator (``ddo_fast._alloc``, ``csrc/cpu/large_alloc.cpp``).

The pool hands out recycled memory that still holds the previous call's values, so every
policy must give exactly the gradient of the float64 reference, including right after a call
of the same size with other values.
"""

import math

import pytest
import torch

import ddo_fast
from ddo_fast import _alloc, reference

# [2, 256, 1024] fp32 = 2 MiB: the smallest gradient the large-buffer path takes
SHAPE = (2, 256, 1024)


@pytest.fixture
def policy():
    before = _alloc.cpu_alloc()
    yield _alloc.cpu_alloc
    _alloc.cpu_alloc(before)


def _grad(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    leaf = x.detach().requires_grad_()
    (g,) = torch.autograd.grad(ddo_fast.token_logprobs(leaf, t, backend="cpp").sum(), leaf)
    return g


def _oracle(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    leaf = x.double().requires_grad_()
    logp = reference.token_logprobs_ref(leaf, t)
    (g,) = torch.autograd.grad(logp.sum(), leaf)
    return g


@pytest.mark.parametrize("name", _alloc.POLICIES)
def test_every_policy_gives_the_reference_gradient_on_reused_memory(policy, name):
    policy(name)
    gen = torch.Generator().manual_seed(0)
    for scale in (30.0, 1.0):  # the second call may get the first call's buffer back
        x = scale * torch.randn(SHAPE, generator=gen)
        t = torch.randint(SHAPE[-1], SHAPE[:2], generator=gen)
        t[0, :7] = -100  # ignored rows: their gradient must be written as zeros, not left
        g = _grad(x, t)
        torch.testing.assert_close(g.double(), _oracle(x, t), rtol=1e-5, atol=1e-7)
        del g


@pytest.mark.parametrize("name", _alloc.POLICIES)
def test_diffusion_gradient_on_reused_memory(policy, name):
    """The diffusion gradient [64, 4, 64, 64] fp32 (4 MiB) goes through the policy too: a
    recycled buffer must be fully overwritten (float64 oracle, two calls with other values)."""
    policy(name)
    gen = torch.Generator().manual_seed(1)
    shape = (64, 4, 64, 64)
    hits = _alloc.cpu_buffer_stats()["hits"]
    for scale in (30.0, 1.0):
        p, q, t = (scale * torch.randn(shape, generator=gen) for _ in range(3))
        w = torch.rand(64, generator=gen) + 0.5
        real = torch.arange(64) % 2 == 0
        leaf = p.clone().requires_grad_()
        loss = ddo_fast.diffusion_ddo_loss(leaf, q, t, w, real, beta=1e-4, backend="cpp")
        (g,) = torch.autograd.grad(loss, leaf)
        ref = p.double().requires_grad_()
        r = reference.diffusion_logratio_ref(ref, q.double(), t.double(), w.double())
        (g_ref,) = torch.autograd.grad(reference.ddo_loss_ref(r, real, beta=1e-4), ref)
        torch.testing.assert_close(g.double(), g_ref, rtol=1e-4, atol=1e-9)
        del g
    if name == "pool":  # the second call's 4 MiB gradient was the first call's buffer
        assert _alloc.cpu_buffer_stats()["hits"] > hits


def test_pool_reuses_buffers_and_is_bounded(policy):
    policy("pool")
    _alloc.release_cpu_buffers()
    x = torch.randn(SHAPE)
    t = torch.randint(SHAPE[-1], SHAPE[:2])
    start = _alloc.cpu_buffer_stats()
    del_me = _grad(x, t)
    del del_me  # back to the pool
    assert _alloc.cpu_buffer_stats()["cached"] >= x.numel() * 4
    g = _grad(x, t)
    assert _alloc.cpu_buffer_stats()["hits"] == start["hits"] + 1
    held = [g, _grad(x, t), _grad(x, t), _grad(x, t)]  # 4 alive: the pool keeps only 2
    del g
    held.clear()
    per_buffer = x.numel() * 4
    assert _alloc.cpu_buffer_stats()["cached"] <= 2 * ((per_buffer + (2 << 20) - 1) >> 21 << 21)
    assert _alloc.release_cpu_buffers() > 0
    assert _alloc.cpu_buffer_stats()["cached"] == 0


def test_leaving_the_pool_releases_it(policy):
    policy("pool")
    g = _grad(torch.randn(SHAPE), torch.randint(SHAPE[-1], SHAPE[:2]))
    del g
    assert _alloc.cpu_buffer_stats()["cached"] > 0
    assert policy("thp") == "thp"
    assert _alloc.cpu_buffer_stats()["cached"] == 0
    g = _grad(torch.randn(SHAPE), torch.randint(SHAPE[-1], SHAPE[:2]))
    del g  # freed, not cached, outside the pool policy
    assert _alloc.cpu_buffer_stats()["cached"] == 0


def test_bad_policy_names_the_argument(policy):
    with pytest.raises(ValueError, match="policy"):
        policy("huge")
    with pytest.raises(RuntimeError, match="action"):
        torch.ops.ddo_fast.cpu_buffers("nothing")


@pytest.mark.parametrize("name", _alloc.POLICIES)
def test_empty_large_hook(policy, name):
    """``ddo_fast_testing::empty_large`` (the benchmarks' floor buffer) is the kernels'
    allocator: fp32 CPU of the shape asked, 2 MiB aligned from 2 MiB up under thp/pool."""
    policy(name)
    empty_large = torch.ops.ddo_fast_testing.empty_large
    for sizes in ([3, 5], [2, 256, 1024], [0], []):
        t = empty_large(sizes)
        assert t.shape == tuple(sizes) and t.dtype == torch.float32 and t.device.type == "cpu"
        assert t.is_contiguous() and t.numel() == math.prod(sizes)
        t.fill_(2.0)  # writable over its whole extent
        assert t.sum().item() == 2.0 * t.numel()
    big = empty_large([2, 256, 1024])
    if name != "plain":
        assert big.data_ptr() % (2 << 20) == 0
    with pytest.raises(ValueError, match="`sizes`"):
        empty_large([4, -1])
